"""Benchmark: the decode step under three routings of the fp32 linear layers (rlhf/models/cpu_gemm.py).

    .venv/bin/python benchmarks/bench_gemm_routing.py                        # SmolLM2, batch 16, 2 threads
    .venv/bin/python benchmarks/bench_gemm_routing.py --model bundled --threads 1

* ``split``: what ``--cpu-gemm auto`` does: each layer shape takes oneDNN or MKL by its own timing,
  separately for training-sized products and decode-sized ones (up to 64 rows);
* ``training verdict``: every product follows the training-sized timing (auto before decode-sized
  products were timed on their own);
* ``blas``: torch's MKL everywhere.

The model is loaded once with ``auto``; the variants only flip the layers' per-regime flags, and run
alternately, round after round (medians in the table; the machine is shared). Each round samples the
same prompts with the same seed: ``sample_response_ids`` (the fast loop), temperature 0.7, EOS made
unreachable so every round decodes exactly --new-tokens steps. ms/step = wall time / steps, prefill
included. Writes benchmarks/results/bench_gemm_routing.json (one entry per model and thread count).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from bench_generate import decode_bench_setup, encode_prompts  # noqa: E402  (the decoding benchmark's prompts and loading)

VARIANTS = ("split", "training verdict", "blas")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2", help="a named model (smollm2, bundled) or a local HF causal LM folder")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_gemm_routing.json"))
    args = ap.parse_args()

    from rlhf.models import cpu_gemm
    from rlhf.rollout import decode
    from rlhf.rollout.generate import SamplingParams
    from rlhf.utils.io import atomic_write_json

    tok, model = decode_bench_setup(args.model, args.threads)
    enc = encode_prompts(tok, args.batch)
    layers = [m for m in model.modules() if "forward" in m.__dict__ and hasattr(m, "_onednn_small")]
    timed = {id(m): (m._onednn_large, m._onednn_small) for m in layers}
    routes = sorted({(f"{m.in_features}x{m.out_features}", *timed[id(m)]) for m in layers})
    print(f"{cpu_gemm.cpu_model()}, {args.threads} thread(s); layer shapes on oneDNN (training-sized, decode-sized):")
    for shape, large, small in routes:
        print(f"  {shape}: {'oneDNN' if large else 'MKL'}, {'oneDNN' if small else 'MKL'}")

    def route(variant: str) -> None:
        for m in layers:
            large, small = timed[id(m)]
            m._onednn_large, m._onednn_small = {"split": (large, small), "training verdict": (large, large),
                                                "blas": (False, False)}[variant]

    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7)
    settings = decode.DecodeSettings(threads=args.threads)
    unreachable = len(tok) + 10  # an EOS id no token has: every round decodes --new-tokens steps

    def run() -> float:
        torch.manual_seed(0)
        t = time.perf_counter()
        with torch.no_grad():
            out = decode.sample_response_ids(model, enc["input_ids"], enc["attention_mask"], params, unreachable,
                                             tok.pad_token_id, settings)
        return (time.perf_counter() - t) / out.tokens.shape[1] * 1e3

    ms = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up: oneDNN builds its primitives, the cache its buffers
        route(v)
        run()
    loads = []
    for r in range(args.rounds):
        for v in VARIANTS:
            route(v)
            ms[v].append(run())
        loads.append(os.getloadavg()[0])
        print(f"round {r + 1}: " + ", ".join(f"{v} {ms[v][-1]:.1f}" for v in VARIANTS) + f" ms/step (load {loads[-1]:.2f})")
    med = {v: statistics.median(ms[v]) for v in VARIANTS}
    print(f"\n| routing | ms/step (median of {args.rounds}) | vs split |\n| --- | --- | --- |")
    for v in VARIANTS:
        print(f"| {v} | {med[v]:.1f} | {med[v] / med['split']:.2f}x |")

    path_out = Path(args.results)
    results = json.loads(path_out.read_text()) if path_out.is_file() else {}
    results[f"{args.model} | {args.threads} threads"] = {
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_gemm.cpu_model(),
        "batch": args.batch, "new_tokens": args.new_tokens, "rounds": args.rounds, "load_average": loads,
        "layer_routes": {shape: {"training_sized": large, "decode_sized": small} for shape, large, small in routes},
        "ms_per_step": ms, "median_ms_per_step": med}
    atomic_write_json(path_out, results)
    print(f"wrote {path_out}")


if __name__ == "__main__":
    main()
