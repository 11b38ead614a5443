"""The AI labeler's math: preferences from option-label probabilities, position debiasing, pooling."""

import math

import torch

from rlhf.cai.preference import (averaged_preference, combine_log_odds, debiased_preference, option_preference,
                                 pointwise_preference, scores_to_log_odds)


def lp(pa: float, pb: float) -> list[float]:
    return [math.log(pa), math.log(pb)]


def test_option_preference_normalises_over_the_labels_by_hand():
    # P(A) = 0.2, P(B) = 0.05 (the rest of the mass is on other tokens): normalised 0.2 / 0.25 = 0.8
    p = option_preference(torch.tensor([lp(0.2, 0.05), lp(0.01, 0.03)]))
    assert torch.allclose(p, torch.tensor([0.8, 0.25]), atol=1e-6)


def test_both_orders_by_hand():
    first = torch.tensor([lp(0.6, 0.2)])    # first reply shown as A: P(A) normalised = 0.75
    swapped = torch.tensor([lp(0.1, 0.3)])  # first reply shown as B: P(B) normalised = 0.75
    assert math.isclose(averaged_preference(first, swapped).item(), 0.75, abs_tol=1e-6)
    # log-odds: ℓ₁ = log 3, ℓ₂ = log(1/3) ⇒ σ((log 3 + log 3) / 2) = σ(log 3) = 0.75
    assert math.isclose(debiased_preference(first, swapped).item(), 0.75, abs_tol=1e-6)


def test_debiasing_removes_an_additive_position_bias_exactly():
    torch.manual_seed(0)
    signal = torch.randn(16)
    for bias in (0.0, 3.0, -5.0):  # the judge leans toward A (or B) by `bias` nats whatever it reads
        first = torch.stack([signal + bias, torch.zeros(16)], -1)
        swapped = torch.stack([-signal + bias, torch.zeros(16)], -1)
        assert torch.allclose(debiased_preference(first, swapped), torch.sigmoid(signal), atol=1e-6)
    # Averaging probabilities keeps the direction but squashes it toward 0.5 as the bias grows.
    first, swapped = torch.stack([signal + 5, torch.zeros(16)], -1), torch.stack([-signal + 5, torch.zeros(16)], -1)
    avg = averaged_preference(first, swapped)
    assert ((avg - 0.5).sign() == signal.sign()).all() and (avg - 0.5).abs().max() < 0.1


def test_swapping_the_replies_gives_the_complement():
    torch.manual_seed(1)
    a, b = torch.randn(8, 2), torch.randn(8, 2)
    for f in (averaged_preference, debiased_preference):
        assert torch.allclose(f(a, b), 1 - f(b, a), atol=1e-6)
    assert torch.allclose(pointwise_preference(a, b), 1 - pointwise_preference(b, a), atol=1e-6)


def test_pointwise_by_hand_and_invariant_to_a_yes_lean():
    # P(yes) for the first 0.9 of (yes, no) mass, for the second 0.5: σ(log 9 − log 1) = 0.9
    p = pointwise_preference(torch.tensor([lp(0.09, 0.01)]), torch.tensor([lp(0.3, 0.3)]))
    assert math.isclose(p.item(), 0.9, abs_tol=1e-6)
    x, y = torch.randn(5, 2), torch.randn(5, 2)
    lean = torch.tensor([2.0, 0.0])
    assert torch.allclose(pointwise_preference(x + lean, y + lean), pointwise_preference(x, y), atol=1e-6)


def test_combine_log_odds_by_hand_loop_and_zero_weights():
    odds = torch.tensor([[1.0, -3.0, 2.0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    weights = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    out = combine_log_odds(odds, weights)
    assert out.tolist() == [-1.0, 0.0]  # (1 − 3) / 2; a row no source speaks for stays undecided
    torch.manual_seed(2)
    o, w = torch.randn(6, 4, dtype=torch.float64), torch.rand(6, 4, dtype=torch.float64)
    loop = torch.tensor([sum(o[i, s] * w[i, s] for s in range(4)) / sum(w[i]) for i in range(6)], dtype=torch.float64)
    assert torch.allclose(combine_log_odds(o, w), loop)
    # Adding a source with weight 0 changes nothing.
    assert torch.allclose(combine_log_odds(torch.cat([o, torch.randn(6, 1, dtype=torch.float64)], 1),
                                           torch.cat([w, torch.zeros(6, 1, dtype=torch.float64)], 1)), loop)


def test_scores_to_log_odds_is_scale_free():
    a, b = torch.tensor([3.0, 1.0]), torch.tensor([1.0, 2.0])
    assert scores_to_log_odds(a, b, 2.0).tolist() == [1.0, -0.5]
    assert torch.allclose(scores_to_log_odds(10 * a, 10 * b, 20.0), scores_to_log_odds(a, b, 2.0))
