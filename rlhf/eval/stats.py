"""Summary statistics for judge scores: mean, std, bootstrap confidence intervals, relative change."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Summary:
    mean: float
    std: float
    ci_low: float
    ci_high: float
    n: int

    def overlaps(self, other: "Summary") -> bool:
        return not (self.ci_high < other.ci_low or other.ci_high < self.ci_low)


def bootstrap_ci(values: torch.Tensor, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of ``values`` [N] (Efron & Tibshirani 1993)."""
    values = values.double().flatten()
    if values.numel() < 2:
        v = float(values.mean()) if values.numel() else float("nan")
        return v, v
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, values.numel(), (n_boot, values.numel()), generator=g)
    means = values[idx].mean(dim=1)
    alpha = (1 - confidence) / 2
    lo, hi = torch.quantile(means, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(lo), float(hi)


def summarise(values: torch.Tensor, n_boot: int = 2000, confidence: float = 0.95, seed: int = 0) -> Summary:
    lo, hi = bootstrap_ci(values, n_boot, confidence, seed)
    std = float(values.double().std()) if values.numel() > 1 else 0.0
    return Summary(float(values.double().mean()), std, lo, hi, int(values.numel()))


def relative_change(before: float, after: float, higher_is_better: bool) -> float:
    """Improvement in percent of |before|: positive means better, whichever direction is better."""
    if before == 0:
        return float("nan")
    change = (after - before) / abs(before) * 100
    return change if higher_is_better else -change


@dataclass
class Agreement:
    """How often one score orders two replies to the same prompt as a reference score does."""

    rate: float        # share of the counted pairs ordered alike (a tie in ``scores`` counts half)
    ci_low: float      # percentile bootstrap over prompts
    ci_high: float
    pairs: int         # pairs counted: the reference's ties (and gaps up to min_gap) are left out
    prompts: int
    mean_gap: float    # mean |reference difference| of the counted pairs: how far apart they are


def within_prompt_differences(values: torch.Tensor) -> torch.Tensor:
    """``values`` [P, S] (S samples per prompt) -> [P, S·(S−1)/2] float64: ``values[:, j] − values[:, i]``
    for every pair i < j of one prompt's samples."""
    i, j = torch.triu_indices(values.shape[1], values.shape[1], offset=1)
    return (values[:, j] - values[:, i]).double()


def pairwise_agreement(scores: torch.Tensor, reference: torch.Tensor, n_boot: int = 2000, confidence: float = 0.95,
                       seed: int = 0, min_gap: float = 0.0) -> Agreement:
    """Share of within-prompt reply pairs that ``scores`` [P, S] orders as ``reference`` [P, S] does.

    Row p holds the S replies sampled for prompt p, both oriented so that higher is preferred. Every
    pair i < j within a row counts once, except where the reference ties (it prefers neither). This is
    a reward model's validation accuracy measured on the replies a policy actually produces, so it
    can be compared between the base and the tuned model: where the tuned model's replies are ordered
    worse, the policy has moved to where the reward stands in for the reference less well. The
    interval resamples prompts, since the pairs of one prompt share its replies.

    Close pairs are harder to order for any score, so agreement also falls when a model's replies
    merely become more alike. ``min_gap`` counts only pairs the reference separates by more than
    that, which compares two models on pairs equally clear to the reference.
    """
    if scores.dim() != 2 or scores.shape != reference.shape:
        raise ValueError(f"pairwise_agreement needs two [prompts, samples] tensors of one shape; "
                         f"got {tuple(scores.shape)} and {tuple(reference.shape)}")
    n_prompts = scores.shape[0]
    ref_diff, score_diff = within_prompt_differences(reference), within_prompt_differences(scores)
    counted = ref_diff.abs() > min_gap
    alike = torch.where(score_diff == 0, 0.5, (torch.sign(score_diff) == torch.sign(ref_diff)).double())
    per_prompt_alike = (alike * counted).sum(dim=1)
    per_prompt_pairs = counted.sum(dim=1).double()
    pairs = int(per_prompt_pairs.sum())
    if pairs == 0:
        return Agreement(float("nan"), float("nan"), float("nan"), 0, n_prompts, float("nan"))
    rate = float(per_prompt_alike.sum() / pairs)
    mean_gap = float(ref_diff.abs()[counted].mean())
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, n_prompts, (n_boot, n_prompts), generator=g)
    rates = per_prompt_alike[idx].sum(dim=1) / per_prompt_pairs[idx].sum(dim=1)  # NaN where a draw has no pair
    alpha = (1 - confidence) / 2
    lo, hi = torch.nanquantile(rates, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return Agreement(rate, float(lo), float(hi), pairs, n_prompts, mean_gap)
