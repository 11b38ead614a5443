"""Benchmark: PPO on the bundled model with a real classifier as the reward (issue 4).

    .venv/bin/python benchmarks/ppo_toxicity.py                        # 60 steps × 32 episodes
    .venv/bin/python benchmarks/ppo_toxicity.py --reward sentiment --steps 40 --threads 1

The reward is alt-profanity-check's non-toxicity logit (a linear model trained on human toxicity
labels). Prints the mean score over the first and last 5 steps, KL from the reference against the
target, β, reply length, time per stage and peak memory; writes
benchmarks/results/ppo_toxicity.json. Target: within 10 minutes on 2 CPU cores the mean score rises
clearly while KL stays near the controller's target (the KL ceiling stops the run otherwise).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
REPO = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reward", default="non-toxicity")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--init-kl-coef", type=float, default=0.3)
    ap.add_argument("--target-kl", type=float, default=4.0)
    ap.add_argument("--kl-ceiling", type=float, default=12.0)
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "ppo_toxicity.json"))
    args = ap.parse_args()

    from rlhf.config import config_to_dict
    from rlhf.engine.config import EngineConfig
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo
    from rlhf.utils.io import atomic_write_json
    from rlhf.utils.metrics import read_metrics

    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        cfg = PPOConfig(out=tmp, reward=args.reward, max_steps=args.steps, batch_size=args.batch_size,
                        init_kl_coef=args.init_kl_coef, target_kl=args.target_kl, kl_ceiling=args.kl_ceiling,
                        seed=args.seed, resume=False, progress=False,
                        engine=EngineConfig(device="cpu", threads=args.threads))
        cfg.validate()
        t0 = time.perf_counter()
        summary = run_ppo(cfg)
        wall = time.perf_counter() - t0
        rows = read_metrics(tmp)
    scores, kls = [r["score_mean"] for r in rows], [r["kl"] for r in rows]
    first, last = statistics.mean(scores[:5]), statistics.mean(scores[-5:])
    result = {"reward": args.reward, "steps": summary["steps"], "stop_reason": summary["stop_reason"],
              "score_first5": first, "score_last5": last, "score_std_first": rows[0]["score_std"],
              "kl_last10_mean": statistics.mean(kls[-10:]), "kl_max": max(kls), "target_kl": args.target_kl,
              "beta_first": rows[0]["beta"], "beta_last": rows[-1]["beta"],
              "length_first5": statistics.mean(r["response_length"] for r in rows[:5]),
              "length_last5": statistics.mean(r["response_length"] for r in rows[-5:]),
              "episodes_per_second": summary["episodes_per_second"], "stage_seconds": summary["stage_seconds"],
              "stage_share": summary["stage_share"], "wall_seconds": round(wall, 1), "peak_rss_mb": summary["peak_rss_mb"],
              "threads": args.threads, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "date": time.strftime("%Y-%m-%d"), "config": config_to_dict(cfg)}
    table = [("reward", args.reward), ("steps (stop)", f"{result['steps']} ({result['stop_reason']})"),
             ("mean score, first 5 → last 5 steps", f"{first:.3f} → {last:.3f} (step-1 std {result['score_std_first']:.3f})"),
             ("KL, mean of last 10 steps / max", f"{result['kl_last10_mean']:.2f} / {result['kl_max']:.2f} (target {args.target_kl})"),
             ("β first → last", f"{result['beta_first']:.3f} → {result['beta_last']:.3f}"),
             ("reply tokens, first 5 → last 5", f"{result['length_first5']:.1f} → {result['length_last5']:.1f}"),
             ("episodes per second", f"{result['episodes_per_second']}"),
             ("seconds per stage", ", ".join(f"{k} {v:.1f}" for k, v in result["stage_seconds"].items())),
             ("wall time", f"{wall:.1f} s"), ("peak memory", f"{result['peak_rss_mb']} MiB")]
    width = max(len(k) for k, _ in table)
    for k, v in table:
        print(f"{k:<{width}}  {v}")
    atomic_write_json(args.results, result)
    print(f"wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
