"""Tokenizer and prompt format, SFT encoding, build → sft → generate through the CLI, exact resume, LoRA."""

import json

import pytest
import torch
from click.testing import CliRunner

from rlhf.cli import app
from rlhf.models.loading import format_prompt, load_causal_lm, load_tokenizer
from rlhf.train.sft import SFTConfig, encode_example, run_sft


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    return result


def write_sft(path, n=48):
    rows = [{"prompt": "how do I cook rice", "completion": "Rinse the rice and simmer it."},
            {"prompt": "my house is too hot", "completion": "Open the windows at night."}] * (n // 2)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_chat_template_and_labels_cover_reply_only(tiny_tokenizer):
    text = format_prompt(tiny_tokenizer, "hi")
    assert text == "<|user|>hi\n<|assistant|>"
    ids, labels = encode_example(tiny_tokenizer, "hi", "hello there", max_length=64)
    n_prompt = len(tiny_tokenizer(text, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:] and ids[-1] == tiny_tokenizer.eos_token_id


def test_long_prompt_is_cut_from_the_left_never_the_reply(tiny_tokenizer):
    reply = "Open the windows at night."
    ids, labels = encode_example(tiny_tokenizer, "word " * 200 + "END", reply, max_length=32)
    assert len(ids) == 32
    reply_ids = tiny_tokenizer(reply, add_special_tokens=False)["input_ids"] + [tiny_tokenizer.eos_token_id]
    assert ids[-len(reply_ids):] == reply_ids and labels[-len(reply_ids):] == reply_ids
    assert "END" in tiny_tokenizer.decode(ids)  # the end of the prompt survives, its start does not


def test_build_sft_generate_round_trip(tmp_path):
    base = tmp_path / "base"
    out = invoke("base", "build", "--out", base, "--vocab-size", 400, "--hidden-size", 32, "--num-layers", 2,
                 "--num-heads", 2, "--intermediate-size", 64, "--pretrain-documents", 128, "--sft-examples", 128,
                 "--sft-epochs", 1, "--batch-size", 16)
    assert json.loads(out.stdout.strip().splitlines()[-1])["parameters"] > 0
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoModelForCausalLM.from_pretrained(str(base)), AutoTokenizer.from_pretrained(str(base))  # plain Auto classes load it
    assert (base / "model.safetensors").is_file() and (base / "build.json").is_file()

    invoke("sft", "--model", base, "--data", write_sft(tmp_path / "sft.jsonl"), "--out", tmp_path / "sft",
           "--batch-size", 8, "--epochs", 1, "--lr", 1e-3)
    tuned = tmp_path / "sft" / "model"
    before = load_causal_lm(base).state_dict()
    after = load_causal_lm(tuned).state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"id": "a", "prompt": "how do I cook rice"}\n{"id": "b", "prompt": "my house is too hot"}\n')
    comp = tmp_path / "completions.jsonl"
    invoke("generate", "--model", tuned, "--prompts", prompts, "--num-completions", 3, "--out", comp,
           "--max-new-tokens", 12, "--seed", 1)
    from rlhf.data import read_records

    recs = read_records(comp, "completions")
    assert [r.prompt_id for r in recs] == ["a", "b"] and all(len(r.completions) == 3 for r in recs)


def test_left_padding_does_not_change_greedy_output(tiny_model_dir):
    from rlhf.rollout.generate import SamplingParams, decode_responses, sample_tokens

    tok, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    greedy = SamplingParams(max_new_tokens=8, temperature=0.0)
    alone = decode_responses(tok, sample_tokens(model, tok, ["hi"], greedy))
    batched = decode_responses(tok, sample_tokens(model, tok, ["hi", "a much longer prompt about a hot house " * 3], greedy))
    assert alone[0] == batched[0]


def test_response_mask_stops_at_first_eos():
    from rlhf.rollout.generate import response_mask_from_ids

    ids = torch.tensor([[5, 6, 0, 7], [5, 6, 7, 8], [0, 0, 0, 0]])
    mask, ended = response_mask_from_ids(ids, 0)
    assert mask.tolist() == [[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]]
    assert ended.tolist() == [True, False, True]


def _sft_cfg(tmp_path, model_dir, **kw):
    return SFTConfig(data=str(write_sft(tmp_path / "d.jsonl", 64)), out=str(tmp_path / kw.pop("name")), model=str(model_dir),
                     batch_size=8, epochs=2, lr=1e-3, warmup_steps=2, save_every=3, **kw)


def test_resume_after_interruption_gives_identical_weights(tmp_path, tiny_model_dir, monkeypatch):
    full = run_sft(_sft_cfg(tmp_path, tiny_model_dir, name="full"))

    from rlhf.utils import metrics

    real_log = metrics.MetricsLogger.log

    def crash_at_step_5(self, step, values):
        if step == 5:
            raise KeyboardInterrupt("simulated kill")
        real_log(self, step, values)

    monkeypatch.setattr(metrics.MetricsLogger, "log", crash_at_step_5)
    with pytest.raises(KeyboardInterrupt):
        run_sft(_sft_cfg(tmp_path, tiny_model_dir, name="killed"))
    monkeypatch.setattr(metrics.MetricsLogger, "log", real_log)
    assert (tmp_path / "killed" / "checkpoints" / "step-00000003" / "state.json").is_file()
    step3 = tmp_path / "killed" / "checkpoints" / "step-00000003" / "model"
    assert len(load_tokenizer(step3)) == len(load_tokenizer(tiny_model_dir))  # a checkpoint loads as it is
    assert load_causal_lm(step3) is not None
    assert not (tmp_path / "killed" / "model").exists()
    resumed = run_sft(_sft_cfg(tmp_path, tiny_model_dir, name="killed"))
    assert resumed["steps"] == full["steps"] == 16
    a = load_causal_lm(tmp_path / "full" / "model").state_dict()
    b = load_causal_lm(tmp_path / "killed" / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    logged = [json.loads(x)["loss"] for x in (tmp_path / "killed" / "metrics.jsonl").read_text().splitlines()]
    reference = [json.loads(x)["loss"] for x in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert logged == reference


def test_lora_sft_trains_adapter_and_saves_merged_model(tmp_path, tiny_model_dir):
    run_sft(_sft_cfg(tmp_path, tiny_model_dir, name="lora", lora=True, lora_r=4, lora_alpha=8, max_steps=4))
    merged = load_causal_lm(tmp_path / "lora" / "model").state_dict()
    base = load_causal_lm(tiny_model_dir).state_dict()
    assert set(merged) == set(base)
    assert any(not torch.equal(merged[k], base[k]) for k in base)


def test_sft_rejects_bad_data_with_file_and_line(tmp_path, tiny_model_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "p", "completion": "ok"}\n{"prompt": "p", "completion": ""}\n')
    result = CliRunner().invoke(app, ["sft", "--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path / "o")])
    assert result.exit_code != 0 and "bad.jsonl:2" in str(result.exception)


def test_shipped_prompt_files_match_the_corpus():
    from rlhf.data import read_records
    from rlhf.models import shipped_prompts
    from rlhf.models.corpus import prompt_files

    for split, rows in prompt_files().items():
        assert [r.to_json() for r in read_records(shipped_prompts(split), "prompts")] == rows
