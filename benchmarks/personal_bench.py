"""Personalization, measured: six scripted users in three conflicting pairs chat with the bundled model.

    .venv/bin/python benchmarks/personal_bench.py --stage collect     # users chat over HTTP (the data)
    .venv/bin/python benchmarks/personal_bench.py --stage curve       # learning curves and cold start
    .venv/bin/python benchmarks/personal_bench.py --stage finetune    # one fine-tuned-backbone point
    .venv/bin/python benchmarks/personal_bench.py --stage generate    # base / pooled RLHF / rerank / adapter
    .venv/bin/python benchmarks/personal_bench.py --stage adapters    # the adapter column again (same model and seeds)
    .venv/bin/python benchmarks/personal_bench.py --stage report      # the tables again, from the JSON
    .venv/bin/python benchmarks/personal_bench.py                     # everything in that order

collect: a chat server (the labeling app with the chat routes, plain samples from the bundled model)
runs in this process; the six users of rlhf/personal/users.py (concise ↔ detailed, polite ↔ blunt,
focused ↔ playful; noise σ = 0.25) each ask TRAIN + HELDOUT questions drawn from the shipped training
prompts and pick a reply through the HTTP API. Their first TRAIN choices are the training pool, the
rest are held out.

curve (per reward backbone, frozen, as `rlhf personal train` does by default): for n in 5, 10, 20, 50,
100 comparisons per user, a personal reward model and a pooled one (the same trainer with
--generic-rate 1: no user part) are trained on each user's first n comparisons, and each user's
held-out choices are scored: accuracy against what the user chose (noise included) and agreement
with their noiseless (gold) preference on pairs where it is strict. Cold start: a personal model is
trained without user X (the five others at 100 each), then X is fitted from their first 5, 10 and 20
comparisons only, with `update`'s per-user fit on cached features.

generate: for each user, replies to the 26 held-out prompt phrasings (4 draws each) from the base
policy, from PPO-LoRA against the pooled reward ("pooled RLHF"), best-of-8 reranked by the user's
personal reward, and the user's own PPO-LoRA adapter against their personal reward
(`rlhf personal adapter`); each scored by the user's gold utility, mean with a 95% bootstrap CI.

Writes benchmarks/results/personal_bench.json and personal_bench.md (the tables).
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
    chat = ChatPolicy(ChatPolicyConfig(), device="cpu")
    prompts = [p.prompt for p in read_records(shipped_prompts("train"), PromptRecord)]
    t0 = time.perf_counter()
    with start_in_thread(store, app=create_chat_app(store, chat)) as srv:
        runs = simulate_users(srv.url, admin, list(SIX_USERS), prompts, train_turns + heldout_turns, noise, seed)
    wall = time.perf_counter() - t0
    records = PersonalStore(store).feedback()
    write_records(work / "feedback.jsonl", records)
    return {"turns": sum(r.turns for r in runs), "wall_s": round(wall, 1), "users": [r.__dict__ for r in runs],
            "train_turns": train_turns, "heldout_turns": heldout_turns, "noise": noise}


# -- curve -----------------------------------------------------------------------------------------

SIZES = (5, 10, 20, 50, 100)


def split_data(work: Path, train_turns: int) -> tuple[dict[str, list], dict[str, list]]:
    """user → their first ``train_turns`` feedback records (the training pool), and the rest (held out)."""
    from rlhf.personal.records import read_feedback

    by_user: dict[str, list] = {}
    for r in read_feedback(work / "feedback.jsonl"):
        by_user.setdefault(r.user, []).append(r)
    return {u: rs[:train_turns] for u, rs in by_user.items()}, {u: rs[train_turns:] for u, rs in by_user.items()}


class Gold:
    """Each user's noiseless utility (their taste's scorer), cached by text."""

    def __init__(self):
        from rlhf.personal.users import taste_scorer

        self.scorers, self.cache = {}, {}
        self._make = taste_scorer

    def __call__(self, taste: str, prompts: list[str], replies: list[str]) -> list[float]:
        from rlhf.judges.base import score_checked

        if taste not in self.scorers:
            self.scorers[taste] = self._make(taste)
        todo = [(p, r) for p, r in zip(prompts, replies) if (taste, p, r) not in self.cache]
        if todo:
            scores = score_checked(self.scorers[taste], [p for p, _ in todo], [r for _, r in todo]).tolist()
            self.cache.update({(taste, p, r): s for (p, r), s in zip(todo, scores)})
        return [self.cache[(taste, p, r)] for p, r in zip(prompts, replies)]


def accuracy_pair(c, r) -> float:
    import torch

    c, r = torch.as_tensor(c, dtype=torch.float64), torch.as_tensor(r, dtype=torch.float64)
    return float(((c > r).double() + 0.5 * (c == r).double()).mean()) if len(c) else float("nan")


def score_heldout(score, held: dict[str, list], gold: Gold) -> dict[str, dict]:
    """Per user: accuracy on their held-out choices, and agreement with their gold preference where it is strict.

    ``score(user, prompts, replies)`` → rewards; the user's taste is their name (the scripted users are named by taste)."""
    out = {}
    for user, recs in held.items():
        pairs = [p for r in recs for p in r.pairs()]
        prompts = [p.prompt for p in pairs]
        sc, sr = score(user, prompts, [p.chosen for p in pairs]), score(user, prompts, [p.rejected for p in pairs])
        gc, gr = gold(user, prompts, [p.chosen for p in pairs]), gold(user, prompts, [p.rejected for p in pairs])
        strict = [i for i in range(len(pairs)) if gc[i] != gr[i]]
        # on pairs where the user's noiseless utility prefers one reply: does the model prefer the same one?
        agree = [1.0 if (sc[i] - sr[i]) * (gc[i] - gr[i]) > 0 else 0.5 if sc[i] == sr[i] else 0.0 for i in strict]
        out[user] = {"pairs": len(pairs), "accuracy": round(accuracy_pair(sc, sr), 4),
                     "gold_agreement": round(sum(agree) / max(1, len(agree)), 4), "gold_pairs": len(strict),
                     "choices_agree_with_gold": round(sum(gc[i] > gr[i] for i in strict) / max(1, len(strict)), 4)}
    return out


def write_feedback(path: Path, records: list) -> Path:
    from rlhf.data.io import write_records

    write_records(path, records)
    return path


def train_frozen(feedback: Path, out: Path, generic_rate: float, n_pairs: int, dim: int, prior: float, seed: int,
                 base: str, shared_cache: Path | None = None, user_part: str = "linear", user_features: str = "pair+reply") -> dict:
    """A personal (or, with generic_rate 1, pooled) reward model on frozen backbone features, ~300 steps.

    A frozen backbone's features are the same in every run, so ``shared_cache`` (a features.sqlite
    that knows its backbone) is copied in before and back out after: each text goes through the
    backbone once per benchmark, not once per model."""
    import shutil

    from rlhf.engine.config import EngineConfig
    from rlhf.personal.train import PersonalTrainConfig, train_personal

    out.mkdir(parents=True, exist_ok=True)
    if shared_cache is not None and shared_cache.is_file():
        shutil.copy(shared_cache, out / "features.sqlite")
    epochs = max(3.0, 300 / max(1, n_pairs // 16))
    cfg = PersonalTrainConfig(feedback=str(feedback), out=str(out), base=base, dim=dim, prior=prior, user_part=user_part,
                              user_features=user_features, generic_rate=generic_rate, freeze_backbone=True, epochs=epochs, batch_size=16,
                              head_lr=3e-3, val_fraction=0.0, engine=EngineConfig(device="cpu", threads=1), seed=seed, save_every=10 ** 6)
    cfg.validate()
    return train_personal(cfg)


def shared_cache(work: Path, base: str, user_features: str) -> Path:
    """The benchmark's feature cache for one backbone and kind of features (a cache holds one kind)."""
    return work / (f"features-{base}.sqlite" if user_features == "pair" else f"features-{base}-{user_features}.sqlite")


def keep_cache(out: Path, shared_cache: Path) -> None:
    """Copy a model's feature cache back out through SQLite's backup API: the cache runs in WAL mode, so
    the file alone can lack its newest rows (they sit in features.sqlite-wal until a checkpoint)."""
    import sqlite3

    src, dst = sqlite3.connect(out / "features.sqlite"), sqlite3.connect(shared_cache)
    try:
        src.backup(dst)
    finally:
        src.close()
        dst.close()


def curve(work: Path, train_turns: int, dim: int, prior: float, seed: int, base: str, part: tuple[str, str]) -> dict:
    import shutil

    import torch

    from rlhf.personal.model import PersonalReward
    from rlhf.personal.update import fit_user

    torch.set_num_threads(1)
    pool, held = split_data(work, train_turns)
    gold = Gold()
    root = work / f"curve-{base}"
    shared = shared_cache(work, base, part[1])
    result: dict = {"sizes": {}, "cold_start": {}, "dim": dim, "prior": prior, "backbone": base, "frozen": True,
                    "user_part": part[0], "user_features": part[1]}
    for n in SIZES:
        if n > train_turns:
            continue
        recs = [r for u in sorted(pool) for r in pool[u][:n]]
        feedback = write_feedback(root / f"feedback-{n}.jsonl", recs)
        n_pairs = sum(len(r.pairs()) for r in recs)
        row = {"comparisons_per_user": n, "train_pairs": n_pairs}
        for kind, rate in (("personal", 0.25), ("pooled", 1.0)):
            out = root / f"{kind}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            t0 = time.perf_counter()
            summary = train_frozen(feedback, out, rate, n_pairs, dim, prior, seed, base, shared, *part)
            row[f"{kind}_train_s"] = round(time.perf_counter() - t0, 1)
            row[f"{kind}_prior"] = summary["prior"]  # λ (chosen by cross-validation on these training pairs when --prior 0)
            reward = PersonalReward(out)
            who = (lambda u: u) if kind == "personal" else (lambda u: None)
            row[kind] = score_heldout(lambda u, p, t: reward.score(who(u), p, t), held, gold)
            keep_cache(out, shared)
        result["sizes"][str(n)] = row
        print(json.dumps({"backbone": base, "n": n, **{k: {u: v["accuracy"] for u, v in row[k].items()}
                                                      for k in ("personal", "pooled")}}), flush=True)
    # cold start: the model never saw user X; X is fitted from their first m comparisons only (backbone fixed)
    for user in sorted(pool):
        others = [r for u in sorted(pool) if u != user for r in pool[u]]
        feedback = write_feedback(root / f"feedback-without-{user}.jsonl", others)
        out = root / f"without-{user}"
        shutil.rmtree(out, ignore_errors=True)
        summary = train_frozen(feedback, out, 0.25, sum(len(r.pairs()) for r in others), dim, prior, seed, base, shared, *part)
        reward = PersonalReward(out)
        row = {"prior": summary["prior"], "generic": score_heldout(lambda u, p, t: reward.score(None, p, t), {user: held[user]}, gold)[user]}
        for m in (5, 10, 20):
            pairs = [p for r in pool[user][:m] for p in r.pairs()]
            t0 = time.perf_counter()
            e = fit_user(reward, reward.table, user, pairs)
            fit_s = time.perf_counter() - t0
            table = reward.table.with_user(user, e, len(pairs))
            row[str(m)] = {**score_heldout(lambda u, p, t: reward.score(u, p, t, table=table), {user: held[user]}, gold)[user],
                           "fit_seconds": round(fit_s, 3)}
        keep_cache(out, shared)
        result["cold_start"][user] = row
        print(json.dumps({"backbone": base, "cold_start": user, **{k: v["accuracy"] for k, v in row.items() if isinstance(v, dict)}}), flush=True)
    return result


def finetune_check(work: Path, train_turns: int, n: int, dim: int, prior: float, seed: int, base: str,
                   freeze_layers: int, epochs: float, lr: float) -> dict:
    """The same personal model with the backbone fine-tuned jointly (top layers), at one size, for comparison."""
    import shutil

    import torch

    from rlhf.engine.config import EngineConfig
    from rlhf.personal.model import PersonalReward
    from rlhf.personal.train import PersonalTrainConfig, train_personal

    torch.set_num_threads(1)
    pool, held = split_data(work, train_turns)
    out = work / f"finetune-{base}-{n}"
    shutil.rmtree(out, ignore_errors=True)
    feedback = write_feedback(work / f"finetune-feedback-{n}.jsonl", [r for u in sorted(pool) for r in pool[u][:n]])
    t0 = time.perf_counter()
    # the low-rank part learned jointly with the backbone (a linear part would sit on a backbone trained as the pooled reward)
    cfg = PersonalTrainConfig(feedback=str(feedback), out=str(out), base=base, dim=dim, prior=prior or 1.0, freeze_layers=freeze_layers,
                              user_part="lowrank", user_features="pair",
                              epochs=epochs, lr=lr, head_lr=3e-3, val_fraction=0.0, engine=EngineConfig(device="cpu", threads=1), seed=seed,
                              save_every=10 ** 6)
    cfg.validate()
    train_personal(cfg)
    reward = PersonalReward(out)
    return {"backbone": base, "comparisons_per_user": n, "freeze_layers": freeze_layers, "epochs": epochs, "lr": lr,
            "train_s": round(time.perf_counter() - t0, 1),
            "personal": score_heldout(lambda u, p, t: reward.score(u, p, t), held, Gold())}


# -- generate --------------------------------------------------------------------------------------

def sample(model, tok, prompts: list[str], k: int, seed: int) -> list[list[str]]:
    from rlhf.rollout.generate import SamplingParams, generate_completions

    return generate_completions(model, tok, prompts, k, SamplingParams(max_new_tokens=48), batch_size=32, seed=seed,
                                progress=False)


def lora_replies(adapter_dir: Path, tok, prompts: list[str], draws: int, seed: int) -> list[str]:
    """``draws`` replies per prompt (prompt-major) from the bundled policy with a LoRA adapter on."""
    from peft import PeftModel

    from rlhf.models.loading import load_causal_lm

    model = PeftModel.from_pretrained(load_causal_lm("bundled"), str(adapter_dir)).eval()
    return [c for g in sample(model, tok, prompts, draws, seed + 1) for c in g]


def user_adapters(gen: Path, users: list[str], prompts: list[str], tok, draws: int, seed: int, ppo_steps: int):
    """Each user's PPO adapter (`rlhf personal adapter` defaults, ``ppo_steps`` steps) on the personal model in
    ``gen``: (replies per user, PPO summaries per user, seconds per user)."""
    from rlhf.engine.config import EngineConfig
    from rlhf.personal.adapter import AdapterConfig, train_adapter

    replies, runs, timings = {}, {}, {}
    for user in users:
        t0 = time.perf_counter()
        summary = train_adapter(AdapterConfig(model=str(gen / "personal"), user=user, steps=ppo_steps, seed=seed,
                                              engine=EngineConfig(device="cpu", threads=1), progress=False))
        timings[f"adapter_{user}_s"] = round(time.perf_counter() - t0, 1)
        meta = json.loads((Path(summary["adapter"]) / "adapter.json").read_text())
        runs[user] = {**{k: summary.get(k) for k in ("steps", "score_first", "score_last", "kl_last")},
                      "reward_scale": meta.get("reward_scale"), "reward_shift": meta.get("reward_shift")}
        replies[user] = lora_replies(Path(summary["adapter"]), tok, prompts, draws, seed)
    return replies, runs, timings


def gold_utility(gold: "Gold", user: str, prompts: list[str], draws: int, texts: list[str], seed: int) -> dict:
    """The user's gold utility of ``draws`` replies per prompt: mean, 95% bootstrap CI, n, mean words."""
    import torch

    from rlhf.eval.stats import summarise

    s = summarise(torch.tensor(gold(user, [p for p in prompts for _ in range(draws)], texts)), seed=seed)
    return {"mean": round(s.mean, 4), "ci": [round(s.ci_low, 4), round(s.ci_high, 4)], "n": s.n,
            "words": round(sum(len(t.split()) for t in texts) / len(texts), 1)}


def mark_winners(row: dict) -> None:
    for m in ("rerank", "adapter"):
        row[m]["beats_base_and_pooled_separated_ci"] = all(row[m]["ci"][0] > row[o]["ci"][1] for o in ("base", "pooled_rlhf"))


def rerun_adapters(work: Path, seed: int, ppo_steps: int, base: str, recorded: dict) -> dict:
    """The adapter column again, on the generation stage's personal model, prompts and seeds: fresh per-user
    adapters with today's `rlhf personal adapter`, judged like the stage does; base, pooled RLHF and
    reranking stay as recorded. Returns the updated generation result."""
    import shutil

    import torch

    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord
    from rlhf.models.loading import load_tokenizer, shipped_prompts

    torch.set_num_threads(1)
    gen = work / f"gen-{base}"
    if not (gen / "personal" / "current.json").is_file():
        raise SystemExit(f"{gen / 'personal'} holds no personal model: run --stage generate first")
    for sub in ("adapters", "adapter-runs"):
        shutil.rmtree(gen / "personal" / sub, ignore_errors=True)
    users = sorted(recorded["users"])
    prompts = [p.prompt for p in read_records(shipped_prompts("eval"), PromptRecord)]
    t0 = time.perf_counter()
    replies, runs, timings = user_adapters(gen, users, prompts, load_tokenizer("bundled"), recorded["draws"], seed, ppo_steps)
    gold = Gold()
    out = json.loads(json.dumps(recorded))
    for user in users:
        out["users"][user]["adapter"] = gold_utility(gold, user, prompts, recorded["draws"], replies[user], seed)
        mark_winners(out["users"][user])
        out["ppo"][user] = runs[user]
        out["samples"]["adapter"][user] = replies[user][:3]
        print(json.dumps({"user": user, "adapter": out["users"][user]["adapter"]}), flush=True)
    out["timings"].update(timings)
    out["adapters_rerun"] = {"machine": machine(), "wall_s": round(time.perf_counter() - t0, 1), "ppo_steps": ppo_steps,
                             "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    return out


def generate(work: Path, train_turns: int, dim: int, prior: float, seed: int, ppo_steps: int, draws: int, n_best: int,
             base: str, part: tuple[str, str]) -> dict:
    """Base, pooled-RLHF, best-of-N by the user's reward, the user's PPO adapter: each user's gold utility."""
    import shutil

    import torch

    from rlhf.engine.config import EngineConfig
    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord
    from rlhf.models.loading import load_causal_lm, load_tokenizer, shipped_prompts
    from rlhf.personal.model import PersonalReward
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo

    torch.set_num_threads(1)
    gen = work / f"gen-{base}"
    pool, _ = split_data(work, train_turns)
    users = sorted(pool)
    recs = [r for u in users for r in pool[u]]
    feedback = write_feedback(gen / "feedback.jsonl", recs)
    n_pairs = sum(len(r.pairs()) for r in recs)
    for kind, rate in (("personal", 0.25), ("pooled", 1.0)):
        if not (gen / kind / "current.json").is_file():
            shutil.rmtree(gen / kind, ignore_errors=True)
            train_frozen(feedback, gen / kind, rate, n_pairs, dim, prior, seed, base, shared_cache(work, base, part[1]), *part)
    reward = PersonalReward(gen / "personal")
    prompts = [p.prompt for p in read_records(shipped_prompts("eval"), PromptRecord)]
    tok, base = load_tokenizer("bundled"), load_causal_lm("bundled")
    replies: dict[str, dict[str, list[str]]] = {}  # method -> user -> replies ("*": the same for every user)
    t0 = time.perf_counter()
    groups = sample(base, tok, prompts, draws * n_best, seed)  # per prompt: draws groups of n_best candidates
    flat_p = [p for p, g in zip(prompts, groups) for _ in g]
    flat_c = [c for g in groups for c in g]
    replies["base"] = {"*": [c for g in groups for c in g[::n_best]]}
    replies["rerank"] = {}
    for user in users:
        scores = reward.score(user, flat_p, flat_c).view(len(prompts), draws, n_best)
        picks = scores.argmax(dim=-1)
        replies["rerank"][user] = [groups[i][d * n_best + int(picks[i, d])] for i in range(len(prompts)) for d in range(draws)]
    timings = {"candidates_s": round(time.perf_counter() - t0, 1)}

    pooled_run = gen / "pooled-ppo"
    ppo = PPOConfig(out=str(pooled_run), policy="bundled", reward=f"rm:{gen / 'pooled' / 'backbone'}", max_steps=ppo_steps,
                    batch_size=32, mini_batch_size=16, micro_batch_size=16, lr=3e-4, lora=True, lora_r=8, lora_alpha=16,
                    init_kl_coef=0.05, max_new_tokens=48, seed=seed, engine=EngineConfig(device="cpu", threads=1), progress=False,
                    save_every=max(1, ppo_steps // 4))
    t0 = time.perf_counter()
    pooled_summary = run_ppo(ppo)
    timings["pooled_ppo_s"] = round(time.perf_counter() - t0, 1)
    replies["pooled_rlhf"] = {"*": lora_replies(pooled_run / "model" / "adapter", tok, prompts, draws, seed)}
    ppo_runs = {"pooled": {k: pooled_summary.get(k) for k in ("steps", "score_first", "score_last", "kl_last")}}
    replies["adapter"], runs, adapter_times = user_adapters(gen, users, prompts, tok, draws, seed, ppo_steps)
    ppo_runs.update(runs)
    timings.update(adapter_times)

    gold = Gold()
    table: dict[str, dict] = {}
    for user in users:
        row = {method: gold_utility(gold, user, prompts, draws, replies[method].get(user) or replies[method]["*"], seed)
               for method in ("base", "pooled_rlhf", "rerank", "adapter")}
        mark_winners(row)
        table[user] = row
        print(json.dumps({"user": user, **{m: row[m]["mean"] for m in row}}), flush=True)
    samples = {m: {u: v[:3] for u, v in by.items()} for m, by in replies.items()}
    return {"users": table, "ppo": ppo_runs, "timings": timings, "prompts": len(prompts), "draws": draws, "best_of": n_best,
            "ppo_steps": ppo_steps, "samples": samples}


# -- report ----------------------------------------------------------------------------------------

def pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.0f}"


def report(out: dict) -> str:
    """The markdown tables of everything measured so far."""
    users = ["concise", "detailed", "polite", "blunt", "focused", "playful"]
    lines = []
    c = out.get("collect")
    if c:
        lines += [f"Data: {len(c['users'])} scripted users, {c['train_turns']} training + {c['heldout_turns']} held-out turns "
                  f"each over HTTP ({c['turns']} turns in {c['wall_s']:.0f} s), noise σ = {c['noise']}; load average "
                  f"{c['machine']['load_average_1min']} at the end.", ""]
    for base, cv in out.get("curve", {}).items():
        part = f"{cv.get('user_part', 'lowrank')} user part on {cv.get('user_features', 'pair')} features"
        lines += [f"**Held-out accuracy, {base} backbone (frozen), {part}, personal / pooled** (% of each user's held-out choices; "
                  "in brackets: agreement with the user's noiseless preference)", "",
                  "| comparisons per user | " + " | ".join(users) + " | mean |", "|---" * (len(users) + 2) + "|"]
        for n, row in cv["sizes"].items():
            cells = []
            for kind in ("personal", "pooled"):
                accs = [row[kind][u]["accuracy"] for u in users]
                cells.append((accs, [row[kind][u]["gold_agreement"] for u in users]))
            (pa, pg), (qa, qg) = cells
            lines.append(f"| {n} | " + " | ".join(f"{pct(a)} / {pct(b)} ({pct(g)} / {pct(h)})" for a, b, g, h in zip(pa, qa, pg, qg))
                         + f" | {pct(sum(pa) / len(pa))} / {pct(sum(qa) / len(qa))} |")
        any_row = next(iter(cv["sizes"].values()))
        lines.append("| choices agree with gold (ceiling) | " + " | ".join(pct(any_row["personal"][u]["choices_agree_with_gold"])
                                                                         for u in users) + " | |")
        if "personal_prior" in any_row:
            lines += ["", "Prior precision λ of the personal model (chosen on the training comparisons when --prior 0): "
                      + ", ".join(f"{n} → {row['personal_prior']:g}" for n, row in cv["sizes"].items())]
        lines += ["", f"**Cold start, {base} backbone**: trained without the user, then fitted from their first m comparisons "
                  "(held-out accuracy %, fit time)", "",
                  "| user | generic (m = 0) | m = 5 | m = 10 | m = 20 |" + (" λ (chosen without the user) |" if "prior" in
                                                                         next(iter(cv["cold_start"].values()), {}) else ""),
                  "|---|---|---|---|---|" + ("---|" if "prior" in next(iter(cv["cold_start"].values()), {}) else "")]
        for u in users:
            r = cv["cold_start"].get(u)
            if r:
                lines.append(f"| {u} | {pct(r['generic']['accuracy'])} | " + " | ".join(
                    f"{pct(r[m]['accuracy'])} ({1000 * r[m]['fit_seconds']:.0f} ms)" for m in ("5", "10", "20")) + " |"
                    + (f" {r['prior']:g} |" if "prior" in r else ""))
        lines.append("")
    ft = out.get("finetune")
    if ft:
        accs = [ft["personal"][u]["accuracy"] for u in users]
        lines += [f"Fine-tuning the {ft['backbone']} backbone jointly (top {6 - ft['freeze_layers']} layers, lr {ft['lr']}, "
                  f"{ft['epochs']:g} epochs, {ft['train_s']:.0f} s) at {ft['comparisons_per_user']} comparisons per user: "
                  + ", ".join(f"{u} {pct(a)}" for u, a in zip(users, accs)) + f" (mean {pct(sum(accs) / len(accs))}).", ""]
    g = out.get("generate")
    if g:
        lines += [f"**Each user's gold utility of the replies** ({g['prompts']} held-out prompts × {g['draws']}; mean [95% CI]; "
                  f"best-of-{g['best_of']}; PPO-LoRA {g['ppo_steps']} steps)", "",
                  "| user | base | pooled RLHF | personal: rerank | personal: adapter |", "|---|---|---|---|---|"]
        for u in users:
            r = g["users"].get(u)
            if r:
                cell = (lambda m: f"{r[m]['mean']:+.2f} [{r[m]['ci'][0]:+.2f}, {r[m]['ci'][1]:+.2f}]"
                        + (" ✓" if r[m].get("beats_base_and_pooled_separated_ci") else ""))
                lines.append(f"| {u} | " + " | ".join(cell(m) for m in ("base", "pooled_rlhf", "rerank", "adapter")) + " |")
        if g.get("adapters_rerun"):
            lines += ["", f"The adapter column was re-run on {g['adapters_rerun']['date']} (`--stage adapters`: the same personal "
                          "model, prompts and seeds; the other columns as first measured)."]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--stage", choices=["collect", "curve", "finetune", "generate", "adapters", "report", "all"], default="all",
                    help="adapters: only the per-user adapters again, on the generation stage's personal model")
    ap.add_argument("--backbones", nargs="+", default=["minilm", "bundled"], help="reward backbones of the curves")
    ap.add_argument("--gen-backbone", default="minilm", help="reward backbone of the generation stage")
    ap.add_argument("--work", default=str(REPO / "runs" / "personal-bench"), help="data, models and runs go here")
    ap.add_argument("--train-turns", type=int, default=100)
    ap.add_argument("--heldout-turns", type=int, default=60)
    ap.add_argument("--noise", type=float, default=0.25)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dim", type=int, default=8, help="user dimension D")
    ap.add_argument("--prior", type=float, default=0.0, help="prior precision λ on user rows (0: chosen by cross-validation "
                                                            "on the training comparisons; needs --user-part linear)")
    ap.add_argument("--user-part", default="linear", choices=["linear", "lowrank"], help="`rlhf personal train --user-part`")
    ap.add_argument("--user-features", default="pair+reply", choices=["pair", "pair+reply"],
                    help="`rlhf personal train --user-features`")
    ap.add_argument("--ppo-steps", type=int, default=30, help="PPO steps of each adapter (pooled and per user)")
    ap.add_argument("--draws", type=int, default=4, help="replies per held-out prompt and method")
    ap.add_argument("--best-of", type=int, default=8, help="N of best-of-N reranking")
    args = ap.parse_args(argv)
    work = Path(args.work)
    part = (args.user_part, args.user_features)
    out = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    if args.stage in ("collect", "all"):
        out["collect"] = {**collect(work, args.train_turns, args.heldout_turns, args.noise, args.seed), "machine": machine()}
        print(json.dumps(out["collect"], indent=1))
    if args.stage in ("curve", "all"):
        for base in args.backbones:
            t0 = time.perf_counter()
            out.setdefault("curve", {})[base] = {**curve(work, args.train_turns, args.dim, args.prior, args.seed, base, part),
                                                 "machine": machine(), "wall_s": round(time.perf_counter() - t0, 1)}
            save(out)
    if args.stage in ("finetune", "all"):
        out["finetune"] = {**finetune_check(work, args.train_turns, 50, args.dim, args.prior, args.seed, "minilm", 4, 3.0,
                                            1e-4), "machine": machine()}
        save(out)
    if args.stage in ("generate", "all"):
        t0 = time.perf_counter()
        out["generate"] = {**generate(work, args.train_turns, args.dim, args.prior, args.seed, args.ppo_steps, args.draws,
                                      args.best_of, args.gen_backbone, part), "machine": machine(),
                           "wall_s": round(time.perf_counter() - t0, 1)}
    if args.stage == "adapters":
        if "generate" not in out:
            raise SystemExit(f"{RESULTS} has no generation stage to update: run --stage generate first")
        out["generate"] = rerun_adapters(work, args.seed, args.ppo_steps, args.gen_backbone, out["generate"])
    save(out)
    return 0


def save(out: dict) -> None:
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    out["date"] = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    RESULTS.write_text(json.dumps(out, indent=1) + "\n")
    md = report(out)
    RESULTS.with_suffix(".md").write_text(md + "\n")
    print(md)


if __name__ == "__main__":
    sys.exit(main())
