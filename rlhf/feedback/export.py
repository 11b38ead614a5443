"""From stored labels to the rankings contract, and the admin page's quality figures.

Export writes one record per labeler per item (skipped items included with ``skipped: true``),
or with ``consensus=True`` one Borda-consensus record per item. Every record is validated by the
same parser that reads rankings files, so the app can never write a file the pipeline rejects.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from typing import Any

from rlhf.data.records import RankingRecord
from rlhf.feedback.consensus import (agreement_with_consensus, borda_consensus, fractional_ranks, kendalls_w,
                                     pairwise_counts)
from rlhf.feedback.store import Campaign, LabelRow, Store


def label_records(store: Store, campaign: Campaign) -> list[dict[str, Any]]:
    """One rankings-contract dict per stored label, in item then labeler order."""
    out = []
    for row in store.label_rows(campaign.id):
        rec = {"prompt": row.prompt, "completions": row.completions, "ranking": row.ranking,
               "labeler": row.labeler, "criterion": campaign.criterion, "prompt_id": row.prompt_id,
               "campaign": campaign.name, "seconds": round(row.seconds, 3)}
        if row.ties:
            rec["ties"] = row.ties
        if row.skipped:
            rec["skipped"] = True
            rec["skip_reason"] = row.skip_reason
        if row.gold_ranking is not None:
            rec["gold"] = True
        out.append(RankingRecord.from_json(rec, "<export>").to_json())
    return out


def _ranked_by_item(rows: list[LabelRow]) -> dict[int, list[LabelRow]]:
    by_item: dict[int, list[LabelRow]] = defaultdict(list)
    for row in rows:
        if not row.skipped:
            by_item[row.item_id].append(row)
    return by_item


def consensus_records(store: Store, campaign: Campaign) -> list[dict[str, Any]]:
    """One Borda-consensus record per item with at least one non-skipped label."""
    out = []
    for rows in _ranked_by_item(store.label_rows(campaign.id)).values():
        first = rows[0]
        cons = borda_consensus([(r.ranking, r.ties) for r in rows])
        rec = {"prompt": first.prompt, "completions": first.completions, "ranking": cons.ranking,
               "labeler": "consensus:borda", "criterion": campaign.criterion, "prompt_id": first.prompt_id,
               "campaign": campaign.name, "n_labelers": len(rows), "labelers": [r.labeler for r in rows],
               "borda": cons.scores, "kendalls_w": kendalls_w([(r.ranking, r.ties) for r in rows])}
        if cons.ties:
            rec["ties"] = cons.ties
        if first.gold_ranking is not None:
            rec["gold"] = True
        out.append(RankingRecord.from_json(rec, "<export>").to_json())
    return out


def _mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def campaign_summary(store: Store, campaign: Campaign) -> dict[str, Any]:
    """Everything the admin page shows: campaign agreement and per-labeler progress and quality.

    Gold items are left out of the agreement figures (everyone ranks them, so they would weigh
    more than other items) and scored against their known order instead.
    """
    rows = store.label_rows(campaign.id)
    counts = store.counts(campaign.id)
    ranked = _ranked_by_item([r for r in rows if r.gold_ranking is None])
    multi = [[(r.ranking, r.ties) for r in rs] for rs in ranked.values() if len(rs) >= 2]
    ws = [w for w in (kendalls_w(rs) for rs in multi) if w is not None]
    pair_agree = pair_total = 0
    for rs in multi:
        ranks = [fractional_ranks(o, t) for o, t in rs]
        for i in range(len(ranks)):
            for j in range(i + 1, len(ranks)):
                a, t = pairwise_counts(ranks[i], ranks[j])
                pair_agree, pair_total = pair_agree + a, pair_total + t
    loo = agreement_with_consensus({item: {r.labeler: (r.ranking, r.ties) for r in rs} for item, rs in ranked.items()})

    per: dict[str, dict[str, Any]] = {}
    for user in store.labelers(campaign.id):
        prog = store.progress(user)
        per[user.name] = {"labeler": user.name, "done": prog["done"], "total": prog["total"], "skipped": prog["skipped"],
                          "median_seconds": None, "agreement_with_consensus": None, "compared_pairs": 0,
                          "gold_items": 0, "gold_agreement": None}
    seconds: dict[str, list[float]] = defaultdict(list)
    gold: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in rows:
        seconds[r.labeler].append(r.seconds)
        if r.gold_ranking is not None and not r.skipped:
            gold[r.labeler].append(pairwise_counts(fractional_ranks(r.ranking, r.ties),
                                                   fractional_ranks(r.gold_ranking, r.gold_ties or [])))
    for name, entry in per.items():
        if seconds[name]:
            entry["median_seconds"] = round(statistics.median(seconds[name]), 2)
        if name in loo and loo[name].compared:
            entry["agreement_with_consensus"] = round(loo[name].rate, 4)
            entry["compared_pairs"] = loo[name].compared
        if gold[name]:
            entry["gold_items"] = len(gold[name])
            entry["gold_agreement"] = round(sum(a for a, _ in gold[name]) / sum(t for _, t in gold[name]), 4)
    items_complete = sum(1 for rs in ranked.values() if len(rs) >= campaign.labels_per_item)
    w = _mean(ws)
    return {
        "campaign": {"name": campaign.name, "criterion": campaign.criterion, "labels_per_item": campaign.labels_per_item,
                     "items": counts["items"] - counts["gold_items"], "gold_items": counts["gold_items"],
                     "labels": len(rows), "skipped": sum(r.skipped for r in rows), "items_complete": items_complete,
                     "open_assignments": counts["open_assignments"],
                     "kendalls_w": None if w is None else round(w, 4), "items_with_w": len(ws),
                     "pairwise_agreement": round(pair_agree / pair_total, 4) if pair_total else None,
                     "consensus_method": "borda"},
        "labelers": list(per.values()),
    }

