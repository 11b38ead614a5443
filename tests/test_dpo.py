"""DPO and IPO end to end on a tiny model: implicit-reward accuracy rises, the stage computes exactly
the math module's loss, resume is exact (with and without LoRA), the reference is cached, and bad
pairs get reward training's errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import safetensors_weights as weights
from rlhf.algos import dpo_loss, ipo_loss
from rlhf.cli import app
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError, DataError
from rlhf.train.dpo import DPOConfig, collate_pairs, encode_pair, pair_logprobs, run_dpo
from rlhf.utils.metrics import read_metrics
from test_reward import polite_pairs, write_jsonl


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("dpo-data") / "pairs.jsonl", polite_pairs(96))


def cfg(model_dir, pairs, out, **kw) -> DPOConfig:
    base = dict(pairs=str(pairs), out=str(out), policy=str(model_dir), epochs=1.0, batch_size=8, micro_batch_size=4, lr=2e-3,
                val_fraction=0.25, save_every=2, keep_checkpoints=20, max_steps=6, seed=1, progress=False)
    base.update(kw)
    engine = {k: base.pop(k) for k in list(base) if k in EngineConfig.__dataclass_fields__}
    c = DPOConfig(**base, engine=EngineConfig(**{"device": "cpu", "threads": 1, **engine}))
    c.validate()
    return c


def comparable(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time_")} for r in rows]


def test_encode_pair_truncates_prompt_first_and_keeps_a_prompt_token(tiny_model_dir):
    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    e = encode_pair(tok, "my house is too hot " * 30, "Thank you for asking!", "Whatever.", max_length=24)
    assert e.prompt_cut and not e.reply_cut and e.chosen_ids[-1] == tok.eos_token_id
    assert len(e.prompt_ids) + len(e.chosen_ids) == 24 and len(e.chosen_ids) > len(e.rejected_ids)
    long = encode_pair(tok, "hi", "Whatever. " * 40, "ok", max_length=16)
    assert long.reply_cut and len(long.prompt_ids) == 1 and len(long.chosen_ids) == 15
    q, qm, r, rm = collate_pairs([e, long], tok.pad_token_id)
    assert q.shape[0] == r.shape[0] == 4 and rm.sum(1).tolist() == [len(e.chosen_ids), 15, len(e.rejected_ids), len(long.rejected_ids)]
    assert qm[:, -1].all() and not qm[1, 0]   # left-padded prompts end at the last column


@pytest.mark.parametrize("loss", ["sigmoid", "ipo"])
def test_implicit_reward_accuracy_rises(tiny_model_dir, pairs_file, tmp_path, loss):
    out = tmp_path / loss
    res = CliRunner().invoke(app, ["dpo", "--pairs", str(pairs_file), "--policy", str(tiny_model_dir), "--out", str(out),
                                   "--loss", loss, "--beta", "0.1" if loss == "sigmoid" else "0.5", "--epochs", "3",
                                   "--batch-size", "8", "--lr", "2e-3", "--val-fraction", "0.25", "--eval-every", "3",
                                   "--device", "cpu", "--no-progress", "--threads", "1"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    rows = read_metrics(out)
    assert rows[0]["step"] == 0 and rows[0]["val_accuracy"] == 0.5   # policy = reference: every implicit reward is 0
    assert summary["val_accuracy_first"] == 0.5 and summary["val_accuracy_last"] >= 0.85, summary
    assert summary["val_margin_last"] > 0
    last = rows[-1]
    assert last["rewards_chosen"] > last["rewards_rejected"] and last["margin"] > 0 and last["accuracy"] >= 0.75
    for key in ("loss", "accuracy", "margin", "rewards_chosen", "rewards_rejected", "logps_chosen", "logps_rejected",
                "grad_norm", "lr", "val_loss", "val_accuracy", "val_margin"):
        assert any(key in r for r in rows), key
    assert (out / "tensorboard").is_dir() and (out / "model" / "model.safetensors").is_file()
    assert any(not torch.equal(a, b) for a, b in zip(weights(out / "model").values(), weights(tiny_model_dir).values()))


def test_stage_loss_is_the_math_modules(tiny_model_dir, pairs_file, tmp_path):
    """Wiring: the validation loss the stage logs at step 0, with a reference that differs from the
    policy, equals rlhf.algos' loss applied to log-probabilities computed here independently."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.train.reward import read_pairs, split_by_prompt

    ref_dir = tmp_path / "ref"
    ref = load_causal_lm(tiny_model_dir)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.05 * torch.randn_like(p))
    ref.save_pretrained(str(ref_dir))
    load_tokenizer(tiny_model_dir).save_pretrained(str(ref_dir))
    for loss, fn in (("sigmoid", lambda c, r: dpo_loss(c, r, 0.2, 0.1)), ("ipo", lambda c, r: ipo_loss(c, r, 0.2))):
        c = cfg(tiny_model_dir, pairs_file, tmp_path / loss, reference=str(ref_dir), loss=loss, beta=0.2, max_steps=1,
                label_smoothing=0.1 if loss == "sigmoid" else 0.0)
        run_dpo(c)
        logged = read_metrics(tmp_path / loss)[0]
        tok = load_tokenizer(tiny_model_dir)
        _, val = split_by_prompt(read_pairs(str(pairs_file), False)[0], 0.25, 1)
        enc = [encode_pair(tok, p.prompt, p.chosen, p.rejected, c.max_length) for p in val]
        def logps(model):  # one pair at a time: no padding, no batching shared with the stage
            with torch.no_grad():
                both = [pair_logprobs(model, [e], tok.pad_token_id, loss == "ipo", torch.device("cpu"), 2) for e in enc]
            return torch.cat([c for c, _ in both]), torch.cat([r for _, r in both])

        (pc, pr), (rc, rr) = logps(load_causal_lm(tiny_model_dir)), logps(ref)
        expected, stats = fn(pc - rc, pr - rr)
        assert logged["val_loss"] == pytest.approx(float(expected), abs=1e-4), loss
        assert logged["val_accuracy"] == pytest.approx(float(stats["accuracy"])) and logged["val_accuracy"] != 0.5


@pytest.mark.parametrize("lora", [False, True])
def test_resume_equals_uninterrupted(tiny_model_dir, pairs_file, tmp_path, lora):
    extra = dict(lora=True, lora_r=4, lora_alpha=8, lr=5e-3) if lora else {}
    full = run_dpo(cfg(tiny_model_dir, pairs_file, tmp_path / "full", **extra))
    assert full["steps"] == 6 and full["reference_seconds"] > 0
    ckpts = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert [c.name for c in ckpts] == ["step-00000002", "step-00000004", "step-00000006"]
    resumed = tmp_path / "resumed"
    shutil.copytree(ckpts[0], resumed / "checkpoints" / ckpts[0].name)
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed / "metrics.jsonl")  # as a killed run leaves it
    again = run_dpo(cfg(tiny_model_dir, pairs_file, resumed, **extra))
    a, b = weights(tmp_path / "full" / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert comparable(read_metrics(tmp_path / "full")) == comparable(read_metrics(resumed))
    assert again["val_accuracy_first"] == full["val_accuracy_first"] == 0.5
    if lora:  # merged into a plain HF folder; the adapter kept beside it
        assert not (tmp_path / "full" / "model" / "adapter_config.json").exists()
        assert (tmp_path / "full" / "model" / "adapter" / "adapter_config.json").is_file()


def test_reference_is_cached_and_refreshed_when_the_data_changes(tiny_model_dir, pairs_file, tmp_path):
    out = tmp_path / "cache"
    first = run_dpo(cfg(tiny_model_dir, pairs_file, out, max_steps=1, resume=False))
    assert first["reference_seconds"] > 0 and (out / "reference_logprobs.safetensors").is_file()
    again = run_dpo(cfg(tiny_model_dir, pairs_file, out, max_steps=1, resume=False))
    assert again["reference_seconds"] == 0.0        # read back, not recomputed
    assert again["val_accuracy_first"] == 0.5
    other = write_jsonl(tmp_path / "other.jsonl", polite_pairs(96, offset=1))
    changed = run_dpo(cfg(tiny_model_dir, other, out, max_steps=1, resume=False))
    assert changed["reference_seconds"] > 0          # other pairs: the fingerprint no longer matches


def test_bad_input_is_reported_like_reward_training(tiny_model_dir, tmp_path):
    bad = write_jsonl(tmp_path / "bad.jsonl", polite_pairs(20) + [{"prompt": "p", "chosen": "", "rejected": "b"},
                                                                   {"prompt": "p", "chosen": "same", "rejected": "same"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:21: field 'chosen'.*--skip-bad-pairs"):
        run_dpo(cfg(tiny_model_dir, bad, tmp_path / "a"))
    res = CliRunner().invoke(app, ["dpo", "--pairs", str(bad), "--policy", str(tiny_model_dir), "--out", str(tmp_path / "b"),
                                   "--device", "cpu"])
    assert res.exit_code != 0 and "bad.jsonl:21" in (res.output + str(res.exception))
    s = run_dpo(cfg(tiny_model_dir, bad, tmp_path / "c", skip_bad_pairs=True, max_steps=1, val_fraction=0.0))
    assert s["skipped_pairs"] == 2 and s["train_pairs"] == 20
    with pytest.raises(ConfigError, match="not found"):
        run_dpo(cfg(tiny_model_dir, tmp_path / "missing.jsonl", tmp_path / "d"))
    with pytest.raises(ConfigError, match="fewer than --batch-size"):
        run_dpo(cfg(tiny_model_dir, write_jsonl(tmp_path / "few.jsonl", polite_pairs(4)), tmp_path / "e", val_fraction=0.0))


def test_resume_refuses_other_options_and_config_errors(tiny_model_dir, pairs_file, tmp_path):
    run_dpo(cfg(tiny_model_dir, pairs_file, tmp_path / "r", max_steps=2))
    with pytest.raises(ConfigError, match="--beta"):
        run_dpo(cfg(tiny_model_dir, pairs_file, tmp_path / "r", max_steps=4, beta=0.3))
    with pytest.raises(ConfigError, match="sigmoid loss only"):
        DPOConfig(pairs="p", out="o", loss="ipo", label_smoothing=0.1).validate()
    with pytest.raises(ConfigError, match="multiple of --micro-batch-size"):
        DPOConfig(pairs="p", out="o", batch_size=10, micro_batch_size=4).validate()


def test_non_finite_loss_stops_and_keeps_last_checkpoint(tiny_model_dir, pairs_file, tmp_path, monkeypatch):
    import rlhf.train.dpo as dpo_mod
    from rlhf.errors import TrainingError

    real, calls = dpo_mod.dpo_loss, {"n": 0}

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss, stats = real(*a, **kw)
        return (loss * float("nan"), stats) if calls["n"] == 5 else (loss, stats)  # 2 micro-batches a step: step 3

    monkeypatch.setattr(dpo_mod, "dpo_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite DPO loss or gradient at step 3"):
        run_dpo(cfg(tiny_model_dir, pairs_file, tmp_path / "nan", val_fraction=0.0))
    assert [c.name for c in sorted((tmp_path / "nan" / "checkpoints").iterdir())] == ["step-00000002"]


@pytest.mark.parametrize("lora", [False, True])
def test_packed_pairs_equal_padded_rows_and_gradients(tiny_model_dir, lora):
    """Prompt once, both replies under a tree mask: the same log-probabilities and gradients as 2B
    padded rows, for pairs of very different lengths packed several to a row."""
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.train.branch_packing import pack_branches, packing_problem
    from rlhf.train.dpo import padded_token_logprobs, segments

    tok = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
        with torch.no_grad():  # a non-zero adapter, so that the adapter's path is exercised
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.1)
    raw = polite_pairs(3) + [{"prompt": "hi", "chosen": "ok", "rejected": "no"}] * 3 + [
        {"prompt": "hi there", "chosen": "Thank you for asking! " * 4, "rejected": "Whatever. " * 8}]
    pairs = [encode_pair(tok, r["prompt"], r["chosen"], r["rejected"], 64) for r in raw]
    packed = pack_branches(segments(pairs), tok.pad_token_id)
    assert packed.input_ids.shape[0] < len(pairs)                  # several pairs share a row
    assert packed.input_ids.numel() < 2 * len(pairs) * max(len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids))
                                                           for p in pairs)
    cpu = torch.device("cpu")
    grads = []
    for packing in (False, True):
        model.zero_grad()
        c, r = pair_logprobs(model, pairs, tok.pad_token_id, False, cpu, 64, packing)
        (c.sum() - 2 * r.sum()).backward()
        grads.append(({n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}, c.detach(), r.detach()))
        mean_c, _ = pair_logprobs(model, pairs, tok.pad_token_id, True, cpu, 64, packing)
        assert torch.allclose(mean_c, c.detach() / torch.tensor([len(p.chosen_ids) for p in pairs]), atol=1e-5)
    (g_pad, c_pad, r_pad), (g_pack, c_pack, r_pack) = grads
    assert torch.allclose(c_pad, c_pack, atol=1e-4) and torch.allclose(r_pad, r_pack, atol=1e-4)
    assert all(torch.allclose(g_pad[n], g_pack[n], atol=1e-4) for n in g_pad)
    padded = lambda m: padded_token_logprobs(m, pairs, tok.pad_token_id, cpu)
    assert packing_problem(model, segments(pairs), tok.pad_token_id, padded) is None
    off = lambda m: padded(m) + 0.1                                 # a model the packed path would not reproduce
    assert "differ by" in packing_problem(model, segments(pairs), tok.pad_token_id, off)


def test_dpo_and_grpo_take_the_engine_section():
    """How a run executes is the shared engine section (its flags in --help, its values in the saved
    config), not options of each verb; changing it never blocks a resume."""
    from dataclasses import fields

    from rlhf.train.grpo import GRPOConfig
    from rlhf.utils.checkpoint import check_resume_options

    for verb, config in (("dpo", DPOConfig), ("grpo", GRPOConfig)):
        out = CliRunner().invoke(app, [verb, "--help"], terminal_width=200).output
        for flag in ("--device", "--threads", "--rollout [", "--packing / --no-packing", "--sampler-logprobs"):
            assert flag in out, (verb, flag)
        assert not {"device", "threads", "packing", "sampler_logprobs"} & {f.name for f in fields(config)}
    saved = {"pairs": "p", "out": "o", "engine": {"packing": True, "threads": 2}}
    check_resume_options(Path("ckpt"), DPOConfig(pairs="p", out="o", engine=EngineConfig(packing=False, threads=1)), saved)
