"""Evaluating agents on questions with answers: no retrieval, plain RAG, and ReAct, side by side.

For every model and way of answering, on the same tasks with greedy decoding:

* ``closed_book`` — the question alone (``Question: ...``): what the weights know;
* ``rag``         — the question's top passages from the index in the prompt (rlhf/retrieval/rag.py):
  one retrieval with the question's words;
* ``react``       — an episode with tools (search the index, ...): retrieve, read, retrieve again.

Exact match and F1 of the final answer with 95% bootstrap intervals, overall and by number of hops
(a task's ``hops`` field), and for ReAct the tool-call validity rate (calls that did not produce an
error observation), turns per episode and the fraction of episodes that ended with an answer.
Retrieval itself is measured apart: recall@k of BM25, dense and hybrid ranking against each
question's ``supporting`` documents.

A single-turn reply without ``Answer:`` is read leniently (its first line is the answer), so the
baselines are not marked down for format alone; a ReAct episode must answer within its turns.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import torch

from rlhf.agents.episode import Episode, write_episodes
from rlhf.agents.kb import closed_book_prompt
from rlhf.agents.rewards import exact_match, f1_score, gold_answers
from rlhf.agents.runner import AgentConfig, EpisodeRunner, Task
from rlhf.agents.tools import ToolRegistry
from rlhf.eval.stats import summarise
from rlhf.retrieval.rag import rag_prompt
from rlhf.rollout.backends import RolloutBackend

MODES = ("closed_book", "rag", "react")


@dataclass
class ModeResult:
    mode: str
    episodes: list[Episode]


def lenient_answer(ep: Episode) -> str | None:
    """The final answer, or for a single-turn reply without ``Answer:`` its first line."""
    if ep.final_answer is not None:
        return ep.final_answer
    replies = [m["content"] for m in ep.messages if m["role"] == "assistant"]
    if len(replies) != 1:
        return None
    first = replies[0].strip().splitlines()[0] if replies[0].strip() else ""
    return first.split(":", 1)[1].strip() if first.lower().startswith("answer:") else first or None


def run_mode(mode: str, model, tokenizer, tasks: list[Task], tools: ToolRegistry, index, cfg: AgentConfig,
             rag_k: int = 3, rag_mode: str = "hybrid", seed: int = 0, progress: bool = False,
             backend: RolloutBackend | None = None) -> list[Episode]:
    """Episodes of one way of answering (greedy unless ``cfg`` samples), sampled by ``backend``."""
    if mode == "react":
        return EpisodeRunner(model, tokenizer, tools, cfg, backend).run(tasks, seed=seed, progress=progress)
    single = EpisodeRunner(model, tokenizer, ToolRegistry(), cfg, backend)  # no tools: one reply, no actions run
    if mode == "closed_book":
        prompts = [closed_book_prompt(t.question) for t in tasks]
    elif mode == "rag":
        hits = index.search_many([t.question for t in tasks], rag_k, rag_mode)
        prompts = [rag_prompt(t.question, h) for t, h in zip(tasks, hits)]
    else:
        raise ValueError(f"unknown mode {mode!r}; modes are {', '.join(MODES)}")
    episodes = single.run(tasks, seed=seed, progress=progress, user_messages=prompts, max_turns=1)
    for ep in episodes:
        ep.final_answer = lenient_answer(ep)
        ep.meta["mode"] = mode
    return episodes


def _summary(values: list[float], seed: int) -> dict:
    s = summarise(torch.tensor(values, dtype=torch.float64), seed=seed)
    return {"mean": round(s.mean, 4), "ci95": [round(s.ci_low, 4), round(s.ci_high, 4)], "n": s.n}


def score_episodes(episodes: list[Episode], seed: int = 0) -> dict:
    """EM, F1 (with CIs) overall and by hops; validity rate, turns, answered fraction."""
    groups: dict[str, list[Episode]] = {"all": episodes}
    for ep in episodes:
        if "hops" in ep.meta:
            groups.setdefault(f"hops={ep.meta['hops']}", []).append(ep)
    out = {}
    for name, eps in sorted(groups.items()):
        em = [exact_match(e.final_answer, gold_answers(e)) for e in eps]
        f1 = [f1_score(e.final_answer, gold_answers(e)) for e in eps]
        calls = sum(e.tool_calls for e in eps)
        out[name] = {"exact_match": _summary(em, seed), "f1": _summary(f1, seed),
                     "tool_calls": calls, "valid_call_rate": round(1 - sum(e.invalid_calls for e in eps) / calls, 4) if calls else None,
                     "turns_per_episode": round(sum(e.turns for e in eps) / len(eps), 3),
                     "answered": round(sum(e.final_answer is not None for e in eps) / len(eps), 4)}
    return out


def retrieval_recall(index, tasks: list[Task], k: int = 3) -> dict:
    """recall@k of each ranking against the tasks' ``supporting`` documents, overall and by hops."""
    from rlhf.retrieval.index import MODES as RANKINGS, recall_at_k

    tasks = [t for t in tasks if t.meta.get("supporting")]
    if not tasks:
        return {}
    out = {}
    for ranking in RANKINGS:
        if ranking != "bm25" and index.embeddings is None:
            continue
        r = recall_at_k(index, [t.question for t in tasks], [set(t.meta["supporting"]) for t in tasks], k, ranking)
        row = {"all": round(float(r.mean()), 4)}
        for hops in sorted({t.meta.get("hops") for t in tasks} - {None}):
            sel = [i for i, t in enumerate(tasks) if t.meta.get("hops") == hops]
            row[f"hops={hops}"] = round(float(r[sel].mean()), 4)
        out[ranking] = row
    return {"k": k, "n": len(tasks), "recall": out}


def transcript(ep: Episode) -> str:
    """An episode as a person reads it: each message with its author."""
    lines = [f"## {ep.id} — gold: {ep.answer!r}, answered: {ep.final_answer!r}, reward: {ep.reward}"]
    for m in ep.messages:
        who = {"user": "user (prompt)", "assistant": "model", "tool": "environment"}[m["role"]]
        lines.append(f"[{who}]\n{m['content']}")
    return "\n".join(lines)


def evaluate_models(models: dict[str, tuple], tasks: list[Task], tools: ToolRegistry, index, cfg: AgentConfig,
                    modes: list[str], out_dir: str | Path, rag_k: int = 3, rag_mode: str = "hybrid", seed: int = 0,
                    progress: bool = False, transcripts: int = 5, backend: RolloutBackend | None = None) -> dict:
    """``models``: name → (model, tokenizer); ``backend`` samples their turns. Writes episodes-<name>-<mode>.jsonl and returns the table."""
    out_dir = Path(out_dir)
    greedy = replace(cfg, temperature=0.0)
    result: dict = {"tasks": len(tasks), "modes": modes, "models": {}}
    for name, (model, tok) in models.items():
        per_mode = {}
        for mode in modes:
            eps = run_mode(mode, model, tok, tasks, tools, index, greedy, rag_k=rag_k, rag_mode=rag_mode, seed=seed, progress=progress,
                           backend=backend)
            for ep in eps:
                ep.reward = exact_match(ep.final_answer, gold_answers(ep))
            write_episodes(out_dir / f"episodes-{name}-{mode}.jsonl", eps)
            per_mode[mode] = score_episodes(eps, seed)
            if mode == "react" and transcripts:
                per_mode[mode]["transcripts"] = [transcript(e) for e in eps[:transcripts]]
        result["models"][name] = per_mode
    return result


def format_table(result: dict) -> str:
    """A Markdown table: exact match (95% CI) by model, mode and hops; ReAct's validity and turns."""
    rows = ["| model | mode | hops | exact match (95% CI) | n | valid calls | turns |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, per_mode in result["models"].items():
        for mode, groups in per_mode.items():
            for g, s in groups.items():
                if g == "transcripts":
                    continue
                em = s["exact_match"]
                valid = "" if s["valid_call_rate"] is None else f"{s['valid_call_rate']:.3f}"
                turns = f"{s['turns_per_episode']:.2f}" if mode == "react" else ""
                rows.append(f"| {name} | {mode} | {g.replace('hops=', '')} | {em['mean']:.3f} ({em['ci95'][0]:.3f}–{em['ci95'][1]:.3f})"
                            f" | {em['n']} | {valid} | {turns} |")
    return "\n".join(rows)


def save_result(result: dict, out_dir: str | Path) -> None:
    from rlhf.utils.io import atomic_write_json, atomic_write_text

    out_dir = Path(out_dir)
    atomic_write_json(out_dir / "eval.json", result)
    atomic_write_text(out_dir / "eval.md", format_table(result) + "\n")
