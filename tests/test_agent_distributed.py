"""``rlhf agent train`` under ``accelerate launch --num_processes 2`` (DDP on gloo, CPU): the same run
as one process with the same global batch, one writer, and exact resume under two processes.

Tolerance, as in tests/test_distributed.py (which says why at length): the two runs sum the same
terms in another order (each process's share is its own forward with its own padding, and gloo adds
the two gradient halves), so weights agree to 1e-5 and logged statistics to 1e-4 relative, while a
real difference (an episode lost or repeated, advantages whitened per process) moves weights by
about the learning rate. Episode-level statistics (exact match, turns, validity) must be equal: the
episodes are the same, sampled with per-episode seeds whichever process runs them.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import safetensors_weights as weights
from rlhf.utils.metrics import read_metrics
from test_agent_cli import small_kb  # noqa: F401 (a fixture: the small invented knowledge base, BM25 only)
from test_distributed import assert_same_metrics, close, launch

ARGS = dict(stage="rl", eval_stage="held_out", eval_every=2, eval_limit=5, search_mode="bm25", max_turns=2,
            max_new_tokens=6, temperature=1.0, steps=3, batch_size=4, mini_batch_size=4, micro_batch_size=2,
            ppo_epochs=2, lr=3e-3, init_kl_coef=0.05, save_every=2, keep_checkpoints=5, seed=4,
            tool_error_penalty=0.5, format_bonus=1.0)  # a reward an untrained tiny model's episodes vary on


def flags(model_dir: Path, kb: tuple[Path, Path], out: Path) -> list[str]:
    index, tasks = kb
    return ["agent", "train", "--policy", str(model_dir), "--index", str(index), "--tasks", str(tasks),
            "--eval-tasks", str(tasks), "--out", str(out), "--device", "cpu",
            *[x for k, v in ARGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]]


@pytest.fixture(scope="module")
def two(tiny_model_dir, small_kb, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("agent-rl") / "two"
    res = launch(flags(tiny_model_dir, small_kb, out))
    # One writer: one metrics line per step (and one for the final evaluation), one summary.
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 3]
    assert sum(1 for line in res.stdout.splitlines() if line.startswith("{")) == 1
    assert json.loads((out / "summary.json").read_text())["processes"] == 2
    return out


EPISODE_STATS = ("exact_match", "answered", "valid_call_rate", "turns", "policy_tokens", "episode_tokens",
                 "eval_exact_match", "eval_answered", "eval_turns")
UPDATE_STATS = ("reward_mean", "kl", "beta", "policy_loss", "value_loss", "grad_norm", "entropy", "clipfrac")


@pytest.mark.slow
def test_agent_rl_on_two_processes_equals_one(tiny_model_dir, small_kb, two, tmp_path):
    from rlhf.agents.train import AgentTrainConfig, train_agent
    from rlhf.engine.config import EngineConfig

    index, tasks = small_kb
    one = train_agent(AgentTrainConfig(policy=str(tiny_model_dir), index=str(index), tasks=str(tasks), eval_tasks=str(tasks),
                                       out=str(tmp_path / "one"), engine=EngineConfig(device="cpu", threads=1), **ARGS))
    assert one["steps"] == 3 and one["processes"] == 1
    m1, m2 = read_metrics(tmp_path / "one"), read_metrics(two)
    assert [r["step"] for r in m1] == [r["step"] for r in m2] == [1, 2, 3, 3]  # the last line: the final evaluation
    for r1, r2 in zip(m1, m2):
        assert {k: r1[k] for k in EPISODE_STATS if k in r1} == {k: r2[k] for k in EPISODE_STATS if k in r2}
    assert_same_metrics(m1, m2, UPDATE_STATS, rel=1e-4)
    assert close(weights(tmp_path / "one" / "model"), weights(two / "model")) < 1e-5
    assert close(weights(tiny_model_dir), weights(two / "model")) > 1e-3  # the run trained: it is no trivial equality
    assert sorted(p.name for p in (two / "checkpoints").iterdir()) == ["step-00000002", "step-00000003"]
    # Every process's episodes are written, in task order, by the one writer.
    assert len((two / "episodes-last-step.jsonl").read_text().splitlines()) == ARGS["batch_size"]


@pytest.mark.slow
def test_agent_rl_resumes_under_two_processes(tiny_model_dir, small_kb, two, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(two / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    shutil.copy(two / "metrics.jsonl", resumed / "metrics.jsonl")  # as a run killed after step 2 leaves it
    res = launch(flags(tiny_model_dir, small_kb, resumed))
    assert res.stderr.count("resuming from") == 1
    a, b = weights(two / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]  # noqa: E731
    assert strip(read_metrics(two)) == strip(read_metrics(resumed))
