"""``rlhf agent run | train | eval | demo | kb``: thin entry points over rlhf.agents."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.agents.demo import AgentDemoConfig, run_agent_demo, summary_markdown
from rlhf.agents.runner import AgentConfig
from rlhf.agents.train import AgentTrainConfig, agent_config, select_tasks, train_agent
from rlhf.config import config_command, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.runtime import Runtime, start
from rlhf.errors import ConfigError


@click.group(name="agent")
def agent() -> None:
    """ReAct agents: run episodes with tools, train them with RL over episodes, evaluate, the shipped KB."""


@dataclass(kw_only=True)
class AgentRunConfig(AgentConfig):
    """Run ReAct episodes (thought, action, observation, answer) with tools over an index."""

    model: str = opt("bundled", help="Local Hugging Face causal-LM folder, or 'bundled'.")
    tasks: str = opt(help="Tasks (JSON Lines: question, optional answer), e.g. rlhf/assets/agent/questions.jsonl.")
    out: str = opt(help="Episodes file to write (JSON Lines): every turn with its author, tokens, answer, reward.")
    index: str = opt("", help="Index folder for the search tool.")
    stage: str = opt("", help="Only tasks whose 'stage' or 'split' field equals this (empty = all).")
    limit: int = opt(0, help="Run at most this many tasks (0 = all).")
    tools: list[str] = opt(factory=lambda: ["search", "calc"], help="Built-in tools: search, calc.")
    tool: list[str] = opt(factory=list, help="A user tool as module:function (schema from its signature).")
    search_k: int = opt(3, help="Passages the search tool returns.")
    search_mode: str = opt("hybrid", help="Ranking of the search tool: bm25, dense or hybrid.")
    seed: int = opt(0, help="Sampling seed.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, rollout backend, ...).")


def _load(model: str, rt: Runtime):
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(model, device=rt.device, dtype=rt.dtype), load_tokenizer(model)


def _tools(cfg):
    from rlhf.agents.tools import make_registry
    from rlhf.retrieval.index import Index

    index = Index.load(cfg.index) if cfg.index else None
    return make_registry(cfg.tools, index, cfg.search_k, cfg.search_mode, cfg.tool), index


@config_command(AgentRunConfig, name="run")
def run(cfg: AgentRunConfig) -> None:
    """Each task's full episode goes to --out; prints exact match, validity and turns."""
    from rlhf.agents.episode import write_episodes
    from rlhf.agents.rewards import exact_match, gold_answers
    from rlhf.agents.runner import EpisodeRunner, read_tasks
    from rlhf.agents.train import episode_stats

    from rlhf.rollout.backends import make_backend

    rt = start(cfg.engine)
    t0 = time.perf_counter()
    tools, _ = _tools(cfg)
    tasks = select_tasks(read_tasks(cfg.tasks), cfg.stage)
    tasks = tasks[:cfg.limit] if cfg.limit else tasks
    model, tok = _load(cfg.model, rt)
    runner = EpisodeRunner(model, tok, tools, agent_config(cfg), make_backend(rt.engine, model, tok))
    episodes = runner.run(tasks, seed=cfg.seed, progress=True)
    for ep in episodes:
        if gold_answers(ep):
            ep.reward = exact_match(ep.final_answer, gold_answers(ep))
    write_episodes(cfg.out, episodes)
    click.echo(json.dumps({"episodes": len(episodes), **{k: round(v, 4) for k, v in episode_stats(episodes).items()},
                           "seconds": round(time.perf_counter() - t0, 1), "out": cfg.out}))


@config_command(AgentTrainConfig, name="train")
def train(cfg: AgentTrainConfig) -> None:
    """PPO over multi-turn episodes: loss, KL and advantages on the model's tokens only."""
    summary = train_agent(cfg)
    if summary is not None:  # the main process (the others return None)
        click.echo(json.dumps({k: summary[k] for k in ("steps", "model", "seconds_this_run", "final_eval")}))


@dataclass(kw_only=True)
class AgentEvalConfig(AgentConfig):
    """Exact match without retrieval, with plain RAG and with ReAct, by hops, with 95% CIs."""

    model: list[str] = opt(factory=lambda: ["bundled"], help="Models to compare (repeat the option).")
    tasks: str = opt(help="Tasks with answers (JSON Lines), e.g. rlhf/assets/agent/questions.jsonl.")
    index: str = opt(help="Index folder: the RAG passages and the search tool.")
    out: str = opt(help="Output folder: eval.json, eval.md and every episode.")
    stage: str = opt("held_out", help="Only tasks whose 'stage' or 'split' field equals this (empty = all).")
    limit: int = opt(0, help="Evaluate at most this many tasks (0 = all).")
    modes: list[str] = opt(factory=lambda: ["closed_book", "rag", "react"], help="Ways of answering: closed_book, rag, react.")
    rag_k: int = opt(3, help="Passages in a RAG prompt.")
    tools: list[str] = opt(factory=lambda: ["search"], help="Built-in tools of the ReAct agent: search, calc.")
    tool: list[str] = opt(factory=list, help="A user tool as module:function.")
    search_k: int = opt(1, help="Passages the search tool returns.")
    search_mode: str = opt("hybrid", help="Ranking of the search tool and of RAG: bm25, dense or hybrid.")
    recall_k: int = opt(3, help="k of the retrieval recall@k table.")
    transcripts: int = opt(5, help="Full ReAct transcripts kept in eval.json per model (the first N tasks).")
    seed: int = opt(0, help="Seed.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, rollout backend, ...).")

    def validate(self) -> None:
        from rlhf.agents.evaluate import MODES

        bad = [m for m in self.modes if m not in MODES]
        if bad:
            raise ConfigError(f"--modes {bad}: expected {', '.join(MODES)}")


def run_agent_eval(cfg: AgentEvalConfig) -> tuple[dict, str]:
    from rlhf.agents.evaluate import evaluate_models, format_table, retrieval_recall, save_result
    from rlhf.agents.runner import read_tasks

    from rlhf.rollout.backends import make_backend

    rt = start(cfg.engine)
    if rt.engine.rollout == "vllm":  # its engine holds one model's weights; this compares several
        raise ConfigError("rlhf agent eval samples with --rollout fast or hf (vLLM serves one model per engine)")
    tools, index = _tools(cfg)
    tasks = select_tasks(read_tasks(cfg.tasks), cfg.stage)
    tasks = tasks[:cfg.limit] if cfg.limit else tasks
    names = {}
    for m in cfg.model:
        name = m if m in ("bundled", "default") else Path(m).parent.name if Path(m).name == "model" else Path(m).name
        names[name if name not in names else m] = _load(m, rt)
    result = evaluate_models(names, tasks, tools, index, agent_config(cfg), cfg.modes, cfg.out, rag_k=cfg.rag_k,
                             rag_mode=cfg.search_mode, seed=cfg.seed, progress=True, transcripts=cfg.transcripts,
                             backend=make_backend(rt.engine))
    result["retrieval"] = retrieval_recall(index, tasks, cfg.recall_k)
    save_result(result, cfg.out)
    return result, format_table(result)


@config_command(AgentEvalConfig, name="eval")
def eval_command(cfg: AgentEvalConfig) -> None:
    """Writes eval.json and eval.md; prints the table."""
    _, table = run_agent_eval(cfg)
    click.echo(table)


@config_command(AgentDemoConfig, name="demo")
def demo_command(cfg: AgentDemoConfig) -> None:
    """The agent recipe with every knob (what `rlhf demo --recipe agent` runs with the demo's options):
    index → SFT on the worked examples → RL over episodes → evaluation; prints the table."""
    click.echo(summary_markdown(run_agent_demo(cfg)))


@agent.command("kb")
@click.option("--out", required=True, help="Folder for kb.jsonl, questions.jsonl, index/ and sft.jsonl.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the invented world.")
def kb(out: str, seed: int) -> None:
    """Generate the invented-entity knowledge base, its questions, its index and SFT examples."""
    from rlhf.agents.kb import write_kb

    click.echo(json.dumps(write_kb(out, seed)))


agent.add_command(run)
agent.add_command(train)
agent.add_command(eval_command)
agent.add_command(demo_command)
