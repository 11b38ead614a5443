"""``rlhf data``: check contract files and convert rankings to pairs."""

from __future__ import annotations

import json
from dataclasses import dataclass

import click

from rlhf.config import config_command, opt
from rlhf.data.io import read_records
from rlhf.data.pairs import preferred_file, rankings_file_to_pairs
from rlhf.data.records import RECORD_TYPES


@click.group()
def data() -> None:
    """Data contracts: prompts, completions, rankings, pairs (JSON Lines)."""


@dataclass
class PairsConfig:
    """Turn a rankings file into pairwise comparisons (chosen = preferred)."""

    rankings: str = opt(help="Rankings file (JSON Lines): prompt, completions, ranking best-first.")
    out: str = opt(help="Pairs file to write (JSON Lines); written atomically.")
    include_gold: bool = opt(False, help="Also turn gold (attention-check) items into pairs; by default they are left out.")


@config_command(PairsConfig, name="pairs")
def pairs_cmd(cfg: PairsConfig) -> None:
    """A ranking of K completions gives K·(K−1)/2 pairs; ties and skipped items give none."""
    stats = rankings_file_to_pairs(cfg.rankings, cfg.out, cfg.include_gold)
    click.echo(json.dumps({"rankings": stats.rankings, "pairs": stats.pairs, "skipped_items": stats.skipped_items, "gold_items_dropped": stats.gold_items,
                           "tied_pairs_dropped": stats.tied_pairs, "identical_pairs_dropped": stats.identical_pairs,
                           "out": cfg.out}))


@dataclass
class PreferredConfig:
    """Each ranked item's consensus-best completion, as prompt/completion data for `rlhf sft`."""

    rankings: str = opt(help="Rankings file (JSON Lines): prompt, completions, ranking best-first.")
    out: str = opt(help="SFT file to write (JSON Lines: prompt, completion); written atomically.")
    include_gold: bool = opt(False, help="Also use gold (attention-check) items; by default they are left out.")


@config_command(PreferredConfig, name="preferred")
def preferred_cmd(cfg: PreferredConfig) -> None:
    """Labelers' rankings of one item are combined by Borda count; an item whose best place is tied gives nothing."""
    stats = preferred_file(cfg.rankings, cfg.out, cfg.include_gold)
    click.echo(json.dumps({"items": stats.items, "examples": stats.kept, "tied_best_dropped": stats.tied_best,
                           "skipped_rankings": stats.skipped_rankings, "gold_rankings_dropped": stats.gold_rankings,
                           "out": cfg.out}))


@data.command("validate")
@click.argument("path", type=click.Path())
@click.option("--kind", type=click.Choice(sorted(RECORD_TYPES)), required=True, help="Which contract the file follows.")
def validate_cmd(path: str, kind: str) -> None:
    """Check a file against its contract; the first error names file, line and field."""
    records = read_records(path, kind)
    click.echo(f"{path}: {len(records)} valid {kind} records")


data.add_command(pairs_cmd)
data.add_command(preferred_cmd)
