"""Consensus and agreement for rankings with ties. Pure functions, no store or server.

A ranking is ``(order, ties)``: completion indices best first, and tie groups that sit next to each
other in ``order`` (the rankings contract). Tied completions share the mean of the places they
occupy ("fractional ranks", 1 = best), the convention Kendall's W with tie correction expects.

Consensus: **Borda count**. Each labeler gives a completion one point per completion it beats and
half a point per completion it ties with; the consensus orders completions by total points, and
completions with equal totals form a tie group. With one labeler the consensus is their ranking.
Borda is the mean-rank rule: it uses every labeler's full order, needs no fitting, and is exact
for the 2-5 labelers an item usually gets (a Bradley-Terry fit needs many more comparisons per
completion to be stable).

Agreement:

* **Kendall's W** (coefficient of concordance) per item, tie-corrected:
  ``W = 12 S / (m² (n³ − n) − m Σ_j T_j)`` with ``S = Σ_i (R_i − m (n + 1) / 2)²``, ``R_i`` the
  rank sum of completion i over m labelers, n completions, ``T_j = Σ_groups (t³ − t)`` over labeler
  j's tie groups. 1 = identical rankings, 0 = no agreement. A campaign reports the mean over
  items with two or more labelers.
* **Pairwise agreement**: for two labelers and one completion pair, do they give the same
  relation (better, worse, tie)? Pooled over all labeler pairs, completion pairs and items.
  Chance level for K strict rankings is 0.5.
* **Agreement with consensus**, per labeler: pairwise agreement of their ranking with the Borda
  consensus of the OTHER labelers of that item (leave-one-out, so a labeler is not compared with
  a consensus they helped make).
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import combinations
from typing import Sequence

Ranking = tuple[Sequence[int], Sequence[Sequence[int]]]


def fractional_ranks(order: Sequence[int], ties: Sequence[Sequence[int]] = ()) -> list[float]:
    """Rank of each completion (index -> rank, 1 = best); tied completions share their mean place.

    >>> fractional_ranks([2, 0, 1], [[0, 1]])
    [2.5, 2.5, 1.0]
    """
    n = len(order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"ranking {list(order)} is not a permutation of 0..{n - 1}")
    place = {c: p + 1 for p, c in enumerate(order)}
    ranks = [float(place[i]) for i in range(n)]
    for group in ties:
        mean = sum(place[c] for c in group) / len(group)
        for c in group:
            ranks[c] = mean
    return ranks


def _relation(ranks: Sequence[float], a: int, b: int) -> int:
    """+1 when a is better than b, −1 when worse, 0 when tied."""
    return (ranks[a] < ranks[b]) - (ranks[a] > ranks[b])


def pairwise_counts(ranks_a: Sequence[float], ranks_b: Sequence[float]) -> tuple[int, int]:
    """(completion pairs on which the two rankings give the same relation, pairs compared)."""
    n = len(ranks_a)
    if len(ranks_b) != n:
        raise ValueError(f"rankings of {n} and {len(ranks_b)} completions cannot be compared")
    agree = sum(_relation(ranks_a, i, j) == _relation(ranks_b, i, j) for i, j in combinations(range(n), 2))
    return agree, n * (n - 1) // 2


def pairwise_agreement(rankings: Sequence[Ranking]) -> float | None:
    """Share of (labeler pair, completion pair) with the same relation; None with fewer than 2 rankings."""
    ranks = [fractional_ranks(o, t) for o, t in rankings]
    agree = total = 0
    for ra, rb in combinations(ranks, 2):
        a, t = pairwise_counts(ra, rb)
        agree, total = agree + a, total + t
    return agree / total if total else None


def kendalls_w(rankings: Sequence[Ranking]) -> float | None:
    """Tie-corrected Kendall's W of m rankings of the same n completions; None when undefined
    (fewer than 2 rankings, fewer than 2 completions, or every labeler tied everything)."""
    m = len(rankings)
    if m < 2:
        return None
    ranks = [fractional_ranks(o, t) for o, t in rankings]
    n = len(ranks[0])
    if n < 2 or any(len(r) != n for r in ranks):
        return None
    sums = [sum(r[i] for r in ranks) for i in range(n)]
    mean = m * (n + 1) / 2
    s = sum((x - mean) ** 2 for x in sums)
    tie_term = sum(len(g) ** 3 - len(g) for _, ties in rankings for g in ties)
    denom = m * m * (n ** 3 - n) - m * tie_term
    return 12 * s / denom if denom > 0 else None


def borda_scores(rankings: Sequence[Ranking]) -> list[float]:
    """Points per completion: one per completion beaten, one half per completion tied, summed."""
    if not rankings:
        raise ValueError("Borda count needs at least one ranking")
    n = len(rankings[0][0])
    scores = [0.0] * n
    for order, ties in rankings:
        ranks = fractional_ranks(order, ties)
        if len(ranks) != n:
            raise ValueError(f"rankings of {n} and {len(ranks)} completions cannot be combined")
        for i in range(n):
            scores[i] += n - ranks[i]  # = beaten + ties/2 for fractional ranks
    return scores


@dataclass
class Consensus:
    ranking: list[int]  # best first
    ties: list[list[int]]  # groups of equal Borda score, contiguous in ranking
    scores: list[float]  # Borda points per completion, original index order


def borda_consensus(rankings: Sequence[Ranking]) -> Consensus:
    """Order by Borda points (index breaks nothing: equal points become a tie group)."""
    scores = borda_scores(rankings)
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    ties: list[list[int]] = []
    group = [order[0]]
    for c in order[1:]:
        if scores[c] == scores[group[0]]:  # multiples of 0.5: exact in floating point
            group.append(c)
        else:
            if len(group) > 1:
                ties.append(group)
            group = [c]
    if len(group) > 1:
        ties.append(group)
    return Consensus(order, ties, scores)


@dataclass
class LabelerAgreement:
    labeler: str
    agree: int
    compared: int

    @property
    def rate(self) -> float | None:
        return self.agree / self.compared if self.compared else None


def agreement_with_consensus(by_item: dict[object, dict[str, Ranking]]) -> dict[str, LabelerAgreement]:
    """Per labeler, pooled pairwise agreement with the leave-one-out Borda consensus.

    ``by_item`` maps an item key to {labeler: ranking} for that item's non-skipped labels.
    Items a labeler ranked alone give no comparison.
    """
    out: dict[str, LabelerAgreement] = {}
    for labels in by_item.values():
        for name, ranking in labels.items():
            entry = out.setdefault(name, LabelerAgreement(name, 0, 0))
            others = [r for other, r in labels.items() if other != name]
            if not others:
                continue
            cons = borda_consensus(others)
            a, t = pairwise_counts(fractional_ranks(*ranking), fractional_ranks(cons.ranking, cons.ties))
            entry.agree += a
            entry.compared += t
    return out
