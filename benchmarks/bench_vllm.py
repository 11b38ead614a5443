"""Benchmark (GPU): rollouts through vLLM against the Hugging Face path, alone and inside PPO.

Two measurements on one CUDA GPU, each backend in its own subprocess (peak memory is that run's):

* rollout tokens/s: ``sample_tokens`` over the shipped training prompts (``--batch`` replies of
  ``--tokens`` new tokens per call, ``--calls`` calls after one warm-up), ``--rollout hf``
  (transformers' generate) against ``--rollout vllm``; greedy replies are checked equal first;
* PPO episodes/s: ``rlhf ppo`` for ``--ppo-steps`` steps of ``--batch`` episodes with each backend
  (the vLLM run syncs the policy's weights into its engine after every update); the wall time
  of the steps comes from the run's metrics, model loading excluded.

    pip install '.[vllm]'
    python benchmarks/bench_vllm.py --model bundled                       # the bundled 2.1M model
    python benchmarks/bench_vllm.py --model /path/to/hf-llama --dtype bfloat16 --batch 64 --tokens 128

Writes benchmarks/results/bench_vllm.json and prints a table. Needs a GPU and vLLM; on a machine
without them it says so and exits 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def worker_rollout(a) -> dict:
    import torch

    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord
    from rlhf.engine.config import EngineConfig
    from rlhf.engine.runtime import start
    from rlhf.models.loading import load_causal_lm, load_tokenizer, shipped_prompts
    from rlhf.rollout.backends import make_backend
    from rlhf.rollout.generate import SamplingParams, sample_tokens

    rt = start(EngineConfig(device="cuda", dtype=a.dtype, rollout=a.backend, vllm_gpu_memory=a.vllm_gpu_memory))
    tok, model = load_tokenizer(a.model), load_causal_lm(a.model, device=rt.device, dtype=rt.dtype)
    backend = make_backend(rt.engine, model, tok)
    prompts = [p.prompt for p in read_records(shipped_prompts("train"), PromptRecord)]
    batch = [prompts[i % len(prompts)] for i in range(a.batch)]
    greedy = sample_tokens(model, tok, batch[:8], SamplingParams(a.tokens, 0.0), backend=backend).texts
    params = SamplingParams(a.tokens, 1.0)
    sample_tokens(model, tok, batch, params, backend=backend, seeds=list(range(a.batch)))  # warm-up
    torch.cuda.synchronize()
    times, tokens = [], 0
    for c in range(a.calls):
        t = time.perf_counter()
        exp = sample_tokens(model, tok, batch, params, backend=backend, seeds=[c * a.batch + i for i in range(a.batch)])
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t)
        tokens += int(exp.response_mask.sum())
    return {"tokens_per_second": tokens / sum(times), "seconds_per_call": statistics.median(times), "greedy": greedy,
            "peak_gpu_mib": torch.cuda.max_memory_allocated() / 2**20}


def run_ppo(a, backend: str, work: Path) -> dict:
    out = work / f"ppo-{backend}"
    cmd = [sys.executable, "-m", "rlhf", "ppo", "--policy", a.model, "--reward", "sentiment", "--out", str(out),
           "--max-steps", str(a.ppo_steps), "--batch-size", str(a.batch), "--mini-batch-size", str(a.batch // 2),
           "--micro-batch-size", str(a.batch // 2), "--max-new-tokens", str(a.tokens), "--no-progress", "--no-resume",
           "--device", "cuda", "--dtype", a.dtype, "--rollout", backend, "--vllm-gpu-memory", str(a.vllm_gpu_memory)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, cwd=REPO)
    if proc.returncode:
        raise SystemExit(f"ppo with --rollout {backend} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if x.strip()]
    steps = rows[1:] or rows  # the first step pays for compilation and cache warm-up
    return {"episodes_per_second": len(steps) * a.batch / sum(r["time_step"] for r in steps),
            "generate_seconds_per_step": statistics.median(r["time_generate"] for r in steps),
            "score_last": rows[-1]["score_mean"],
            "sampler_logprob_gap": [r.get("sampler_logprob_gap") for r in rows]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="bundled")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--calls", type=int, default=5)
    ap.add_argument("--ppo-steps", type=int, default=6)
    ap.add_argument("--vllm-gpu-memory", type=float, default=0.3)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_vllm.json"))
    ap.add_argument("--worker", choices=["rollout"], help=argparse.SUPPRESS)
    ap.add_argument("--backend", default="hf", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print("RESULT " + json.dumps(worker_rollout(a)), flush=True)
        return 0
    import torch

    if not torch.cuda.is_available() or importlib.util.find_spec("vllm") is None:
        print("needs a CUDA GPU and vLLM (pip install '.[vllm]'); nothing measured", file=sys.stderr)
        return 2
    rollout = {}
    for backend in ("hf", "vllm"):
        cmd = [sys.executable, __file__, "--worker", "rollout", "--backend", backend] + \
              [x for k in ("model", "dtype", "batch", "tokens", "calls", "vllm_gpu_memory")
               for x in (f"--{k.replace('_', '-')}", str(getattr(a, k)))]
        proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        lines = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
        if proc.returncode or not lines:
            raise SystemExit(f"rollout with {backend} failed:\n{proc.stderr[-3000:]}")
        rollout[backend] = json.loads(lines[-1][len("RESULT "):])
    same_greedy = rollout["hf"].pop("greedy") == rollout["vllm"].pop("greedy")
    with tempfile.TemporaryDirectory(prefix="bench-vllm-") as tmp:
        ppo = {b: run_ppo(a, b, Path(tmp)) for b in ("hf", "vllm")}
    result = {"gpu": torch.cuda.get_device_name(0), "settings": {k: getattr(a, k) for k in
              ("model", "dtype", "batch", "tokens", "calls", "ppo_steps", "vllm_gpu_memory")},
              "greedy_replies_equal": same_greedy, "rollout": rollout, "ppo": ppo, "date": time.strftime("%Y-%m-%d %H:%M")}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['gpu']}, {a.model} ({a.dtype}), batch {a.batch}, {a.tokens} new tokens; greedy replies equal: {same_greedy}")
    print(f"| | HF generate | vLLM | vLLM/HF |\n| --- | --- | --- | --- |")
    for name, x, y in [("rollout tokens/s", rollout["hf"]["tokens_per_second"], rollout["vllm"]["tokens_per_second"]),
                       ("PPO episodes/s", ppo["hf"]["episodes_per_second"], ppo["vllm"]["episodes_per_second"])]:
        print(f"| {name} | {x:.1f} | {y:.1f} | {y / x:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
