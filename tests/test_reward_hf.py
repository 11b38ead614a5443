"""Saved reward models load with plain transformers: AutoModelForSequenceClassification (one label)
scores as ``rlhf reward score`` does, for a causal backbone (last token) and an encoder (pooler)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from rlhf.judges import load_scorer
from rlhf.models.reward_model import (HEAD_FILE, RewardEncoder, collate, load_reward_model, new_reward_model,
                                      save_reward_model)

PROMPTS = ["my house is too hot", "how do I cook rice", "hi"]
REPLIES = ["Thank you for asking! Open the windows at night and close the curtains by day.",
           "Figure it out yourself.", "Hello!"]


@pytest.fixture(scope="module")
def tiny_bert_dir(tmp_path_factory) -> Path:
    """A 2-layer BERT (width 32) with MiniLM's real WordPiece tokenizer, random weights."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from rlhf.models.reward_model import minilm_dir

    tok = AutoTokenizer.from_pretrained(str(minilm_dir()))
    torch.manual_seed(0)
    model = BertModel(BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                 intermediate_size=64, max_position_embeddings=128))
    out = tmp_path_factory.mktemp("tiny-bert")
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    return out


def _randomise_head(model, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=g))
        if model.head.bias is not None:
            model.head.bias.fill_(0.3)


def _hf_scores(folder: Path, prompts, replies, encoder_kind: str) -> torch.Tensor:
    """Score as a user of plain transformers would: the folder's tokenizer, padding and class."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    clf = AutoModelForSequenceClassification.from_pretrained(str(folder)).eval()
    tok = AutoTokenizer.from_pretrained(str(folder))
    assert clf.config.num_labels == 1
    if encoder_kind == "encoder":
        batch = tok(prompts, replies, padding=True, return_tensors="pt")
    else:  # the chat template's prompt, the reply, and the end-of-turn token, as the folder's README-less spec says
        texts = [tok.apply_chat_template([{"role": "user", "content": p}], tokenize=False, add_generation_prompt=True)
                 + r + tok.eos_token for p, r in zip(prompts, replies)]
        batch = tok(texts, padding=True, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        return clf(**batch).logits[:, 0]


@pytest.mark.parametrize("kind", ["causal", "encoder"])
def test_sequence_classification_round_trip(kind, tiny_model_dir, tiny_bert_dir, tmp_path):
    base = tiny_model_dir if kind == "causal" else tiny_bert_dir
    model, tok, spec = new_reward_model(base, pooling="auto" if kind == "causal" else "pooler", max_length=128)
    _randomise_head(model, 1)
    save_reward_model(model, tok, tmp_path / "rm")
    saved = json.loads((tmp_path / "rm" / "rlhf_reward.json").read_text())
    expected = "LlamaForSequenceClassification" if kind == "causal" else "BertForSequenceClassification"
    assert saved["hf_class"] == expected and not (tmp_path / "rm" / HEAD_FILE).exists()

    ours = load_scorer(f"rm:{tmp_path / 'rm'}").score(PROMPTS, REPLIES)
    theirs = _hf_scores(tmp_path / "rm", PROMPTS, REPLIES, kind)
    assert ours.std() > 0  # a random head: the three replies score differently
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    # Scored one at a time (no padding) the class gives the same numbers: padding is handled.
    for i in range(len(PROMPTS)):
        alone = _hf_scores(tmp_path / "rm", PROMPTS[i:i + 1], REPLIES[i:i + 1], kind)
        assert alone.item() == pytest.approx(ours[i].item(), abs=1e-5)

    # The folder also resumes training weights exactly (what checkpoints rely on).
    from rlhf.models.reward_model import load_weights_into

    fresh, _, _ = new_reward_model(base, pooling=spec.pooling, max_length=128)
    load_weights_into(fresh, tmp_path / "rm")
    enc = RewardEncoder(tok, spec)
    batch = collate([enc.encode(p, r) for p, r in zip(PROMPTS, REPLIES)], tok.pad_token_id)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(**batch), ours, atol=1e-5, rtol=1e-5)


def test_mean_pooling_has_no_standard_class_and_keeps_the_head_file(tiny_bert_dir, tmp_path):
    model, tok, _ = new_reward_model(tiny_bert_dir, pooling="mean", max_length=128)
    _randomise_head(model, 2)
    save_reward_model(model, tok, tmp_path / "rm")
    assert json.loads((tmp_path / "rm" / "rlhf_reward.json").read_text())["hf_class"] == ""
    assert (tmp_path / "rm" / HEAD_FILE).is_file()
    loaded, _, _ = load_reward_model(tmp_path / "rm")
    torch.testing.assert_close(loaded.head.weight, model.head.weight)


def test_causal_pad_token_never_ends_a_sequence(tiny_model_dir, tmp_path):
    """The bundled-style tokenizer pads with its EOS; the saved folder must pad with something else,
    or the class would read the score one token too early."""
    model, tok, _ = new_reward_model(tiny_model_dir, max_length=128)
    assert tok.pad_token_id == tok.eos_token_id
    save_reward_model(model, tok, tmp_path / "rm")
    config = json.loads((tmp_path / "rm" / "config.json").read_text())
    from transformers import AutoTokenizer

    saved_tok = AutoTokenizer.from_pretrained(str(tmp_path / "rm"))
    assert config["pad_token_id"] != tok.eos_token_id and saved_tok.pad_token_id == config["pad_token_id"]
    assert saved_tok.padding_side == "right"


def test_pooler_pooling_packs_like_padding(tiny_bert_dir):
    """Padding-free batches give the pooler-pooled rewards of padded ones (packing reads the first
    token of every sequence; the head applies the pooler layer)."""
    from rlhf.models.packing import pack, packed_rewards, packing_problem
    from rlhf.models.reward_model import pad_id_of

    model, tok, spec = new_reward_model(tiny_bert_dir, pooling="pooler", max_length=128)
    _randomise_head(model, 3)
    enc = RewardEncoder(tok, spec)
    items = [enc.encode(p, r) for p, r in zip(PROMPTS, REPLIES)]
    assert packing_problem(model, items, pad_id_of(tok)) is None
    with torch.no_grad():
        padded = model.eval()(**collate(items, pad_id_of(tok)))
        packed = packed_rewards(model, pack(items, pad_id_of(tok), causal=False))
    torch.testing.assert_close(packed, padded, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["mean", "cls", "pooler"])
def test_every_trainable_weight_gets_a_gradient(tiny_bert_dir, pooling):
    """A layer the reward never reads must not be trainable: DDP on several processes waits for its
    gradient and stops (BERT's pooler under mean pooling did, in reward training on 2 processes)."""
    from rlhf.models.reward_model import new_reward_model

    model, tok, _ = new_reward_model(tiny_bert_dir, pooling=pooling, max_length=64)
    with torch.no_grad():
        model.head.weight.fill_(0.1)
    enc = tok(["how do I cook rice", "open the windows"], return_tensors="pt", padding=True)
    model(enc["input_ids"], enc["attention_mask"]).sum().backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert missing == []
    assert any(p.requires_grad for n, p in model.named_parameters() if "pooler" in n) == (pooling == "pooler")
