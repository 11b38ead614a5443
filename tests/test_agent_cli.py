"""``rlhf agent run | train | eval`` through the real command line, on a tiny model and a small
invented knowledge base (BM25 only, so no encoder is loaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import safetensors_weights as weights

from rlhf.agents.episode import read_episodes
from rlhf.agents.kb import documents, make_world, questions
from rlhf.cli import app
from rlhf.errors import ConfigError
from rlhf.retrieval.documents import Document
from rlhf.retrieval.index import Index


@pytest.fixture(scope="module")
def small_kb(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("kb")
    w = make_world(seed=5, people=30, towns=6, companies=6, split_sizes=(8, 6))
    Index.build([Document(d["id"], d["text"], "kb") for d in documents(w)], dense=False).save(root / "index")
    (root / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in questions(w)))
    return root / "index", root / "questions.jsonl"


def invoke(args: list[str]):
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, (res.output, res.exception)
    return res


def test_agent_run_writes_every_episode_with_its_authors(small_kb, tiny_model_dir, tmp_path):
    index, tasks = small_kb
    out = tmp_path / "episodes.jsonl"
    res = invoke(["agent", "run", "--model", str(tiny_model_dir), "--index", str(index), "--tasks", str(tasks), "--stage", "held_out",
                  "--limit", "5", "--search-mode", "bm25", "--max-turns", "2", "--max-new-tokens", "8", "--out", str(out), "--device", "cpu", "--threads", "1"])
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["episodes"] == 5 and 0 <= summary["valid_call_rate"] <= 1
    eps = read_episodes(out)
    assert [e.id for e in eps] == [json.loads(line)["id"] for line in tasks.read_text().splitlines()
                                   if json.loads(line)["stage"] == "held_out"][:5]
    for ep in eps:
        assert ep.segments[0].author == "prompt" and any(s.author == "model" for s in ep.segments)
        assert ep.messages[0]["content"].startswith("Tools: search[query], calc[expression]\nQuestion: ")
        assert ep.stop_reason in ("answer", "max_turns", "context") and ep.reward in (0.0, 1.0)
        ids, mask = ep.ids_and_mask()
        assert len(ids) == len(mask) and sum(mask) == sum(len(s.ids) for s in ep.segments if s.author == "model")


def test_agent_eval_reports_each_mode_by_hops_with_intervals(small_kb, tiny_model_dir, tmp_path):
    index, tasks = small_kb
    out = tmp_path / "eval"
    invoke(["agent", "eval", "--model", str(tiny_model_dir), "--index", str(index), "--tasks", str(tasks), "--limit", "8",
            "--search-mode", "bm25", "--max-turns", "2", "--max-new-tokens", "6", "--out", str(out), "--device", "cpu", "--threads", "1"])
    result = json.loads((out / "eval.json").read_text())
    (name,) = result["models"]
    per_mode = result["models"][name]
    assert set(per_mode) == {"closed_book", "rag", "react"}
    for mode, groups in per_mode.items():
        assert {"all", "hops=1", "hops=2"} <= set(groups)
        em = groups["all"]["exact_match"]
        assert em["n"] == 8 and em["ci95"][0] <= em["mean"] <= em["ci95"][1]
        assert groups["hops=1"]["exact_match"]["n"] + groups["hops=2"]["exact_match"]["n"] == 8
        assert (out / f"episodes-{name}-{mode}.jsonl").is_file()
    assert len(per_mode["react"]["transcripts"]) == 5
    assert set(result["retrieval"]["recall"]) == {"bm25"}  # a BM25-only index: no dense or hybrid rows
    assert "| react |" in (out / "eval.md").read_text()


def test_agent_train_runs_checkpoints_and_resumes(small_kb, tiny_model_dir, tmp_path):
    index, tasks = small_kb
    out = tmp_path / "rl"
    args = ["agent", "train", "--policy", str(tiny_model_dir), "--index", str(index), "--tasks", str(tasks), "--stage", "rl",
            "--search-mode", "bm25", "--max-turns", "2", "--max-new-tokens", "6", "--batch-size", "4", "--mini-batch-size", "2",
            "--micro-batch-size", "2", "--ppo-epochs", "1", "--save-every", "1", "--eval-every", "0", "--out", str(out), "--device", "cpu", "--threads", "1"]
    invoke(args + ["--steps", "2"])
    assert (out / "model" / "config.json").is_file() and (out / "checkpoints").is_dir()
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    assert {"exact_match", "kl", "valid_call_rate", "turns", "policy_loss", "value_loss"} <= set(lines[0])
    invoke(args + ["--steps", "3"])  # picks up at step 2
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["config"]["engine"]["threads"] == 1

    # Exact resume: the same weights and metrics as a run that went to step 3 without stopping.
    straight = tmp_path / "straight"
    invoke([a if a != str(out) else str(straight) for a in args] + ["--steps", "3"])
    resumed, uninterrupted = weights(out / "model"), weights(straight / "model")
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    again = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(lines, again):
        assert {k: v for k, v in a.items() if not k.startswith("time_")} == {k: v for k, v in b.items() if not k.startswith("time_")}

    # A changed option that shapes the steps is refused, naming it; a longer --steps is not.
    res = CliRunner().invoke(app, args + ["--steps", "4", "--lr", "1e-3"])
    assert isinstance(res.exception, ConfigError) and "--lr 2e-05 → 0.001" in str(res.exception)


def test_agent_verbs_show_the_engine_options():
    for verb in (["agent", "run"], ["agent", "train"], ["agent", "eval"], ["agent", "demo"]):
        out = CliRunner().invoke(app, [*verb, "--help"], terminal_width=200).output
        for flag in ("--device", "--dtype", "--threads", "--rollout [", "--rollout-threads", "--cpu-gemm"):
            assert flag in out, (verb, flag)
    for verb in (["index", "build"], ["index", "add"]):
        out = CliRunner().invoke(app, [*verb, "--help"], terminal_width=200).output
        assert "--device" in out and "--threads" in out and "--rollout" not in out, verb


def test_the_agent_recipe_takes_its_budget_from_either_command(monkeypatch, tmp_path):
    """`rlhf demo --recipe agent` passes the demo's PPO budget to the RL stage (unset ones keep the
    recipe's defaults), and `rlhf agent demo` sets every knob of the recipe."""
    import rlhf.agents.commands as commands
    import rlhf.agents.demo as agent_demo

    seen = []
    fake = lambda cfg: seen.append(cfg) or {"exact_match": []}  # noqa: E731
    monkeypatch.setattr(agent_demo, "run_agent_demo", fake)
    monkeypatch.setattr(agent_demo, "summary_markdown", lambda s: "table")
    monkeypatch.setattr(commands, "run_agent_demo", fake)
    monkeypatch.setattr(commands, "summary_markdown", lambda s: "table")
    res = CliRunner().invoke(app, ["demo", "--recipe", "agent", "--out", str(tmp_path / "a"), "--ppo-steps", "7",
                                   "--ppo-lr", "1e-4", "--seed", "3", "--threads", "1"])
    assert res.exit_code == 0, res.output
    cfg = seen[-1]
    assert (cfg.rl_steps, cfg.rl_lr, cfg.seed, cfg.engine.threads) == (7, 1e-4, 3, 1)
    assert cfg.rl_batch_size == agent_demo.AgentDemoConfig(out="x").rl_batch_size  # not given: the recipe's default
    res = CliRunner().invoke(app, ["agent", "demo", "--out", str(tmp_path / "b"), "--rl-batch-size", "8",
                                   "--sft-epochs", "0.5", "--eval-limit", "20"])
    assert res.exit_code == 0, res.output
    assert (seen[-1].rl_batch_size, seen[-1].sft_epochs, seen[-1].eval_limit) == (8, 0.5, 20) and "table" in res.output


def test_the_agent_recipe_sizes_its_stages_for_the_starting_model(tiny_model_dir):
    from rlhf.agents.demo import AGENT_DEFAULTS, AgentDemoConfig, with_agent_defaults

    tiny = with_agent_defaults(AgentDemoConfig(out="x", policy="bundled"))
    assert (tiny.sft_lora, tiny.sft_max_steps, tiny.sft_lr, tiny.rl_steps) == (False, 0, 1e-3, 30)
    real = with_agent_defaults(AgentDemoConfig(out="x", policy=str(tiny_model_dir), rl_steps=3))
    assert real.sft_lora and real.sft_max_steps == AGENT_DEFAULTS["other"]["sft_max_steps"] and real.rl_temperature == 0.7
    assert real.rl_steps == 3  # what the user gave stays
    assert set(AGENT_DEFAULTS["bundled"]) == set(AGENT_DEFAULTS["other"])


@pytest.mark.slow
def test_agent_demo_runs_every_stage_with_its_engine_and_skips_them_on_rerun(tiny_model_dir, tmp_path, capsys):
    """index → SFT → RL → eval on a tiny budget: every stage runs with the demo's engine section
    (saved in each stage's config), the summary has the issue's four rows, and a rerun skips all."""
    from rlhf.agents.demo import AgentDemoConfig, run_agent_demo
    from rlhf.engine.config import EngineConfig

    cfg = AgentDemoConfig(out=str(tmp_path / "demo"), policy=str(tiny_model_dir), sft_epochs=0.02, rl_steps=1,
                          rl_batch_size=4, eval_limit=4, engine=EngineConfig(device="cpu", threads=1))
    summary = run_agent_demo(cfg)
    assert set(summary["stage_seconds"]) == {"index", "examples", "sft", "rl", "eval"}
    assert [r["method"] for r in summary["exact_match"]] == ["no retrieval", "plain RAG", "ReAct before RL", "ReAct after RL"]
    assert all(r["all"]["n"] == 4 for r in summary["exact_match"]) and summary["rl"]["steps"] == 1
    for stage in ("sft", "rl"):
        saved = json.loads((tmp_path / "demo" / stage / "summary.json").read_text())["config"]["engine"]
        assert (saved["device"], saved["threads"]) == ("cpu", 1), stage
    capsys.readouterr()
    again = run_agent_demo(cfg)
    assert again["exact_match"] == summary["exact_match"]
    assert capsys.readouterr().err.count("already done") == len(summary["stage_seconds"])  # every stage skipped
