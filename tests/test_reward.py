"""Reward models: input encoding, pair reading, padding invariance, training through the CLI, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import safetensors_weights as _weights
from rlhf.cli import app
from rlhf.errors import ConfigError, DataError, TrainingError
from rlhf.models.reward_model import RewardEncoder, load_reward_model, new_reward_model, pool_hidden
from rlhf.engine.config import EngineConfig
from rlhf.train.reward import RewardTrainConfig, epoch_batches, pair_metrics, read_pairs, split_by_prompt, train_reward_model
from rlhf.utils.metrics import read_metrics

POLITE = ["Thank you for asking! Open the windows at night.", "Great question! Try a short walk and water.",
          "Sure, here is a simple recipe: rinse the rice and simmer.", "Happy to help: close the curtains by day."]
RUDE = ["That is a stupid question. Figure it out yourself.", "Whatever. I do not care about your problem.",
        "Stupid. Figure it out.", "I do not care. Whatever."]
PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next"]


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def polite_pairs(n: int, offset: int = 0) -> list[dict]:
    """Easy synthetic preference: the polite reply is chosen, the rude one rejected."""
    return [{"prompt": f"{PROMPTS[(i + offset) % 4]} ({i + offset})", "chosen": POLITE[(i + offset) % 4],
             "rejected": RUDE[(i * 3 + offset) % 4]} for i in range(n)]


# --- encoding -----------------------------------------------------------------------------------

def test_pool_hidden_ignores_padding():
    h = torch.arange(2 * 4 * 3, dtype=torch.float32).view(2, 4, 3)
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert torch.equal(pool_hidden(h, mask, "last"), torch.stack([h[0, 1], h[1, 3]]))
    assert torch.allclose(pool_hidden(h, mask, "mean"), torch.stack([h[0, :2].mean(0), h[1].mean(0)]))
    h2 = h.clone()
    h2[0, 2:] = 1e6  # whatever sits under padding must not matter
    assert torch.equal(pool_hidden(h2, mask, "mean"), pool_hidden(h, mask, "mean"))


def test_left_truncation_keeps_reply_encoder():
    model, tok, spec = new_reward_model("minilm", max_length=24)
    enc = RewardEncoder(tok, spec)
    prompt = " ".join(f"word{i}" for i in range(60)) + " final question"
    e = enc.encode(prompt, "the reply stays whole")
    text = tok.decode(e.ids)
    assert len(e.ids) == 24 and e.prompt_cut and not e.reply_cut
    assert text.endswith("final question [SEP] the reply stays whole [SEP]") and "word0 " not in text
    assert e.types[-6:] == [0] + [1] * 5 and e.types[0] == 0  # reply tokens form the second segment
    short = enc.encode("hi", "ok")
    assert not short.prompt_cut and tok.decode(short.ids) == "[CLS] hi [SEP] ok [SEP]"


def test_left_truncation_keeps_reply_causal(tiny_model_dir):
    model, tok, spec = new_reward_model(tiny_model_dir, max_length=32)
    assert spec.backbone_kind == "causal" and spec.pooling == "last"
    enc = RewardEncoder(tok, spec)
    reply_ids = tok("Thank you for asking!", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    e = enc.encode("my house is too hot " * 20, "Thank you for asking!")
    assert len(e.ids) == 32 and e.prompt_cut and not e.reply_cut
    assert e.ids[-len(reply_ids):] == reply_ids  # the whole reply and the EOS the reward is read at
    long = enc.encode("hi", "Whatever. " * 40)
    assert long.reply_cut and len(long.ids) == 32 and long.ids[-1] == tok.eos_token_id


# --- pairs --------------------------------------------------------------------------------------

def test_pairs_from_rankings_hh_and_bad_input(tmp_path):
    rankings = write_jsonl(tmp_path / "rank.jsonl", [
        {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1], "labeler": "ann"},
        {"prompt": "q", "completions": ["x", "y"], "ranking": [], "skipped": True}])
    pairs, skipped = read_pairs(str(rankings), False)
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "b"), ("a", "b")] and not skipped
    hh = write_jsonl(tmp_path / "hh.jsonl", [{"chosen": "\n\nHuman: hi\n\nAssistant: Hello, how can I help?",
                                              "rejected": "\n\nHuman: hi\n\nAssistant: Go away."}])
    (p,), _ = read_pairs(str(hh), False)
    assert p.prompt.endswith("Assistant:") and p.chosen == "Hello, how can I help?" and p.rejected == "Go away."

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                               {"prompt": "p", "chosen": "", "rejected": "b"},
                                               {"prompt": "p", "chosen": "same", "rejected": "same"},
                                               {"prompt": "p", "chosen": "only one side"}])
    with pytest.raises(DataError, match=r"bad\.jsonl:2: field 'chosen'.*--skip-bad-pairs"):
        read_pairs(str(bad), False)
    good, skipped = read_pairs(str(bad), True)
    assert len(good) == 1 and len(skipped) == 3
    assert any("identical" in s for s in skipped) and any("rejected" in s for s in skipped)
    with pytest.raises(DataError, match="empty.jsonl: .*no (valid )?pairs"):
        read_pairs(str(write_jsonl(tmp_path / "empty.jsonl", [])), False)


def test_split_by_prompt_keeps_prompts_together_and_batches_are_deterministic():
    from rlhf.data.records import PairRecord

    pairs = [PairRecord(prompt=f"p{i // 3}", chosen=f"c{i}", rejected=f"r{i}") for i in range(300)]
    train, val = split_by_prompt(pairs, 0.2, seed=1)
    assert len(train) + len(val) == 300 and 30 < len(val) < 100
    assert not {p.prompt for p in train} & {p.prompt for p in val}
    assert split_by_prompt(pairs, 0.2, seed=1)[1] == val
    fake = [(type("E", (), {"ids": [0] * (i % 7)})(),) * 2 for i in range(50)]
    b1, b2 = epoch_batches(fake, 8, 0, 1), epoch_batches(fake, 8, 0, 1)
    assert b1 == b2 and b1 != epoch_batches(fake, 8, 0, 2) and len(b1) == 6
    assert len({i for b in b1 for i in b}) == 48


def test_pair_metrics_by_hand():
    from rlhf.data.records import PairRecord

    pairs = [PairRecord("p", "short", "a much longer reply"), PairRecord("p", "x " * 60, "y"), PairRecord("p", "a", "b")]
    m = pair_metrics(torch.tensor([1.0, 0.0, 2.0]), torch.tensor([0.0, 1.0, 2.0]), pairs)
    assert m["accuracy"] == pytest.approx(0.5) and m["pairs"] == 3 and m["ties"] == 1
    assert m["mean_margin"] == pytest.approx(0.0)
    assert m["accuracy_by_length"] == {"0-20": {"pairs": 2, "accuracy": 0.75}, "20-50": {"pairs": 1, "accuracy": 0.0}}
    assert m["shorter_reply_baseline"] == pytest.approx(1.5 / 3)


# --- scoring ------------------------------------------------------------------------------------

@pytest.mark.parametrize("base", ["minilm", "tiny"])
def test_padding_invariance(base, tiny_model_dir, tmp_path):
    from rlhf.judges.base import load_scorer, score_checked
    from rlhf.models.reward_model import save_reward_model

    model, tok, spec = new_reward_model(tiny_model_dir if base == "tiny" else "minilm", max_length=64, seed=3)
    with torch.no_grad():
        model.head.weight.normal_()  # a head far from zero, so differences would show
    save_reward_model(model, tok, tmp_path / "rm")
    scorer = load_scorer(str(tmp_path / "rm"))
    alone = score_checked(scorer, ["how do I cook rice"], ["Rinse it."])
    batch = score_checked(scorer, ["a much longer prompt about many things " * 3, "how do I cook rice", "x"],
                          ["a long reply that needs plenty of padding around the short one " * 2, "Rinse it.", "y"])
    assert batch.dtype == torch.float32 and batch.shape == (3,)
    # The batch runs other kernel shapes than the single row, so float32 sums differ slightly; through a
    # head of norm ~20 that reached 1.06e-5 on an AVX-512 Xeon (2026-12-02). Attending to or pooling
    # over padding would move the score by far more than 1e-4.
    assert batch[1].item() == pytest.approx(alone.item(), abs=1e-4)
    assert load_scorer(f"rm:{tmp_path / 'rm'}").score(["how do I cook rice"], ["Rinse it."]).item() == pytest.approx(alone.item(), abs=1e-6)


def test_not_a_reward_model_folder(tiny_model_dir):
    with pytest.raises(ConfigError, match="rlhf_reward.json is missing"):
        load_reward_model(tiny_model_dir)


# --- training -----------------------------------------------------------------------------------

def test_cli_training_raises_validation_accuracy_then_eval_and_score(tiny_model_dir, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(64))
    val = write_jsonl(tmp_path / "val.jsonl", polite_pairs(16, offset=100))
    out = tmp_path / "run"
    runner = CliRunner()
    res = runner.invoke(app, ["reward", "train", "--pairs", str(train), "--val-pairs", str(val), "--base", str(tiny_model_dir),
                              "--out", str(out), "--epochs", "3", "--batch-size", "8", "--lr", "3e-3", "--max-length", "64",
                              "--eval-every", "8", "--warmup-ratio", "0", "--freeze-layers", "0"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    vals = [m["val_accuracy"] for m in read_metrics(out) if "val_accuracy" in m]
    assert vals[0] <= 0.75 and summary["best_val_accuracy"] >= 0.95 and max(vals) == summary["best_val_accuracy"]
    losses = [m["loss"] for m in read_metrics(out) if "loss" in m]
    assert sum(losses[-4:]) / 4 < losses[0]
    spec = json.loads((out / "model" / "rlhf_reward.json").read_text())
    assert spec["backbone_kind"] == "causal" and spec["prompt_format"] == "chat_template"
    # A causal backbone's reward model is a standard sequence-classification folder (no separate head file).
    assert spec["hf_class"] == "LlamaForSequenceClassification" and spec["head_bias"] is False
    assert (out / "model" / "model.safetensors").is_file() and not (out / "model" / "reward_head.safetensors").exists()

    res = runner.invoke(app, ["reward", "eval", "--model", str(out / "model"), "--pairs", str(val), "--json"])
    assert res.exit_code == 0, res.output
    result = json.loads(res.stdout.strip().splitlines()[-1])
    assert result["pairs"] == 16 and result["accuracy"] == summary["best_val_accuracy"] and result["mean_margin"] > 0
    assert sum(b["pairs"] for b in result["accuracy_by_length"].values()) == 16

    comps = write_jsonl(tmp_path / "comps.jsonl", [{"prompt_id": "p1", "prompt": "my house is too hot",
                                                     "completions": [POLITE[0], RUDE[0]]}])
    res = runner.invoke(app, ["reward", "score", "--model", str(out / "model"), "--completions", str(comps),
                              "--out", str(tmp_path / "scored.jsonl")])
    assert res.exit_code == 0, res.output
    scored = json.loads((tmp_path / "scored.jsonl").read_text())
    assert scored["scores"][0] > scored["scores"][1]


def _cfg(tiny_model_dir, tmp_path, out: Path, **kw) -> RewardTrainConfig:
    train = write_jsonl(tmp_path / "train.jsonl", polite_pairs(32))
    base = dict(pairs=str(train), out=str(out), base=str(tiny_model_dir), val_fraction=0.25, epochs=2, batch_size=8,
                lr=1e-3, max_length=48, eval_every=2, keep_checkpoints=20, seed=5, freeze_layers=0)
    base.update(kw)
    cfg = RewardTrainConfig(**base, engine=EngineConfig(device="cpu"))
    cfg.validate()
    return cfg


@pytest.mark.parametrize("lora", [False, True])
def test_exact_resume(tiny_model_dir, tmp_path, lora):
    """A run restarted from a mid-run checkpoint ends with exactly the weights of an uninterrupted run."""
    full = _cfg(tiny_model_dir, tmp_path, tmp_path / "full", lora=lora, lora_r=4, lora_alpha=8)
    summary = train_reward_model(full)
    steps = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert len(steps) >= 3 and summary["steps"] == int(steps[-1].name.split("-")[1])
    resumed = tmp_path / "resumed"
    shutil.copytree(steps[0], resumed / "checkpoints" / steps[0].name)
    shutil.copy(tmp_path / "full" / "metrics.jsonl", resumed / "metrics.jsonl")
    train_reward_model(_cfg(tiny_model_dir, tmp_path, resumed, lora=lora, lora_r=4, lora_alpha=8))
    a, b = _weights(steps[-1] / "model"), _weights(resumed / "checkpoints" / steps[-1].name / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert read_metrics(tmp_path / "full") == read_metrics(resumed)
    if lora:  # the LoRA checkpoint holds an adapter; the final model is merged and loads on its own
        assert (steps[-1] / "model" / "adapter_model.safetensors").is_file()
        assert not (tmp_path / "full" / "model" / "adapter_config.json").exists()
    model, _, _ = load_reward_model(tmp_path / "full" / "model")
    assert model.head.weight.abs().sum() > 0


def test_freeze_lower_layers_and_head_learning_rate(tiny_model_dir, tmp_path):
    from rlhf.train.reward import freeze_lower

    model, _, _ = new_reward_model("minilm", max_length=32)
    n = freeze_lower(model.backbone, embeddings=False, layers=2)
    # (the pooler is frozen from the start: mean pooling never reads it)
    frozen = {name for name, p in model.backbone.named_parameters() if not p.requires_grad and not name.startswith("pooler.")}
    assert all(name.startswith(("embeddings.", "encoder.layer.0.", "encoder.layer.1.")) for name in frozen)
    assert any(name.startswith("embeddings.") for name in frozen) and any(".layer.1." in name for name in frozen)
    assert n == sum(p.numel() for name, p in model.backbone.named_parameters()
                    if not p.requires_grad and not name.startswith("pooler."))
    assert all(p.requires_grad for name, p in model.backbone.named_parameters() if name.startswith("encoder.layer.2."))
    with pytest.raises(ConfigError, match="exceeds the backbone's 6 layers"):
        freeze_lower(new_reward_model("minilm", max_length=32)[0].backbone, embeddings=False, layers=7)

    # A causal backbone: the frozen layer ends training exactly as it started, the others move.
    out = tmp_path / "frozen"
    summary = train_reward_model(_cfg(tiny_model_dir, tmp_path, out, freeze_layers=1, head_lr=1e-2, max_steps=2))
    assert summary["frozen_weights"] > 0
    before, after = _weights(Path(tiny_model_dir)), _weights(out / "checkpoints" / "step-00000002" / "model")
    # Checkpoints are sequence-classification folders: the backbone sits under "model." as in the LM.
    assert torch.equal(before["model.safetensors/model.layers.0.mlp.up_proj.weight"],
                       after["model.safetensors/model.layers.0.mlp.up_proj.weight"])
    assert not torch.equal(before["model.safetensors/model.layers.1.mlp.up_proj.weight"],
                           after["model.safetensors/model.layers.1.mlp.up_proj.weight"])


def test_truncation_warning(tiny_model_dir, tmp_path, capsys):
    """Training says so when many pairs lose part of their prompt at --max-length, and only then."""
    from rlhf.train.reward import TruncationStats

    assert TruncationStats(sequences=100, prompts_cut=5).warning(64) is None  # 5% is not "more than 5%"
    msg = TruncationStats(sequences=100, prompts_cut=6, replies_cut=50).warning(64)
    assert "at --max-length 64" in msg and "6 of 100 sequences (6%) lost the start of their prompt" in msg
    assert "50 of 100 sequences (50%) lost the end of their reply" in msg
    assert TruncationStats().warning(64) is None

    train_reward_model(_cfg(tiny_model_dir, tmp_path, tmp_path / "short", max_length=128, max_steps=1))
    assert "lost the start" not in capsys.readouterr().err
    long = write_jsonl(tmp_path / "long.jsonl", [{**p, "prompt": "please tell me, " * 30 + p["prompt"]} for p in polite_pairs(32)])
    summary = train_reward_model(_cfg(tiny_model_dir, tmp_path, tmp_path / "long", pairs=str(long), max_steps=1))
    err = capsys.readouterr().err
    assert summary["truncation"]["prompts_cut"] == summary["truncation"]["sequences"] == 64
    assert "at --max-length 48, 64 of 64 sequences (100%) lost the start of their prompt" in err


def test_non_finite_loss_stops_with_checkpoint_intact(tiny_model_dir, tmp_path, monkeypatch):
    import rlhf.train.reward as rt

    calls = {"n": 0}
    real = rt.bradley_terry_loss

    def poisoned(*a, **kw):
        calls["n"] += 1
        loss = real(*a, **kw)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(rt, "bradley_terry_loss", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(TrainingError, match="non-finite loss.*step 3.*last good checkpoint"):
        train_reward_model(_cfg(tiny_model_dir, tmp_path, out))
    ckpts = sorted((out / "checkpoints").glob("step-*"))
    assert [c.name for c in ckpts] == ["step-00000002"]
    load_reward_model(ckpts[0] / "model")  # loads: the checkpoint is complete


def test_config_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ConfigError, match="val-fraction"):
        _cfg(tiny_model_dir, tmp_path, tmp_path / "x", val_fraction=1.5)
    with pytest.raises(ConfigError, match="fewer than --batch-size"):
        train_reward_model(_cfg(tiny_model_dir, tmp_path, tmp_path / "x", batch_size=64))
    with pytest.raises(ConfigError, match="pooling last"):
        new_reward_model(tiny_model_dir, pooling="mean")


# --- real data ----------------------------------------------------------------------------------

def test_hh_harmless_pairs_encode_with_reply_intact(hh_dir):
    pairs, skipped = read_pairs(str(hh_dir / "validation.jsonl.gz"), True)
    assert len(pairs) + len(skipped) == 250 and len(pairs) >= 240
    assert all(p.prompt.rstrip().endswith("Assistant:") for p in pairs)
    _, tok, spec = new_reward_model("minilm", max_length=128)
    enc = RewardEncoder(tok, spec)
    for p in pairs[:40]:
        e = enc.encode(p.prompt, p.chosen)
        reply = tok(p.chosen, add_special_tokens=False)["input_ids"]
        assert len(e.ids) <= 128
        if not e.reply_cut:
            assert e.ids[-len(reply) - 1:-1] == reply
    # For scale: always preferring the shorter reply gets about 56% here.
    m = pair_metrics(torch.zeros(len(pairs)), torch.zeros(len(pairs)), pairs)
    assert 0.5 < m["shorter_reply_baseline"] < 0.62
