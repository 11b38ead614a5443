"""Benchmark: the decode loop's one-token step through the model's forward() against the lean step.

    .venv/bin/python benchmarks/bench_lean_step.py                                   # bundled, batch 16 and 32, 1 thread
    .venv/bin/python benchmarks/bench_lean_step.py --model smollm2 --batches 16 --threads 2 --new-tokens 12

rlhf/rollout/lean_step.py runs a Llama-style decoder's step as calls to its own submodules, without
transformers' per-call machinery. Here the same model (loaded once, ``--cpu-gemm auto`` as every
command uses it) samples the same prompts with the same per-episode random numbers, alternating the
two steps round after round (the machine may be shared; the table shows medians and the best of
the rounds). EOS is made unreachable, so every call decodes exactly --new-tokens steps; ms/step =
wall time / steps, the prefill included. The first lean call also passes the once-per-model check
against the full forward (outside the timed rounds). Writes benchmarks/results/bench_lean_step.json
(one entry per model, batch and thread count).
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

from bench_generate import decode_bench_setup, encode_prompts  # noqa: E402  (the decoding benchmark's prompts and loading)

STEPS = ("full forward", "lean step")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="bundled", help="a named model (bundled, smollm2) or a local HF causal LM folder")
    ap.add_argument("--batches", type=int, nargs="+", default=[16, 32])
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_lean_step.json"))
    args = ap.parse_args()

    from rlhf.models import cpu_gemm
    from rlhf.rollout import decode
    from rlhf.rollout.lean_step import lean_problem
    from rlhf.utils.io import atomic_write_json

    tok, model = decode_bench_setup(args.model, args.threads)
    state = decode._state(model)
    problem = lean_problem(model)
    if problem:
        raise SystemExit(f"the lean step does not take {args.model}: {problem}")
    print(f"{cpu_gemm.cpu_model()}, {args.threads} thread(s), {args.model}, {args.new_tokens} tokens")

    path_out = Path(args.results)
    results = json.loads(path_out.read_text()) if path_out.is_file() else {}
    for batch in args.batches:
        ms, loads = measure(model, tok, state, batch, args)
        med = {s: statistics.median(ms[s]) for s in STEPS}
        best = {s: min(ms[s]) for s in STEPS}
        print(f"\nbatch {batch}\n| step | ms/step, median of {args.rounds} | best | per round |\n| --- | --- | --- | --- |")
        for s in STEPS:
            print(f"| {s} | {med[s]:.2f} | {best[s]:.2f} | {', '.join(f'{x:.2f}' for x in ms[s])} |")
        print(f"full/lean: {med['full forward'] / med['lean step']:.2f}x on medians, "
              f"{best['full forward'] / best['lean step']:.2f}x on the bests (load {min(loads):.2f}-{max(loads):.2f})")
        results[f"{args.model} | batch {batch} | {args.threads} threads"] = {
            "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), "cpu": cpu_gemm.cpu_model(),
            "new_tokens": args.new_tokens, "rounds": args.rounds, "load_average": loads, "ms_per_step": ms,
            "median_ms_per_step": med, "speedup_median": med["full forward"] / med["lean step"]}
    atomic_write_json(path_out, results)
    print(f"wrote {path_out}")


def measure(model, tok, state, batch: int, args) -> tuple[dict[str, list[float]], list[float]]:
    from rlhf.rollout import decode
    from rlhf.rollout.generate import SamplingParams

    enc = encode_prompts(tok, batch)
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.7)
    settings = decode.DecodeSettings(threads=args.threads)
    unreachable = len(tok) + 10  # an EOS id no token has: every call decodes --new-tokens steps
    uniforms = decode.episode_uniforms(list(range(batch)), args.new_tokens)

    verdict = None  # the lean step's: None until the first lean call has checked it

    def run(step: str) -> float:
        state.lean = False if step == "full forward" else verdict
        t = time.perf_counter()
        out = decode.sample_response_ids(model, enc["input_ids"], enc["attention_mask"], params, unreachable,
                                         tok.pad_token_id, settings, uniforms=uniforms)
        return (time.perf_counter() - t) / out.tokens.shape[1] * 1e3

    for step in STEPS:  # warm-up, and the lean step's one-time check against the full forward
        run(step)
    verdict = state.lean
    if verdict is not True:
        raise SystemExit("the lean step failed its check against the full forward on this model (see the log)")
    ms: dict[str, list[float]] = {s: [] for s in STEPS}
    loads = []
    for r in range(args.rounds):
        for step in (STEPS if r % 2 == 0 else STEPS[::-1]):
            ms[step].append(run(step))
        loads.append(os.getloadavg()[0])
        print(f"batch {batch} round {r + 1}: " + ", ".join(f"{s} {ms[s][-1]:.2f}" for s in STEPS) + f" ms/step (load {loads[-1]:.2f})")
    return ms, loads


if __name__ == "__main__":
    main()
