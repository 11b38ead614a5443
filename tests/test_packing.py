"""Padding-free reward batches (rlhf/models/packing.py) compute what padded batches compute: the same
rewards and the same gradients, for an encoder (BERT: token types, learned absolute positions) and
a causal backbone (Llama: rotary positions, causal mask), with every pooling."""

import pytest
import torch

from rlhf.models.packing import pack, packed_rewards, packing_problem
from rlhf.models.reward_model import Encoded, RewardModel, RewardSpec, collate

LENGTHS = [7, 3, 12, 5, 12, 1, 9, 4]  # uneven on purpose: rows hold 1–3 sequences, with leftover slots


def items(vocab: int, with_types: bool, seed: int = 0) -> list[Encoded]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for n in LENGTHS:
        ids = torch.randint(1, vocab, (n,), generator=g).tolist()
        types = [0] * (n // 2) + [1] * (n - n // 2) if with_types else None
        out.append(Encoded(ids, types, False, False))
    return out


def bert(pooling: str) -> RewardModel:
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                        max_position_embeddings=64, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    spec = RewardSpec("encoder", pooling, 64, "sentence_pair")
    model = RewardModel(BertModel(config, add_pooling_layer=False), spec, 32)
    torch.nn.init.normal_(model.head.weight)
    return model


def llama() -> RewardModel:
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         intermediate_size=64, max_position_embeddings=64)
    model = RewardModel(LlamaModel(config), RewardSpec("causal", "last", 64, "chat_template"), 32)
    torch.nn.init.normal_(model.head.weight)
    return model


CASES = {"bert-mean": lambda: (bert("mean"), True, False), "bert-cls": lambda: (bert("cls"), True, False),
         "llama-last": lambda: (llama(), False, True)}


@pytest.mark.parametrize("case", CASES)
def test_packed_rewards_and_gradients_equal_padded(case):
    model, with_types, causal = CASES[case]()
    batch = items(50, with_types)
    packed = pack(batch, pad_id=0, causal=causal)
    assert packed.input_ids.shape[1] == max(LENGTHS)            # rows no longer than the longest sequence
    assert packed.input_ids.shape[0] < len(batch)               # and fewer rows than sequences
    assert packed.input_ids.numel() < len(batch) * max(LENGTHS)  # fewer slots than a padded batch

    padded = model(**collate(batch, 0))
    padded.square().sum().backward()
    want = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    got = packed_rewards(model, packed)
    got.square().sum().backward()
    assert torch.allclose(got, padded, atol=1e-5), (got, padded)
    for n, p in model.named_parameters():
        assert torch.allclose(p.grad, want[n], atol=1e-4), n
    assert packing_problem(model, batch, 0) is None


def test_packing_keeps_item_order_and_counts():
    batch = items(50, True)
    packed = pack(batch, pad_id=0, causal=False)
    flat = packed.input_ids.reshape(-1)
    for e, start, n in zip(batch, packed.flat_start.tolist(), packed.lengths.tolist()):
        assert flat[start:start + n].tolist() == e.ids
    # a real token sees exactly its own sequence; a leftover slot sees only itself
    mask = packed.attention_mask[:, 0]
    assert int(mask.sum()) == sum(n * n for n in LENGTHS) + (packed.input_ids.numel() - sum(LENGTHS))


def test_a_model_whose_positions_do_not_count_from_zero_is_refused():
    """RoBERTa numbers positions from pad_id + 1; packing with plain 0.. positions would change its
    outputs, and the up-front check must say so rather than train on different numbers."""
    from transformers import RobertaConfig, RobertaModel

    torch.manual_seed(0)
    config = RobertaConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64,
                           max_position_embeddings=70, pad_token_id=1, hidden_dropout_prob=0.0,
                           attention_probs_dropout_prob=0.0, type_vocab_size=1)
    model = RewardModel(RobertaModel(config, add_pooling_layer=False), RewardSpec("encoder", "mean", 64, "sentence_pair"), 32)
    torch.nn.init.normal_(model.head.weight)
    assert "differ" in packing_problem(model, items(50, False), pad_id=1)
