"""From stored labels to the rankings contract, and the admin page's quality figures.

Export writes one record per labeler per item (skipped items included with ``skipped: true``),
or with ``consensus=True`` one Borda-consensus record per item. Every record is validated by the
same parser that reads rankings files, so the app can never write a file the pipeline rejects.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Any

from rlhf.data.records import RankingRecord
from rlhf.feedback.consensus import (agreement_with_consensus, borda_consensus, fractional_ranks, kendalls_w,
                                     pairwise_agreement, pairwise_counts)
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
                          "gold_items": 0, "gold_agreement": None, "as_shown": 0, "as_shown_by_chance": 0.0}
    seconds: dict[str, list[float]] = defaultdict(list)
    gold: dict[str, list[tuple[int, int]]] = defaultdict(list)
    for r in rows:
        seconds[r.labeler].append(r.seconds)
        if r.labeler in per and not r.skipped:
            # A careful labeler agrees with a random shuffle 1 time in K!; far more often means unranked answers.
            per[r.labeler]["as_shown"] += r.as_shown
            per[r.labeler]["as_shown_by_chance"] += 1 / math.factorial(len(r.completions))
        if r.gold_ranking is not None and not r.skipped:
            gold[r.labeler].append(pairwise_counts(fractional_ranks(r.ranking, r.ties),
                                                   fractional_ranks(r.gold_ranking, r.gold_ties or [])))
    for name, entry in per.items():
        entry["as_shown_by_chance"] = round(entry["as_shown_by_chance"], 2)
        if seconds[name]:
            # Three significant digits: scripted labelers on the API answer in milliseconds, and a
            # fixed two decimals showed them as 0.
            entry["median_seconds"] = float(f"{statistics.median(seconds[name]):.3g}")
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
                     "as_shown": sum(r.as_shown for r in rows), "consensus_method": "borda"},
        "labelers": list(per.values()),
    }



def item_summaries(store: Store, campaign: Campaign) -> list[dict[str, Any]]:
    """The admin's per-item view: every item with its labels, agreement, skips and flags.

    Per item: how many rankings it has of the N it needs, Kendall's W and pairwise agreement of its
    labelers (None with fewer than two), the Borda consensus, each label (original completion
    indices, seconds, whether it was submitted in the shuffled order as shown) and every skip with
    its reason. Gold items carry their known order and each label's agreement with it.
    """
    by_item: dict[int, list[LabelRow]] = defaultdict(list)
    for row in store.label_rows(campaign.id):
        by_item[row.item_id].append(row)
    out = []
    for item in store.items(campaign.id):
        rows = by_item.get(item["id"], [])
        ranked = [r for r in rows if not r.skipped]
        rankings = [(r.ranking, r.ties) for r in ranked]
        cons = borda_consensus(rankings) if ranked else None
        gold_ranks = (fractional_ranks(item["gold_ranking"], item["gold_ties"] or [])
                      if item["gold_ranking"] is not None else None)
        labels = []
        for r in rows:
            entry = {"labeler": r.labeler, "skipped": r.skipped, "skip_reason": r.skip_reason, "ranking": r.ranking,
                     "ties": r.ties, "seconds": float(f"{r.seconds:.3g}"), "as_shown": r.as_shown}
            if gold_ranks is not None and not r.skipped:
                agree, total = pairwise_counts(fractional_ranks(r.ranking, r.ties), gold_ranks)
                entry["gold_agreement"] = round(agree / total, 4)
            labels.append(entry)
        w = kendalls_w(rankings)
        out.append({"id": item["id"], "prompt_id": item["prompt_id"], "prompt": item["prompt"],
                    "completions": item["completions"], "gold": item["gold_ranking"] is not None,
                    "gold_ranking": item["gold_ranking"], "gold_ties": item["gold_ties"],
                    "labels_needed": campaign.labels_per_item, "rankings": len(ranked),
                    "skips": len(rows) - len(ranked), "open_claims": item["open_claims"],
                    "complete": len(ranked) >= campaign.labels_per_item,
                    "kendalls_w": None if w is None else round(w, 4),
                    "pairwise_agreement": None if (pa := pairwise_agreement(rankings)) is None else round(pa, 4),
                    "as_shown": sum(r.as_shown for r in rows),
                    "consensus": None if cons is None else {"ranking": cons.ranking, "ties": cons.ties},
                    "labels": labels})
    return out
