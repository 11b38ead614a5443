"""Benchmark: PPO, DPO and GRPO side by side on the demo task, one set of labels per seed.

    .venv/bin/python benchmarks/compare_algos.py                          # seeds 0 1 2 under runs/compare-algos/
    .venv/bin/python benchmarks/compare_algos.py --seeds 0 --threads 1 --root /tmp/cmp

For each seed, the demo's shared stages (generate, label with the scripted labelers, pairs, reward
model) run once (``rlhf demo --algo dpo --out ROOT/seed-S/shared``, the cheapest training stage);
their outputs are then copied into one folder per algorithm and ``rlhf demo --algo A`` runs there
in its own process, which finds them done and runs only its training stage, the evaluation and the
report. So the three algorithms learn from the same rankings (and PPO/GRPO from the same reward
model) and are judged on the same held-out prompts with the same sampling seeds.

Per algorithm and seed the table gives the judges before → after with 95% bootstrap intervals
(toxicity, sentiment, relevance: judges no method trained on; the labelers' preference, the gold
judge; the reward model), the final KL from the reference (nats per reply, from the evaluation's
samples), the training stage's wall seconds and the peak memory of the process that trained
(``peak_rss_mb`` of the training stage's summary: model loading and training, before evaluation).
Writes benchmarks/results/compare_algos.json and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
ALGOS = ("ppo", "dpo", "grpo")
SHARED = ("completions.jsonl", "labels.sqlite", "rankings.jsonl", "labeling.json", "pairs.jsonl", "reward", "stages.json")
INDEPENDENT = ("toxicity", "sentiment", "relevance")


def demo(out: Path, algo: str, seed: int, threads: int) -> dict:
    cmd = [sys.executable, "-m", "rlhf", "demo", "--algo", algo, "--out", str(out), "--seed", str(seed)]
    if threads:
        cmd += ["--threads", str(threads)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=REPO)
    if proc.returncode != 0:
        raise SystemExit(f"seed {seed} {algo}: rlhf demo failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads((out / "summary.json").read_text())


def run_seed(seed: int, root: Path, threads: int, algos: tuple[str, ...]) -> dict[str, dict]:
    shared = root / f"seed-{seed}" / "shared"
    if not (shared / "summary.json").is_file():
        demo(shared, "dpo", seed, threads)
    out = {}
    for algo in algos:
        folder = root / f"seed-{seed}" / algo
        if not (folder / "summary.json").is_file():
            folder.mkdir(parents=True, exist_ok=True)
            for name in SHARED:
                src, dst = shared / name, folder / name
                if src.is_dir():
                    shutil.copytree(src, dst, dirs_exist_ok=True)
                elif src.is_file():
                    shutil.copy2(src, dst)
            stages = json.loads((folder / "stages.json").read_text())
            (folder / "stages.json").write_text(json.dumps({k: v for k, v in stages.items() if k in
                                                            ("generate", "label", "pairs", "reward")}))
        load = os.getloadavg()[0]
        summary = demo(folder, algo, seed, threads)
        summary["load_average_before"] = load
        summary["training"] = json.loads((folder / algo / "summary.json").read_text())
        out[algo] = summary
    return out


def row(algo: str, seed: int, s: dict) -> dict:
    judges = s["judges"]
    gold = s["config"]["labeler_scorer"]
    rm = next(k for k in judges if k.startswith("rm:"))
    picked = {**{j: j for j in INDEPENDENT}, "gold": gold, "reward model": rm}
    r = {"algo": algo, "seed": seed, "steps": s["ppo"]["steps"], "stop_reason": s["ppo"]["stop_reason"],
         "final_kl": s["final_kl"], "train_seconds": s["stage_seconds"].get(algo),
         "train_peak_rss_mb": s["training"].get("peak_rss_mb"), "demo_peak_rss_mb": s["peak_rss_mb"],
         "load_average_before": s["load_average_before"]}
    for name, key in picked.items():
        d = judges[key]
        r[name] = {"before": d["before"]["mean"], "after": d["after"]["mean"], "before_ci95": d["before"]["ci95"],
                   "after_ci95": d["after"]["ci95"], "ci_separated": d["ci_separated"],
                   "higher_is_better": d["higher_is_better"]}
    return r


def cell(j: dict) -> str:
    better = (j["after"] > j["before"]) == j["higher_is_better"]
    sep = ("better" if better else "worse") if j["ci_separated"] else "overlap"
    return (f"{j['before']:.3f} → {j['after']:.3f} [{j['after_ci95'][0]:.3f}, {j['after_ci95'][1]:.3f}] ({sep})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--algos", nargs="+", default=list(ALGOS), choices=ALGOS)
    ap.add_argument("--root", default=str(REPO / "runs" / "compare-algos"))
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads per run (0 = torch's default)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "compare_algos.json"))
    a = ap.parse_args()

    started = {"date": time.strftime("%Y-%m-%d %H:%M"), "load_average_at_start": os.getloadavg()}
    rows = []
    for seed in a.seeds:
        for algo, summary in run_seed(seed, Path(a.root), a.threads, tuple(a.algos)).items():
            rows.append(row(algo, seed, summary))
            r = rows[-1]
            print(f"seed {seed} {algo}: KL {r['final_kl']:.2f}, train {r['train_seconds']} s, {r['train_peak_rss_mb']} MiB",
                  file=sys.stderr, flush=True)
    names = ("toxicity", "sentiment", "relevance", "gold", "reward model")
    print("| algo | seed | steps (stop) | " + " | ".join(f"{n} before → after [95% CI after]" for n in names)
          + " | final KL | train s | train peak MiB |")
    print("| --- " * (len(names) + 6) + "|")
    for r in rows:
        print(f"| {r['algo']} | {r['seed']} | {r['steps']} ({r['stop_reason']}) | " + " | ".join(cell(r[n]) for n in names)
              + f" | {r['final_kl']:.2f} | {r['train_seconds']} | {r['train_peak_rss_mb']} |")
    print("\nmedians over seeds:")
    for algo in a.algos:
        mine = [r for r in rows if r["algo"] == algo]
        med = {n: statistics.median(r[n]["after"] for r in mine) for n in names}
        print(f"  {algo}: " + ", ".join(f"{n} {v:.3f}" for n, v in med.items())
              + f", KL {statistics.median(r['final_kl'] for r in mine):.2f}, train "
                f"{statistics.median(r['train_seconds'] for r in mine):.0f} s, "
                f"{statistics.median(r['train_peak_rss_mb'] for r in mine):.0f} MiB; CIs separated in the better "
                f"direction: " + ", ".join(f"{n} {sum(r[n]['ci_separated'] and ((r[n]['after'] > r[n]['before']) == r[n]['higher_is_better']) for r in mine)}/{len(mine)}" for n in names))
    result = {**started, "load_average_at_end": os.getloadavg(), "threads": a.threads, "rows": rows,
              "command": " ".join(sys.argv), "cpu_count": os.cpu_count()}
    sys.path.insert(0, str(REPO))
    from rlhf.utils.io import atomic_write_json

    atomic_write_json(a.results, result)
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
