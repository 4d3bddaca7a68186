#!/usr/bin/env bash
# On a CUDA machine: run the attention-kernel tests on the GPU, check the engine on the GPU against
# the oracle, measure decode attention bandwidth as a fraction of the device's peak
# (benchmarks/gpu_bandwidth.py), fast's end-to-end throughput beside HF generate and the GEMM
# floor (benchmarks/gpu_throughput.py), and run the conformance suite (quick) against fast on the GPU.
#
#   benchmarks/gpu.sh            # results in $OUT if set, else benchmarks/gpu_results/
#   PYTHON=/path/to/python benchmarks/gpu.sh
#
# Uses $PYTHON (default python3) when it imports a CUDA torch and triton; otherwise makes a venv
# in $TMPDIR and pip-installs torch and triton (needs the network). Budget: under 10 minutes on
# an H200 (tests <= 100 s, engine check <= 60 s, bandwidth <= 60 s, throughput <= 120 s,
# conformance <= 150 s, decode profile <= 90 s; measured 2026-11-30 without the profile: 5.6 min;
# a fresh torch install adds ~1 min). The structured tier of the
# conformance suite needs xgrammar; without it that tier fails at import and the others run.
# Exit status: non-zero when the tests or the measurement failed.
#
# Through this workplace's device tool (its machine has torch, triton, pytest, hypothesis but no
# network): carry xgrammar, jsonschema, hypothesis-jsonschema and their missing dependencies as
# cp312 wheels in .whl (the tool's README says how), install them with
# `pip install --no-index --no-deps --target /tmp/site .whl/*.whl` and PYTHONPATH=/tmp/site, run
# with OUT=/tmp/res, then `tar czf $OUT/gpu_results.tar.gz -C /tmp/res .`: at most 8 files come back.
set -uo pipefail
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."

OUT_DIR="${OUT:-benchmarks/gpu_results}"
mkdir -p "$OUT_DIR"
LOG="$OUT_DIR/gpu_log.txt"
log() { echo "[gpu.sh $(date +%H:%M:%S)] $*" | tee -a "$LOG"; }

if ! nvidia-smi -L > /dev/null 2>&1; then
    log "no NVIDIA GPU visible (nvidia-smi -L failed): nothing to measure; the CPU tests are 'make test'"
    exit 3
fi

PY="${PYTHON:-python3}"
if ! "$PY" -c "import torch, triton; assert torch.cuda.is_available()" 2>/dev/null; then
    VENV="${TMPDIR:-/tmp}/pagedlm-gpu-venv"
    log "$PY lacks a CUDA torch or triton: installing both into $VENV"
    "$PY" -m venv "$VENV" && PY="$VENV/bin/python"
    "$PY" -m pip install -q --upgrade pip
    if ! "$PY" -m pip install -q torch triton; then
        log "pip install torch triton failed (no network?); cannot continue"
        exit 2
    fi
fi
if ! "$PY" -c "import hypothesis, pytest" 2>/dev/null; then
    "$PY" -m pip install -q hypothesis pytest || log "pip install hypothesis pytest failed: tests will not run"
fi
# The project is used from this checkout (PYTHONPATH), not installed; its other runtime deps
# are only needed if its package imports pull them in.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if ! "$PY" -c "import fast.attention, ref.paged_reference, conformance.compare" 2>>"$LOG"; then
    log "importing the project failed; trying pip install -e ."
    "$PY" -m pip install -q -e . || log "pip install -e . failed"
fi
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"
nvidia-smi > "$OUT_DIR/nvidia_smi.txt" 2>&1 || true

log "kernel tests on the GPU (ci profile)"
HYPOTHESIS_PROFILE=ci timeout 100 "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_attention_triton.py tests/test_store_kv.py tests/test_attention_api.py \
    2>&1 | tee "$OUT_DIR/gpu_tests.txt"
tests_rc=${PIPESTATUS[0]}
log "tests exit status $tests_rc"

log "the engine on the GPU vs the oracle (mp executor with NCCL, TP=1; and uni)"
timeout 60 "$PY" benchmarks/gpu_engine_check.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_engine_check.txt"
engine_rc=${PIPESTATUS[0]}
log "engine check exit status $engine_rc"

log "decode bandwidth"
timeout 60 "$PY" benchmarks/gpu_bandwidth.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_bandwidth.txt"
bench_rc=${PIPESTATUS[0]}
log "bandwidth exit status $bench_rc; report: $OUT_DIR/gpu_bandwidth.md"

log "end-to-end throughput (fast, HF generate, GEMM floor)"
timeout 120 "$PY" benchmarks/gpu_throughput.py --out "$OUT_DIR" 2>&1 | tee "$OUT_DIR/gpu_throughput.txt"
throughput_rc=${PIPESTATUS[0]}
log "throughput exit status $throughput_rc; report: $OUT_DIR/gpu_throughput.md"

log "conformance suite, quick profile, against fast on the GPU"
timeout 150 "$PY" -m conformance --profile quick --timeout 120 --report "$OUT_DIR/conformance.json" \
    2>&1 | tee "$OUT_DIR/conformance.txt"
conformance_rc=${PIPESTATUS[0]}
log "conformance exit status $conformance_rc"

log "where a decode step's time goes on the GPU (informational: its status does not count)"
timeout 90 "$PY" -m benchmarks.profile_decode --device cuda --batch 256 --context 512 --steps 20 \
    > "$OUT_DIR/profile_decode_gpu.txt" 2>&1
log "profile exit status $?; report: $OUT_DIR/profile_decode_gpu.txt"

[ "$tests_rc" -eq 0 ] && [ "$engine_rc" -eq 0 ] && [ "$bench_rc" -eq 0 ] && [ "$throughput_rc" -eq 0 ] \
    && [ "$conformance_rc" -eq 0 ]
