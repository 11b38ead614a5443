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
        fit = fit_gao_rl(self.points)
        out = {"points": [asdict(p) for p in self.points], "flags": self.flags, "best_gold_step": self.best_gold_step,
               "best_gold": None if self.best_gold == -math.inf else self.best_gold}
        if fit is not None:
            alpha, beta = fit
            out["gao_fit"] = {"alpha": alpha, "beta": beta,
                              "peak_sqrt_kl": math.exp(alpha / beta - 1) if beta > 0 else None}
        return out

    def state_dict(self) -> dict:
        return {"points": [asdict(p) for p in self.points], "flags": list(self.flags), "best_gold_step": self.best_gold_step,
                "best_gold": self.best_gold, "streak": self._streak}

    def load_state_dict(self, state: dict) -> None:
        self.points = [WatchPoint(**p) for p in state["points"]]
        self.flags = list(state["flags"])
        self.best_gold_step, self.best_gold, self._streak = state["best_gold_step"], state["best_gold"], state["streak"]
