"""The lean decode step (rlhf/rollout/lean_step.py) against the full forward, on each layer family it
takes, with LoRA on and off, and its one-time check in the decode loop."""

import pytest
import torch

from rlhf.rollout import decode
from rlhf.rollout.generate import SamplingParams
from rlhf.rollout.lean_step import lean_problem

PROMPTS = ["hi", "my house is too hot", "a much longer prompt about a hot house " * 3, "how do I cook rice"]
SAMPLED = SamplingParams(max_new_tokens=10, temperature=1.0)
GREEDY = SamplingParams(max_new_tokens=10, temperature=0.0)


def tiny(family: str, tok, kv_heads: int = 2, bias: bool = False):
    """A 2-layer decoder of ``family`` built from its transformers config (random weights). ``bias``: Llama's
    attention biases (Qwen2 always has them on q, k and v; Mistral never)."""
    import transformers

    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "qwen3": (transformers.Qwen3Config, transformers.Qwen3ForCausalLM),
    }[family]
    extra = {"llama": {"attention_bias": bias}, "mistral": {"sliding_window": None}}.get(family, {})
    config = config_class(vocab_size=len(tok), hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=kv_heads, head_dim=16, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                          tie_word_embeddings=False, **extra)
    torch.manual_seed(3)
    return model_class(config).eval()


def encode(tok, prompts):
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def sample(model, tok, params=SAMPLED, lean: bool | None = None):
    """Decode with the lean step forced on (True, after its check), off (False), or as the loop decides (None)."""
    if lean is not None:
        decode._state(model).lean = None if lean else False
    ids, mask = encode(tok, PROMPTS)
    uniforms = decode.episode_uniforms(list(range(len(PROMPTS))), params.max_new_tokens)
    out = decode.sample_response_ids(model, ids, mask, params, [-1], tok.pad_token_id, record=True, uniforms=uniforms)
    assert out is not None
    return out


@pytest.mark.parametrize("family,kv_heads,bias", [("llama", 4, False), ("llama", 2, True), ("mistral", 2, False),
                                                  ("qwen2", 1, True)])
def test_lean_step_gives_the_full_forwards_tokens_logprobs_and_hidden_states(family, kv_heads, bias, tiny_tokenizer):
    model = tiny(family, tiny_tokenizer, kv_heads, bias)
    assert lean_problem(model) is None
    full = sample(model, tiny_tokenizer, lean=False)
    lean = sample(model, tiny_tokenizer, lean=True)
    assert decode._state(model).lean is True  # it passed its check on this model
    assert torch.equal(full.tokens, lean.tokens)
    assert torch.allclose(full.logprobs, lean.logprobs, atol=1e-5)
    assert torch.allclose(full.hidden, lean.hidden, atol=1e-5)


def test_the_checking_call_returns_what_later_calls_return(tiny_tokenizer):
    """A resumed run checks on a later step than the uninterrupted one did: both must sample from the
    same numbers there, bit for bit."""
    model = tiny("llama", tiny_tokenizer)
    first = sample(model, tiny_tokenizer, lean=True)
    later = sample(model, tiny_tokenizer)
    assert torch.equal(first.tokens, later.tokens)
    assert torch.equal(first.logprobs, later.logprobs) and torch.equal(first.hidden, later.hidden)


def test_a_lora_policy_and_its_switched_off_reference_both_take_the_lean_step(tiny_tokenizer):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(tiny("llama", tiny_tokenizer), LoraConfig(r=4, target_modules=["q_proj", "v_proj", "down_proj"]))
    torch.manual_seed(4)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.eval()
    assert lean_problem(model) is None
    for adapter_on in (True, False):
        with (model.disable_adapter() if not adapter_on else torch.no_grad()):
            full = sample(model, tiny_tokenizer, GREEDY, lean=False)
            lean = sample(model, tiny_tokenizer, GREEDY, lean=True)
            assert decode._state(model).lean is True
            assert torch.equal(full.tokens, lean.tokens)
            assert torch.allclose(full.logprobs, lean.logprobs, atol=1e-5)
    with model.disable_adapter():
        off = sample(model, tiny_tokenizer, GREEDY)
    assert not torch.allclose(off.hidden, sample(model, tiny_tokenizer, GREEDY).hidden)  # the adapter matters


def test_layers_it_does_not_reproduce_keep_the_full_forward(tiny_tokenizer):
    qwen3 = tiny("qwen3", tiny_tokenizer)  # q and k normed inside attention
    assert "Qwen3DecoderLayer" in lean_problem(qwen3)
    full = sample(qwen3, tiny_tokenizer, GREEDY, lean=False)
    decoded = sample(qwen3, tiny_tokenizer, GREEDY, lean=None)
    assert decode._state(qwen3).lean is False and torch.equal(full.tokens, decoded.tokens)


def test_a_lean_step_that_disagrees_is_dropped_and_the_step_is_the_full_forwards(tiny_tokenizer, monkeypatch):
    model = tiny("llama", tiny_tokenizer)
    full = sample(model, tiny_tokenizer, lean=False)
    real = decode.lean_step

    def off_by_a_little(model, token, positions, slots, cache, slot, record):
        logits, hidden = real(model, token, positions, slots, cache, slot, record)
        for layer in cache.layers:  # and what it wrote to the cache
            layer.keys[:, :, slot] += 1.0
        return logits + 1e-2, hidden

    monkeypatch.setattr(decode, "lean_step", off_by_a_little)
    checked = sample(model, tiny_tokenizer, lean=True)
    assert decode._state(model).lean is False
    # The checking step's cache slot was put back to the full forward's keys and values.
    assert torch.equal(full.tokens, checked.tokens) and torch.equal(full.logprobs, checked.logprobs)


def test_a_lean_step_that_fails_outright_is_dropped_and_decoding_goes_on(tiny_tokenizer, monkeypatch):
    model = tiny("llama", tiny_tokenizer)
    full = sample(model, tiny_tokenizer, lean=False)

    def broken(model, token, positions, slots, cache, slot, record):
        for layer in cache.layers:  # it wrote to the cache before failing
            layer.keys[:, :, slot] += 1.0
        raise RuntimeError("a layout this step does not know")

    monkeypatch.setattr(decode, "lean_step", broken)
    decoded = sample(model, tiny_tokenizer, lean=True)
    assert decode._state(model).lean is False
    assert torch.equal(full.tokens, decoded.tokens) and torch.equal(full.logprobs, decoded.logprobs)
