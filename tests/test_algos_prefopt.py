"""DPO/IPO and GRPO/RLOO math, each function three ways: a small case by hand, a plain loop against
the vectorised version, and invariance to padding (masked tokens or group members change nothing)."""

import math
import statistics

import pytest
import torch

from rlhf.algos import (aggregate_loss, dpo_loss, group_advantages, grpo_policy_loss, ipo_loss, kl_k3,
                        kl_penalised_scores, pairwise_accuracy, policy_loss, rloo_advantages, sequence_logprobs)

from test_algos_ppo import pad, random_batch


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# --- sequence log-probabilities and accuracy -------------------------------------------------------

def test_sequence_logprobs_by_hand_loop_and_padding():
    lp = torch.tensor([[-1.0, -2.0, 99.0], [-3.0, float("nan"), 7.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert sequence_logprobs(lp, mask).tolist() == [-3.0, -3.0]
    assert sequence_logprobs(lp, mask, average=True).tolist() == [-1.5, -3.0]
    assert sequence_logprobs(lp, torch.zeros_like(mask), average=True).tolist() == [0.0, 0.0]
    g, mask = random_batch(7)
    lp = torch.randn(mask.shape, generator=g)
    loop = [sum(lp[i, t].item() for t in range(6) if mask[i, t]) for i in range(4)]
    assert torch.allclose(sequence_logprobs(lp, mask), torch.tensor(loop), atol=1e-6)
    assert torch.allclose(sequence_logprobs(pad(lp, 3, float("inf")), pad(mask, 3)), torch.tensor(loop), atol=1e-6)


def test_pairwise_accuracy_counts_ties_half():
    assert pairwise_accuracy(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0])).item() == pytest.approx(0.5)
    assert pairwise_accuracy(torch.zeros(5), torch.zeros(5)).item() == 0.5


# --- DPO and IPO -----------------------------------------------------------------------------------

def test_dpo_loss_by_hand():
    loss, stats = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), beta=0.5)
    assert loss.item() == pytest.approx(-log_sigmoid(1.0))          # β·h = 0.5·(1 − (−1)) = 1
    assert stats["rewards_chosen"].item() == pytest.approx(0.5) and stats["rewards_rejected"].item() == pytest.approx(-0.5)
    assert stats["margin"].item() == pytest.approx(1.0) and stats["accuracy"].item() == 1.0
    smoothed, _ = dpo_loss(torch.tensor([1.0]), torch.tensor([-1.0]), beta=0.5, label_smoothing=0.1)
    assert smoothed.item() == pytest.approx(-0.9 * log_sigmoid(1.0) - 0.1 * log_sigmoid(-1.0))
    # Policy = reference: every implicit reward is 0, the loss is log 2 and accuracy is chance.
    zero, stats = dpo_loss(torch.zeros(4), torch.zeros(4), beta=0.1)
    assert zero.item() == pytest.approx(math.log(2)) and stats["accuracy"].item() == 0.5


def test_ipo_loss_by_hand():
    # h = 1.5 − (−0.5) = 2; the target margin 1/(2β) is 2 at β = 0.25 and 1 at β = 0.5
    assert ipo_loss(torch.tensor([1.5]), torch.tensor([-0.5]), beta=0.25)[0].item() == pytest.approx(0.0)
    loss, stats = ipo_loss(torch.tensor([1.5]), torch.tensor([-0.5]), beta=0.5)
    assert loss.item() == pytest.approx(1.0) and stats["margin"].item() == pytest.approx(1.0)


def test_preference_losses_push_chosen_up_and_rejected_down():
    for fn in (lambda c, r: dpo_loss(c, r, 0.1, 0.05), lambda c, r: ipo_loss(c, r, 0.1)):
        c, r = torch.zeros(3, requires_grad=True), torch.zeros(3, requires_grad=True)
        fn(c, r)[0].backward()
        assert (c.grad < 0).all() and (r.grad > 0).all()   # gradient descent raises chosen, lowers rejected
    # IPO stops pushing at its target margin; DPO's sigmoid never quite does.
    c = torch.full((2,), 5.0, requires_grad=True)
    ipo_loss(c, torch.zeros(2), beta=0.1)[0].backward()
    assert torch.allclose(c.grad, torch.zeros(2))


def test_preference_losses_loop_and_halves():
    g = torch.Generator().manual_seed(11)
    c, r = torch.randn(8, generator=g) * 3, torch.randn(8, generator=g) * 3
    beta, eps = 0.3, 0.2
    dpo_loop = sum(-(1 - eps) * log_sigmoid(beta * (c[i] - r[i]).item()) - eps * log_sigmoid(-beta * (c[i] - r[i]).item())
                   for i in range(8)) / 8
    ipo_loop = sum(((c[i] - r[i]).item() - 1 / (2 * beta)) ** 2 for i in range(8)) / 8
    acc_loop = sum(1.0 if c[i] > r[i] else 0.5 if c[i] == r[i] else 0.0 for i in range(8)) / 8
    dpo, stats = dpo_loss(c, r, beta, eps)
    assert dpo.item() == pytest.approx(dpo_loop, abs=1e-5) and stats["accuracy"].item() == pytest.approx(acc_loop)
    assert ipo_loss(c, r, beta)[0].item() == pytest.approx(ipo_loop, abs=1e-4)
    # Two half-batches (pair means) average to the whole batch's loss: gradient accumulation is exact.
    for fn in (lambda a, b: dpo_loss(a, b, beta, eps)[0], lambda a, b: ipo_loss(a, b, beta)[0]):
        halves = (fn(c[:4], r[:4]) + fn(c[4:], r[4:])) / 2
        assert halves.item() == pytest.approx(fn(c, r).item(), abs=1e-5)


def test_dpo_loss_finite_for_huge_margins():
    loss, _ = dpo_loss(torch.tensor([-1e4]), torch.tensor([1e4]), beta=1.0, label_smoothing=0.1)
    assert torch.isfinite(loss) and loss.item() > 1e4


# --- group advantages (GRPO) and leave-one-out baselines (RLOO) ------------------------------------

def test_group_advantages_by_hand():
    scores = torch.tensor([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    adv = group_advantages(scores, eps=0.0)
    assert torch.allclose(adv[0], torch.tensor([-1.0, 0.0, 1.0]))      # mean 2, unbiased std 1
    assert (adv[1] == 0).all()                                          # a unanimous group teaches nothing
    assert torch.allclose(group_advantages(scores, scale_std=False)[0], torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(group_advantages(scores * 10, scale_std=False)[0], torch.tensor([-10.0, 0.0, 10.0]))
    assert torch.allclose(group_advantages(scores * 10, eps=0.0)[0], torch.tensor([-1.0, 0.0, 1.0]))


def test_rloo_by_hand():
    adv = rloo_advantages(torch.tensor([[1.0, 2.0, 3.0]]))
    assert torch.allclose(adv, torch.tensor([[1 - 2.5, 2 - 2.0, 3 - 1.5]]))
    assert torch.allclose(adv, 3 / 2 * group_advantages(torch.tensor([[1.0, 2.0, 3.0]]), scale_std=False))
    assert (rloo_advantages(torch.tensor([[4.0]])) == 0).all()  # one reply: no baseline, no signal


def _group_loop(scores, sizes, estimator, scale_std=True, eps=1e-4):
    out = torch.zeros_like(scores)
    for i, n in enumerate(sizes):
        group = scores[i, :n].tolist()
        for j in range(n):
            if estimator == "rloo":
                out[i, j] = group[j] - sum(group[:j] + group[j + 1:]) / (n - 1) if n > 1 else 0.0
            else:
                mean = sum(group) / n
                std = statistics.stdev(group) if n > 1 else 0.0
                out[i, j] = (group[j] - mean) / (std + eps) if scale_std else group[j] - mean
    return out


def test_group_estimators_loop_and_padding():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(5, 4, generator=g)
    sizes = [4, 4, 4, 4, 4]
    assert torch.allclose(group_advantages(scores), _group_loop(scores, sizes, "grpo"), atol=1e-5)
    assert torch.allclose(group_advantages(scores, scale_std=False), _group_loop(scores, sizes, "grpo", False), atol=1e-6)
    assert torch.allclose(rloo_advantages(scores), _group_loop(scores, sizes, "rloo"), atol=1e-6)
    # Groups of unequal size in one tensor: members marked as padding hold junk and change nothing,
    # and get advantage 0.
    sizes = [4, 2, 3, 1, 4]
    mask = (torch.arange(4)[None, :] < torch.tensor(sizes)[:, None]).long()
    junk = torch.where(mask.bool(), scores, torch.full_like(scores, 1e6))
    for fn, name in ((group_advantages, "grpo"), (rloo_advantages, "rloo")):
        adv = fn(junk, mask)
        assert torch.allclose(adv, _group_loop(scores, sizes, name), atol=1e-5), name
        assert (adv[~mask.bool()] == 0).all()
        # Extra padded columns and a fully padded group change nothing either.
        wider = torch.cat([pad(junk, 2, -7.0), torch.full((1, 6), 3.0)])
        wider_mask = torch.cat([pad(mask, 2), torch.zeros(1, 6, dtype=torch.long)])
        adv2 = fn(wider, wider_mask)
        assert torch.allclose(adv2[:5, :4], adv, atol=1e-6) and (adv2[:, 4:] == 0).all() and (adv2[5] == 0).all()
    # Groups are independent: changing one group leaves the others' advantages alone.
    moved = scores.clone()
    moved[0] += 100.0
    assert torch.allclose(group_advantages(moved)[1:], group_advantages(scores)[1:])


def test_kl_penalised_scores_by_hand_and_padding():
    kl = torch.tensor([[0.5, 1.0, 9.0], [2.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert torch.allclose(kl_penalised_scores(torch.tensor([1.0, 1.0]), kl, mask, beta=0.1), torch.tensor([0.85, 0.8]))
    from rlhf.algos import kl_shaped_rewards

    g, mask = random_batch(9)
    kl, scores = torch.randn(mask.shape, generator=g), torch.randn(4, generator=g)
    # The per-token KL-shaped rewards summed over each reply give the same number.
    assert torch.allclose(kl_penalised_scores(scores, kl, mask, 0.2), kl_shaped_rewards(scores, kl * mask, mask, 0.2).sum(1),
                          atol=1e-6)
    assert torch.allclose(kl_penalised_scores(scores, pad(kl, 2, 5.0), pad(mask, 2), 0.2),
                          kl_penalised_scores(scores, kl, mask, 0.2))


# --- aggregation and the GRPO loss -----------------------------------------------------------------

def test_aggregate_loss_by_hand():
    x = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    assert aggregate_loss(x, mask, "token").item() == pytest.approx((1 + 2 + 3) / 3)
    assert aggregate_loss(x, mask, "sequence").item() == pytest.approx((1.5 + 3) / 2)
    with pytest.raises(ValueError, match="token"):
        aggregate_loss(x, mask, "batch")


def test_grpo_policy_loss_by_hand():
    old = torch.zeros(2, 2)
    new = torch.log(torch.tensor([[1.5, 0.5], [1.1, 7.0]]))
    adv = torch.tensor([1.0, -2.0])
    mask = torch.tensor([[1, 1], [1, 0]])
    loss, stats = grpo_policy_loss(new, old, adv, mask, clip=0.2)
    # reply 0 (A = 1): ratio 1.5 → −1.2 (clipped), ratio 0.5 → −0.5; reply 1 (A = −2): ratio 1.1 → 2.2
    assert loss.item() == pytest.approx((-1.2 - 0.5 + 2.2) / 3, abs=1e-6)
    assert stats["clipfrac"].item() == pytest.approx(1 / 3)
    seq, _ = grpo_policy_loss(new, old, adv, mask, clip=0.2, level="sequence")
    assert seq.item() == pytest.approx(((-1.2 - 0.5) / 2 + 2.2) / 2, abs=1e-6)
    # With a reference, β·k3 is added per token; k3 = (r − 1) − log r, r = π_ref/π.
    ref = torch.log(torch.tensor([[1.0, 1.0], [0.5, 1.0]]))
    with_kl, stats = grpo_policy_loss(new, old, adv, mask, clip=0.2, ref_logprobs=ref, beta=0.5)
    k3 = [(1 / 1.5 - 1) - math.log(1 / 1.5), (1 / 0.5 - 1) - math.log(1 / 0.5), (0.5 / 1.1 - 1) - math.log(0.5 / 1.1)]
    assert with_kl.item() == pytest.approx((-1.2 - 0.5 + 2.2 + 0.5 * sum(k3)) / 3, abs=1e-6)
    assert stats["kl_k3"].item() == pytest.approx(sum(k3) / 3, abs=1e-6)


def test_grpo_policy_loss_loop_padding_and_accumulation():
    g, mask = random_batch(5)
    lp, old, ref = (torch.randn(mask.shape, generator=g) * 0.3 for _ in range(3))
    adv = torch.randn(4, generator=g)
    beta, clip = 0.1, 0.2
    per = {}
    for i in range(4):
        for t in range(6):
            if mask[i, t]:
                ratio = math.exp(lp[i, t] - old[i, t])
                surrogate = max(-adv[i].item() * ratio, -adv[i].item() * min(max(ratio, 1 - clip), 1 + clip))
                r = math.exp(ref[i, t] - lp[i, t])
                per[i, t] = surrogate + beta * ((r - 1) - math.log(r))
    token_loop = sum(per.values()) / len(per)
    seq_loop = sum(sum(v for (i, _), v in per.items() if i == row) / int(mask[row].sum()) for row in range(4)) / 4
    for level, expected in (("token", token_loop), ("sequence", seq_loop)):
        loss, _ = grpo_policy_loss(lp, old, adv, mask, clip, ref, beta, level)
        assert loss.item() == pytest.approx(expected, abs=1e-5), level
        padded, _ = grpo_policy_loss(pad(lp, 2, 50.0), pad(old, 2), adv, pad(mask, 2), clip, pad(ref, 2, -50.0), beta, level)
        assert padded.item() == pytest.approx(loss.item(), abs=1e-6), level
        # Micro-batches normalised by the minibatch's token (or reply) count add up to its loss.
        n = mask.sum() if level == "token" else 4
        halves = sum(grpo_policy_loss(lp[s], old[s], adv[s], mask[s], clip, ref[s], beta, level, normaliser=n)[0]
                     for s in (slice(0, 1), slice(1, 4)))
        assert halves.item() == pytest.approx(loss.item(), abs=1e-6), level
    # Without a KL term and with one advantage per reply broadcast to its tokens, the token-level
    # GRPO loss is PPO's clipped policy loss: one objective, two callers.
    ppo, _ = policy_loss(lp, old, adv[:, None].expand_as(lp), mask, clip)
    assert grpo_policy_loss(lp, old, adv, mask, clip)[0].item() == pytest.approx(ppo.item(), abs=1e-6)


def test_grpo_gradient_ignores_padding_and_kl_pulls_toward_reference():
    g, mask = random_batch(6)
    lp = (torch.randn(mask.shape, generator=g) * 0.1).requires_grad_()
    grpo_policy_loss(lp, lp.detach(), torch.randn(4, generator=g), mask, ref_logprobs=torch.zeros_like(lp), beta=0.1,
                     level="sequence")[0].backward()
    assert (lp.grad[~mask.bool()] == 0).all() and (lp.grad[mask.bool()] != 0).any()
    # Zero advantages: only the KL term acts, and descending it moves log π toward log π_ref (0 here).
    lp = torch.tensor([[0.5, -0.5]], requires_grad=True)
    grpo_policy_loss(lp, lp.detach(), torch.zeros(1), torch.ones(1, 2), ref_logprobs=torch.zeros(1, 2), beta=1.0)[0].backward()
    assert lp.grad[0, 0] > 0 and lp.grad[0, 1] < 0
    assert torch.allclose(kl_k3(lp.detach(), torch.zeros(1, 2)), torch.tensor([[math.exp(-0.5) - 1 + 0.5, math.exp(0.5) - 1 - 0.5]]))
