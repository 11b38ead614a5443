"""Wiring: what the PPO trainer produced for one experience batch equals rlhf/algos.py applied to
its inputs. The math module's own tests cannot see a trainer that calls correct math with the
wrong arguments (the policy where the reference belongs, β = 0, the other KL estimator); these can.

The policy is moved away from the reference first: at step 0 they are the same weights, and a
reference forward through the policy would then pass every comparison by coincidence."""

from __future__ import annotations

import pytest
import torch

from rlhf.algos import KL_ESTIMATORS, gae, kl_shaped_rewards, masked_whiten
from rlhf.engine.config import EngineConfig
from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer
from rlhf.models.policy import policy_forward
from rlhf.train.ppo import PPOTrainer
from rlhf.train.ppo_config import PPOConfig
from test_ppo import LetterScorer

PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next"]


def make_trainer(model_dir, lora: bool, **kw) -> PPOTrainer:
    cfg = PPOConfig(out="unused", policy=str(model_dir), batch_size=8, mini_batch_size=4, micro_batch_size=2,
                    max_new_tokens=10, temperature=0.8, init_kl_coef=0.2, adaptive_kl=True, target_kl=0.5,
                    kl_horizon=16, missing_eos_penalty=0.5, seed=0, engine=EngineConfig(device="cpu"), **kw)
    cfg.validate()
    tok = load_tokenizer(model_dir)
    policy = load_causal_lm(model_dir)
    disable_dropout(policy)
    torch.manual_seed(0)
    if lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0))
        reference = None  # the policy with its adapter switched off
        moved = [p for n, p in policy.named_parameters() if "lora_B" in n]
    else:
        reference = load_causal_lm(model_dir)
        disable_dropout(reference)
        moved = list(policy.parameters())
    with torch.no_grad():  # away from the reference, as after some updates
        for p in moved:
            p.add_(0.3 * torch.randn_like(p))
    trainer = PPOTrainer(cfg, policy, tok, LetterScorer(), reference)
    torch.nn.init.normal_(trainer.value_head.linear.weight, std=0.5)  # non-zero values, so GAE has work to do
    # A tiny random LM rarely samples its real EOS: declare the token it samples most often after
    # the first few positions to be EOS, so that replies end at different lengths (padding is exercised).
    torch.manual_seed(1)
    ids = trainer.generate(PROMPTS * 2).response_ids[:, 2:]
    tok.eos_token_id = int(torch.mode(ids.flatten()).values)
    return trainer


def experience(trainer: PPOTrainer, beta: float):
    """One experience batch, made after the controller's β was moved to ``beta``."""
    trainer.kl_ctl.beta = beta
    torch.manual_seed(1)
    exp = trainer.generate(PROMPTS * 2)
    scores = trainer.score(exp)
    return exp, scores.clone(), trainer.make_experience(exp)


def reference_forward(trainer: PPOTrainer, exp) -> torch.Tensor:
    args = (exp.query_ids, exp.query_mask, exp.response_ids, exp.response_mask, trainer.cfg.temperature)
    with torch.no_grad():
        if trainer.reference is not None:
            return policy_forward(trainer.reference, *args).logprobs
        with trainer.policy.disable_adapter():
            return policy_forward(trainer.policy, *args).logprobs


@pytest.mark.parametrize("lora", [False, True], ids=["copy", "lora"])
@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_one_experience_batch_is_the_math_applied_to_its_inputs(tiny_model_dir, lora, estimator):
    trainer = make_trainer(tiny_model_dir, lora, kl_estimator=estimator)
    beta = 0.37  # neither 0, 1 nor --init-kl-coef: the controller's current value must be the one used
    rollout, scores, exp = experience(trainer, beta)
    mask = exp.response_mask
    lengths = mask.sum(dim=1)
    assert lengths.min() < mask.shape[1] and lengths.max() > 1 and rollout.ended_with_eos.any()  # padding is exercised

    # the scores: the scorer's, less the missing-EOS penalty
    raw = LetterScorer().score(rollout.prompts, rollout.texts)
    assert torch.allclose(scores, raw - 0.5 * (~rollout.ended_with_eos).float())

    # reference log-probabilities: a forward pass of the reference, not of the policy
    ref = reference_forward(trainer, exp)
    with torch.no_grad():
        policy_lp = policy_forward(trainer.policy, exp.query_ids, exp.query_mask, exp.response_ids, mask,
                                   trainer.cfg.temperature).logprobs
    assert float((ref - policy_lp).abs().max()) > 1e-2, "the policy must differ from the reference for this test"
    assert torch.allclose(exp.ref_logprobs, ref, atol=1e-5)
    assert torch.allclose(exp.logprobs, policy_lp, atol=1e-4)

    # kl: the chosen estimator (and visibly not the other one)
    other = "k3" if estimator == "k1" else "k1"
    assert torch.allclose(exp.kl, KL_ESTIMATORS[estimator](exp.logprobs, exp.ref_logprobs) * mask, atol=1e-6)
    assert not torch.allclose(exp.kl, KL_ESTIMATORS[other](exp.logprobs, exp.ref_logprobs) * mask, atol=1e-3)

    # rewards: −β·KL per token with the controller's β, the score on the last token; summed: score − β·ΣKL
    assert torch.allclose(exp.rewards, kl_shaped_rewards(exp.scores, exp.kl, mask, beta), atol=1e-6)
    assert torch.allclose(exp.rewards.sum(dim=1), exp.scores - beta * exp.kl.sum(dim=1), atol=1e-5)
    assert float(exp.kl.abs().sum()) > 0.1  # so that a wrong β changes the rewards visibly

    # advantages and returns: GAE on those rewards and the recorded values, whitened
    adv, ret = gae(exp.rewards, exp.values, mask, trainer.cfg.gamma, trainer.cfg.lam)
    assert torch.allclose(exp.returns, ret, atol=1e-5)
    assert torch.allclose(exp.advantages, masked_whiten(adv, mask), atol=1e-5)


def test_the_step_uses_and_updates_the_controllers_beta(tiny_model_dir):
    """Across ppo_step calls the rewards follow the adaptive controller: after a step β has moved
    by the controller's rule on that step's KL, and the next batch is shaped with the moved β."""
    trainer = make_trainer(tiny_model_dir, lora=False)
    shaped = []
    real = trainer.make_experience

    def spy(exp):
        exp = real(exp)
        shaped.append((trainer.kl_ctl.beta, exp))
        return exp

    trainer.make_experience = spy
    beta0 = trainer.kl_ctl.beta
    torch.manual_seed(2)
    stats, updated = trainer.ppo_step(PROMPTS * 2)
    assert updated and stats["beta"] == beta0 == 0.2
    error = min(max(stats["kl_estimate"] / 0.5 - 1.0, -0.2), 0.2)
    assert trainer.kl_ctl.beta == pytest.approx(beta0 * (1 + error * 8 / 16))
    assert trainer.kl_ctl.beta != pytest.approx(beta0)
    trainer.ppo_step(PROMPTS * 2)
    for beta, exp in shaped:
        assert torch.allclose(exp.rewards.sum(dim=1), exp.scores - beta * exp.kl.sum(dim=1), atol=1e-5)
    assert shaped[1][0] == pytest.approx(beta0 * (1 + error * 8 / 16))
