"""PPO end to end on a tiny model: the score rises under the KL ceiling, resume is exact, every stop
criterion fires and says so, and bad scorers or losses stop the run with the last checkpoint intact."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import safetensors_weights as weights
from rlhf.cli import app
from rlhf.engine.config import EngineConfig
from rlhf.errors import TrainingError
from rlhf.judges.base import SCORER_KINDS
from rlhf.train.ppo_config import PPOConfig
from rlhf.train.ppo_loop import run_ppo, step_prompts
from rlhf.utils.metrics import read_metrics

PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next"]


class LetterScorer:
    """Share of the reply's characters that are 'e' or 't': an easy, dense target for a tiny random LM."""

    name = "letters"
    higher_is_better = True

    def score(self, prompts, completions):
        return torch.tensor([sum(ch in "et" for ch in c) / max(1, len(c)) for c in completions], dtype=torch.float32)


class BadShapeScorer(LetterScorer):
    name = "bad-shape"

    def score(self, prompts, completions):
        return torch.zeros(len(completions), 2)


@pytest.fixture(autouse=True)
def test_scorers(monkeypatch):
    monkeypatch.setitem(SCORER_KINDS, "letters", lambda arg, device: LetterScorer())
    monkeypatch.setitem(SCORER_KINDS, "bad-shape", lambda arg, device: BadShapeScorer())


@pytest.fixture
def prompts_file(tmp_path) -> Path:
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


def cfg(model_dir, prompts_file, out, **kw) -> PPOConfig:
    base = dict(out=str(out), policy=str(model_dir), reward="letters", prompts=str(prompts_file), max_steps=6,
                batch_size=8, mini_batch_size=4, micro_batch_size=2, ppo_epochs=2, max_new_tokens=8, lr=3e-3,
                save_every=2, keep_checkpoints=20, seed=3, progress=False, missing_eos_penalty=0.0)
    engine = {k: kw.pop(k) for k in list(kw) if k in EngineConfig.__dataclass_fields__}
    base.update(kw)
    c = PPOConfig(**base, engine=EngineConfig(**{"device": "cpu", **engine}))
    c.validate()
    return c


def comparable(rows: list[dict]) -> list[dict]:
    """Metrics minus wall-clock timings, which differ between any two runs."""
    return [{k: v for k, v in r.items() if not k.startswith("time_") and k != "episodes_per_second"} for r in rows]


def test_step_prompts_cover_each_epoch_once():
    prompts = [f"p{i}" for i in range(5)]
    seen = [p for s in range(5) for p in step_prompts(prompts, s, 3, seed=1)]  # 15 = three epochs
    for e in range(3):
        assert sorted(seen[e * 5:(e + 1) * 5]) == prompts
    assert step_prompts(prompts, 2, 3, seed=1) == step_prompts(prompts, 2, 3, seed=1)


@pytest.mark.slow
def test_score_rises_while_kl_stays_under_ceiling(tiny_model_dir, prompts_file, tmp_path):
    out = tmp_path / "run"
    res = CliRunner().invoke(app, ["ppo", "--policy", str(tiny_model_dir), "--reward", "letters", "--prompts", str(prompts_file),
                                   "--out", str(out), "--max-steps", "30", "--batch-size", "16", "--mini-batch-size", "8",
                                   "--micro-batch-size", "8", "--max-new-tokens", "8", "--lr", "3e-3",
                                   "--kl-ceiling", "25", "--init-kl-coef", "0.02", "--missing-eos-penalty", "0",
                                   "--device", "cpu", "--no-progress", "--seed", "0"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rows = read_metrics(out)
    scores = [r["score_mean"] for r in rows]
    first, last = sum(scores[:5]) / 5, sum(scores[-5:]) / 5
    assert last > first + 0.05, (first, last)
    assert summary["stop_reason"] == "max_steps" and summary["steps"] == 30
    assert max(r["kl"] for r in rows) < 25
    for key in ("score_std", "beta", "entropy", "policy_loss", "value_loss", "clipfrac", "approx_kl", "response_length",
                "time_generate", "time_score", "time_update"):
        assert key in rows[-1], key
    assert (out / "tensorboard").is_dir() and (out / "model" / "model.safetensors").is_file()
    # The tuned policy is a plain HF folder and differs from the start.
    assert any(not torch.equal(a, b) for a, b in zip(weights(out / "model").values(), weights(tiny_model_dir).values()))


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_uninterrupted(tiny_model_dir, prompts_file, tmp_path, lora):
    extra = dict(lora=True, lora_r=4, lora_alpha=8) if lora else {}
    full = run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "full", **extra))
    assert full["steps"] == 6
    ckpts = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004", "step-00000006"]
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpts[0], resumed / "checkpoints" / ckpts[0].name)
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed / "metrics.jsonl")  # as a killed run leaves it
    run_ppo(cfg(tiny_model_dir, prompts_file, resumed, **extra))
    a, b = weights(tmp_path / "full" / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert weights(ckpts[-1]).keys() == weights(resumed / "checkpoints" / ckpts[-1].name).keys()
    assert comparable(read_metrics(tmp_path / "full")) == comparable(read_metrics(resumed))
    if lora:  # the final model is merged: loadable without peft
        assert not (tmp_path / "full" / "model" / "adapter_config.json").exists()


def test_reward_threshold_and_kl_ceiling_stop_cleanly(tiny_model_dir, prompts_file, tmp_path):
    s = run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "thr", score_threshold=-1.0))
    assert s["stop_reason"] == "reward_threshold" and s["steps"] == 1
    assert (tmp_path / "thr" / "checkpoints" / "step-00000001").is_dir() and (tmp_path / "thr" / "model").is_dir()
    # The ceiling sits far above rounding noise (a reference forward through the policy would show
    # only that noise and never stop): step 1 samples from the starting weights (KL exactly 0 up to
    # rounding), and after one update at this learning rate the KL is several nats.
    s = run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "kl", kl_ceiling=1.0, lr=5e-2))
    assert s["stop_reason"] == "kl_ceiling" and 1 < s["steps"] <= 6
    rows = read_metrics(tmp_path / "kl")
    assert abs(rows[0]["kl"]) < 1e-3
    assert rows[-1]["stop_reason"] == "kl_ceiling" and rows[-1]["kl"] > 1.0
    assert "policy_loss" not in rows[-1]  # the step that crossed the ceiling made no update


def test_wrong_shape_scorer_is_an_error(tiny_model_dir, prompts_file, tmp_path):
    with pytest.raises(TrainingError, match=r"shape \(8, 2\), expected \[8\]"):
        run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "bad", reward="bad-shape"))


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    import rlhf.train.ppo as ppo_mod

    real, calls = ppo_mod.policy_loss, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, stats = real(*a, **kw)
        # 2 epochs × 2 minibatches × 2 micro-batches = 8 calls a step: poison step 3
        return (loss * float("nan"), stats) if calls["n"] == 17 else (loss, stats)

    monkeypatch.setattr(ppo_mod, "policy_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite PPO loss at step 3"):
        run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "nan"))
    assert [c.name for c in sorted((tmp_path / "nan" / "checkpoints").iterdir())] == ["step-00000002"]


def test_resume_refuses_other_options(tiny_model_dir, prompts_file, tmp_path):
    from rlhf.errors import ConfigError

    run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "r", max_steps=2))
    with pytest.raises(ConfigError, match="--lr"):
        run_ppo(cfg(tiny_model_dir, prompts_file, tmp_path / "r", max_steps=4, lr=1e-4))


def test_config_errors():
    with pytest.raises(Exception, match="multiple of --mini-batch-size"):
        PPOConfig(out="x", batch_size=10, mini_batch_size=4).validate()
    with pytest.raises(Exception, match="temperature"):
        PPOConfig(out="x", temperature=0).validate()


def test_micro_batch_split_does_not_change_the_update(tiny_model_dir, prompts_file, tmp_path, monkeypatch):
    """Length-bucketed forward chunks only change how a minibatch is split: the experience, the
    statistics and the updated weights match whole micro-batches (up to float summation order)."""
    import rlhf.train.ppo as ppo_mod
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer

    results = []
    for overhead in (10**9, 0):  # as few forwards as possible; every split that saves a padded position
        monkeypatch.setattr(ppo_mod, "CPU_CHUNK_OVERHEAD_POSITIONS", overhead)
        c = cfg(tiny_model_dir, prompts_file, tmp_path / f"o{overhead}", micro_batch_size=4)
        torch.manual_seed(0)
        tok, policy, ref = load_tokenizer(c.policy), load_causal_lm(c.policy), load_causal_lm(c.policy)
        disable_dropout(policy)
        trainer = ppo_mod.PPOTrainer(c, policy, tok, LetterScorer(), ref)
        exp = trainer.generate(PROMPTS * 2)
        trainer.score(exp)
        exp = trainer.make_experience(exp)
        results.append((exp, trainer.update(exp), {k: v.detach().clone() for k, v in policy.state_dict().items()},
                        len(trainer._chunks(exp.query_mask, exp.response_mask))))
    (e1, s1, w1, n1), (e2, s2, w2, n2) = results
    assert n1 == 2 and n2 > n1  # the second run really split differently
    assert torch.equal(e1.response_ids, e2.response_ids)  # same seed, same rollouts
    for name in ("logprobs", "ref_logprobs", "values", "advantages"):
        assert torch.allclose(getattr(e1, name), getattr(e2, name), atol=1e-5), name
    for k in s1:
        assert abs(s1[k] - s2[k]) < 1e-4, k
    # Adam divides by √v, so rounding differences in near-zero gradients show up at ~1e-6 after
    # four steps of lr 3e-3; a real difference in the minibatch gradient would be of order lr.
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < 1e-5


def test_sampler_logprobs_and_values_match_a_full_forward(tiny_model_dir, prompts_file, tmp_path):
    """The old logprobs and values recorded while sampling are what a forward over the finished
    replies computes, at a temperature ≠ 1 and with top-k on (scored before the filter either way)."""
    import rlhf.train.ppo as ppo_mod
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer

    c = cfg(tiny_model_dir, prompts_file, tmp_path / "rec", temperature=0.7, top_k=20, max_new_tokens=12)
    tok, policy, ref = load_tokenizer(c.policy), load_causal_lm(c.policy), load_causal_lm(c.policy)
    disable_dropout(policy)
    trainer = ppo_mod.PPOTrainer(c, policy, tok, LetterScorer(), ref)
    torch.manual_seed(0)
    torch.nn.init.normal_(trainer.value_head.linear.weight)  # zero-initialised values would match trivially
    rollout = trainer.generate(PROMPTS * 2)
    assert rollout.logprobs is not None and rollout.hidden is not None
    assert rollout.hidden.shape == (*rollout.response_ids.shape, policy.config.hidden_size)
    trainer.score(rollout)
    # what --no-sampler-logprobs (or the generate fallback) gives: the same rollout, nothing recorded
    unrecorded = dataclasses.replace(rollout, logprobs=None, hidden=None)
    recorded = trainer.make_experience(rollout)
    full = trainer.make_experience(unrecorded)
    rm = recorded.response_mask.bool()
    assert (recorded.logprobs[rm] < 0).all() and (recorded.values[rm] != 0).all()
    for name in ("logprobs", "values", "ref_logprobs", "advantages", "returns"):
        assert torch.allclose(getattr(recorded, name), getattr(full, name), atol=1e-4), name


def test_length_chunks_partition_rows_and_save_padding():
    from rlhf.models.policy import length_chunks

    q_len = torch.tensor([3, 9, 4, 8, 5, 9, 3, 7])
    r_len = torch.tensor([2, 30, 3, 28, 2, 31, 4, 25])
    qm = (torch.arange(10)[None, :] >= 10 - q_len[:, None]).long()  # left-padded prompts
    rm = (torch.arange(32)[None, :] < r_len[:, None]).long()          # right-padded replies
    few = length_chunks(qm, rm, max_rows=4)
    assert [len(c) for c in few] == [4, 4]
    split = length_chunks(qm, rm, max_rows=8, overhead_positions=16)
    for chunks in (few, split):
        assert sorted(torch.cat(chunks).tolist()) == list(range(8)) and all(len(c) <= 8 for c in chunks)
    cost = lambda chunks: sum(len(c) * (int(q_len[c].max()) + int(r_len[c].max())) for c in chunks)
    assert len(split) == 2 and cost(split) < 8 * (9 + 31)  # short and long replies no longer share a width
    assert {frozenset(c.tolist()) for c in split} == {frozenset({0, 2, 4, 6}), frozenset({1, 3, 5, 7})}
