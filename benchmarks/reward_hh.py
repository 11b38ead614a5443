"""Benchmark: train the default reward model (all-MiniLM-L6-v2 encoder) on hh-harmless and report
validation accuracy, wall time, training throughput and peak memory.

    .venv/bin/python benchmarks/reward_hh.py            # defaults: the recipe the docs recommend
    .venv/bin/python benchmarks/reward_hh.py --epochs 1 --max-length 96

Reads ../shared/data/hh-harmless (real human harmlessness judgements; not in the repository),
writes benchmarks/results/reward_hh.json. Target: ≥ 62% validation accuracy in ≤ 15 minutes on
2 CPU cores; always choosing the shorter reply scores about 56%.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh-harmless"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA), help="hh-harmless folder (train.jsonl.gz, validation.jsonl.gz)")
    ap.add_argument("--base", default="minilm", help="reward backbone (default: the packaged MiniLM encoder)")
    ap.add_argument("--epochs", type=float, default=2.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--head-lr", type=float, default=3e-3, help="reward head learning rate (0 = --lr)")
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--freeze-layers", type=int, default=2, help="freeze the embeddings and the lowest N layers")
    ap.add_argument("--freeze-embeddings", action="store_true")
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--pooling", default="auto")
    ap.add_argument("--margin", type=float, default=0.0)
    ap.add_argument("--center-coef", type=float, default=0.0)
    ap.add_argument("--patience", type=int, default=0)
    ap.add_argument("--eval-every", type=int, default=25, help="validate every N steps (0 = each epoch)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (the target is for 2 cores)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="run folder (default: a temporary folder, removed afterwards)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "reward_hh.json"))
    args = ap.parse_args()

    data = Path(args.data)
    if not (data / "train.jsonl.gz").is_file():
        print(f"hh-harmless not found at {data}; see its README in ../shared/data", file=sys.stderr)
        return 2

    from rlhf.config import config_to_dict
    from rlhf.engine.config import EngineConfig
    from rlhf.train.reward import RewardTrainConfig, train_reward_model
    from rlhf.train.reward_commands import evaluate_scorer
    from rlhf.train.reward import read_pairs
    from rlhf.utils.io import atomic_write_json
    from rlhf.utils.metrics import peak_rss_mb

    tmp = tempfile.TemporaryDirectory(prefix="reward-hh-") if args.out is None else None
    out = Path(args.out or tmp.name)
    cfg = RewardTrainConfig(pairs=str(data / "train.jsonl.gz"), val_pairs=str(data / "validation.jsonl.gz"),
                            out=str(out), base=args.base, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                            max_length=args.max_length, eval_every=args.eval_every, skip_bad_pairs=True,
                            head_lr=args.head_lr, warmup_ratio=args.warmup_ratio, freeze_layers=args.freeze_layers,
                            freeze_embeddings=args.freeze_embeddings, dropout=not args.no_dropout, pooling=args.pooling,
                            margin=args.margin, center_coef=args.center_coef, patience=args.patience,
                            seed=args.seed, resume=False, engine=EngineConfig(device="cpu", threads=args.threads))
    cfg.validate()
    t0 = time.perf_counter()
    summary = train_reward_model(cfg)
    wall = time.perf_counter() - t0
    val_pairs, _ = read_pairs(cfg.val_pairs, True)
    final = evaluate_scorer(summary["model"], val_pairs, "cpu")
    from rlhf.utils.metrics import read_metrics

    # The kept model is the best of several validations on these same pairs, which flatters it a
    # little; the whole curve (and its last point, no selection) is recorded to show by how much.
    curve = {m["step"]: m["val_accuracy"] for m in read_metrics(out) if "val_accuracy" in m}
    baseline = evaluate_scorer("length", val_pairs, "cpu")  # longer = worse: the flip is the shorter-reply rule
    result = {
        "val_accuracy": final["accuracy"], "val_pairs": final["pairs"], "val_mean_margin": final["mean_margin"],
        "val_accuracy_by_length": final["accuracy_by_length"], "val_curve": curve,
        "val_accuracy_last": curve[max(curve)] if curve else None,
        "shorter_reply_baseline": final["shorter_reply_baseline"], "length_scorer_accuracy": baseline["accuracy"],
        "wall_seconds_total": round(wall, 1), "train_seconds": summary["seconds"],
        "pairs_per_second": summary["pairs_per_second"], "peak_rss_mb": round(peak_rss_mb()),
        "train_pairs": summary["train_pairs"], "skipped_pairs": summary["skipped_pairs"], "steps": summary["steps"],
        "truncation": summary["truncation"], "threads": args.threads, "cpu_count": os.cpu_count(),
        "machine": platform.machine(), "python": platform.python_version(),
        "config": config_to_dict(cfg),
    }
    # CPU seconds of this process: on a shared machine wall time grows with other people's load,
    # CPU time much less so (wall ≈ CPU / threads when the cores are free).
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result["cpu_seconds"] = round(ru.ru_utime + ru.ru_stime, 1)
    result["load_avg_1m_at_end"] = round(os.getloadavg()[0], 2)
    result["date"] = time.strftime("%Y-%m-%d %H:%M")
    atomic_write_json(args.results, result)
    rows = [("validation accuracy", f"{result['val_accuracy']:.3f} on {result['val_pairs']} pairs (best of "
                                    f"{len(curve) - 1} validations; last {result['val_accuracy_last']:.3f})"),
            ("shorter-reply baseline", f"{result['shorter_reply_baseline']:.3f}"),
            ("wall time (load+train+eval)", f"{wall / 60:.1f} min"),
            ("CPU time (all threads)", f"{result['cpu_seconds'] / 60:.1f} min; load average {result['load_avg_1m_at_end']}"),
            ("training throughput", f"{result['pairs_per_second']} pairs/s"),
            ("peak memory", f"{result['peak_rss_mb']} MiB"),
            ("prompts cut / replies cut", f"{result['truncation']['prompts_cut']} / {result['truncation']['replies_cut']}"
                                          f" of {result['truncation']['sequences']} sequences")]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print(f"wrote {args.results}")
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
