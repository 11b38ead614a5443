"""Typed config: defaults < YAML < flags, type checks, unknown keys, --help lists every option."""

from dataclasses import dataclass
from typing import Literal

import pytest
from click.testing import CliRunner

from rlhf.config import config_command, load_config, opt
from rlhf.errors import ConfigError


@dataclass
class Demo:
    """A demo stage."""

    data: str = opt(help="Input file.")
    steps: int = opt(10, help="How many steps.")
    lr: float = opt(1e-3, help="Learning rate.")
    lora: bool = opt(False, help="Use LoRA.")
    mode: Literal["a", "b"] = opt("a", help="Which mode.")
    judges: list[str] = opt(help="Judges.", factory=lambda: ["length"])
    note: str | None = opt(None, help="Optional note.")


def test_precedence_defaults_yaml_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: d.jsonl\nsteps: 20\nlr: 0.5\nmode: b\njudges: [x, y]\n")
    cfg = load_config(Demo, y, {"steps": 30})
    assert (cfg.data, cfg.steps, cfg.lr, cfg.mode, cfg.judges, cfg.lora) == ("d.jsonl", 30, 0.5, "b", ["x", "y"], False)


@pytest.mark.parametrize("text, message", [
    ("data: d\nsteps: ten\n", "expected an integer"),
    ("data: d\nwhat: 1\n", "unknown option 'what'"),
    ("data: d\nmode: c\n", "not one of"),
    ("data: d\nlora: maybe\n", "expected true or false"),
    ("- a\n- b\n", "expected a mapping"),
    ("data: [\n", "not valid YAML"),
])
def test_bad_yaml_is_a_clear_error(tmp_path, text, message):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=message) as err:
        load_config(Demo, y)
    if "mapping" not in message:
        assert str(y) in str(err.value)


def test_missing_required_option():
    with pytest.raises(ConfigError, match="--data"):
        load_config(Demo, None, {})


def test_command_help_lists_every_option_with_defaults_and_flag_beats_yaml(tmp_path):
    seen = {}

    @config_command(Demo, name="demo")
    def demo(cfg: Demo) -> None:
        seen["cfg"] = cfg

    result = CliRunner().invoke(demo, ["--help"])
    for flag in ("--data", "--steps", "--lr", "--lora / --no-lora", "--mode", "--judges", "--note", "--config"):
        assert flag in result.output
    assert "default: 10]" in result.output and "Learning rate." in result.output
    y = tmp_path / "c.yaml"
    y.write_text("data: d\nsteps: 20\n")
    result = CliRunner().invoke(demo, ["--config", str(y), "--lr", "0.1", "--judges", "a", "--judges", "b"])
    assert result.exit_code == 0, result.output
    # steps untouched on the command line: the YAML value stands
    assert seen["cfg"].steps == 20 and seen["cfg"].lr == 0.1 and seen["cfg"].judges == ["a", "b"]


def test_real_verbs_show_help():
    from rlhf.cli import app

    for verb in (["sft"], ["generate"], ["base", "build"], ["data", "pairs"]):
        result = CliRunner().invoke(app, [*verb, "--help"])
        assert result.exit_code == 0 and "--config" in result.output, verb
