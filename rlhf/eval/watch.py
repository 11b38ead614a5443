"""Over-optimisation watch: is the policy hacking its reward model?

Every k PPO steps the trainer's samples are also scored by a held-out "gold" judge that the policy
is not trained on. Gao, Schulman & Hilton (2022) found that gold reward under RL follows
``gold ≈ d·(α − β·log d)`` with ``d = √KL`` from the initial policy: it rises, peaks at
``d* = exp(α/β − 1)``, and falls, while the optimised proxy keeps rising. The watch fits that curve
to what it has seen and raises a flag when

* the proxy rose while the gold judge fell for ``patience`` evaluations in a row (the signature of
  reward hacking), or
* reply length grew or shrank past a factor of the first evaluation's, or repetition rose past a
  bound (the usual ways a policy games a reward model).

It keeps the step with the best gold score so the trainer can keep that checkpoint.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch


@dataclass
class WatchPoint:
    step: int
    kl: float
    proxy: float
    gold: float
    length: float
    repetition: float

    @property
    def d(self) -> float:
        return math.sqrt(max(self.kl, 0.0))


def fit_gao_rl(points: list[WatchPoint]) -> tuple[float, float] | None:
    """Least-squares (α, β) for gold − gold₀ ≈ d·(α − β·log d), using points with d > 0.

    Gao et al. measure gold relative to the initial policy, so the first point's gold is the
    offset. Dividing by d makes the model linear: (gold − gold₀)/d = α − β·log d.
    """
    base = points[0].gold if points else 0.0
    usable = [p for p in points if p.d > 1e-6]
    if len(usable) < 3:
        return None
    x = torch.tensor([math.log(p.d) for p in usable], dtype=torch.float64)
    y = torch.tensor([(p.gold - base) / p.d for p in usable], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), -x], dim=1)
    solution = torch.linalg.lstsq(design, y.unsqueeze(1)).solution.squeeze(1)
    return float(solution[0]), float(solution[1])


# When the fit counts as well determined (see gao_fit_report): enough points, a curvature β that is
# at least twice its standard error, and a predicted peak no further out than this multiple of
# the largest √KL seen (beyond it the peak is an extrapolation the data cannot support).
GAO_MIN_POINTS = 4
GAO_MIN_T = 2.0
GAO_MAX_EXTRAPOLATION = 1.5


def gao_fit_report(points: list[WatchPoint]) -> dict | None:
    """The fit with what it takes to trust it: standard errors, R² on the gold scale, and a verdict.

    ``peak_sqrt_kl`` / ``peak_kl`` (d* and d*² in nats per reply) are given only when the fit is
    well determined; otherwise ``why`` says what is missing. A β near zero puts d* = exp(α/β − 1)
    anywhere (the 25,750 a flat gold curve once gave), which is noise, not a prediction.
    """
    fit = fit_gao_rl(points)
    if fit is None:
        return None
    alpha, beta = fit
    base = points[0].gold
    usable = [p for p in points if p.d > 1e-6]
    n = len(usable)
    x = torch.tensor([math.log(p.d) for p in usable], dtype=torch.float64)
    y = torch.tensor([(p.gold - base) / p.d for p in usable], dtype=torch.float64)
    design = torch.stack([torch.ones_like(x), -x], dim=1)
    resid = y - design @ torch.tensor([alpha, beta], dtype=torch.float64)
    dof = n - 2
    sigma2 = float(resid.pow(2).sum()) / dof if dof > 0 else math.inf
    try:
        cov = sigma2 * torch.linalg.inv(design.T @ design)
        se_beta = math.sqrt(max(float(cov[1, 1]), 0.0))
    except RuntimeError:  # singular: every point at the same KL
        se_beta = math.inf
    gold = torch.tensor([p.gold - base for p in usable], dtype=torch.float64)
    pred = torch.tensor([p.d * (alpha - beta * math.log(p.d)) for p in usable], dtype=torch.float64)
    ss_tot = float((gold - gold.mean()).pow(2).sum())
    r2 = 1.0 - float((gold - pred).pow(2).sum()) / ss_tot if ss_tot > 0 else 0.0
    max_d = max(p.d for p in usable)
    peak = math.exp(alpha / beta - 1) if beta > 0 and alpha / beta - 1 < 50 else None
    why = None
    if n < GAO_MIN_POINTS:
        why = f"{n} gold evaluations with KL > 0; it needs {GAO_MIN_POINTS}"
    elif beta <= 0:
        why = "the gold curve does not bend down (β ≤ 0), so it has no peak"
    elif not beta > GAO_MIN_T * se_beta:
        why = f"the curvature β = {beta:.3g} is within {GAO_MIN_T:g} standard errors ({se_beta:.3g}) of zero"
    elif peak is None or peak > GAO_MAX_EXTRAPOLATION * max_d:
        why = (f"the predicted peak lies far beyond the largest KL seen ({max_d ** 2:.3g} nats per reply), "
               "an extrapolation the data cannot support")
    out = {"alpha": alpha, "beta": beta, "se_beta": se_beta if math.isfinite(se_beta) else None, "r2": r2, "points": n, "max_sqrt_kl": max_d,
           "well_determined": why is None, "peak_sqrt_kl": peak if why is None else None,
           "peak_kl": peak ** 2 if why is None else None}
    if why is not None:
        out["why"] = why
    return out


@dataclass
class OveroptimisationWatch:
    patience: int = 3
    max_length_ratio: float = 2.0
    max_repetition_increase: float = 0.25
    min_length_tokens: float = 4.0
    points: list[WatchPoint] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)
    best_gold_step: int | None = None
    best_gold: float = -math.inf
    _streak: int = 0

    def update(self, point: WatchPoint) -> str | None:
        """Record one evaluation; return a flag message when reward hacking is detected, else None."""
        flag = None
        if self.points:
            prev, first = self.points[-1], self.points[0]
            if point.proxy > prev.proxy and point.gold < prev.gold:
                self._streak += 1
            else:
                self._streak = 0
            if self._streak >= self.patience:
                flag = (f"step {point.step}: proxy reward rose while the gold judge fell for {self._streak} evaluations "
                        f"in a row (proxy {first.proxy:.3f}→{point.proxy:.3f}, gold {self.best_gold:.3f} best → {point.gold:.3f})")
            elif point.length > max(first.length, self.min_length_tokens) * self.max_length_ratio:
                flag = (f"step {point.step}: reply length drifted from {first.length:.1f} to {point.length:.1f} tokens "
                        f"(bound ×{self.max_length_ratio})")
            elif first.length >= self.min_length_tokens and point.length < first.length / self.max_length_ratio:
                # Collapse is as telling as growth: a near-empty reply is the classic way to please a
                # classifier that only penalises bad content.
                flag = (f"step {point.step}: reply length collapsed from {first.length:.1f} to {point.length:.1f} tokens "
                        f"(bound ÷{self.max_length_ratio})")
            elif point.repetition > first.repetition + self.max_repetition_increase:
                flag = (f"step {point.step}: repetition rose from {first.repetition:.2f} to {point.repetition:.2f} "
                        f"(bound +{self.max_repetition_increase})")
        self.points.append(point)
        if point.gold > self.best_gold:
            self.best_gold, self.best_gold_step = point.gold, point.step
        if flag:
            self.flags.append(flag)
        return flag

    def summary(self) -> dict:
        fit = gao_fit_report(self.points)
        out = {"points": [asdict(p) for p in self.points], "flags": self.flags, "best_gold_step": self.best_gold_step,
               "best_gold": None if self.best_gold == -math.inf else self.best_gold}
        if fit is not None:
            out["gao_fit"] = fit
        return out

    def state_dict(self) -> dict:
        return {"points": [asdict(p) for p in self.points], "flags": list(self.flags), "best_gold_step": self.best_gold_step,
                "best_gold": self.best_gold, "streak": self._streak}

    def load_state_dict(self, state: dict) -> None:
        self.points = [WatchPoint(**p) for p in state["points"]]
        self.flags = list(state["flags"])
        self.best_gold_step, self.best_gold, self._streak = state["best_gold_step"], state["best_gold"], state["streak"]
