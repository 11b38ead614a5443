"""Personalization, measured: six scripted users in three conflicting pairs chat with the bundled model.

    .venv/bin/python benchmarks/personal_bench.py --stage collect     # users chat over HTTP (the data)
    .venv/bin/python benchmarks/personal_bench.py --stage curve       # learning curves, cold start
    .venv/bin/python benchmarks/personal_bench.py --stage generate    # base / pooled RLHF / rerank / adapter
    .venv/bin/python benchmarks/personal_bench.py                     # all three, then the tables

collect: a chat server (the labeling app with the chat routes, plain samples from the bundled model)
runs in this process; the six users of rlhf/personal/users.py (concise ↔ detailed, polite ↔ blunt,
focused ↔ playful; noise σ = 0.25) each ask TRAIN + HELDOUT questions drawn from the shipped training
prompts and pick a reply through the HTTP API. Their first TRAIN choices are the training pool, the
rest are held out.

curve: for n in 5, 10, 20, 50, 100 comparisons per user, a personal reward model (`rlhf personal
train`) and one pooled reward model (`rlhf reward train` on the same pairs, no user ids) are trained
on each user's first n comparisons, and each user's held-out choices are scored: accuracy against
what the user chose (noise included) and against their noiseless (gold) preference on pairs where
it is strict. Cold start: the personal model is trained without user X (all five others at n = 100),
then X is fitted with `update`'s per-user fit from their first 5, 10 and 20 comparisons only.

generate: for each user, replies to the 26 held-out prompt phrasings (4 draws each) from the base
policy, from PPO-LoRA against the pooled reward ("pooled RLHF"), best-of-8 reranked by the user's
personal reward, and the user's own PPO-LoRA adapter against their personal reward; each scored by
the user's gold utility, mean with a 95% bootstrap CI.

Writes benchmarks/results/personal_bench.json and personal_bench.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "personal_bench.json"
sys.path.insert(0, str(REPO))


def machine() -> dict:
    cpu = ""
    try:
        cpu = next((ln.split(":", 1)[1].strip() for ln in subprocess.run(["lscpu"], capture_output=True, text=True).stdout.splitlines()
                    if ln.startswith("Model name")), "")
    except OSError:
        pass
    return {"cpu": cpu or platform.processor(), "cores": os.cpu_count(), "load_average_1min": round(os.getloadavg()[0], 2)}


def collect(work: Path, train_turns: int, heldout_turns: int, noise: float, seed: int) -> dict:
    """The six users chat over HTTP; writes work/labels.sqlite and work/feedback.jsonl."""
    import torch

    from rlhf.data.io import read_records, write_records
    from rlhf.data.records import PromptRecord
    from rlhf.feedback.server import start_in_thread
    from rlhf.feedback.store import open_store
    from rlhf.models.loading import shipped_prompts
    from rlhf.personal.api import create_chat_app
    from rlhf.personal.policy import ChatPolicy, ChatPolicyConfig
    from rlhf.personal.store import PersonalStore
    from rlhf.personal.users import SIX_USERS, simulate_users

    torch.set_num_threads(1)
    work.mkdir(parents=True, exist_ok=True)
    db = work / "labels.sqlite"
    if db.exists():
        raise SystemExit(f"{db} exists: remove {work} to collect again")
    store = open_store(db)
    _, admin = store.add_user("bench-admin", "admin", None)
    chat = ChatPolicy(ChatPolicyConfig(device="cpu"))
    prompts = [p.prompt for p in read_records(shipped_prompts("train"), PromptRecord)]
    t0 = time.perf_counter()
    with start_in_thread(store, app=create_chat_app(store, chat)) as srv:
        runs = simulate_users(srv.url, admin, list(SIX_USERS), prompts, train_turns + heldout_turns, noise, seed)
    wall = time.perf_counter() - t0
    records = PersonalStore(store).feedback()
    write_records(work / "feedback.jsonl", records)
    return {"turns": sum(r.turns for r in runs), "wall_s": round(wall, 1), "users": [r.__dict__ for r in runs],
            "train_turns": train_turns, "heldout_turns": heldout_turns, "noise": noise}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["collect", "curve", "generate", "all"], default="all")
    ap.add_argument("--work", default=str(REPO / "runs" / "personal-bench"), help="data, models and runs go here")
    ap.add_argument("--train-turns", type=int, default=100)
    ap.add_argument("--heldout-turns", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    work = Path(args.work)
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.stage in ("collect", "all"):
        out["collect"] = {**collect(work, args.train_turns, args.heldout_turns, args.noise, args.seed), "machine": machine()}
        print(json.dumps(out["collect"], indent=1))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
