"""The AI labeler's math, pure tensor functions: preferences from option-label probabilities.

A feedback model asked "which reply is better, (A) or (B)?" gives log-probabilities for the option
labels as its next token. Following Bai et al. 2022 (§4.1) the preference is the *normalised*
probability of the label, P(A) / (P(A) + P(B)), read from the model, never parsed from text.

Small models prefer one position whatever the content (the measured SmolLM2-135M picks B in >99%
of first-order questions). Asking both orders and combining cancels a position bias that adds a
constant to the log-odds: with ℓ₁ = log P(A)/P(B) when the first reply is shown as A, and ℓ₂ the
same log-odds when the order is swapped (the first reply is now B),

    ℓ₁ = s + b,   ℓ₂ = −s + b   ⇒   (ℓ₁ − ℓ₂) / 2 = s

where s is the content signal and b the position bias. ``debiased_preference`` computes σ of that;
``averaged_preference`` averages the two probabilities instead (what the paper does), which keeps
the bias's squashing: a judge that says B with 99% in both orders lands near 0.5 either way, and its
small content signal survives only as a tiny difference.
"""

from __future__ import annotations

import torch


def option_log_odds(option_logprobs: torch.Tensor) -> torch.Tensor:
    """log P(A) − log P(B) from the labels' log-probabilities [N, 2] → [N].

    The normalised probability of A is σ of this; the model's mass on other tokens cancels.
    """
    return option_logprobs[..., 0] - option_logprobs[..., 1]


def option_preference(option_logprobs: torch.Tensor) -> torch.Tensor:
    """P(A) / (P(A) + P(B)) for each row of label log-probabilities [N, 2] → [N]."""
    return torch.sigmoid(option_log_odds(option_logprobs))


def averaged_preference(first_order: torch.Tensor, swapped_order: torch.Tensor) -> torch.Tensor:
    """P(first reply is better), the probabilities of both orders averaged (Bai et al. 2022).

    first_order: [N, 2] label log-probs with the first reply shown as A; swapped_order: [N, 2] with
    it shown as B. Returns [N] = ½·(P₁(A) + P₂(B)).
    """
    return 0.5 * (option_preference(first_order) + 1.0 - option_preference(swapped_order))


def debiased_preference(first_order: torch.Tensor, swapped_order: torch.Tensor) -> torch.Tensor:
    """P(first reply is better) with an additive position bias removed: σ((ℓ₁ − ℓ₂) / 2) → [N].

    Shapes as in ``averaged_preference``. Swapping the two replies gives exactly 1 − P.
    """
    return torch.sigmoid(0.5 * (option_log_odds(first_order) - option_log_odds(swapped_order)))


def pointwise_preference(yes_no_first: torch.Tensor, yes_no_second: torch.Tensor) -> torch.Tensor:
    """P(first reply is better) from a yes/no question asked about each reply alone → [N].

    yes_no_*: [N, 2] log-probs of "Yes" and "No" (Yes = keeps the principle). The reply with the
    higher log-odds of Yes wins: σ(ℓ_first − ℓ_second). A constant lean toward Yes cancels.
    """
    return torch.sigmoid(option_log_odds(yes_no_first) - option_log_odds(yes_no_second))


def combine_log_odds(log_odds: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted mean of several sources' log-odds that the first reply is better.

    log_odds, weights: [N, S] (S sources: principles, evaluators; weight 0 = not asked for this
    row). Returns [N] log-odds; rows with no weight give 0 (no preference). Averaging in log-odds
    rather than probability keeps a confident source from being diluted to nothing by unsure ones
    and is the logarithmic opinion pool (Genest & Zidek 1986).
    """
    total = weights.sum(dim=-1)
    return (log_odds * weights).sum(dim=-1) / total.clamp(min=1e-12) * (total > 0).to(log_odds.dtype)


def scores_to_log_odds(first: torch.Tensor, second: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Log-odds that the first reply is better from an evaluator's scores [N] each (higher = better).

    The score difference is divided by ``scale`` (the evaluator's spread on the replies being
    labeled), so that one standard deviation of score difference is one unit of log-odds whatever
    units the evaluator speaks in.
    """
    scale = torch.as_tensor(scale, dtype=first.dtype)
    return (first - second) / scale.clamp(min=1e-12)
