"""PPO math, each function three ways: a small case by hand, a plain loop against the vectorised
version, and invariance to padded (masked) tokens."""

import math

import pytest
import torch

from rlhf.algos import (AdaptiveKLController, FixedKLController, entropy_from_logits, gae, kl_k1, kl_k3,
                        kl_shaped_rewards, masked_mean, masked_var, masked_whiten, policy_loss, value_loss)


def pad(x: torch.Tensor, extra: int, value: float = 0.0) -> torch.Tensor:
    """Append ``extra`` columns of junk (``value``) that the mask marks as padding."""
    return torch.cat([x, torch.full((x.shape[0], extra), value, dtype=x.dtype)], dim=1)


def random_batch(seed: int = 0, b: int = 4, r: int = 6):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([r, 3, 1, r - 1])[:b]
    mask = (torch.arange(r)[None, :] < lengths[:, None]).long()
    return g, mask


# --- masked statistics ---------------------------------------------------------------------------

def test_masked_stats_by_hand():
    x = torch.tensor([[1.0, 2.0, 100.0], [3.0, 99.0, 98.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert masked_mean(x, mask).item() == pytest.approx(2.0)
    assert torch.allclose(masked_mean(x, mask, dim=1), torch.tensor([1.5, 3.0]))
    assert masked_var(x, mask).item() == pytest.approx(1.0)          # values 1, 2, 3: unbiased var 1
    assert masked_var(x, mask, unbiased=False).item() == pytest.approx(2 / 3)
    w = masked_whiten(x, mask)
    assert torch.allclose(w[mask.bool()], torch.tensor([-1.0, 0.0, 1.0]), atol=1e-4)
    assert (w[~mask.bool()] == 0).all()
    assert torch.allclose(masked_whiten(x, mask, shift_mean=False)[mask.bool()], torch.tensor([1.0, 2.0, 3.0]), atol=1e-4)


def test_masked_stats_loop_and_padding():
    g, mask = random_batch()
    x = torch.randn(mask.shape, generator=g)
    values = [x[i, j].item() for i in range(x.shape[0]) for j in range(x.shape[1]) if mask[i, j]]
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    assert masked_mean(x, mask).item() == pytest.approx(mean, abs=1e-6)
    assert masked_var(x, mask).item() == pytest.approx(var, abs=1e-6)
    junk = pad(x, 3, float("nan"))
    assert masked_mean(junk, pad(mask, 3)).item() == pytest.approx(mean, abs=1e-6)
    assert masked_var(junk, pad(mask, 3)).item() == pytest.approx(var, abs=1e-6)
    assert torch.allclose(masked_whiten(junk, pad(mask, 3))[:, :6], masked_whiten(x, mask), atol=1e-6)


# --- KL ------------------------------------------------------------------------------------------

def test_kl_estimators_by_hand():
    lp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    assert kl_k1(lp, ref).item() == pytest.approx(math.log(2))
    assert kl_k3(lp, ref).item() == pytest.approx((0.5 - 1) - math.log(0.5))  # r = 0.25/0.5
    assert kl_k3(ref, ref).item() == 0.0
    assert (kl_k3(torch.randn(50, 3), torch.randn(50, 3)) >= 0).all()


def test_kl_estimators_agree_in_expectation():
    """Both are unbiased for KL(p‖q) when tokens are sampled from p: the loop sums it exactly."""
    p = torch.tensor([0.6, 0.3, 0.1])
    q = torch.tensor([0.2, 0.5, 0.3])
    exact = float(sum(p[i] * math.log(p[i] / q[i]) for i in range(3)))
    tokens = torch.multinomial(p, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    lp, lq = p.log()[tokens], q.log()[tokens]
    assert kl_k1(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)
    assert kl_k3(lp, lq).mean().item() == pytest.approx(exact, abs=0.01)


def test_kl_shaped_rewards_by_hand_loop_and_padding():
    kl = torch.tensor([[0.1, 0.2, 0.3], [0.5, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    r = kl_shaped_rewards(torch.tensor([1.0, -2.0]), kl, mask, beta=0.5)
    assert torch.allclose(r, torch.tensor([[-0.05, -0.1, -0.15 + 1.0], [-0.25 - 2.0, 0.0, 0.0]]))
    g, mask = random_batch(1)
    kl, scores = torch.randn(mask.shape, generator=g), torch.randn(mask.shape[0], generator=g)
    loop = torch.zeros_like(kl)
    for i in range(kl.shape[0]):
        n = int(mask[i].sum())
        for t in range(n):
            loop[i, t] = -0.1 * kl[i, t] + (scores[i] if t == n - 1 else 0.0)
    assert torch.allclose(kl_shaped_rewards(scores, kl, mask, 0.1), loop)
    padded = kl_shaped_rewards(scores, pad(kl, 2, 7.0), pad(mask, 2), 0.1)
    assert torch.allclose(padded[:, :-2], loop) and (padded[:, -2:] == 0).all()


# --- GAE -----------------------------------------------------------------------------------------

def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 1.0]])
    values = torch.tensor([[0.5, 0.25]])
    mask = torch.ones(1, 2)
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    d1 = 1.0 - 0.25                 # last token: no value after it
    d0 = 0.0 + 0.9 * 0.25 - 0.5
    assert torch.allclose(adv, torch.tensor([[d0 + 0.9 * 0.8 * d1, d1]]))
    assert torch.allclose(ret, adv + values)


def _gae_loop(rewards, values, mask, gamma, lam):
    adv = torch.zeros_like(rewards)
    for i in range(rewards.shape[0]):
        n = int(mask[i].sum())
        running = 0.0
        for t in reversed(range(n)):
            nv = values[i, t + 1].item() if t + 1 < n else 0.0
            delta = rewards[i, t].item() + gamma * nv - values[i, t].item()
            running = delta + gamma * lam * running
            adv[i, t] = running
    return adv


def test_gae_loop_equals_vectorised_and_padding_changes_nothing():
    g, mask = random_batch(2)
    rewards, values = torch.randn(mask.shape, generator=g), torch.randn(mask.shape, generator=g)
    adv, ret = gae(rewards * mask, values, mask, gamma=0.97, lam=0.9)
    assert torch.allclose(adv, _gae_loop(rewards, values, mask, 0.97, 0.9), atol=1e-6)
    assert torch.allclose(ret, (adv + values) * mask)
    # Junk under padding (even where the mask already is 0 inside the batch) changes nothing.
    junk_r = torch.where(mask.bool(), rewards, torch.full_like(rewards, 5.0))
    junk_v = torch.where(mask.bool(), values, torch.full_like(values, -3.0))
    adv2, _ = gae(pad(junk_r, 3, 1.0), pad(junk_v, 3, 2.0), pad(mask, 3), gamma=0.97, lam=0.9)
    assert torch.allclose(adv2[:, :6], adv, atol=1e-6) and (adv2[:, 6:] == 0).all()


# --- PPO losses ----------------------------------------------------------------------------------

def test_policy_loss_by_hand():
    old = torch.zeros(1, 3)
    new = torch.log(torch.tensor([[1.5, 0.5, 1.1]]))  # ratios 1.5, 0.5, 1.1
    adv = torch.tensor([[1.0, 1.0, -2.0]])
    loss, stats = policy_loss(new, old, adv, torch.ones(1, 3), clip=0.2)
    # token 0: min(1.5, 1.2)·1 → −1.2 (clipped); token 1: min(0.5, 0.8) → −0.5; token 2: max(2.2, 2.2) → 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    assert stats["approx_kl"].item() == pytest.approx(sum(0.5 * math.log(r) ** 2 for r in (1.5, 0.5, 1.1)) / 3, abs=1e-6)


def test_value_loss_by_hand():
    v, old, ret = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    loss, stats = value_loss(v, old, ret, torch.ones(1, 2), clip=0.5)
    # token 0: V_clip = 0.5: max((1−2)², (0.5−2)²) = 2.25; token 1: max(1, 1) = 1
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0) / 2)
    assert stats["vf_clipfrac"].item() == pytest.approx(0.5)


def test_losses_loop_padding_and_accumulation():
    g, mask = random_batch(3)
    lp, old = torch.randn(mask.shape, generator=g) * 0.3, torch.randn(mask.shape, generator=g) * 0.3
    adv, v, old_v, ret = (torch.randn(mask.shape, generator=g) for _ in range(4))
    loss, _ = policy_loss(lp, old, adv, mask, clip=0.2)
    terms = [max(-adv[i, t] * math.exp(lp[i, t] - old[i, t]),
                 -adv[i, t] * min(max(math.exp(lp[i, t] - old[i, t]), 0.8), 1.2))
             for i in range(4) for t in range(6) if mask[i, t]]
    assert loss.item() == pytest.approx(float(sum(terms)) / len(terms), abs=1e-5)
    padded, _ = policy_loss(pad(lp, 2, 50.0), pad(old, 2), pad(adv, 2, 9.0), pad(mask, 2))
    assert padded.item() == pytest.approx(loss.item(), abs=1e-6)
    vl, _ = value_loss(v, old_v, ret, mask)
    vpadded, _ = value_loss(pad(v, 2, 9.0), pad(old_v, 2), pad(ret, 2, -9.0), pad(mask, 2))
    assert vpadded.item() == pytest.approx(vl.item(), abs=1e-6)
    # Two micro-batches normalised by the whole batch's token count add up to the batch loss.
    n = mask.sum()
    halves = sum(policy_loss(lp[s], old[s], adv[s], mask[s], normaliser=n)[0] for s in (slice(0, 2), slice(2, 4)))
    assert halves.item() == pytest.approx(loss.item(), abs=1e-6)


def test_policy_gradient_ignores_padding():
    g, mask = random_batch(4)
    lp = (torch.randn(mask.shape, generator=g) * 0.1).requires_grad_()
    adv = torch.randn(mask.shape, generator=g)
    policy_loss(lp, torch.zeros_like(lp), adv, mask)[0].backward()
    assert (lp.grad[~mask.bool()] == 0).all() and (lp.grad[mask.bool()] != 0).any()


def test_entropy_by_hand_and_loop():
    uniform = torch.zeros(1, 1, 4)
    assert entropy_from_logits(uniform).item() == pytest.approx(math.log(4))
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(5))
    loop = torch.tensor([[-sum(p * math.log(p) for p in torch.softmax(logits[i, t], -1).tolist()) for t in range(3)]
                         for i in range(2)])
    assert torch.allclose(entropy_from_logits(logits), loop, atol=1e-5)


# --- KL controllers ------------------------------------------------------------------------------

def test_kl_controllers():
    fixed = FixedKLController(0.1)
    fixed.update(100.0, 64)
    assert fixed.beta == 0.1
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=1000)
    ctl.update(12.0, 100)                      # error clipped to +0.2 → β·(1 + 0.2·0.1)
    assert ctl.beta == pytest.approx(0.1 * 1.02)
    ctl.update(5.4, 100)                       # error −0.1 → β·(1 − 0.01)
    assert ctl.beta == pytest.approx(0.1 * 1.02 * 0.99)
    state = ctl.state_dict()
    other = AdaptiveKLController(0.5, target=6.0, horizon=1000)
    other.load_state_dict(state)
    assert other.beta == ctl.beta
    beta = ctl.beta
    for _ in range(50):                        # KL far under target: β shrinks step by step
        ctl.update(0.0, 100)
    assert ctl.beta < beta * 0.5
    with pytest.raises(ValueError):
        AdaptiveKLController(0.1, target=0.0, horizon=10)


# --- pieces the trainers share ------------------------------------------------------------------

def test_token_logprobs_by_hand_and_against_log_softmax():
    from rlhf.algos import token_logprobs

    logits = torch.log(torch.tensor([[[0.5, 0.25, 0.25], [0.1, 0.2, 0.7]]]))
    assert torch.allclose(token_logprobs(logits, torch.tensor([[0, 2]])), torch.log(torch.tensor([[0.5, 0.7]])))
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(3, 5, 11, generator=g), torch.randint(0, 11, (3, 5), generator=g)
    loop = torch.tensor([[torch.log_softmax(x[i, j], -1)[t[i, j]].item() for j in range(5)] for i in range(3)])
    assert torch.allclose(token_logprobs(x, t), loop, atol=1e-6)


def test_token_mean_with_a_minibatch_normaliser_adds_up():
    from rlhf.algos import token_mean

    g, mask = random_batch(3)
    x = torch.randn(mask.shape, generator=g)
    n = mask.sum()
    halves = token_mean(x[:2], mask[:2], n) + token_mean(x[2:], mask[2:], n)
    assert torch.allclose(halves, masked_mean(x, mask)) and torch.allclose(token_mean(x, mask), masked_mean(x, mask))


def test_whitening_over_shares_equals_whitening_the_whole_batch():
    """Split over two "processes" (threads) whose ``all_sum`` is a real all-reduce between them: each
    share is whitened exactly as the whole batch would be (what PPO does with several processes)."""
    import threading

    g, mask = random_batch(4)
    x = pad(torch.randn(mask.shape, generator=g), 2, float("nan"))
    mask = pad(mask, 2)
    whole = masked_whiten(x, mask)
    barrier, slots, out = threading.Barrier(2), [None, None], [None, None]

    def process(rank: int) -> None:
        def all_sum(t):
            slots[rank] = t.clone()
            barrier.wait()
            total = slots[0] + slots[1]
            barrier.wait()
            return total

        rows = slice(2 * rank, 2 * rank + 2)
        out[rank] = masked_whiten(x[rows], mask[rows], all_sum=all_sum)

    threads = [threading.Thread(target=process, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert torch.allclose(torch.cat(out), whole, atol=1e-6, equal_nan=True)
    assert not torch.allclose(masked_whiten(x[:2], mask[:2]), whole[:2], atol=1e-3)  # a share alone differs
