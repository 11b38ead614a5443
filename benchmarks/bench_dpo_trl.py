"""Benchmark: our DPO (``rlhf dpo``) against TRL 1.16's ``DPOTrainer`` on identical settings.

Same starting policy (the bundled 2.1M Llama, or the randomly initialised ~28M Llama that
benchmarks/bench_ppo.py builds), the same preference pairs (the bundled corpus's tones for one
prompt: polite > curt > off-topic > rude, training phrasings only), handed to TRL as the chat-
formatted prompt text and the reply (TRL appends EOS): the worker checks that TRL's token ids equal
ours for every pair. Same batch size, epochs, learning rate, linear schedule and warmup, β, sigmoid
loss, max length, clipping; fp32, no gradient checkpointing, dropout off, fused AdamW on both sides,
one torch thread. Each run is its own subprocess (peak RSS is that run's own); runs alternate
ours / TRL / TRL-with-precomputed-reference, rotating who goes first, and the table shows medians.

Throughput is training pairs per second of reference scoring plus the training loop: ours
(``reference_seconds`` + the loop, which includes its final checkpoint), TRL (``train_runtime``,
whose steps each run the reference, or with ``precompute_ref_log_probs`` its precompute pass timed
separately plus ``train_runtime``). Model loading and tokenization are outside both. Quality:
afterwards both policies are scored the same way on held-out pairs (the held-out phrasing of each
topic, never trained on): implicit-reward accuracy and margin, β·(log π − log π_ref) with the
starting model as reference.

    .venv/bin/python benchmarks/bench_dpo_trl.py                      # both models, 3 rounds
    .venv/bin/python benchmarks/bench_dpo_trl.py --models bundled --rounds 1

TRL lives in .venv-trl (torch==2.13.0 CPU first, then trl==1.16.0 and this project editable).
Writes benchmarks/results/bench_dpo_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "rlhf" / "assets" / "base-model"
SIDES = ("ours", "trl", "trl-precompute")
# ours-blas: our trainer with every linear layer on torch's default BLAS instead of the oneDNN routing
# that rlhf/models/cpu_gemm.py picks on non-Intel CPUs (slower on CPUs without AVX-512, e.g. Zen 3).
SIDE_ENV = {"ours-blas": {"RLHF_CPU_GEMM": "blas"}}

# One setting per model size, the same for every side.
SETTINGS = {
    "bundled": dict(pairs_per_prompt=12, batch_size=16, epochs=2, lr=1e-4, beta=0.1, max_length=128, warmup_ratio=0.1),
    "30m": dict(pairs_per_prompt=4, batch_size=16, epochs=1, lr=1e-5, beta=0.1, max_length=128, warmup_ratio=0.1),
}
TONES = ["polite", "curt", "off_topic", "rude"]  # best first
KEYS = ("pairs_per_second", "pairs_per_cpu_second", "seconds", "cpu_seconds", "reference_seconds", "peak_rss_mb",
        "val_accuracy", "val_margin")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tone_pairs(held_out: bool, per_prompt: int, seed: int) -> list[dict]:
    """Pairs over the bundled corpus: for one prompt, a reply in a better tone beats one in a worse tone."""
    from rlhf.models.corpus import TOPICS, make_reply, split_prompts

    rng = random.Random(seed)
    train, evals = split_prompts()
    pairs = []
    for topic, prompt in (evals if held_out else train):
        for _ in range(per_prompt):
            a, b = sorted(rng.sample(range(4), 2))
            pairs.append({"prompt": prompt, "chosen": make_reply(rng, TOPICS[topic][1], TONES[a]),
                          "rejected": make_reply(rng, TOPICS[topic][1], TONES[b])})
    return pairs


def setup(work: Path) -> dict[str, str]:
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_ppo import build_30m

    work.mkdir(parents=True, exist_ok=True)
    m30 = work / "llama-30m"
    if not (m30 / "config.json").is_file():
        build_30m(m30)
    for size, s in SETTINGS.items():
        for name, held_out, seed in (("train", False, 0), ("val", True, 1)):
            path = work / f"{size}-{name}.jsonl"
            path.write_text("".join(json.dumps(p) + "\n" for p in tone_pairs(held_out, s["pairs_per_prompt"] * (1 if not held_out else 2), seed)))
    return {"bundled": str(BUNDLED), "30m": str(m30)}


# ---------------------------------------------------------------------------------------------
# Workers
# ---------------------------------------------------------------------------------------------

def run_ours(a) -> dict:
    from rlhf.engine.config import EngineConfig
    from rlhf.train.dpo import DPOConfig, run_dpo

    s = SETTINGS[a.size]
    cfg = DPOConfig(pairs=a.train, out=a.out, policy=a.policy, loss="sigmoid", beta=s["beta"], epochs=s["epochs"],
                    batch_size=s["batch_size"], lr=s["lr"], warmup_ratio=s["warmup_ratio"], weight_decay=0.0,
                    max_grad_norm=1.0, max_length=s["max_length"], val_fraction=0.0, save_every=10**6, seed=a.round,
                    engine=EngineConfig(device="cpu", threads=a.threads), resume=False, progress=False)
    cfg.validate()
    summary = run_dpo(cfg)
    seconds = summary["seconds"] + summary["reference_seconds"]
    cpu = summary["cpu_seconds"] + summary["reference_cpu_seconds"]
    pairs = summary["steps"] * s["batch_size"]
    return {"pairs": pairs, "seconds": seconds, "cpu_seconds": cpu, "reference_seconds": summary["reference_seconds"],
            "pairs_per_second": pairs / seconds, "pairs_per_cpu_second": pairs / cpu, "peak_rss_mb": peak_rss_mb(),
            "policy": str(Path(a.out) / "model")}


def run_trl(a, precompute: bool) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    from rlhf.models.loading import format_prompt, load_tokenizer
    from rlhf.train.dpo import encode_pair

    s = SETTINGS[a.size]
    rows = [json.loads(line) for line in Path(a.train).read_text().splitlines() if line.strip()]
    tok = AutoTokenizer.from_pretrained(a.policy)
    ds = Dataset.from_dict({"prompt": [format_prompt(tok, r["prompt"]) for r in rows], "chosen": [r["chosen"] for r in rows],
                            "rejected": [r["rejected"] for r in rows]})
    steps_per_epoch = len(rows) // s["batch_size"]
    args = DPOConfig(output_dir=a.out, per_device_train_batch_size=s["batch_size"], gradient_accumulation_steps=1,
                     num_train_epochs=s["epochs"], learning_rate=s["lr"], lr_scheduler_type="linear",
                     warmup_steps=int(s["warmup_ratio"] * steps_per_epoch * s["epochs"]), weight_decay=0.0, max_grad_norm=1.0,
                     beta=s["beta"], loss_type=["sigmoid"], max_length=s["max_length"], disable_dropout=True,
                     precompute_ref_log_probs=precompute, precompute_ref_batch_size=64, gradient_checkpointing=False,
                     bf16=False, fp16=False, use_cpu=True, seed=a.round, save_strategy="no", eval_strategy="no",
                     report_to="none", logging_steps=10**6, dataloader_num_workers=0, dataloader_drop_last=True,
                     disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    precompute_seconds = [0.0, 0.0]  # wall, CPU
    real_precompute = DPOTrainer._precompute_ref_logps

    def timed_precompute(self, *args, **kwargs):
        t, c = time.perf_counter(), time.process_time()
        try:
            return real_precompute(self, *args, **kwargs)
        finally:
            precompute_seconds[0] += time.perf_counter() - t
            precompute_seconds[1] += time.process_time() - c

    DPOTrainer._precompute_ref_logps = timed_precompute
    trainer = DPOTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    # Identical inputs: TRL's token ids of every pair are ours.
    ours_tok = load_tokenizer(a.policy)
    mismatched = 0
    for r, ex in zip(rows, trainer.train_dataset):
        e = encode_pair(ours_tok, r["prompt"], r["chosen"], r["rejected"], s["max_length"])
        mismatched += (ex["prompt_ids"], ex["chosen_ids"], ex["rejected_ids"]) != (e.prompt_ids, e.chosen_ids, e.rejected_ids)
    c0 = time.process_time()
    metrics = trainer.train().metrics
    cpu = time.process_time() - c0 + precompute_seconds[1]
    seconds = float(metrics["train_runtime"]) + precompute_seconds[0]
    pairs = trainer.state.global_step * s["batch_size"]
    model.save_pretrained(str(Path(a.out) / "model"), safe_serialization=True)
    tok.save_pretrained(str(Path(a.out) / "model"))
    return {"pairs": pairs, "seconds": seconds, "cpu_seconds": cpu, "reference_seconds": precompute_seconds[0],
            "pairs_per_second": pairs / seconds, "pairs_per_cpu_second": pairs / cpu, "peak_rss_mb": peak_rss_mb(),
            "token_mismatches": mismatched, "policy": str(Path(a.out) / "model")}


def run_eval(a) -> dict:
    """Implicit-reward accuracy and margin of a trained policy on the held-out pairs (reference = the start)."""
    import torch

    torch.set_num_threads(a.threads)
    from rlhf.algos import implicit_reward_stats
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.train.dpo import encode_pair, score_pairs

    s = SETTINGS[a.size]
    tok = load_tokenizer(a.reference)
    rows = [json.loads(line) for line in Path(a.val).read_text().splitlines() if line.strip()]
    enc = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], s["max_length"]) for r in rows]
    cpu = torch.device("cpu")
    pc, pr = score_pairs(load_causal_lm(a.policy), enc, tok.pad_token_id, False, cpu, 64)
    rc, rr = score_pairs(load_causal_lm(a.reference), enc, tok.pad_token_id, False, cpu, 64)
    stats = implicit_reward_stats(pc - rc, pr - rr, s["beta"])
    return {"val_accuracy": float(stats["accuracy"]), "val_margin": float(stats["margin"]), "val_pairs": len(rows)}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def sub(python: str, mode: str, extra_env: dict | None = None, **kw) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", mode] + [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(kw["threads"]), "PYTHONPATH": str(REPO), **(extra_env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=[*SIDES, "eval"])
    ap.add_argument("--models", default="bundled,30m")
    ap.add_argument("--sides", default=",".join(SIDES), help="ours, trl, trl-precompute, ours-blas")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(REPO / "out" / "bench_dpo"))
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bench_dpo_trl.json"))
    for k in ("size", "policy", "reference", "train", "val", "out"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    if a.worker:
        fn = {"ours": run_ours, "trl": lambda x: run_trl(x, False), "trl-precompute": lambda x: run_trl(x, True),
              "eval": run_eval}[a.worker]
        print(json.dumps(fn(a)))
        return

    work = Path(a.work).resolve()
    policies = setup(work)
    sides = a.sides.split(",")
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
               "load_average_at_start": os.getloadavg(), "threads": a.threads, "rounds": a.rounds, "models": {}}
    for size in a.models.split(","):
        runs: dict[str, list] = {side: [] for side in sides}
        data = dict(train=work / f"{size}-train.jsonl", val=work / f"{size}-val.jsonl")
        for r in range(a.rounds):
            order = sides[r % len(sides):] + sides[:r % len(sides)]
            for side in order:
                out = work / "runs" / f"{size}-{side}-{r}"
                python = a.trl_python if side.startswith("trl") else sys.executable
                row = sub(python, "ours" if side == "ours-blas" else side, SIDE_ENV.get(side), size=size, policy=policies[size],
                          out=out, round=r, threads=a.threads, **data)
                row.update(sub(sys.executable, "eval", size=size, policy=row["policy"], reference=policies[size],
                               threads=a.threads, **data))
                row["load_average"] = os.getloadavg()[0]
                runs[side].append(row)
                print(f"{size} round {r} {side}: {row['pairs_per_second']:.2f} pairs/s ({row['pairs_per_cpu_second']:.2f} per CPU s), peak {row['peak_rss_mb']:.0f} MiB, "
                      f"val accuracy {row['val_accuracy']:.3f}, margin {row['val_margin']:.3f} (load {row['load_average']:.1f})",
                      file=sys.stderr, flush=True)
        median = {side: {k: statistics.median(x[k] for x in rows)
                         for k in KEYS}
                  for side, rows in runs.items()}
        results["models"][size] = {"settings": SETTINGS[size], "median": median, "runs": runs}
        print_table(size, SETTINGS[size], median)
    trl_version = subprocess.run([a.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                                 text=True).stdout.strip()
    results["trl_version"] = trl_version
    results["load_average_at_end"] = os.getloadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def print_table(size: str, s: dict, m: dict) -> None:
    sides = list(m)
    print(f"\n## {size}: batch {s['batch_size']} pairs, {s['epochs']} epoch(s), max length {s['max_length']}, β {s['beta']}")
    print("| median | " + " | ".join(sides) + " | " + " | ".join(f"ours/{x}" for x in sides if x != "ours") + " |")
    print("| --- " * (2 * len(sides)) + "|")
    for key in KEYS:
        vals = [m[x][key] for x in sides]
        ratios = [m["ours"][key] / m[x][key] if m[x][key] else float("nan") for x in sides if x != "ours"] if "ours" in m else []
        print(f"| {key} | " + " | ".join(f"{v:.3f}" for v in vals) + " | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")


if __name__ == "__main__":
    main()
