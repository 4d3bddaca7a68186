"""On a CUDA machine: the whole engine on the GPU, proved equal to the oracle (run by gpu.sh).

fast runs on `cuda` through the `mp` executor (a worker process in a one-rank NCCL process group:
the same code path as tensor parallelism, with TP=1) and through the in-process `uni` executor,
both with the auto-picked attention backend (Triton on CUDA); the oracle runs on the CPU. Each
is compared with the oracle under the SPEC rule (`conformance/compare.py`). Writes
`gpu_engine_check.json` into --out and exits non-zero on any difference.

    python benchmarks/gpu_engine_check.py --out DIR
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/gpu_results")
    args = ap.parse_args(argv)
    import torch

    from conformance.compare import check_request_outputs
    from fast import LLM, SamplingParams
    from ref import LLM as RefLLM
    from ref.models import tiny_checkpoint

    model = str(tiny_checkpoint())
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 40, 17, 90, 9, 64)]
    params = [SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=3),
              SamplingParams(temperature=0.8, seed=7, max_tokens=24, n=2, prompt_logprobs=2),
              SamplingParams(temperature=1.0, top_p=0.9, seed=3, max_tokens=16)] * 2
    oracle = RefLLM(model, max_model_len=256)
    expected = oracle.generate(prompts, params)
    results = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else "none"}
    ok = True
    for backend in ("mp", "uni"):
        t0 = time.perf_counter()
        try:
            llm = LLM(model, device="cuda", max_model_len=256, distributed_executor_backend=backend,
                      num_kv_blocks=64, block_size=16)
            try:
                got = llm.generate(prompts, params, use_tqdm=False)
            finally:
                llm.shutdown()
            check_request_outputs(oracle.llm_engine.model, oracle.llm_engine.model_config.eos_token_ids,
                                  [(p["prompt_token_ids"], sp) for p, sp in zip(prompts, params)], expected, got)
            results[backend] = {"status": "passed", "seconds": round(time.perf_counter() - t0, 2)}
        except Exception:  # noqa: BLE001 - every failure is reported in the JSON
            ok = False
            results[backend] = {"status": "failed", "error": traceback.format_exc()[-4000:]}
        print(backend, results[backend]["status"], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu_engine_check.json").write_text(json.dumps(results, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
