"""``rlhf demo --recipe agent``: index → SFT on ReAct traces → RL over episodes → evaluation.

On the shipped knowledge base of invented people, towns and firms (rlhf/agents/kb.py):

1. **index** — BM25 + MiniLM over the 400 knowledge-base documents;
2. **sft**   — the starting model learns the formats from the shipped worked examples (ReAct traces,
   RAG examples, closed-book examples; loss on the model's turns only);
3. **rl**    — PPO over ReAct episodes on the ``rl`` questions (people never seen in SFT), rewarded
   by exact match of the final answer;
4. **eval**  — held-out questions, greedy: no retrieval, plain RAG and ReAct for the SFT model and the
   RL model, exact match with 95% CIs by hops, tool-call validity, turns, recall@3 of the index,
   and the first five held-out transcripts.

Every stage writes under ``--out``; a rerun skips stages whose outputs are complete.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.agents.kb import KB_DIR, KB_RAG_K, KB_SEARCH_K, KB_TOOLS
from rlhf.config import opt
from rlhf.engine.config import EngineConfig
from rlhf.utils.io import atomic_write_json, atomic_write_text


@dataclass
class AgentDemoConfig:
    """The agent recipe's knobs (the demo's --out, --policy, --seed and engine section apply)."""

    out: str = opt("runs/agent", help="Output folder.")
    policy: str = opt("bundled", help="Starting model.")
    sft_epochs: float = opt(3.0, help="Passes over the worked examples.")
    sft_lr: float = opt(1e-3, help="SFT learning rate (the bundled model is tiny; lower it for larger models).")
    sft_batch_size: int = opt(32, help="SFT batch size.")
    rl_steps: int = opt(30, help="PPO iterations over episodes.")
    rl_batch_size: int = opt(32, help="Episodes per PPO iteration.")
    rl_lr: float = opt(3e-5, help="PPO learning rate.")
    init_kl_coef: float = opt(0.05, help="β of the per-token KL penalty.")
    eval_limit: int = opt(0, help="Evaluate on at most this many held-out questions (0 = all 240).")
    seed: int = opt(0, help="Seed of every stage.")
    resume: bool = opt(True, help="Skip stages whose outputs are complete.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How every stage runs (device, threads, rollout backend, ...).")


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def run_agent_demo(cfg: AgentDemoConfig) -> dict:
    from rlhf.agents.commands import AgentEvalConfig, run_agent_eval
    from rlhf.agents.train import AgentTrainConfig, train_agent
    from rlhf.retrieval.documents import read_documents
    from rlhf.retrieval.index import Index
    from rlhf.train.sft import SFTConfig, run_sft

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    questions, examples = KB_DIR / "questions.jsonl", KB_DIR / "sft.jsonl"
    stages_file = out / "stages.json"
    stages: dict[str, float] = json.loads(stages_file.read_text()) if cfg.resume and stages_file.is_file() else {}

    def stage(name: str, done: Path, fn) -> None:
        if cfg.resume and done.exists():
            _say(f"[{name}] already done ({done}); skipping")
            return
        _say(f"[{name}] ...")
        t = time.perf_counter()
        fn()
        stages[name] = round(time.perf_counter() - t, 1)
        atomic_write_json(stages_file, stages)
        _say(f"[{name}] done in {stages[name]} s")

    index = out / "index"
    stage("index", index / "index.json", lambda: Index.build(read_documents(KB_DIR / "kb.jsonl")[0], device="cpu").save(index))
    sft = out / "sft"
    stage("sft", sft / "summary.json", lambda: run_sft(SFTConfig(
        data=str(examples), out=str(sft), model=cfg.policy, epochs=cfg.sft_epochs, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
        warmup_steps=10, save_every=25, seed=cfg.seed, engine=cfg.engine)))
    rl = out / "rl"
    rl_cfg = AgentTrainConfig(
        out=str(rl), tasks=str(questions), policy=str(sft / "model"), index=str(index), stage="rl", eval_tasks=str(questions),
        eval_stage="held_out", eval_every=10, eval_limit=60, tools=list(KB_TOOLS), search_k=KB_SEARCH_K, steps=cfg.rl_steps,
        batch_size=cfg.rl_batch_size, mini_batch_size=min(16, cfg.rl_batch_size), micro_batch_size=min(16, cfg.rl_batch_size),
        lr=cfg.rl_lr, init_kl_coef=cfg.init_kl_coef, seed=cfg.seed, engine=cfg.engine)
    rl_cfg.validate()
    stage("rl", rl / "summary.json", lambda: train_agent(rl_cfg))
    ev = out / "eval"
    eval_cfg = AgentEvalConfig(model=[str(sft / "model"), str(rl / "model")], tasks=str(questions), index=str(index), out=str(ev),
                               stage="held_out", limit=cfg.eval_limit, rag_k=KB_RAG_K, tools=list(KB_TOOLS), search_k=KB_SEARCH_K,
                               seed=cfg.seed, engine=cfg.engine)
    eval_cfg.validate()
    stage("eval", ev / "eval.json", lambda: _say(run_agent_eval(eval_cfg)[1]))
    summary = summarise(json.loads((ev / "eval.json").read_text()), json.loads((rl / "summary.json").read_text()), stages)
    atomic_write_json(out / "summary.json", summary)
    atomic_write_text(out / "summary.md", summary_markdown(summary))
    return summary


HEADLINE = [("no retrieval", "sft", "closed_book"), ("plain RAG", "sft", "rag"), ("ReAct before RL", "sft", "react"),
            ("ReAct after RL", "rl", "react")]


def summarise(ev: dict, rl: dict, stages: dict) -> dict:
    """The issue's table: exact match by way of answering and hops, validity and turns before/after RL."""
    rows = []
    for label, model, mode in HEADLINE:
        groups = ev["models"][model][mode]
        row = {"method": label}
        for g in ("all", "hops=1", "hops=2"):
            if g in groups:
                row[g] = groups[g]["exact_match"]
        if mode == "react":
            row["valid_call_rate"] = groups["all"]["valid_call_rate"]
            row["turns_per_episode"] = groups["all"]["turns_per_episode"]
            row["answered"] = groups["all"]["answered"]
        rows.append(row)
    return {"exact_match": rows, "retrieval": ev.get("retrieval"), "transcripts_after_rl": ev["models"]["rl"]["react"].get("transcripts"),
            "transcripts_before_rl": ev["models"]["sft"]["react"].get("transcripts"),
            "rl": {k: rl.get(k) for k in ("steps", "first_step", "last_step", "final_eval")}, "stage_seconds": stages}


def summary_markdown(summary: dict) -> str:
    lines = ["| method | all | single-hop | two-hop | valid calls | turns |", "| --- | --- | --- | --- | --- | --- |"]

    def cell(s: dict | None) -> str:
        return "" if s is None else f"{s['mean']:.3f} ({s['ci95'][0]:.3f}–{s['ci95'][1]:.3f}, n={s['n']})"

    for row in summary["exact_match"]:
        valid = row.get("valid_call_rate")
        lines.append(f"| {row['method']} | {cell(row.get('all'))} | {cell(row.get('hops=1'))} | {cell(row.get('hops=2'))} | "
                     f"{'' if valid is None else f'{valid:.3f}'} | {row.get('turns_per_episode', '')} |")
    rec = summary.get("retrieval") or {}
    if rec:
        lines += ["", f"recall@{rec['k']} on the held-out questions (n={rec['n']}):", "", "| ranking | all | single-hop | two-hop |",
                  "| --- | --- | --- | --- |"]
        for ranking, r in rec["recall"].items():
            lines.append(f"| {ranking} | {r['all']:.3f} | {r.get('hops=1', float('nan')):.3f} | {r.get('hops=2', float('nan')):.3f} |")
    return "\n".join(lines) + "\n"
