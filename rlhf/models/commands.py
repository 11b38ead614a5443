"""``rlhf base`` (the bundled tiny instruction model) and ``rlhf model`` (the named models)."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import click

from rlhf.config import config_command
from rlhf.errors import ConfigError
from rlhf.models.base import BaseBuildConfig, build_base_model, describe
from rlhf.models.named import NAMED_MODELS, cache_dir, cache_root, convert, ensure, lookup, status
from rlhf.utils.io import publish_dir, staging_dir


@click.group()
def base() -> None:
    """The bundled default model: a small instruction-following causal LM trained by our own code."""


@config_command(BaseBuildConfig, name="build")
def build(cfg: BaseBuildConfig) -> None:
    """Train a tokenizer, pre-train, then instruction-tune on the shipped corpus (2 CPU cores: minutes)."""
    click.echo(describe(build_base_model(cfg)))


base.add_command(build)


@click.group()
def model() -> None:
    """Named models (bundled, smollm2): where they live, and writing them out as Hugging Face folders."""


@model.command(name="list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
def list_models(as_json: bool) -> None:
    """The named models, their folders and whether they are ready (nothing is converted or read)."""
    rows = [status(m) for m in NAMED_MODELS.values()]
    if as_json:
        click.echo(json.dumps({"cache": str(cache_root()), "models": rows}, indent=2))
        return
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        click.echo(f"{r['name']:<{width}}  {r['description']}\n{'':<{width}}  {r['path']}  [{r['state']}]")
    click.echo(f"cache: {cache_root()} (set RLHF_HOME to move it); any local Hugging Face folder or hub id "
               "(org/name) works wherever a model is named")


def import_model(name: str, out: str | Path | None = None) -> Path:
    """Write the named model ``name`` to ``out`` (None: the cache folder ``--model NAME`` uses)."""
    named = lookup(name)
    if named is None:
        raise ConfigError(f"unknown model {name!r}; named models: {', '.join(NAMED_MODELS)}")
    if named.name == "bundled":
        if not out:
            raise ConfigError("the bundled model ships inside the package; give --out to copy it somewhere")
        staged = staging_dir(out)
        shutil.copytree(ensure(named), staged, dirs_exist_ok=True)
        return publish_dir(staged, out)
    out = Path(out) if out else cache_dir(named)
    click.echo(f"converting {named.name} from the {named.package} wheel into {out} ...", err=True)
    return convert(named, out)


@model.command(name="import")
@click.argument("name")
@click.option("--out", default=None, type=click.Path(file_okay=False),
              help="Folder to write (replaced atomically); default: (re)write the cache folder that --model NAME uses.")
def import_command(name: str, out: str | None) -> None:
    """Convert a named model into a plain Hugging Face folder (AutoModelForCausalLM.from_pretrained loads it)."""
    written = import_model(name, out)
    click.echo(json.dumps({"model": name, "out": str(written)}))
    sys.stdout.flush()
