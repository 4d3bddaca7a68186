# Two commands do all the set-up on a fresh machine with Python 3.11:
#   make run   - the main job: the conformance suite (quick) against fast on the embedded tiny model
#   make test  - the project's tests (the `ci` Hypothesis profile)
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
LLAMACPP_STAMP := $(VENV)/.llamacpp-stamp
HYPOTHESIS_PROFILE ?= ci
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test conformance-deep bench bench-compare venv clean

venv: $(STAMP)

# The pinned torch is the CPU build that lies on this machine's disk; an unpinned one would pull CUDA.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[dev,ray]'
	touch $(STAMP)

run: $(STAMP)
	$(PY) -m conformance

# The long run of the suite (200 examples a check), for a nightly job: .ci/nightly runs it and
# exits non-zero on a failure. It took 44 min wall (isolated, nice 10, 2 cores shared with other
# jobs; at 322b783): scheduler 23 min, e2e 12 min, allocator 4.5 min, the other tiers ~6 min together.
conformance-deep: $(STAMP)
	$(PY) -m conformance --profile deep --report conformance-deep.json

test: $(STAMP)
	HYPOTHESIS_PROFILE=$(HYPOTHESIS_PROFILE) $(PY) -m pytest -q -n 2 tests benchmarks --benchmark-disable

# llama.cpp, the CPU peer of the benchmarks (benchmarks/bench_single.py, llamacpp_peer.py): the
# `llamacpp` extra, compiled from source for this CPU (~7+ min on 2 cores, once). `make test` never
# installs it; its cases skip without it.
$(LLAMACPP_STAMP): $(STAMP)
	CMAKE_ARGS="-DGGML_NATIVE=ON -DGGML_BLAS=OFF -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF" \
		$(PY) -m pip install -q -e '.[llamacpp]'
	touch $(LLAMACPP_STAMP)

# Benchmarks: `make bench` saves a run under .benchmarks/ and writes benchmarks/results/;
# `make bench-compare` fails if any mean is 10% slower than the newest saved run.
bench: $(LLAMACPP_STAMP)
	$(PY) -m pytest -q benchmarks --benchmark-autosave -p no:xdist
	$(PY) -m benchmarks.report

bench-compare: $(STAMP)
	$(PY) -m pytest -q benchmarks -p no:xdist --benchmark-compare --benchmark-compare-fail=mean:10%

clean:
	rm -rf $(VENV)
