"""``rlhf ppo``: the command-line entry point over rlhf.train.ppo_loop."""

from __future__ import annotations

import json

import click

from rlhf.config import config_command
from rlhf.train.ppo_config import PPOConfig


@config_command(PPOConfig, name="ppo")
def ppo(cfg: PPOConfig) -> None:
    """PPO with a per-token KL penalty against the frozen reference, until a reward threshold, a KL
    ceiling, a reward-hacking flag or the step limit; prints a JSON summary (also in OUT/summary.json)."""
    from rlhf.train.ppo_loop import run_ppo

    summary = run_ppo(cfg)
    if summary is None:  # not the main process of a multi-process run: it prints nothing
        return
    click.echo(f"stopped: {summary['stop_reason']} after {summary['steps']} steps; "
               f"score {summary['score_first']:.3f} → {summary['score_last']:.3f}, KL {summary['kl_last']:.2f}", err=True)
    click.echo(json.dumps(summary))
