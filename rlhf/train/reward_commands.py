"""``rlhf reward train | eval | score``: thin command-line entry points over rlhf.train.reward."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.config import config_command, opt
from rlhf.errors import ConfigError
from rlhf.train.reward import RewardTrainConfig, pair_metrics, read_pairs, train_reward_model


@click.group(name="reward")
def reward() -> None:
    """Reward models: train from preference pairs, evaluate on pairs, score completions."""


@config_command(RewardTrainConfig, name="train")
def train(cfg: RewardTrainConfig) -> None:
    """Train a reward model on preference pairs; prints a JSON summary (also in OUT/summary.json)."""
    summary = train_reward_model(cfg)
    if summary is not None:  # the main process of a multi-process run prints for all
        click.echo(json.dumps(summary))


@dataclass
class RewardEvalConfig:
    """Pairwise accuracy of a scorer on preference pairs."""

    model: str = opt(help="A reward model folder, or any scorer spec (rm:DIR, classifier:DIR:LABEL, length, ...).")
    pairs: str = opt(help="Comparisons to judge: a pairs file (any supported layout) or a rankings file.")
    json: bool = opt(False, help="Print one JSON object instead of a short table.")
    out: str | None = opt(None, help="Also write the JSON result to this file.")
    skip_bad_pairs: bool = opt(False, help="Skip and count malformed pairs instead of stopping at the first.")
    device: str = opt("auto", help="cpu, cuda, or auto.")


def evaluate_scorer(spec: str, pairs: list, device: str = "auto") -> dict:
    """Score both replies of every pair with ``spec`` and compare; a lower-is-better scorer is flipped."""
    import torch

    from rlhf.judges.base import load_scorer, score_checked

    scorer = load_scorer(spec, device)
    prompts = [p.prompt for p in pairs]
    both = score_checked(scorer, prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    sign = 1.0 if scorer.higher_is_better else -1.0
    r_c, r_r = sign * both[: len(pairs)], sign * both[len(pairs):]
    result = {"model": spec, "scorer": scorer.name, **pair_metrics(r_c, r_r, pairs)}
    if hasattr(scorer, "prompts_cut"):
        result["truncation"] = {"prompts_cut": scorer.prompts_cut, "replies_cut": scorer.replies_cut,
                                "sequences": 2 * len(pairs)}
    result["mean_chosen"] = round(float(torch.mean(r_c)), 4)
    result["mean_rejected"] = round(float(torch.mean(r_r)), 4)
    return result


@config_command(RewardEvalConfig, name="eval")
def eval_(cfg: RewardEvalConfig) -> None:
    """Pairwise accuracy, mean margin and accuracy by reply length of a reward model (or any scorer)."""
    from rlhf.utils.io import atomic_write_json

    pairs, skipped = read_pairs(cfg.pairs, cfg.skip_bad_pairs)
    result = evaluate_scorer(cfg.model, pairs, cfg.device)
    result["skipped_pairs"] = len(skipped)
    if cfg.out:
        atomic_write_json(cfg.out, result)
    if cfg.json:
        click.echo(json.dumps(result))
        return
    click.echo(f"{result['scorer']}: accuracy {result['accuracy']:.3f} on {result['pairs']} pairs "
               f"(mean margin {result['mean_margin']:+.3f}; shorter-reply baseline {result['shorter_reply_baseline']:.3f})")
    for name, b in result["accuracy_by_length"].items():
        click.echo(f"  replies of {name:>7} words: {b['accuracy']:.3f} on {b['pairs']} pairs")


@dataclass
class RewardScoreConfig:
    """Score every completion of a completions file."""

    model: str = opt(help="A reward model folder or any scorer spec (rm:DIR, classifier:DIR:LABEL:prob, toxicity, ...).")
    completions: str = opt(help="Completions file: {prompt_id, prompt, completions: [...]} per line.")
    out: str | None = opt(None, help="Write the records with a 'scores' list added here (JSON Lines); default: stdout.")
    device: str = opt("auto", help="cpu, cuda, or auto.")


@config_command(RewardScoreConfig, name="score")
def score(cfg: RewardScoreConfig) -> None:
    """Add a 'scores' list (one per completion) to every record of a completions file."""
    from rlhf.data.io import read_records
    from rlhf.data.records import CompletionsRecord
    from rlhf.judges.base import load_scorer, score_checked
    from rlhf.utils.io import atomic_write_text

    if not Path(cfg.completions).is_file():
        raise ConfigError(f"completions file {cfg.completions} not found")
    records = read_records(cfg.completions, CompletionsRecord)
    scorer = load_scorer(cfg.model, cfg.device)
    prompts = [r.prompt for r in records for _ in r.completions]
    texts = [c for r in records for c in r.completions]
    scores = score_checked(scorer, prompts, texts).tolist()
    lines, k = [], 0
    for r in records:
        n = len(r.completions)
        lines.append(json.dumps({**r.to_json(), "scores": [round(s, 6) for s in scores[k:k + n]],
                                 "scorer": scorer.name, "higher_is_better": scorer.higher_is_better}, ensure_ascii=False))
        k += n
    text = "".join(line + "\n" for line in lines)
    if cfg.out:
        atomic_write_text(cfg.out, text)
        click.echo(f"wrote {len(texts)} scores for {len(records)} prompts to {cfg.out}", err=True)
    else:
        sys.stdout.write(text)


reward.add_command(train)
reward.add_command(eval_)
reward.add_command(score)
