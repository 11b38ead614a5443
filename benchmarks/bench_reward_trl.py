"""Benchmark: our reward-model training against TRL's ``RewardTrainer`` on identical settings.

Same backbone (the packaged all-MiniLM-L6-v2; TRL gets it as ``AutoModelForSequenceClassification``
with ``num_labels=1``), same hh-harmless training pairs tokenized by the same encoder (so both see
identical token ids and truncation), same batch size, max length, learning rate, warmup, weight
decay, clipping and number of optimizer steps; fp32, no gradient checkpointing, no bf16, dropout
off in both, the same CPU thread count. Each run is its own subprocess, so peak memory (max RSS)
belongs to that run alone; runs alternate ours/TRL (and swap who goes first each round) so that
load from other users of the machine hits both alike. The table shows medians.

TRL lives in its own virtual environment so the project's stays untouched:

    python3 -m venv .venv-trl
    .venv-trl/bin/pip install torch==2.13.0            # first: a bare torch requirement pulls CUDA
    .venv-trl/bin/pip install trl==1.16.0 -e . "transformers==$(.venv/bin/python -c 'import transformers; print(transformers.__version__)')"

Then:

    .venv/bin/python benchmarks/bench_reward_trl.py                 # 3 rounds, 40 steps each
    .venv/bin/python benchmarks/bench_reward_trl.py --rounds 5 --steps 98 --trl-optim adamw_torch

Writes benchmarks/results/bench_reward_trl.json. Throughput is pairs per second of the training
loop alone (ours: the loop in ``train_reward_model``, including its one checkpoint at the end;
TRL: ``train_runtime`` of ``trainer.train()``); model loading, tokenization and the validation
pass are outside it. Validation accuracy is measured afterwards on the 250 validation pairs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
DATA = REPO.parent / "shared" / "data" / "hh-harmless"


def _encode(pairs: list, max_length: int):
    """Both replies of every pair as our encoder's token ids (left-truncated prompt, reply intact)."""
    from rlhf.models.reward_model import RewardEncoder, RewardSpec, load_backbone_tokenizer, minilm_dir

    tok = load_backbone_tokenizer(minilm_dir())
    spec = RewardSpec(backbone_kind="encoder", pooling="mean", max_length=max_length, prompt_format="sentence_pair")
    enc = RewardEncoder(tok, spec)
    return tok, [(enc.encode(p.prompt, p.chosen), enc.encode(p.prompt, p.rejected)) for p in pairs]


def _accuracy(score_fn, encoded: list) -> float:
    """Pairwise accuracy (ties count half) of score_fn(list of Encoded) -> tensor on encoded pairs."""

    flat = [e for pair in encoded for e in pair]
    s = score_fn(flat)
    d = s[0::2] - s[1::2]
    return float(((d > 0).double() + 0.5 * (d == 0).double()).mean())


def worker_ours(a, train_path: str, val_path: str, out: Path) -> dict:
    from rlhf.engine.config import EngineConfig
    from rlhf.train.reward import RewardTrainConfig, read_pairs, train_reward_model
    from rlhf.train.reward_commands import evaluate_scorer

    n_train = len(read_pairs(train_path, True)[0])
    spe = n_train // a.batch_size
    # epochs chosen so that the schedule spans exactly --steps steps, as TRL's max_steps does
    cfg = RewardTrainConfig(pairs=train_path, out=str(out), base="minilm", val_fraction=0.0,
                            epochs=(a.steps - 0.5) / spe, batch_size=a.batch_size, lr=a.lr, head_lr=0.0,
                            warmup_ratio=a.warmup_ratio,
                            weight_decay=0.01, max_grad_norm=1.0, max_length=a.max_length, dropout=False,
                            skip_bad_pairs=True, seed=a.seed, resume=False, keep_checkpoints=1, freeze_layers=0,  # all layers train, as in TRL
                           
                            engine=EngineConfig(device="cpu", threads=a.threads, cpu_gemm=a.cpu_gemm))
    cfg.validate()
    summary = train_reward_model(cfg)
    after_train = _peak_rss_mb()
    assert summary["steps"] == a.steps, summary["steps"]
    val_pairs, _ = read_pairs(val_path, True)
    acc = evaluate_scorer(summary["model"], val_pairs, "cpu")["accuracy"]
    return {"pairs_per_second": summary["pairs_per_second"], "train_seconds": summary["seconds"], "val_accuracy": acc,
            "peak_rss_after_train_mb": after_train}


def worker_trl(a, train_path: str, val_path: str, out: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForSequenceClassification
    from trl import RewardConfig, RewardTrainer

    from rlhf.models.reward_model import collate, minilm_dir
    from rlhf.train.reward import read_pairs

    tok, train_enc = _encode(read_pairs(train_path, True)[0], a.max_length)
    _, val_enc = _encode(read_pairs(val_path, True)[0], a.max_length)
    # Pre-tokenized columns: TRL skips its own tokenization (which would drop, not truncate,
    # over-long pairs) and trains on exactly our token ids.
    ds = Dataset.from_dict({"chosen_ids": [c.ids for c, _ in train_enc], "rejected_ids": [r.ids for _, r in train_enc]})
    model = AutoModelForSequenceClassification.from_pretrained(str(minilm_dir()), num_labels=1, dtype=torch.float32)
    model.config.pad_token_id = tok.pad_token_id
    args = RewardConfig(output_dir=str(out), per_device_train_batch_size=a.batch_size, max_steps=a.steps,
                        learning_rate=a.lr, warmup_steps=int(a.warmup_ratio * a.steps), lr_scheduler_type="linear",
                        weight_decay=0.01, max_grad_norm=1.0, max_length=a.max_length, disable_dropout=True,
                        gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True, seed=a.seed,
                        save_strategy="no", eval_strategy="no", report_to="none", logging_steps=10**6,
                        dataloader_num_workers=0, disable_tqdm=True, **({"optim": a.trl_optim} if a.trl_optim else {}))
    trainer = RewardTrainer(model=model, args=args, train_dataset=ds, processing_class=tok)
    metrics = trainer.train().metrics
    after_train = _peak_rss_mb()

    @torch.no_grad()
    def score(items):
        model.eval()
        outs = torch.empty(len(items))
        order = sorted(range(len(items)), key=lambda i: len(items[i].ids))
        for s in range(0, len(order), 64):
            idx = order[s:s + 64]
            b = collate([items[i] for i in idx], tok.pad_token_id)
            # TRL's collator passes no token types, so score the way it trained
            outs[torch.tensor(idx)] = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, 0]
        return outs

    secs = float(metrics["train_runtime"])
    return {"pairs_per_second": round(a.steps * a.batch_size / secs, 2), "train_seconds": round(secs, 2),
            "val_accuracy": round(_accuracy(score, val_enc), 4), "peak_rss_after_train_mb": after_train,
            "optim": str(getattr(args.optim, "value", args.optim))}


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def _peak_rss_mb() -> int:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)  # Linux: KiB


def run_worker(a) -> int:
    import torch

    torch.set_num_threads(a.threads)
    data = Path(a.data)
    train_path, val_path = str(data / "train.jsonl.gz"), str(data / "validation.jsonl.gz")
    with tempfile.TemporaryDirectory(prefix=f"bench-{a.worker}-") as tmp:
        fn = worker_ours if a.worker == "ours" else worker_trl
        res = fn(a, train_path, val_path, Path(tmp))
    res["peak_rss_mb"] = _peak_rss_mb()
    print("RESULT " + json.dumps(res), flush=True)
    return 0


def spawn(a, which: str, python: str) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", which, "--data", a.data, "--steps", str(a.steps),
           "--batch-size", str(a.batch_size), "--max-length", str(a.max_length), "--lr", str(a.lr),
           "--warmup-ratio", str(a.warmup_ratio), "--threads", str(a.threads), "--seed", str(a.seed),
           "--trl-optim", a.trl_optim, "--cpu-gemm", a.cpu_gemm]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"{which} run failed (exit {proc.returncode})")
    res = json.loads(lines[-1][len("RESULT "):])
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    res["load_avg_1m"] = round(os.getloadavg()[0], 2)
    return res


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--warmup-ratio", type=float, default=0.1)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--trl-optim", default="", help="TRL's optimizer; empty = its own default (with torch >= 2.8 that "
                                                    "is adamw_torch_fused, the fused kernel ours uses too)")
    ap.add_argument("--rounds", type=int, default=3, help="ours/TRL pairs of runs (medians are reported)")
    ap.add_argument("--cpu-gemm", default="auto", choices=["auto", "onednn", "blas"], help="ours: --cpu-gemm")
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_reward_trl.json"))
    ap.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        return run_worker(a)
    if not (Path(a.data) / "train.jsonl.gz").is_file():
        print(f"hh-harmless not found at {a.data}", file=sys.stderr)
        return 2
    if not Path(a.trl_python).is_file():
        print(f"{a.trl_python} not found: install TRL into .venv-trl as this script's docstring says", file=sys.stderr)
        return 2

    runs = {"ours": [], "trl": []}
    for r in range(a.rounds):
        order = ("ours", "trl") if r % 2 == 0 else ("trl", "ours")
        for which in order:
            res = spawn(a, which, sys.executable if which == "ours" else a.trl_python)
            runs[which].append(res)
            print(f"round {r + 1} {which:>4}: {res['pairs_per_second']:6.2f} pairs/s  {res['peak_rss_mb']:5d} MiB  "
                  f"val acc {res['val_accuracy']:.3f}  (load {res['load_avg_1m']})", flush=True)

    med = {k: {m: statistics.median(x[m] for x in v) for m in ("pairs_per_second", "peak_rss_mb", "val_accuracy")}
           for k, v in runs.items()}
    rows = [("pairs/s", "pairs_per_second", "{:.2f}"), ("peak RSS (MiB)", "peak_rss_mb", "{:.0f}"),
            ("val accuracy", "val_accuracy", "{:.3f}")]
    print(f"\nmedians of {a.rounds} runs each ({a.steps} steps x {a.batch_size} pairs, max length {a.max_length}, "
          f"{a.threads} threads)")
    print(f"{'':<16}{'ours':>10}{'TRL':>10}{'ours/TRL':>10}")
    for label, key, fmt in rows:
        o, t = med["ours"][key], med["trl"][key]
        print(f"{label:<16}{fmt.format(o):>10}{fmt.format(t):>10}{o / t:>10.2f}")
    trl_version = subprocess.run([a.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                                 text=True).stdout.strip()
    result = {"settings": {k: getattr(a, k) for k in ("steps", "batch_size", "max_length", "lr", "warmup_ratio",
                                                      "threads", "seed", "rounds", "trl_optim", "cpu_gemm")},
              "runs": runs, "median": med,
              "ratio_ours_over_trl": {k: round(med["ours"][k] / med["trl"][k], 3) for k in med["ours"]},
              "trl_version": trl_version, "cpu_count": os.cpu_count(), "machine": platform.machine(),
              "cpu": _cpu_name(),
              "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    from rlhf.utils.io import atomic_write_json

    atomic_write_json(a.results, result)
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
