import math

import torch

from rlhf.algos import bradley_terry_loss


def test_bradley_terry_by_hand():
    # r_c - r_r = 1 and -2: -log σ(1) = 0.31326, -log σ(-2) = 2.12693
    loss = bradley_terry_loss(torch.tensor([2.0, 0.0]), torch.tensor([1.0, 2.0]))
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(2.0))) / 2
    assert abs(loss.item() - expected) < 1e-6


def test_bradley_terry_margin_and_centering():
    rc, rr = torch.tensor([1.0]), torch.tensor([0.0])
    with_margin = bradley_terry_loss(rc, rr, margin=1.0)
    assert abs(with_margin.item() - math.log(2.0)) < 1e-6  # σ(0) = 1/2
    centered = bradley_terry_loss(rc, rr, center_coef=0.5)
    assert abs(centered.item() - (math.log1p(math.exp(-1.0)) + 0.5 * 1.0)) < 1e-6


def test_bradley_terry_loop_equals_vectorised_and_halves_agree():
    torch.manual_seed(0)
    rc, rr = torch.randn(8), torch.randn(8)
    loop = sum(-torch.log(torch.sigmoid(rc[i] - rr[i])) for i in range(8)) / 8
    assert torch.allclose(bradley_terry_loss(rc, rr), loop, atol=1e-6)
    halves = (bradley_terry_loss(rc[:4], rr[:4]) + bradley_terry_loss(rc[4:], rr[4:])) / 2
    assert torch.allclose(bradley_terry_loss(rc, rr), halves, atol=1e-6)


def test_bradley_terry_stays_finite_for_huge_gaps():
    loss = bradley_terry_loss(torch.tensor([-1e4]), torch.tensor([1e4]))
    assert torch.isfinite(loss) and loss.item() > 1e4 - 1


def test_pairwise_accuracy_counts_ties_half():
    from rlhf.algos import pairwise_accuracy

    assert float(pairwise_accuracy(torch.tensor([2.0, 1.0, 0.0, 3.0]), torch.tensor([1.0, 1.0, 1.0, 0.0]))) == 0.625
