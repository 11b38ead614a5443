"""``rlhf demo --recipe agent``: index → SFT on ReAct traces → RL over episodes → evaluation.

On the shipped knowledge base of invented people, towns and firms (rlhf/agents/kb.py):

1. **index** — BM25 + MiniLM over the 400 knowledge-base documents;
2. **sft**   — the starting model learns the formats from the shipped worked examples (ReAct traces,
   RAG examples, closed-book examples; loss on the model's turns only), plus copies of the ReAct and
   RAG examples with every invented name replaced by a fresh one (``examples`` stage), so that it
   learns to copy the names it reads rather than memorise the examples' facts;
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

from rlhf.agents.episode import read_episodes, write_episodes
from rlhf.agents.kb import KB_DIR, KB_RAG_K, KB_SEARCH_K, KB_TOOLS
from rlhf.config import opt
from rlhf.engine.config import EngineConfig
from rlhf.utils.io import atomic_write_json, atomic_write_text


@dataclass
class AgentDemoConfig:
    """The agent recipe's knobs (the demo's --out, --policy, --seed and engine section apply)."""

    out: str = opt("runs/agent", help="Output folder.")
    policy: str = opt("bundled", help="Starting model.")
    sft_epochs: float | None = opt(None, help="Passes over the worked examples (unset: 3 for bundled, 1 for other models).")
    sft_max_steps: int | None = opt(None, help="Stop SFT after this many steps (0 = all epochs; unset: 0 for bundled, 40 for "
                                               "other models, whose steps cost ~100× more and which learn the format fast).")
    sft_lr: float | None = opt(None, help="SFT learning rate (unset: 1e-3 for the tiny bundled model, 3e-4 for a LoRA adapter).")
    sft_batch_size: int | None = opt(None, help="SFT batch size (unset: 32 for bundled, 8 for other models).")
    sft_lora: bool | None = opt(None, help="SFT trains a LoRA adapter, merged at the end (unset: off for bundled, on otherwise).")
    sft_renamed_copies: int = opt(3, help="Copies of each ReAct and RAG worked example with every invented name replaced by a "
                                          "fresh one, added to the SFT data so the model learns to copy names from what it reads "
                                          "instead of memorising the examples' facts (0 = the shipped examples only).")
    rl_steps: int | None = opt(None, help="PPO iterations over episodes (unset: 30 for bundled, 8 for other models).")
    rl_batch_size: int | None = opt(None, help="Episodes per PPO iteration (unset: 32 for bundled, 16 for other models).")
    rl_lr: float | None = opt(None, help="PPO learning rate (unset: 1e-5 for bundled, 1e-6 for other models, trained in full).")
    rl_temperature: float | None = opt(None, help="Sampling temperature of RL episodes (unset: 1.0 for bundled, 0.7 otherwise).")
    init_kl_coef: float | None = opt(None, help="β of the per-token KL penalty (unset: 0.2 for bundled, 0.05 for other models).")
    eval_limit: int = opt(0, help="Evaluate on at most this many held-out questions (0 = all 240).")
    seed: int = opt(0, help="Seed of every stage.")
    resume: bool = opt(True, help="Skip stages whose outputs are complete.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How every stage runs (device, threads, rollout backend, ...).")


# What suits the tiny bundled model and what suits a real one (benchmarks/RESULTS.md, issue 18):
# SmolLM2-135M learns the formats in 40 LoRA steps of 8 examples; on the bundled model, RL at
# lr 3e-5 / β 0.05 cost 4 points of held-out exact match (it drifted the copying of names), at
# lr 1e-5 / β 0.2 it kept the SFT model's.
AGENT_DEFAULTS: dict[str, dict] = {
    "bundled": {"sft_epochs": 3.0, "sft_max_steps": 0, "sft_lr": 1e-3, "sft_batch_size": 32, "sft_lora": False,
                "rl_steps": 30, "rl_batch_size": 32, "rl_lr": 1e-5, "rl_temperature": 1.0, "init_kl_coef": 0.2},
    "other": {"sft_epochs": 1.0, "sft_max_steps": 40, "sft_lr": 3e-4, "sft_batch_size": 8, "sft_lora": True,
              "rl_steps": 8, "rl_batch_size": 16, "rl_lr": 1e-6, "rl_temperature": 0.7, "init_kl_coef": 0.05},
}


def with_agent_defaults(cfg: AgentDemoConfig) -> AgentDemoConfig:
    """A copy of ``cfg`` whose unset (None) options take the values that suit its starting model."""
    from rlhf.models.named import with_model_defaults

    return with_model_defaults(cfg, AGENT_DEFAULTS)


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def run_agent_demo(cfg: AgentDemoConfig) -> dict:
    from rlhf.agents.commands import AgentEvalConfig, run_agent_eval
    from rlhf.agents.train import AgentTrainConfig, train_agent
    from rlhf.retrieval.documents import read_documents
    from rlhf.retrieval.index import Index
    from rlhf.train.sft import SFTConfig, run_sft

    cfg = with_agent_defaults(cfg)
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
    if cfg.sft_renamed_copies > 0:
        shipped, examples = examples, out / "sft-examples.jsonl"
        stage("examples", examples, lambda: write_episodes(examples, _with_renamed_copies(shipped, cfg)))
    sft = out / "sft"
    stage("sft", sft / "summary.json", lambda: run_sft(SFTConfig(
        data=str(examples), out=str(sft), model=cfg.policy, epochs=cfg.sft_epochs, batch_size=cfg.sft_batch_size, lr=cfg.sft_lr,
        max_steps=cfg.sft_max_steps, lora=cfg.sft_lora, warmup_steps=_warmup(cfg.sft_max_steps), save_every=25, seed=cfg.seed,
        engine=cfg.engine)))
    rl = out / "rl"
    rl_cfg = AgentTrainConfig(
        out=str(rl), tasks=str(questions), policy=str(sft / "model"), index=str(index), stage="rl", eval_tasks=str(questions),
        eval_stage="held_out", eval_every=10, eval_limit=60, tools=list(KB_TOOLS), search_k=KB_SEARCH_K, steps=cfg.rl_steps,
        batch_size=cfg.rl_batch_size, mini_batch_size=min(16, cfg.rl_batch_size), micro_batch_size=min(16, cfg.rl_batch_size),
        lr=cfg.rl_lr, temperature=cfg.rl_temperature, init_kl_coef=cfg.init_kl_coef, seed=cfg.seed, engine=cfg.engine)
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


def _warmup(max_steps: int) -> int:
    """10 warmup steps, or a tenth of a short step budget (40 steps warm up over 4)."""
    return 10 if not max_steps else max(1, min(10, max_steps // 10))


def _with_renamed_copies(shipped: Path, cfg: AgentDemoConfig) -> list:
    from rlhf.agents.kb import renamed_copies

    episodes = read_episodes(shipped)
    return episodes + renamed_copies(episodes, cfg.sft_renamed_copies, seed=cfg.seed)


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
