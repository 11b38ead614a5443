"""GRPO and RLOO end to end on a tiny model: the score rises with the KL under the ceiling, the stage
computes the math module's advantages and rewards, resume is exact, stop criteria and the watch work."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import safetensors_weights as weights
from rlhf.algos import group_advantages, kl_k1, kl_penalised_scores, rloo_advantages
from rlhf.cli import app
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.judges.base import SCORER_KINDS
from rlhf.models.policy import policy_forward
from rlhf.train.grpo import GRPOConfig, GRPOTrainer, run_grpo
from rlhf.utils.metrics import read_metrics
from test_ppo import PROMPTS, LetterScorer, comparable


@pytest.fixture(autouse=True)
def letters(monkeypatch):
    monkeypatch.setitem(SCORER_KINDS, "letters", lambda arg, device: LetterScorer())


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def cfg(model_dir, prompts_file, out, **kw) -> GRPOConfig:
    base = dict(out=str(out), policy=str(model_dir), reward="letters", prompts=str(prompts_file), max_steps=6, group_size=4,
                batch_size=8, mini_batch_size=4, micro_batch_size=2, ppo_epochs=2, max_new_tokens=8, lr=3e-3, save_every=2,
                keep_checkpoints=20, seed=3, progress=False, missing_eos_penalty=0.0)
    base.update(kw)
    engine = {k: base.pop(k) for k in list(base) if k in EngineConfig.__dataclass_fields__}
    c = GRPOConfig(**base, engine=EngineConfig(**{"device": "cpu", "threads": 1, **engine}))
    c.validate()
    return c


@pytest.mark.parametrize("estimator", ["grpo", "rloo"])
def test_score_rises_while_kl_stays_under_ceiling(tiny_model_dir, prompts_file, tmp_path, estimator):
    out = tmp_path / estimator
    extra = ["--kl-in", "reward"] if estimator == "rloo" else []
    res = CliRunner().invoke(app, ["grpo", "--policy", str(tiny_model_dir), "--reward", "letters", "--prompts", str(prompts_file),
                                   "--out", str(out), "--estimator", estimator, "--group-size", "8", "--max-steps", "16", "--ppo-epochs", "2",
                                   "--batch-size", "32", "--mini-batch-size", "16", "--micro-batch-size", "16",
                                   "--max-new-tokens", "8", "--lr", "5e-3", "--kl-coef", "0.01", "--kl-ceiling", "25",
                                   "--missing-eos-penalty", "0", "--device", "cpu", "--no-progress", "--seed", "0",
                                   "--threads", "1", *extra])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rows = read_metrics(out)
    scores = [r["score_mean"] for r in rows]
    first, last = sum(scores[:4]) / 4, sum(scores[-4:]) / 4
    assert last > first + 0.05, (first, last)
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 16
    assert 0 < max(r["kl"] for r in rows) < 25
    for key in ("score_std", "group_score_std", "groups_without_signal", "beta", "entropy", "policy_loss", "clipfrac",
                "approx_kl", "kl_k3", "response_length", "time_generate", "time_score", "time_update", "episodes_per_second"):
        assert key in rows[-1], key
    assert (out / "tensorboard").is_dir() and (out / "model" / "model.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(weights(out / "model").values(), weights(tiny_model_dir).values()))


@pytest.mark.parametrize("estimator,kl_in", [("grpo", "loss"), ("rloo", "reward")])
def test_stage_advantages_are_the_math_modules(tiny_model_dir, prompts_file, tmp_path, estimator, kl_in):
    """Wiring: the experience's rewards and advantages are rlhf.algos applied to this step's scores
    and log-probabilities, with the replies of one prompt forming one group."""
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer

    c = cfg(tiny_model_dir, prompts_file, tmp_path / "w", estimator=estimator, kl_in=kl_in, kl_coef=0.5)
    tok, policy, ref = load_tokenizer(c.policy), load_causal_lm(c.policy), load_causal_lm(c.policy)
    disable_dropout(policy)
    with torch.no_grad():
        for p in ref.parameters():  # a reference that differs, so that the KL is not zero
            p.add_(0.05 * torch.randn_like(p))
    trainer = GRPOTrainer(c, policy, tok, LetterScorer(), ref)
    exp = trainer.generate(PROMPTS[:2])
    assert exp.prompts == [PROMPTS[0]] * 4 + [PROMPTS[1]] * 4     # prompt-major groups
    scores = trainer.score(exp).clone()
    trainer.make_experience(exp)
    rm = exp.response_mask
    with torch.no_grad():  # the reference's log-probabilities are a forward pass of the reference
        assert torch.allclose(exp.ref_logprobs, policy_forward(ref, exp.query_ids, exp.query_mask, exp.response_ids, rm).logprobs,
                              atol=1e-5)
    rewards = scores
    if kl_in == "reward":
        rewards = kl_penalised_scores(scores, kl_k1(exp.logprobs, exp.ref_logprobs), rm, 0.5)
        assert not torch.allclose(rewards, scores)
    assert torch.allclose(exp.rewards.sum(dim=1), rewards, atol=1e-5)  # per token; a reply's sum is its reward
    expected = rloo_advantages(rewards.view(2, 4)) if estimator == "rloo" else group_advantages(rewards.view(2, 4))
    assert torch.allclose(exp.advantages, expected.reshape(-1, 1) * rm, atol=1e-6)  # one advantage on each token
    assert torch.allclose(exp.advantages[:, 0].view(2, 4).sum(dim=1), torch.zeros(2), atol=1e-5)  # each group centred


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_uninterrupted(tiny_model_dir, prompts_file, tmp_path, lora):
    extra = dict(lora=True, lora_r=4, lora_alpha=8) if lora else {}
    full = run_grpo(cfg(tiny_model_dir, prompts_file, tmp_path / "full", **extra))
    assert full["steps"] == 6
    ckpts = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004", "step-00000006"]
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpts[0], resumed / "checkpoints" / ckpts[0].name)
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed / "metrics.jsonl")  # as a killed run leaves it
    run_grpo(cfg(tiny_model_dir, prompts_file, resumed, **extra))
    a, b = weights(tmp_path / "full" / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(read_metrics(tmp_path / "full")) == comparable(read_metrics(resumed))
    if lora:
        assert not (tmp_path / "full" / "model" / "adapter_config.json").exists()


def test_stop_criteria_and_watch(tiny_model_dir, prompts_file, tmp_path):
    s = run_grpo(cfg(tiny_model_dir, prompts_file, tmp_path / "thr", score_threshold=-1.0))
    assert s["stop_reason"] == "reward_threshold" and s["steps"] == 1
    assert (tmp_path / "thr" / "checkpoints" / "step-00000001").is_dir() and (tmp_path / "thr" / "model").is_dir()
    # The first step's KL is float noise (~1e-7: the sampler's recorded logprobs against a reference
    # forward); at this rate the second step's is several nats, far above a ceiling of 1.
    s = run_grpo(cfg(tiny_model_dir, prompts_file, tmp_path / "kl", kl_ceiling=1.0, lr=5e-2))
    assert s["stop_reason"] == "kl_ceiling" and 1 < s["steps"] <= 6
    rows = read_metrics(tmp_path / "kl")
    assert rows[-1]["stop_reason"] == "kl_ceiling" and "policy_loss" not in rows[-1]  # no update on the crossing step
    # The watch scores every second step with a gold judge the policy never sees and keeps the best-gold
    # policy; a flag (forced here: any repetition at all counts as a rise) stops the run with that policy.
    s = run_grpo(cfg(tiny_model_dir, prompts_file, tmp_path / "watch", gold="length", watch_every=2,
                     max_repetition_increase=-1.0, max_steps=8))
    watch = json.loads((tmp_path / "watch" / "watch.json").read_text())
    assert s["stop_reason"] == "reward_hacking" and s["steps"] == 3 and len(watch["points"]) == 2
    assert watch["flags"] and s["watch"]["flags"] and "repetition" in watch["flags"][0]
    rows = read_metrics(tmp_path / "watch")
    assert "gold_mean" in rows[0] and rows[-1]["stop_reason"] == "reward_hacking" and "policy_loss" not in rows[-1]
    best = weights(tmp_path / "watch" / "best-gold")
    final = weights(tmp_path / "watch" / "model")
    assert all(torch.equal(best[k], final[k]) for k in best)


def test_config_errors_and_resume_refusal(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(ConfigError, match="multiple of --group-size"):
        GRPOConfig(out="x", batch_size=10, group_size=4).validate()
    with pytest.raises(ConfigError, match="at least 2"):
        GRPOConfig(out="x", group_size=1).validate()
    run_grpo(cfg(tiny_model_dir, prompts_file, tmp_path / "r", max_steps=2))
    with pytest.raises(ConfigError, match="--group-size"):
        run_grpo(cfg(tiny_model_dir, prompts_file, tmp_path / "r", max_steps=4, group_size=2))


def test_packed_groups_give_the_padded_experience_and_update(tiny_model_dir, prompts_file, tmp_path):
    """A prompt read once with its G replies as branches: the same reference log-probabilities,
    statistics and updated weights as one padded row per reply (up to float summation order)."""
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer

    results = []
    for packing in (False, True):
        c = cfg(tiny_model_dir, prompts_file, tmp_path / f"p{packing}", packing=packing, micro_batch_size=4, temperature=0.8)
        torch.manual_seed(0)
        tok, policy, ref = load_tokenizer(c.policy), load_causal_lm(c.policy), load_causal_lm(c.policy)
        disable_dropout(policy)
        with torch.no_grad():
            for p in ref.parameters():
                p.add_(0.02 * torch.randn_like(p))
        trainer = GRPOTrainer(c, policy, tok, LetterScorer(), ref)
        exp = trainer.generate(PROMPTS[:2])
        trainer.score(exp)
        trainer.make_experience(exp)
        assert trainer.packing is packing
        results.append((exp, trainer.update(exp), {k: v.detach().clone() for k, v in policy.state_dict().items()}))
    (e1, s1, w1), (e2, s2, w2) = results
    assert torch.equal(e1.response_ids, e2.response_ids)
    for name in ("logprobs", "ref_logprobs", "advantages"):
        assert torch.allclose(getattr(e1, name), getattr(e2, name), atol=1e-5), name
    for k in ("policy_loss", "clipfrac", "kl_k3", "entropy", "grad_norm"):
        assert abs(s1[k] - s2[k]) < 1e-4, k
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5
