"""The engine section (rlhf/engine/): one typed config shown by every verb that trains or samples and
saved with each run, nothing read from the environment or changed in the process at import, the
process-wide settings applied once by the command, and the rollout backends against the reference."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from dataclasses import dataclass

import pytest
import torch
from click.testing import CliRunner

from rlhf.config import config_to_dict, load_config, opt
from rlhf.engine.config import EngineConfig, with_legacy_env
from rlhf.errors import ConfigError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclass
class Stage:
    """A stage with an engine section."""

    data: str = opt(help="Input.")
    steps: int = opt(3, help="Steps.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How it runs.")


def test_section_from_yaml_nested_or_flat_and_flags(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("data: d\nengine:\n  threads: 3\n  rollout: hf\ncpu_gemm: blas\n")
    cfg = load_config(Stage, y, {"rollout": "fast", "compile": True})
    assert cfg.engine == EngineConfig(threads=3, rollout="fast", cpu_gemm="blas", compile=True)  # flags beat the file
    saved = config_to_dict(cfg)
    assert saved["engine"]["threads"] == 3 and saved["engine"]["rollout"] == "fast" and "threads" not in saved
    assert load_config(Stage, None, {"data": "d"}).engine == EngineConfig()


@pytest.mark.parametrize("text, message", [
    ("data: d\nengine:\n  thread: 2\n", "unknown option 'thread' in section 'engine'"),
    ("data: d\nengine: 2\n", "is a section"),
    ("data: d\nrollout: turbo\n", "not one of"),
    ("data: d\nengine:\n  threads: -1\n", "must not be negative"),
])
def test_bad_engine_options_are_clear_errors(tmp_path, text, message):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(Stage, y)


def test_every_verb_that_trains_or_samples_shows_the_engine_options():
    from rlhf.cli import app

    for verb in (["sft"], ["reward", "train"], ["ppo"], ["generate"], ["eval"], ["demo"]):
        out = CliRunner().invoke(app, [*verb, "--help"], terminal_width=200).output
        for flag in ("--device", "--dtype", "--threads", "--rollout [", "--rollout-threads", "--compile / --no-compile",
                     "--cpu-gemm", "--packing / --no-packing", "--sampler-logprobs / --no-sampler-logprobs"):
            assert flag in out, (verb, flag)


def test_a_section_option_may_not_shadow_a_stage_option():
    @dataclass
    class Clash:
        threads: int = opt(1, help="x")
        engine: EngineConfig = opt(factory=EngineConfig, help="y")

    with pytest.raises(TypeError, match="clash"):
        load_config(Clash)


def test_legacy_environment_variables_map_onto_the_section_with_a_message():
    env = {"RLHF_CPU_GEMM": "blas", "RLHF_FAST_DECODE": "0", "RLHF_DECODE_COMPILE": "1", "RLHF_DECODE_THREADS": "2"}
    with pytest.warns(DeprecationWarning, match="RLHF_CPU_GEMM is deprecated: use --cpu-gemm blas"):
        cfg, messages = with_legacy_env(EngineConfig(), env)
    assert (cfg.cpu_gemm, cfg.rollout, cfg.compile, cfg.rollout_threads) == ("blas", "hf", True, 2)
    assert len(messages) == 4
    with pytest.warns(DeprecationWarning, match="ignored here: --cpu-gemm was given"):
        cfg, _ = with_legacy_env(EngineConfig(cpu_gemm="onednn"), {"RLHF_CPU_GEMM": "blas"})
    assert cfg.cpu_gemm == "onednn"  # an option given explicitly wins
    with pytest.raises(ConfigError, match="RLHF_CPU_GEMM='fastest'"):
        with_legacy_env(EngineConfig(), {"RLHF_CPU_GEMM": "fastest"})
    assert with_legacy_env(EngineConfig(), {}) == (EngineConfig(), [])


def test_importing_the_package_reads_no_environment_and_changes_nothing():
    """Import every module with the old variables set to junk: no error, torch's thread count and
    the environment unchanged, nothing routed through oneDNN."""
    code = """
import os, pkgutil, importlib, json, torch
before_env, before_threads = dict(os.environ), torch.get_num_threads()
import rlhf
for m in pkgutil.walk_packages(rlhf.__path__, "rlhf."):
    if m.name.startswith("rlhf.rollout.vllm") or m.name == "rlhf.__main__":
        continue  # an optional extra, imported only when asked for; the entry point runs the CLI
    importlib.import_module(m.name)
from rlhf.models import cpu_gemm
print(json.dumps({"env_changed": sorted(set(os.environ.items()) ^ set(before_env.items())),
                  "threads_changed": torch.get_num_threads() != before_threads, "gemm": cpu_gemm.configured_mode()}))
"""
    env = {**os.environ, "PYTHONPATH": REPO, "RLHF_CPU_GEMM": "junk", "RLHF_FAST_DECODE": "junk",
           "RLHF_DECODE_THREADS": "junk", "RLHF_DECODE_COMPILE": "junk", "OMP_NUM_THREADS": "2"}
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    env.pop("LRU_CACHE_CAPACITY", None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-2000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"env_changed": [], "threads_changed": False, "gemm": "blas"}


def test_start_applies_the_section_once_and_says_so(capsys):
    """What must be process-wide is set by the command's call to start(): threads, oneDNN's cache
    bounds, the GEMM routing; auto choices are resolved and printed in one line."""
    from rlhf.engine import runtime
    from rlhf.models import cpu_gemm

    threads, mode = torch.get_num_threads(), cpu_gemm.configured_mode()
    try:
        rt = runtime.start(EngineConfig(device="cpu", threads=1, cpu_gemm="onednn", rollout_threads=0))
        assert torch.get_num_threads() == 1 and cpu_gemm.configured_mode() == "onednn"
        assert os.environ["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] == "16" and os.environ["LRU_CACHE_CAPACITY"] == "16"
        assert rt.device == torch.device("cpu") and rt.dtype == torch.float32 and rt.dist.world_size == 1
        assert (rt.engine.rollout, rt.engine.rollout_threads) == ("fast", 1)  # one thread: nothing left to decide
        assert "engine: cpu float32, 1 thread per process" in capsys.readouterr().err
        rt = runtime.start(EngineConfig(device="cpu", threads=2, rollout_threads=0))
        assert rt.engine.rollout_threads == 0  # decided per model when it decodes
        assert "rollout fast (1 thread, 2 for models of 20M+ parameters)" in capsys.readouterr().err
    finally:
        torch.set_num_threads(threads)
        cpu_gemm.configure(mode)


def test_start_maps_an_old_variable_and_says_it_is_deprecated(monkeypatch, capsys):
    from rlhf.engine import runtime

    threads = torch.get_num_threads()
    monkeypatch.setenv("RLHF_FAST_DECODE", "0")
    try:
        with pytest.warns(DeprecationWarning):
            rt = runtime.start(EngineConfig(device="cpu", threads=1, cpu_gemm="blas"))
    finally:
        torch.set_num_threads(threads)
    assert rt.engine.rollout == "hf"
    assert "warning: RLHF_FAST_DECODE is deprecated: use --rollout hf" in capsys.readouterr().err


@pytest.mark.parametrize("cores, processes, expected", [(2, 1, 1), (1, 1, 1), (8, 1, 7), (8, 2, 3), (16, 3, 5), (4, 8, 1)])
def test_auto_threads(cores, processes, expected):
    from rlhf.engine.runtime import auto_threads

    assert auto_threads(cores, processes) == expected


# --- rollout backends ------------------------------------------------------------------------------

PROMPTS = ["hi", "my house is too hot", "a much longer prompt about a hot house " * 3, "how do I cook rice"]


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


def test_backends_from_the_section(tiny_model_dir):
    from rlhf.rollout.backends import FastDecode, HFGenerate, make_backend

    assert isinstance(make_backend(EngineConfig(rollout="hf")), HFGenerate)
    fast = make_backend(EngineConfig(rollout="fast", compile=True, rollout_threads=2))
    assert isinstance(fast, FastDecode) and (fast.settings.compile, fast.settings.threads) == (True, 2)
    assert isinstance(make_backend(EngineConfig(rollout="auto", device="cpu")), FastDecode)


def test_per_episode_seeds_make_a_reply_independent_of_its_batch(llama):
    """With one seed per episode, the fast loop draws each reply from its own random stream: the
    same seed gives the same reply alone or in any batch (what lets several processes share a PPO
    batch and still sample what one process would); another seed gives another reply."""
    from rlhf.rollout.backends import FastDecode
    from rlhf.rollout.generate import SamplingParams, sample_tokens

    model, tok = llama
    params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.9)
    whole = sample_tokens(model, tok, PROMPTS, params, backend=FastDecode(), seeds=[11, 12, 13, 14])
    halves = [sample_tokens(model, tok, PROMPTS[i:i + 2], params, backend=FastDecode(), seeds=[11 + i, 12 + i])
              for i in (0, 2)]
    assert whole.texts == halves[0].texts + halves[1].texts
    alone = sample_tokens(model, tok, PROMPTS[3:], params, backend=FastDecode(), seeds=[14])
    assert alone.texts == whole.texts[3:]
    other = sample_tokens(model, tok, PROMPTS, params, backend=FastDecode(), seeds=[21, 22, 23, 24])
    assert other.texts != whole.texts


def test_generate_backend_is_seeded_by_the_batch_and_leaves_the_global_stream(llama):
    from rlhf.rollout.backends import HFGenerate
    from rlhf.rollout.generate import SamplingParams, sample_tokens

    model, tok = llama
    params = SamplingParams(max_new_tokens=8, temperature=1.0)
    torch.manual_seed(0)
    state = torch.get_rng_state()
    a = sample_tokens(model, tok, PROMPTS, params, backend=HFGenerate(), seeds=[5, 6, 7, 8])
    assert torch.equal(torch.get_rng_state(), state)  # forked: the caller's stream is untouched
    b = sample_tokens(model, tok, PROMPTS, params, backend=HFGenerate(), seeds=[5, 99, 98, 97])
    assert a.texts == b.texts  # the first episode's seed seeds the batch


def test_experience_select_keeps_every_set_field(llama):
    from rlhf.rollout.generate import SamplingParams, sample_tokens

    model, tok = llama
    exp = sample_tokens(model, tok, PROMPTS, SamplingParams(max_new_tokens=6), record=True)
    exp.scores = torch.arange(4.0)
    sub = exp.select(torch.tensor([2, 0]))
    assert sub.prompts == [PROMPTS[2], PROMPTS[0]] and sub.texts == [exp.texts[2], exp.texts[0]]
    assert torch.equal(sub.scores, torch.tensor([2.0, 0.0])) and sub.ref_logprobs is None
    assert torch.equal(sub.hidden, exp.hidden[[2, 0]]) and len(sub) == 2
    assert dataclasses.fields(sub) == dataclasses.fields(exp)


def test_saved_run_config_holds_the_engine_section(tiny_model_dir, tmp_path):
    """A run's saved config says how it ran: PPO through the CLI with engine flags, then its files."""
    from rlhf.cli import app

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "1", "prompt": "hot house"}\n{"id": "2", "prompt": "cook rice"}\n')
    res = CliRunner().invoke(app, ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--out",
                                   str(tmp_path / "c.jsonl"), "--num-completions", "2", "--max-new-tokens", "4",
                                   "--device", "cpu", "--rollout", "hf", "--threads", "1"])
    assert res.exit_code == 0, res.output
    assert len(json.loads((tmp_path / "c.jsonl").read_text().splitlines()[0])["completions"]) == 2
    res = CliRunner().invoke(app, ["ppo", "--policy", str(tiny_model_dir), "--reward", "length", "--prompts", str(prompts),
                                   "--out", str(tmp_path / "ppo"), "--max-steps", "1", "--batch-size", "4",
                                   "--mini-batch-size", "4", "--micro-batch-size", "4", "--max-new-tokens", "4",
                                   "--ppo-epochs", "1", "--no-progress", "--device", "cpu", "--threads", "1",
                                   "--rollout", "hf", "--cpu-gemm", "blas", "--no-sampler-logprobs"])
    assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "ppo" / "summary.json").read_text())["config"]["engine"]
    assert saved == {**dataclasses.asdict(EngineConfig()), "device": "cpu", "threads": 1, "rollout": "hf",
                     "cpu_gemm": "blas", "sampler_logprobs": False}
    state = json.loads(next((tmp_path / "ppo" / "checkpoints").glob("step-*/state.json")).read_text())
    assert state["config"]["engine"] == saved
