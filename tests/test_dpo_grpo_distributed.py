"""DPO and GRPO on several processes through accelerate (DDP on gloo, here on CPU): a 2-process run
takes the same steps as a 1-process run with the same global batch, only the main process writes,
and a GRPO run resumes under 2 processes to exactly the uninterrupted result.

Tolerance, and why (as for reward training, SFT and PPO in tests/test_distributed.py): the two runs
compute the same sums in a different order (each process scores its share of a batch in its own
forwards, with its own padding and packing, and gloo adds the two gradient halves), so float32
results differ by rounding, ~1e-7 relative per operation, which Adam turns into weight differences
of 1e-7 to 1e-6 over a few steps. A real difference (a pair or group read twice or not at all, a
reference log-probability left at 0, a minibatch normalised by its local instead of its global
token count) moves the weights by about the learning rate, 1e-3. Weights must agree to 1e-5,
logged statistics to 1e-4 relative.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from conftest import safetensors_weights as weights
from rlhf.engine.config import EngineConfig
from rlhf.utils.metrics import read_metrics
from test_distributed import PROMPTS, assert_same_metrics, close, launch, written_once

pytestmark = pytest.mark.slow  # each test launches accelerate (two Python processes with torch)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    from test_reward import polite_pairs, write_jsonl

    root = tmp_path_factory.mktemp("dist-algos")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return {"prompts": prompts, "pairs": write_jsonl(root / "pairs.jsonl", polite_pairs(48))}


def flags(args: dict) -> list[str]:
    return [x for k, v in args.items() for x in
            ((f"--{k.replace('_', '-')}", str(v)) if not isinstance(v, bool) else (f"--{'' if v else 'no-'}{k.replace('_', '-')}",))]


def dpo_args(tiny_model_dir, data) -> dict:
    return dict(pairs=str(data["pairs"]), policy=str(tiny_model_dir), val_fraction=0.25, epochs=1.0, batch_size=8,
                micro_batch_size=2, lr=2e-3, max_steps=4, eval_every=2, save_every=2, keep_checkpoints=10,
                eval_batch_size=4, seed=1)


def dpo_flags(args: dict, out: Path) -> list[str]:
    return ["dpo", "--out", str(out), "--device", "cpu", "--no-progress", *flags(args)]


@pytest.fixture(scope="module")
def dpo_two(tiny_model_dir, data, tmp_path_factory) -> Path:
    """An uninterrupted 2-process DPO run (checkpoints at steps 2 and 4)."""
    out = tmp_path_factory.mktemp("dpo") / "two"
    res = launch(dpo_flags(dpo_args(tiny_model_dir, data), out))
    written_once(out, res.stdout)
    return out


def test_dpo_on_two_processes_equals_one(tiny_model_dir, data, dpo_two, tmp_path):
    """Each process takes half of every batch of pairs and scores half of the reference's and the
    validation's batches; the gathered scores and averaged gradients give one process's run."""
    from rlhf.train.dpo import DPOConfig, run_dpo

    args = dpo_args(tiny_model_dir, data)
    one = run_dpo(DPOConfig(out=str(tmp_path / "one"), progress=False, **args, engine=EngineConfig(device="cpu", threads=1)))
    shutil.copytree(dpo_two, tmp_path / "two")
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["steps"] == one["steps"] == 4 and two["val_accuracy_first"] == one["val_accuracy_first"] == 0.5
    assert close(weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")) < 1e-5
    assert_same_metrics(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"),
                        ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen",
                         "grad_norm", "val_loss", "val_accuracy", "val_margin"), rel=1e-4)
    # the reference was scored in halves and gathered: every pair's, as one process scores them
    from safetensors.torch import load_file

    for name in ("reference_logprobs.safetensors", "reference_logprobs_val.safetensors"):
        a, b = load_file(str(tmp_path / "one" / name)), load_file(str(tmp_path / "two" / name))
        assert (a["chosen"] != 0).all() and torch.allclose(a["chosen"], b["chosen"], atol=1e-5)
        assert torch.allclose(a["rejected"], b["rejected"], atol=1e-5)
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts == ["step-00000002", "step-00000004"]


def test_dpo_resumes_under_two_processes(tiny_model_dir, data, dpo_two, tmp_path):
    """What a run killed after its step-2 checkpoint leaves (that checkpoint, the cached reference
    log-probabilities, the metrics written so far) resumes under 2 processes to the same weights and
    metrics as the uninterrupted run."""
    resumed = tmp_path / "resumed"
    shutil.copytree(dpo_two / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    for name in ("metrics.jsonl", "reference_logprobs.safetensors", "reference_logprobs_val.safetensors"):
        shutil.copy(dpo_two / name, resumed / name)
    res = launch(dpo_flags(dpo_args(tiny_model_dir, data), resumed))
    assert res.stderr.count("resuming from") == 1
    a, b = weights(dpo_two / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time_", "pairs_per"))} for r in rows]  # noqa: E731
    assert strip(read_metrics(dpo_two)) == strip(read_metrics(resumed))


GRPO_ARGS = dict(reward="length", max_steps=4, group_size=4, batch_size=8, mini_batch_size=8, micro_batch_size=2,
                 ppo_epochs=2, max_new_tokens=8, lr=3e-3, kl_coef=0.05, save_every=2, keep_checkpoints=10, seed=3,
                 missing_eos_penalty=0.0)


def grpo_flags(model_dir, prompts, out) -> list[str]:
    return ["grpo", "--policy", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
            "--no-progress", *flags(GRPO_ARGS)]


@pytest.fixture(scope="module")
def grpo_two(tiny_model_dir, data, tmp_path_factory) -> Path:
    """An uninterrupted 2-process GRPO run (one group per process and step)."""
    out = tmp_path_factory.mktemp("grpo") / "two"
    res = launch(grpo_flags(tiny_model_dir, data["prompts"], out))
    written_once(out, res.stdout)
    return out


def test_grpo_on_two_processes_equals_one(tiny_model_dir, data, grpo_two, tmp_path):
    """With the minibatch the whole batch, two processes sample the same episodes (per-episode seeds,
    whole groups each), take global statistics and normalise by the global token count."""
    from rlhf.train.grpo import GRPOConfig, run_grpo

    one = run_grpo(GRPOConfig(out=str(tmp_path / "one"), policy=str(tiny_model_dir), prompts=str(data["prompts"]),
                              progress=False, engine=EngineConfig(device="cpu", threads=1), **GRPO_ARGS))
    assert one["steps"] == 4
    assert close(weights(tmp_path / "one" / "model"), weights(grpo_two / "model")) < 1e-5
    assert_same_metrics(read_metrics(tmp_path / "one"), read_metrics(grpo_two),
                        ("score_mean", "score_std", "group_score_std", "kl", "response_length", "advantage_abs_mean",
                         "policy_loss", "clipfrac", "kl_k3", "grad_norm", "entropy"), rel=1e-4)


def test_grpo_resumes_under_two_processes(tiny_model_dir, data, grpo_two, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(grpo_two / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    shutil.copy(grpo_two / "metrics.jsonl", resumed / "metrics.jsonl")  # as a killed run leaves it
    res = launch(grpo_flags(tiny_model_dir, data["prompts"], resumed))
    assert res.stderr.count("resuming from") == 1
    a, b = weights(grpo_two / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(("time_", "episodes_per"))} for r in rows]  # noqa: E731
    assert strip(read_metrics(grpo_two)) == strip(read_metrics(resumed))


def test_grpo_refuses_a_batch_that_splits_groups(tiny_model_dir, data, tmp_path):
    args = grpo_flags(tiny_model_dir, data["prompts"], tmp_path / "bad")
    for flag in ("--batch-size", "--mini-batch-size"):
        args[args.index(flag) + 1] = "12"  # 6 replies a process: one and a half groups of 4
    with pytest.raises(AssertionError, match="not whole groups of 4"):
        launch(args)  # it exits with an error, whose message launch() shows
    assert not (tmp_path / "bad" / "checkpoints").exists()
