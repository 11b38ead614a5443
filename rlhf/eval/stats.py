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
