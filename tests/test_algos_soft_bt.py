"""Bradley-Terry against soft targets (AI-labeler probabilities), tested three ways."""

import math

import torch

from rlhf.algos import bradley_terry_loss


def test_soft_bradley_terry_by_hand():
    # d = 1 with p = 0.8: −[0.8·log σ(1) + 0.2·log σ(−1)] = 0.8·0.31326 + 0.2·1.31326 = 0.51326
    # d = −2 with p = 0.3: −[0.3·log σ(−2) + 0.7·log σ(2)] = 0.3·2.12693 + 0.7·0.12693 = 0.72693
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 2.0]), target=torch.tensor([0.8, 0.3]))
    softplus = lambda x: math.log1p(math.exp(x))  # −log σ(d) = softplus(−d)
    first = 0.8 * softplus(-1.0) + 0.2 * softplus(1.0)
    second = 0.3 * softplus(2.0) + 0.7 * softplus(-2.0)
    assert abs(loss.item() - (first + second) / 2) < 1e-6


def test_soft_target_one_is_the_plain_loss_and_optimum_is_the_target():
    rc, rr = torch.tensor([0.3, -1.2, 2.0]), torch.tensor([0.0, 0.5, 1.0])
    hard = bradley_terry_loss(rc, rr)
    assert torch.allclose(bradley_terry_loss(rc, rr, target=torch.ones(3)), hard, atol=1e-7)
    # The gradient in d vanishes where σ(d) = p: the reward gap learns the labeler's log-odds.
    p = torch.tensor([0.7])
    d = torch.log(p / (1 - p)).requires_grad_(True)
    bradley_terry_loss(d, torch.zeros(1), target=p).backward()
    assert abs(d.grad.item()) < 1e-6
    # Swapping the two replies and the target (1 − p) leaves the loss unchanged.
    t = torch.tensor([0.9, 0.2, 0.5])
    assert torch.allclose(bradley_terry_loss(rc, rr, target=t), bradley_terry_loss(rr, rc, target=1 - t), atol=1e-7)


def test_soft_bradley_terry_loop_equals_vectorised():
    torch.manual_seed(0)
    rc, rr, p = torch.randn(8), torch.randn(8), torch.rand(8)
    loop = sum(-(p[i] * torch.log(torch.sigmoid(rc[i] - rr[i])) + (1 - p[i]) * torch.log(torch.sigmoid(rr[i] - rc[i])))
               for i in range(8)) / 8
    assert torch.allclose(bradley_terry_loss(rc, rr, target=p), loop, atol=1e-6)


def test_soft_bradley_terry_halves_agree_and_margin_applies():
    torch.manual_seed(1)
    rc, rr, p = torch.randn(8), torch.randn(8), torch.rand(8)
    whole = bradley_terry_loss(rc, rr, target=p)
    halves = (bradley_terry_loss(rc[:4], rr[:4], target=p[:4]) + bradley_terry_loss(rc[4:], rr[4:], target=p[4:])) / 2
    assert torch.allclose(whole, halves, atol=1e-6)
    # A margin shifts the difference the same way for soft and hard targets.
    shifted = bradley_terry_loss(rc, rr, margin=0.5, target=p)
    assert torch.allclose(shifted, bradley_terry_loss(rc - 0.5, rr, target=p), atol=1e-6)


def test_soft_bradley_terry_stays_finite_for_huge_gaps():
    loss = bradley_terry_loss(torch.tensor([1e4]), torch.tensor([-1e4]), target=torch.tensor([0.5]))
    assert torch.isfinite(loss) and abs(loss.item() - 1e4) < 1.0  # half of the 2e4 gap is wrong
