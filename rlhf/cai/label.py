"""AI feedback on completions: the rankings contract, with the soft preference kept.

Every pair of a prompt's K completions is compared (rlhf/cai/labeler.py); the ranking orders the
completions by their mean probability of beating the others, and the record keeps

* ``labeler: "ai:<model>"`` and ``criterion``: the principles asked, comma-separated;
* ``probabilities``: the K×K matrix P[i][j] = P(completion i is better than j), which
  ``rlhf data pairs`` / ``rlhf reward train`` turn into soft Bradley-Terry targets;
* ``ai_feedback``: for each compared pair, every source's verdict and which sources decided it.

Identical completions are tied without asking anyone.
"""

from __future__ import annotations

from collections import Counter
from itertools import combinations, groupby

from rlhf.cai.labeler import AILabeler, Comparison
from rlhf.data.records import CompletionsRecord, RankingRecord


def label_completions(labeler: AILabeler, records: list[CompletionsRecord]) -> tuple[list[RankingRecord], dict]:
    """Rankings (one per record with at least two completions) and a summary of who decided what."""
    comparisons, where = [], []
    for r, rec in enumerate(records):
        for i, j in combinations(range(len(rec.completions)), 2):
            if rec.completions[i] != rec.completions[j]:
                comparisons.append(Comparison(rec.prompt, rec.completions[i], rec.completions[j]))
                where.append((r, i, j))
    verdicts = labeler.judge(comparisons) if comparisons else []
    by_record: dict[int, list] = {}
    for (r, i, j), v in zip(where, verdicts):
        by_record.setdefault(r, []).append((i, j, v))
    rankings, deciders, confident = [], Counter(), 0
    for r, rec in enumerate(records):
        k = len(rec.completions)
        if k < 2:
            continue
        prob = [[0.5] * k for _ in range(k)]
        pairs, principles = [], []
        for i, j, v in by_record.get(r, []):
            prob[i][j], prob[j][i] = round(v.probability, 6), round(1.0 - v.probability, 6)
            pairs.append({"i": i, "j": j, "probability": round(v.probability, 4), "principles": v.principles,
                          "sources": v.sources, "decided_by": v.decided_by})
            principles += [p for p in v.principles if p not in principles]
            deciders.update(v.decided_by[:1] or ["nobody (no preference)"])
            confident += abs(v.probability - 0.5) >= 0.1
        wins = [sum(prob[i][j] for j in range(k) if j != i) / (k - 1) for i in range(k)]
        ranking = sorted(range(k), key=lambda i: (-wins[i], i))
        ties = _tie_groups(ranking, wins)
        rankings.append(RankingRecord(prompt=rec.prompt, completions=rec.completions, ranking=ranking,
                                      labeler=labeler.name, criterion=",".join(principles) or None, ties=ties,
                                      prompt_id=rec.prompt_id,
                                      extra={"probabilities": prob,
                                             "ai_feedback": {"method": labeler.settings.method,
                                                             "debias": labeler.settings.debias, "pairs": pairs}}))
    summary = {"records": len(rankings), "comparisons": len(comparisons),
               "first_decider": dict(deciders.most_common()),
               "confident_share": round(confident / len(comparisons), 4) if comparisons else None,
               "labeler": labeler.name}
    return rankings, summary


def _tie_groups(ranking: list[int], wins: list[float]) -> list[list[int]]:
    """Neighbours in the ranking with equal win rates (identical texts, or no source preferred either)."""
    runs = (list(run) for _, run in groupby(ranking, key=lambda i: round(wins[i], 9)))
    return [run for run in runs if len(run) > 1]
