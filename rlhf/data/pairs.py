"""Rankings → pairwise comparisons (the reward model's training signal).

A ranking of K completions, best first, yields every ordered pair (better, worse): K·(K−1)/2 of
them. Pairs inside a tie group and all pairs of a skipped item are left out, as are pairs whose
two texts are identical (sampling often repeats a completion; such a pair carries no preference).
Gold items (``"gold": true``, the labeling app's attention checks) are left out unless asked for:
every labeler ranks each of them, so a few prompts would weigh as much as the whole campaign.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from rlhf.data.io import read_records, write_records
from rlhf.data.records import PairRecord, RankingRecord, SFTRecord
from rlhf.feedback.consensus import borda_consensus


@dataclass
class PairStats:
    rankings: int = 0
    skipped_items: int = 0
    pairs: int = 0
    tied_pairs: int = 0
    identical_pairs: int = 0
    gold_items: int = 0
    by_labeler: dict[str, int] = field(default_factory=dict)


def ranking_to_pairs(rec: RankingRecord, stats: PairStats | None = None, include_gold: bool = False) -> list[PairRecord]:
    stats = stats if stats is not None else PairStats()
    stats.rankings += 1
    if rec.extra.get("gold") is True and not include_gold:
        stats.gold_items += 1
        return []
    if rec.skipped:
        stats.skipped_items += 1
        return []
    tie_of = {i: g for g, group in enumerate(rec.ties) for i in group}
    meta = {k: v for k, v in (("labeler", rec.labeler), ("criterion", rec.criterion), ("prompt_id", rec.prompt_id)) if v is not None}
    pairs = []
    for a, better in enumerate(rec.ranking):
        for worse in rec.ranking[a + 1:]:
            if better in tie_of and tie_of.get(worse) == tie_of[better]:
                stats.tied_pairs += 1
                continue
            chosen, rejected = rec.completions[better], rec.completions[worse]
            if chosen == rejected:
                stats.identical_pairs += 1
                continue
            soft = rec.extra.get("probabilities")  # an AI labeler's P(row better than column)
            pairs.append(PairRecord(prompt=rec.prompt, chosen=chosen, rejected=rejected, extra=dict(meta),
                                    probability=None if soft is None else float(soft[better][worse])))
    stats.pairs += len(pairs)
    if rec.labeler is not None:
        stats.by_labeler[rec.labeler] = stats.by_labeler.get(rec.labeler, 0) + len(pairs)
    return pairs


def rankings_to_pairs(rankings: list[RankingRecord], stats: PairStats | None = None,
                      include_gold: bool = False) -> list[PairRecord]:
    return [p for rec in rankings for p in ranking_to_pairs(rec, stats, include_gold)]


def rankings_file_to_pairs(rankings: str | Path, out: str | Path, include_gold: bool = False) -> PairStats:
    """Read a rankings file, write its pairs atomically to ``out``; returns what was kept and dropped."""
    stats = PairStats()
    write_records(out, rankings_to_pairs(read_records(rankings, RankingRecord), stats, include_gold))
    return stats


@dataclass
class PreferredStats:
    items: int = 0          # distinct (prompt, completions) items with at least one usable ranking
    kept: int = 0           # items whose consensus has one best completion
    tied_best: int = 0      # items whose best place is a tie: no single preferred completion
    skipped_rankings: int = 0
    gold_rankings: int = 0


def preferred_completions(rankings: list[RankingRecord], stats: PreferredStats | None = None,
                          include_gold: bool = False) -> list[SFTRecord]:
    """Each ranked item's consensus-best completion as a (prompt, completion) SFT example.

    An item is one prompt with one list of completions; its labelers' rankings are combined by Borda
    count (rlhf/feedback/consensus.py). Items whose best place is a tie give nothing, since no single
    completion was preferred; skipped rankings and gold items are left out as for pairs. This is
    "preferred-completion" fine-tuning (best-of-K under the labels): it moves a policy towards what
    people ranked first before RL, using only rankings that were collected anyway.
    """
    stats = stats if stats is not None else PreferredStats()
    items: dict[tuple, list[RankingRecord]] = {}
    for rec in rankings:
        if rec.extra.get("gold") is True and not include_gold:
            stats.gold_rankings += 1
        elif rec.skipped:
            stats.skipped_rankings += 1
        else:
            items.setdefault((rec.prompt_id, rec.prompt, tuple(rec.completions)), []).append(rec)
    out = []
    for (_, prompt, completions), recs in items.items():
        stats.items += 1
        consensus = borda_consensus([(r.ranking, r.ties) for r in recs])
        best = consensus.ranking[0]
        if any(best in group for group in consensus.ties):
            stats.tied_best += 1
            continue
        stats.kept += 1
        out.append(SFTRecord(prompt=prompt, completion=completions[best]))
    return out


def preferred_file(rankings: str | Path, out: str | Path, include_gold: bool = False) -> PreferredStats:
    """Read a rankings file, write each item's preferred completion atomically to ``out`` (SFT contract)."""
    stats = PreferredStats()
    write_records(out, preferred_completions(read_records(rankings, RankingRecord), stats, include_gold))
    return stats


def load_pairs(path: str | Path, *, on_error: str = "raise", skipped: list[str] | None = None) -> list[PairRecord]:
    """Read pairs from a pairs file (any supported layout) or convert a rankings file on the fly.

    The file's first record decides: one with a ``ranking`` field is a rankings file.
    """
    from rlhf.data.io import iter_jsonl

    path = Path(path)
    if not path.is_dir():
        first = next(iter_jsonl(path), None)
        if first is not None and "ranking" in first[1]:
            return rankings_to_pairs(read_records(path, RankingRecord, on_error=on_error, skipped=skipped))
    return read_records(path, PairRecord, on_error=on_error, skipped=skipped)
