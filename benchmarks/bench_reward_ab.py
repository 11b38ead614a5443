"""Benchmark: what each reward-training optimisation is worth, one switch at a time.

Runs ``rlhf reward train`` on the hh-harmless training pairs with the settings of
bench_reward_trl.py (MiniLM, 16 pairs a step, max length 128, lr 1e-4, dropout off, 2 threads,
no validation) for --steps steps, in three variants:

    blas-padded     --cpu-gemm blas     --no-packing   (MKL products, right-padded batches)
    blas-packed     --cpu-gemm blas     --packing      (padding-free batches alone)
    onednn-packed   --cpu-gemm onednn   --packing      (every linear layer through oneDNN)
    auto-packed     --cpu-gemm auto     --packing      (the default: per shape, whichever was timed faster here)

Variants alternate, forward then backward (a b c c b a ...), each run its own process; the table
shows medians of pairs/s (the training loop, from summary.json) and peak RSS.

    .venv/bin/python benchmarks/bench_reward_ab.py                  # 2 runs of each, 40 steps
    .venv/bin/python benchmarks/bench_reward_ab.py --repeats 3 --steps 60

Writes benchmarks/results/bench_reward_ab.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh-harmless" / "train.jsonl.gz"
VARIANTS = {"blas-padded": ("blas", "--no-packing"), "blas-packed": ("blas", "--packing"),
            "onednn-packed": ("onednn", "--packing"), "auto-packed": ("auto", "--packing")}


def run(name: str, steps: int, threads: int, work: Path, data: Path = DATA) -> dict:
    gemm, packing = VARIANTS[name]
    out = work / f"{name}-{time.monotonic_ns()}"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "rlhf", "reward", "train", "--pairs", str(data),
           "--out", str(out), "--max-steps", str(steps), "--batch-size", "16", "--max-length", "128", "--lr", "1e-4",
           "--head-lr", "0", "--freeze-layers", "0", "--val-fraction", "0", "--skip-bad-pairs", "--threads", str(threads), "--no-resume", "--no-dropout", packing,
           "--cpu-gemm", gemm, "--device", "cpu"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)  # `-m rlhf` imports from cwd first
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    return {"pairs_per_second": summary["pairs_per_second"], "train_seconds": summary["seconds"],
            "packing": summary["packing"], "peak_rss_mb": round(int(proc.stderr.strip().splitlines()[-1]) / 1024),
            "load_avg_1m": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant (alternating order)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_reward_ab.json"))
    ap.add_argument("--data", type=Path, default=DATA, help="hh-harmless training pairs")
    a = ap.parse_args()
    if not a.data.is_file():
        print(f"hh-harmless not found at {a.data}", file=sys.stderr)
        return 2
    runs: dict[str, list[dict]] = {name: [] for name in VARIANTS}
    with tempfile.TemporaryDirectory(prefix="bench-reward-ab-") as tmp:
        for r in range(a.repeats):
            for name in (list(VARIANTS) if r % 2 == 0 else list(VARIANTS)[::-1]):
                res = run(name, a.steps, a.threads, Path(tmp), a.data)
                runs[name].append(res)
                print(f"{name:<14} {res['pairs_per_second']:6.2f} pairs/s  {res['peak_rss_mb']:5d} MiB  "
                      f"(load {res['load_avg_1m']})", flush=True)
    base = statistics.median(x["pairs_per_second"] for x in runs["blas-padded"])
    print(f"\nmedians of {a.repeats} runs, {a.steps} steps x 16 pairs, {a.threads} threads")
    print(f"{'variant':<16}{'pairs/s':>9}{'vs blas-padded':>16}{'peak MiB':>10}")
    median = {}
    for name, rows in runs.items():
        pps = statistics.median(x["pairs_per_second"] for x in rows)
        rss = statistics.median(x["peak_rss_mb"] for x in rows)
        median[name] = {"pairs_per_second": pps, "peak_rss_mb": rss, "speedup": round(pps / base, 3)}
        print(f"{name:<16}{pps:>9.2f}{pps / base:>15.2f}x{rss:>10.0f}")
    from rlhf.utils.io import atomic_write_json

    atomic_write_json(a.results, {"date": time.strftime("%Y-%m-%d %H:%M"), "steps": a.steps, "threads": a.threads,
                                  "command": " ".join([".venv/bin/python", "benchmarks/bench_reward_ab.py", *sys.argv[1:]]),
                                  "runs": runs, "median": median})
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
