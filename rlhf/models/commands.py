"""``rlhf base``: the bundled tiny instruction model."""

from __future__ import annotations

import click

from rlhf.config import config_command
from rlhf.models.base import BaseBuildConfig, build_base_model, describe


@click.group()
def base() -> None:
    """The bundled default model: a small instruction-following causal LM trained by our own code."""


@config_command(BaseBuildConfig, name="build")
def build(cfg: BaseBuildConfig) -> None:
    """Train a tokenizer, pre-train, then instruction-tune on the shipped corpus (2 CPU cores: minutes)."""
    click.echo(describe(build_base_model(cfg)))


base.add_command(build)
