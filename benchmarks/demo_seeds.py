"""Benchmark: `rlhf demo` for several seeds — do the judges improve every time?

    .venv/bin/python benchmarks/demo_seeds.py                       # seeds 0 1 2 under runs/demo-seeds/
    .venv/bin/python benchmarks/demo_seeds.py --seeds 0 1 2 --root /tmp/demo --threads 1

Each seed is one `rlhf demo --seed S --out ROOT/seed-S` in its own process (a finished run's stages
are reused, so the script can tabulate runs made earlier). Prints, per seed: reward-model
validation accuracy, PPO steps and stop criterion, final KL, toxicity, sentiment and relevance before →
after with whether their 95% bootstrap intervals separate, wall time per stage and peak memory; writes
benchmarks/results/demo_seeds.json. Target (issue 6): ≤ 10 minutes and < 4 GB per run on 2 cores,
and the judge clearly better with non-overlapping intervals in every seed. These three judges are
the parts of the scripted labelers' preference, so the report groups them as gold, not independent
(benchmarks/RESULTS.md, "What these judges are to the training").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
JUDGES = ("toxicity", "sentiment", "relevance")


def run_seed(seed: int, root: Path, threads: int) -> dict:
    out = root / f"seed-{seed}"
    cmd = [str(REPO / ".venv" / "bin" / "rlhf"), "demo", "--out", str(out), "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    t = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed}: rlhf demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    summary["invocation_seconds"] = round(time.perf_counter() - t, 1)
    return summary


def row(seed: int, s: dict) -> dict:
    out = {"seed": seed, "rm_val_accuracy": s["reward_model"]["val_accuracy"], "ppo_steps": s["ppo"]["steps"],
           "stop_reason": s["ppo"]["stop_reason"], "final_kl": s["final_kl"], "total_seconds": s["total_seconds"],
           "stage_seconds": s["stage_seconds"], "peak_rss_mb": s["peak_rss_mb"]}
    for j in JUDGES:
        d = s["judges"][j]
        out[j] = {"before": d["before"]["mean"], "after": d["after"]["mean"], "before_ci95": d["before"]["ci95"],
                  "after_ci95": d["after"]["ci95"], "improvement_pct": d["improvement_pct"], "ci_separated": d["ci_separated"]}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--root", default=str(REPO / "runs" / "demo-seeds"), help="one run folder per seed under here")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads per run (0 = torch's default)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "demo_seeds.json"))
    args = ap.parse_args()

    rows = [row(seed, run_seed(seed, Path(args.root), args.threads)) for seed in args.seeds]
    header = f"{'seed':>4} {'RM acc':>6} {'steps':>5} {'stop':<16} {'KL':>5} " + " ".join(
        f"{j + ' before→after (sep)':>34}" for j in JUDGES) + f" {'total s':>7} {'MB':>5}"
    print(header)
    for r in rows:
        cells = " ".join(f"{r[j]['before']:>10.3f} → {r[j]['after']:<8.3f} {r[j]['improvement_pct']:+6.1f}% "
                         f"{'yes' if r[j]['ci_separated'] else 'no':>3}" for j in JUDGES)
        print(f"{r['seed']:>4} {r['rm_val_accuracy']:>6.3f} {r['ppo_steps']:>5} {r['stop_reason']:<16} {r['final_kl']:>5.2f} "
              f"{cells} {r['total_seconds']:>7.1f} {r['peak_rss_mb']:>5}")
    for r in rows:
        print(f"seed {r['seed']} seconds per stage: {r['stage_seconds']}")
    result = {"rows": rows, "cpu_count": os.cpu_count(), "machine": platform.machine(), "threads": args.threads,
              "date": time.strftime("%Y-%m-%d"), "command": " ".join(sys.argv)}
    sys.path.insert(0, str(REPO))
    from rlhf.utils.io import atomic_write_json

    atomic_write_json(args.results, result)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
