"""Hostile and careless inputs get messages, never tracebacks (issue 15, items 1 and 4): deeply nested
JSON, a .gz that is not gzip, tie groups holding lists, bytes that are not UTF-8 (line and byte
column named), `lr: .nan`, a damaged model folder, and prompts longer than the model's context."""

import gzip
import json
import shutil
from dataclasses import dataclass

import pytest

from rlhf.config import load_config, opt
from rlhf.data.io import read_records
from rlhf.errors import ConfigError, DataError
from rlhf.models.loading import format_prompt, load_causal_lm, load_tokenizer
from rlhf.engine.config import EngineConfig

GOOD = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1]}


def lines(path, *rows: bytes):
    path.write_bytes(b"".join(r + b"\n" for r in rows))
    return path


def test_deeply_nested_json_line_is_a_message_naming_the_line(tmp_path):
    deep = b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    path = lines(tmp_path / "r.jsonl", json.dumps(GOOD).encode(), deep)
    with pytest.raises(DataError, match=r"r\.jsonl:2: JSON nested more than 64 levels deep"):
        read_records(path, "rankings")
    # Nested less than the stack limit but past the reader's bound: refused the same way.
    medium = b'{"prompt": "p", "completions": ["a", "b"], "ranking": ' + b"[" * 500 + b"]" * 500 + b"}"
    with pytest.raises(DataError, match=r":1: JSON nested more than 64 levels deep"):
        read_records(lines(tmp_path / "m.jsonl", medium), "rankings")


def test_gz_that_is_not_gzip_or_is_cut_short(tmp_path):
    plain = lines(tmp_path / "r.jsonl.gz", json.dumps(GOOD).encode())
    with pytest.raises(DataError, match=r"r\.jsonl\.gz: not a valid gzip file"):
        read_records(plain, "rankings")
    data = gzip.compress(b"".join(json.dumps(GOOD).encode() + b"\n" for _ in range(2000)))
    (tmp_path / "cut.jsonl.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match=r"cut\.jsonl\.gz: not a valid gzip file after line \d+"):
        read_records(tmp_path / "cut.jsonl.gz", "rankings")


@pytest.mark.parametrize("ties", [[[[0], 1]], [[{"a": 1}, 0]], [[0, True]], [["0", 1]]])
def test_tie_groups_holding_lists_or_objects(tmp_path, ties):
    path = lines(tmp_path / "r.jsonl", json.dumps({**GOOD, "ties": ties}).encode())
    with pytest.raises(DataError, match=r"r\.jsonl:1: field 'ties': expected a list of groups of integer indices"):
        read_records(path, "rankings")


def test_non_utf8_bytes_name_the_line_and_byte_column(tmp_path):
    bad = b'{"id": "3", "prompt": "caf\xe9"}'
    path = lines(tmp_path / "p.jsonl", b'{"id": "1", "prompt": "hi"}', b"", bad)
    with pytest.raises(DataError, match=r"p\.jsonl:3: not UTF-8 text: byte 0xe9 at byte column 27"):
        read_records(path, "prompts")
    # The same in a gzipped file, past the first read buffer.
    gz = tmp_path / "p.jsonl.gz"
    gz.write_bytes(gzip.compress(b'{"id": "1", "prompt": "hi"}\n' * 5000 + bad + b"\n"))
    with pytest.raises(DataError, match=r"p\.jsonl\.gz:5001: not UTF-8 text"):
        read_records(gz, "prompts")
    # A byte-order mark at the start is not an error.
    bom = lines(tmp_path / "bom.jsonl", b'\xef\xbb\xbf{"id": "1", "prompt": "hi"}')
    assert read_records(bom, "prompts")[0].prompt == "hi"


def test_huge_integer_in_a_record_is_a_message(tmp_path):
    path = lines(tmp_path / "r.jsonl", b'{"prompt": "p", "completions": ["a", "b"], "ranking": [' + b"9" * 5000 + b", 0]}")
    with pytest.raises(DataError, match=r"r\.jsonl:1: malformed JSON"):
        read_records(path, "rankings")


@dataclass
class Stage:
    """A stage."""

    lr: float = opt(1e-3, help="Learning rate.")
    steps: int = opt(3, help="Steps.")


def test_yaml_config_not_utf8_names_line_and_byte_column(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_bytes(b"steps: 4\n# r\xe9sum\xe9\nlr: 0.1\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:2: not UTF-8 text: byte 0xe9 at byte column 4"):
        load_config(Stage, y)


@pytest.mark.parametrize("text", ["lr: .nan\n", "lr: .inf\n", "lr: -.inf\n", "lr: nan\n"])
def test_non_finite_numbers_in_a_config_are_refused(tmp_path, text):
    y = tmp_path / "c.yaml"
    y.write_text(text)
    with pytest.raises(ConfigError, match=r"option 'lr': expected a finite number"):
        load_config(Stage, y)
    with pytest.raises(ConfigError, match=r"--lr: expected a finite number"):
        load_config(Stage, None, {"lr": float("nan")})


def test_yaml_config_nested_past_the_stack_is_a_message(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: " + "[" * 3000 + "]" * 3000 + "\n")
    with pytest.raises(ConfigError, match=r"c\.yaml"):
        load_config(Stage, y)


@pytest.fixture()
def model_copy(tmp_path, tiny_model_dir):
    return shutil.copytree(tiny_model_dir, tmp_path / "model")


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "config.json").write_text('{"model_type": "llama", '), r"config\.json:1: not valid JSON"),
    (lambda d: (d / "config.json").write_bytes(b'{"model_type": "ll\xffama"}'), r"config\.json:1: not UTF-8 text"),
    (lambda d: (d / "config.json").write_text("[1, 2]"), r"config\.json: expected a JSON object"),
    (lambda d: (d / "config.json").write_text('{"hidden_size": 8}'), r"config\.json: no 'model_type' field"),
    (lambda d: (d / "tokenizer.json").write_text('{"version": '), r"tokenizer\.json:1: not valid JSON"),
])
def test_model_folder_with_a_broken_json_file(model_copy, damage, message):
    damage(model_copy)
    with pytest.raises(ConfigError, match=message):
        load_tokenizer(model_copy)
    with pytest.raises(ConfigError, match=message):
        load_causal_lm(model_copy)


@pytest.mark.parametrize("keep", [0.5, 0.999, 4, 20])
def test_model_folder_with_truncated_weights(model_copy, keep):
    weights = model_copy / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: int(len(data) * keep)] if keep < 1 else data[:int(keep)])
    with pytest.raises(ConfigError, match=r"model\.safetensors: truncated"):
        load_causal_lm(model_copy)


def test_reward_model_folder_with_truncated_weights(tmp_path):
    from rlhf.models.reward_model import load_reward_model, new_reward_model, save_reward_model

    model, tok, _ = new_reward_model("minilm", max_length=32)
    save_reward_model(model, tok, tmp_path / "rm")
    weights = tmp_path / "rm" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    with pytest.raises(ConfigError, match=r"model\.safetensors: truncated"):
        load_reward_model(tmp_path / "rm")


# -- prompts longer than the context -------------------------------------------------------------
# (imported here, so that the tests above also run against code without rlhf/data/context.py)

def context_helpers():
    from rlhf.data import context

    return context.clip_chars, context.context_length, context.fit_prompts, context.prompt_budget

def test_context_length_and_prompt_budget(tiny_model_dir):
    _, context_length, _, prompt_budget = context_helpers()
    model, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert context_length(model, tok) == 256
    assert prompt_budget(model, tok, 56) == 200
    with pytest.raises(ConfigError, match="--max-new-tokens 256 leaves no room for a prompt"):
        prompt_budget(model, tok, 256)


def test_long_prompts_are_cut_from_the_left_and_counted(tiny_model_dir):
    _, _, fit_prompts, _ = context_helpers()
    tok = load_tokenizer(tiny_model_dir)
    words = " ".join(f"word{i}" for i in range(2000)) + " how do I cook rice"
    short = "my house is too hot"
    out, cuts = fit_prompts(tok, [short, words], 60)
    assert out[0] == short
    assert out[1].endswith("how do I cook rice") and len(out[1]) < len(words)
    assert len(tok(format_prompt(tok, out[1]), add_special_tokens=False)["input_ids"]) <= 60
    assert (cuts.truncated, cuts.prompts, cuts.chars_dropped) == (1, 2, len(words) - len(out[1]))
    with pytest.raises(DataError, match=r"p\.jsonl: prompt 'b' is [\d,]+ (tokens|characters) long; the model's context leaves 60"):
        fit_prompts(tok, [short, words[:2000]], 60, "refuse", ["prompt 'a'", "prompt 'b'"], "p.jsonl")


def test_a_megabyte_prompt_is_clipped_before_it_is_tokenized(tiny_model_dir):
    """Memory stays bounded: what reaches the tokenizer is at most budget x longest-token characters."""
    clip_chars, _, fit_prompts, _ = context_helpers()
    tok = load_tokenizer(tiny_model_dir)
    huge = "my house is too hot " * 50_000
    clipped = clip_chars(tok, huge, 200)
    assert len(clipped) < 200 * 64 and huge.endswith(clipped)
    seen = []
    real = type(tok).__call__

    class Spy(type(tok)):
        def __call__(self, text, *a, **k):
            seen.append(len(text))
            return real(self, text, *a, **k)

    tok.__class__ = Spy
    out, cuts = fit_prompts(tok, [huge], 200)
    assert cuts.truncated == 1 and max(seen) < 200 * 64 and huge.endswith(out[0])


def run_cli(argv, capsys) -> tuple[int, str]:
    """``rlhf ARGV`` in this process, as the console script runs it: (exit code, stderr)."""
    from rlhf.cli import main

    capsys.readouterr()
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr().err


def test_generate_cli_truncates_and_reports_or_refuses(tmp_path, tiny_model_dir, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text(json.dumps({"id": "long", "prompt": "word " * 2000 + "how do I cook rice"}) + "\n"
                       + json.dumps({"id": "short", "prompt": "my house is too hot"}) + "\n")
    cmd = ["generate", "--model", str(tiny_model_dir), "--prompts", str(prompts), "--num-completions", "1",
           "--max-new-tokens", "8", "--device", "cpu"]
    code, err = run_cli(cmd + ["--out", str(tmp_path / "c.jsonl")], capsys)
    assert code == 0, err
    assert "generate: 1 of 2 prompts were longer than the 248 tokens" in err
    recs = [json.loads(x) for x in (tmp_path / "c.jsonl").read_text().splitlines()]
    assert recs[0]["prompt"].endswith("how do I cook rice") and len(recs[0]["prompt"]) < 2000
    assert recs[1]["prompt"] == "my house is too hot"
    code, err = run_cli(cmd + ["--out", str(tmp_path / "r.jsonl"), "--long-prompts", "refuse"], capsys)
    assert code == 2 and "prompt 'long' is" in err and "Traceback" not in err
    assert not (tmp_path / "r.jsonl").exists()


def test_cli_prints_a_message_for_a_nested_line(tmp_path, capsys):
    path = lines(tmp_path / "r.jsonl", b'{"prompt": ' + b"[" * 100_000 + b"]" * 100_000 + b"}")
    code, err = run_cli(["data", "validate", str(path), "--kind", "rankings"], capsys)
    assert code == 2 and err.startswith("error: ") and "r.jsonl:1: JSON nested" in err


def test_sft_counts_and_reports_what_it_cut_and_refuses_a_length_past_the_context(tmp_path, tiny_model_dir, capsys):
    from rlhf.train.sft import SFTConfig, load_sft_data, run_sft

    rows = [{"prompt": "word " * 5000 + "how do I cook rice", "completion": "Rinse it."},
            {"prompt": "my house is too hot", "completion": "reply " * 3000}] + [
           {"prompt": "hi", "completion": "hello"}] * 6
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tok = load_tokenizer(tiny_model_dir)
    cfg = SFTConfig(data=str(data), out=str(tmp_path / "out"), model=str(tiny_model_dir), batch_size=4, max_length=64)
    encoded = load_sft_data(str(data), tok, cfg)
    assert len(encoded) == 8 and all(len(ids) <= 64 for ids, _ in encoded)
    err = capsys.readouterr().err
    # the long reply fills the window alone, so its prompt goes too: 2 prompts cut, 1 reply cut
    assert "sft: to fit --max-length 64, 2 of 8 examples lost the start of their prompt and 1 the end of their reply" in err
    with pytest.raises(ConfigError, match="--max-length 512 exceeds the 256 positions"):
        run_sft(SFTConfig(data=str(data), out=str(tmp_path / "out"), model=str(tiny_model_dir), batch_size=4,
                          max_length=512, engine=EngineConfig(device="cpu")))


def test_reward_encoder_bounds_the_work_of_a_megabyte_pair():
    from rlhf.models.reward_model import RewardEncoder, new_reward_model

    _, tok, spec = new_reward_model("minilm", max_length=32)
    e = RewardEncoder(tok, spec).encode("my house is too hot " * 50_000, "Open the windows at night. " * 40_000)
    assert len(e.ids) <= 32 and e.prompt_cut and e.reply_cut
