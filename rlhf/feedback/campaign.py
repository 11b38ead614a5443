"""Reading a campaign's inputs: completions, instructions, gold (attention-check) items.

Gold items have a known best-to-worst order. They come either from a completions file whose
records carry ``gold_ranking`` (and optionally ``gold_ties``), or from a separate rankings file
(``--gold``): every record there becomes a gold item with its ``ranking`` and ``ties``. Every
labeler sees every gold item once, spread through their queue; the admin page scores each
labeler against the known orders.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rlhf.data.io import iter_jsonl
from rlhf.data.records import CompletionsRecord, RankingRecord
from rlhf.errors import ConfigError, DataError
from rlhf.feedback.store import MAX_COMPLETIONS, Campaign, Store
from rlhf.utils.io import read_utf8

MAX_INSTRUCTIONS_BYTES = 1 << 20


def default_instructions(criterion: str) -> str:
    return (f"# Rank by {criterion}\n\nRead the prompt, then read every completion. Put the completion that is "
            f"best for **{criterion}** at the top and the worst at the bottom.\n\n"
            "- Judge the completion as a reply to the prompt.\n"
            "- Mark a tie only when you truly cannot prefer one over the other.\n"
            "- Skip an item (and say why) if you cannot judge it.\n")


def _check_k(completions: list[str], path: str | Path, line: int) -> None:
    # One limit, here at import and in the labeling API: an item the page cannot rank is refused now.
    if len(completions) > MAX_COMPLETIONS:
        raise DataError(path, line, f"{len(completions)} completions; an item holds at most {MAX_COMPLETIONS} "
                                    "(labelers rank all of them on one page); split it or sample fewer", "completions")


def read_items(path: str | Path) -> list[dict[str, Any]]:
    """Items from a completions file; a record with ``gold_ranking`` becomes a gold item."""
    items = []
    for line, obj in iter_jsonl(path):
        rec = CompletionsRecord.from_json(obj, path, line)
        if len(rec.completions) < 2:
            raise DataError(path, line, "an item needs at least 2 completions to rank", "completions")
        _check_k(rec.completions, path, line)
        item: dict[str, Any] = {"prompt_id": rec.prompt_id, "prompt": rec.prompt, "completions": rec.completions}
        if obj.get("gold_ranking") is not None:
            # The contract's own ranking checks: a permutation, ties contiguous.
            gold = RankingRecord.from_json({"prompt": rec.prompt, "completions": rec.completions,
                                            "ranking": obj["gold_ranking"], "ties": obj.get("gold_ties") or []}, path, line)
            item.update(gold_ranking=gold.ranking, gold_ties=gold.ties)
        items.append(item)
    if not items:
        raise DataError(path, None, "holds no completions records")
    return items


def read_gold(path: str | Path) -> list[dict[str, Any]]:
    """Gold items from a rankings file (prompt, completions, ranking best-first, optional ties)."""
    items = []
    for line, obj in iter_jsonl(path):
        rec = RankingRecord.from_json(obj, path, line)
        if rec.skipped:
            raise DataError(path, line, "a gold item needs a ranking, not a skip", "skipped")
        _check_k(rec.completions, path, line)
        items.append({"prompt_id": rec.prompt_id or f"gold-{line}", "prompt": rec.prompt,
                      "completions": rec.completions, "gold_ranking": rec.ranking, "gold_ties": rec.ties})
    if not items:
        raise DataError(path, None, "holds no gold rankings")
    return items


def import_campaign(store: Store, completions: str | Path, criterion: str, labels_per_item: int,
                    instructions: str | Path | None = None, gold: str | Path | None = None,
                    name: str | None = None) -> Campaign:
    """Create a campaign from files. ``instructions`` is a Markdown or text file (None: a default text)."""
    if not criterion.strip():
        raise ConfigError("--criterion must not be empty (e.g. helpfulness, harmlessness)")
    if instructions is not None:
        p = Path(instructions)
        if not p.is_file():
            raise ConfigError(f"{p}: instructions file not found")
        text = read_utf8(p, ConfigError, max_bytes=MAX_INSTRUCTIONS_BYTES)
        if not text.strip():
            raise ConfigError(f"{p}: instructions file is empty")
    else:
        text = default_instructions(criterion)
    items = read_items(completions)
    if gold is not None:
        items += read_gold(gold)
    return store.create_campaign(name or Path(completions).name.split(".")[0], criterion, text, labels_per_item, items)
