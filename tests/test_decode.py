"""The fast decode loop (rlhf/rollout/decode.py) against transformers' generate, and its sampling rules."""

import pytest
import torch

from rlhf.models.loading import load_causal_lm, load_tokenizer
from rlhf.rollout import decode
from rlhf.rollout.backends import FastDecode, HFGenerate
from rlhf.rollout.generate import SamplingParams, _generate_with_hf, decode_responses, sample_tokens

PROMPTS = ["hi", "my house is too hot", "a much longer prompt about a hot house " * 3, "how do I cook rice"]
GREEDY = SamplingParams(max_new_tokens=12, temperature=0.0)


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)


@pytest.fixture(scope="module")
def gpt2(tiny_tokenizer):
    """A 2-layer GPT-2 (learned absolute positions, fused QKV, biases): a second architecture family."""
    from transformers import GPT2Config, GPT2LMHeadModel

    tok = tiny_tokenizer
    config = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=2, n_positions=128,
                        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(1)
    return GPT2LMHeadModel(config).eval(), tok


@pytest.fixture(scope="module")
def lora_llama(tiny_model_dir):
    """The tiny Llama behind a peft LoRA wrapper (PPO's --lora policy), with a non-zero adapter so the
    wrapper's output differs from the base model's."""
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    torch.manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    return model.eval(), load_tokenizer(tiny_model_dir)


def encode(tok, prompts):
    from rlhf.models.loading import format_prompt

    enc = tok([format_prompt(tok, p) for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False, padding_side="left")
    return enc["input_ids"], enc["attention_mask"]


def fast(model, tok, prompts, params, eos=None, **settings):
    ids, mask = encode(tok, prompts)
    eos = tok.eos_token_id if eos is None else eos
    out = decode.sample_response_ids(model, ids, mask, params, eos, tok.pad_token_id,
                                     decode.DecodeSettings(**settings))
    assert out is not None, "fast path refused a model it should handle"
    return out.tokens


def reference(model, tok, prompts, params, eos=None):
    ids, mask = encode(tok, prompts)
    eos = tok.eos_token_id if eos is None else eos
    return _generate_with_hf(model, ids, mask, params, eos, tok.pad_token_id)


def same_tokens(a, b):
    """Equal up to trailing all-pad columns (either side may stop early once every row has ended)."""
    r = min(a.shape[1], b.shape[1])
    return torch.equal(a[:, :r], b[:, :r]) and not a[:, r:].any() and not b[:, r:].any()


@pytest.mark.parametrize("family", ["llama", "gpt2", "lora_llama"])
def test_greedy_matches_hf_generate(family, request):
    model, tok = request.getfixturevalue(family)
    assert decode.unsupported_reason(model) is None
    ours, theirs = fast(model, tok, PROMPTS, GREEDY), reference(model, tok, PROMPTS, GREEDY)
    assert ours.shape == (len(PROMPTS), 12)
    assert same_tokens(ours, theirs)
    if family == "lora_llama":  # the adapter is live in the fast path: switched off, the output changes
        with model.disable_adapter():
            assert not same_tokens(fast(model, tok, PROMPTS, GREEDY), ours)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_stops_at_eos_like_generate_and_keeps_the_mask_contract(family, request):
    model, tok = request.getfixturevalue(family)
    free = fast(model, tok, PROMPTS, GREEDY)
    # Random tiny models rarely emit the real EOS, so declare a token greedy decoding does produce
    # to be EOS: the first position k ≥ 1 of row 1 holding a token not seen earlier in that row.
    row = free[1].tolist()
    k = next((i for i in range(1, len(row)) if row[i] not in row[:i]), 0)
    eos = row[k]
    ours = fast(model, tok, PROMPTS, GREEDY, eos=eos)
    assert same_tokens(ours, reference(model, tok, PROMPTS, GREEDY, eos=eos))
    assert ours[1, :k + 1].tolist() == row[:k + 1] and (ours[1, k + 1:] == tok.pad_token_id).all()

    tok_eos = tok.eos_token_id
    try:  # the full sample_tokens contract with this EOS
        tok.eos_token_id = eos
        batch = sample_tokens(model, tok, PROMPTS, GREEDY)
    finally:
        tok.eos_token_id = tok_eos
    assert batch.ended_with_eos[1] and batch.response_mask[1].tolist() == [1] * (k + 1) + [0] * (batch.response_ids.shape[1] - k - 1)
    assert (batch.response_ids[1, k + 1:] == tok.pad_token_id).all()
    for row in range(len(PROMPTS)):
        hits = (batch.response_ids[row] == eos).nonzero()
        expected_len = int(hits[0]) + 1 if len(hits) else batch.response_ids.shape[1]
        assert int(batch.response_mask[row].sum()) == expected_len
        assert bool(batch.ended_with_eos[row]) == bool(len(hits))


def test_stops_early_when_every_row_has_ended(llama):
    model, tok = llama
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    eos = int(fast(model, tok, ["hi"], params)[0, 0])  # the very first token ends the reply
    out = fast(model, tok, ["hi"], params, eos=eos, check_every=4)
    assert out.shape[1] == 4 and int(out[0, 0]) == eos and (out[0, 1:] == tok.pad_token_id).all()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_left_padding_does_not_change_greedy_output(family, request):
    model, tok = request.getfixturevalue(family)
    alone = fast(model, tok, ["hi"], GREEDY)
    batched = fast(model, tok, ["hi", "a much longer prompt about a hot house " * 3], GREEDY)
    assert torch.equal(alone[0], batched[0])


def test_seeded_sampling_is_reproducible_and_seeds_differ(llama):
    model, tok = llama
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.95, top_k=50)
    runs = []
    for seed in (7, 7, 8):
        torch.manual_seed(seed)
        runs.append(fast(model, tok, PROMPTS, params))
    assert torch.equal(runs[0], runs[1])
    assert not torch.equal(runs[0], runs[2])


def test_top_k_one_and_tiny_top_p_are_greedy(llama):
    model, tok = llama
    greedy = fast(model, tok, PROMPTS, GREEDY)
    torch.manual_seed(0)
    assert torch.equal(fast(model, tok, PROMPTS, SamplingParams(12, temperature=1.0, top_k=1)), greedy)
    torch.manual_seed(0)
    assert torch.equal(fast(model, tok, PROMPTS, SamplingParams(12, temperature=0.7, top_p=1e-6)), greedy)


@pytest.mark.parametrize("scale", [3.0, 0.05])  # peaked rows, and flat rows whose nucleus needs the full sort
def test_candidates_keep_exactly_what_transformers_warpers_keep(scale):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(8, 300) * scale
    for temperature, top_k, top_p in [(1.0, 5, 1.0), (0.7, 0, 0.9), (1.3, 40, 0.5), (1.0, 0, 0.3), (1.0, 100, 0.95)]:
        expected = TemperatureLogitsWarper(temperature)(None, logits.clone())
        if top_k:
            expected = TopKLogitsWarper(top_k)(None, expected)
        if top_p < 1:
            expected = TopPLogitsWarper(top_p)(None, expected)
        values, ids = decode.candidates(logits, temperature, top_k, top_p)
        for row in range(logits.shape[0]):
            ours = set(ids[row][torch.isfinite(values[row])].tolist())
            assert ours == set(torch.isfinite(expected[row]).nonzero().flatten().tolist()), (temperature, top_k, top_p)
            kept = torch.isfinite(values[row])
            torch.testing.assert_close(values[row][kept], expected[row][ids[row][kept]])


def test_sampling_draws_only_allowed_tokens_with_the_right_frequencies():
    torch.manual_seed(0)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).expand(20000, 4)
    counts = torch.bincount(decode._pick(logits, 1.0, 2, 1.0), minlength=4).float() / 20000
    assert counts[2:].sum() == 0  # top_k=2 keeps tokens 0 and 1 only
    torch.testing.assert_close(counts[:2], torch.tensor([0.625, 0.375]), atol=0.015, rtol=0)
    counts = torch.bincount(decode._pick(logits, 1.0, 0, 0.7), minlength=4).float() / 20000
    assert counts[2:].sum() == 0  # mass above token 2 is 0.8 ≥ 0.7: removed
    counts = torch.bincount(decode._pick(logits, 0.5, 0, 1.0), minlength=4).float() / 20000
    sharp = torch.tensor([0.5, 0.3, 0.15, 0.05]) ** 2
    torch.testing.assert_close(counts, sharp / sharp.sum(), atol=0.015, rtol=0)


def test_fallback_to_generate_gives_the_same_batch(llama):
    model, tok = llama
    ours = sample_tokens(model, tok, PROMPTS, GREEDY, backend=FastDecode())
    theirs = sample_tokens(model, tok, PROMPTS, GREEDY, backend=HFGenerate())  # --rollout hf
    assert decode_responses(tok, ours) == decode_responses(tok, theirs)
    assert ours.texts == theirs.texts == decode_responses(tok, ours)
    assert torch.equal(ours.ended_with_eos, theirs.ended_with_eos)


def test_unsupported_models_are_refused_not_mangled(tiny_tokenizer):
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=len(tiny_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, sliding_window=4)
    model = MistralForCausalLM(config).eval()
    assert "sliding" in decode.unsupported_reason(model)
    batch = sample_tokens(model, tiny_tokenizer, ["hi"], SamplingParams(max_new_tokens=6, temperature=0.0))
    assert batch.response_ids.shape == (1, 6)  # served by model.generate


def test_rollout_tensors_work_with_autograd_and_leave_the_model_mode_alone(llama):
    model, tok = llama
    model.train()
    batch = sample_tokens(model, tok, PROMPTS[:2], SamplingParams(max_new_tokens=6))
    assert model.training
    model.eval()
    assert not batch.response_ids.is_inference()
    ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    model(input_ids=ids).logits.sum().backward()  # would raise on inference tensors
    model.zero_grad()


def test_repeated_calls_reuse_the_cache_and_stay_exact(llama):
    model, tok = llama
    first = fast(model, tok, PROMPTS, GREEDY)
    fast(model, tok, PROMPTS[:2], GREEDY)
    assert torch.equal(fast(model, tok, PROMPTS, GREEDY), first)  # a reused cache is fully reset



def test_decode_threads_follow_model_size_unless_set(llama, monkeypatch):
    """--rollout-threads 0: one thread for a model under SPLIT_MIN_PARAMETERS, torch's count (--threads)
    at or above it; a count given explicitly always wins. Seen from inside the model's forward."""
    model, tok = llama
    seen = []
    hook = model.register_forward_pre_hook(lambda *_: seen.append(torch.get_num_threads()))
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        params = SamplingParams(max_new_tokens=2, temperature=0.0)
        fast(model, tok, PROMPTS[:1], params, threads=0)  # the tiny model: far under the threshold
        assert set(seen) == {1} and torch.get_num_threads() == 2  # and the count is restored afterwards
        seen.clear()
        monkeypatch.setattr(decode, "SPLIT_MIN_PARAMETERS", 1)  # now it counts as large
        fast(model, tok, PROMPTS[:1], params, threads=0)
        assert set(seen) == {2}
        seen.clear()
        fast(model, tok, PROMPTS[:1], params, threads=1)
        assert set(seen) == {1}
    finally:
        hook.remove()
        torch.set_num_threads(before)


def test_a_shared_prompt_head_is_prefilled_once_with_the_same_result(llama, monkeypatch):
    """Prompts that start alike (a system prompt): the head runs as a batch of one, after a one-time
    check against the plain prefill, and greedy replies, recorded logprobs and hidden states match;
    the checking call returns exactly what later calls return."""
    from rlhf.models.shared_prefix import shared_prefix_length

    model, tok = llama
    prompts = ["You are a careful assistant. Answer in one short sentence, politely and on topic. " + p for p in PROMPTS]
    ids, mask = encode(tok, prompts)
    assert shared_prefix_length(ids, mask) >= decode.MIN_SHARED_TOKENS
    state = decode._state(model)
    monkeypatch.setattr(state, "shared_prefix", None)
    heads = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: heads.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        first = decode.sample_response_ids(model, ids, mask, GREEDY, tok.eos_token_id, tok.pad_token_id, record=True)
        assert state.shared_prefix is True  # checked on this call
        heads.clear()
        shared = decode.sample_response_ids(model, ids, mask, GREEDY, tok.eos_token_id, tok.pad_token_id, record=True)
        assert heads[0][0] == 1 and heads[1][0] == len(prompts)  # the head alone, then the rest of every row
    finally:
        hook.remove()
    monkeypatch.setattr(state, "shared_prefix", False)
    plain = decode.sample_response_ids(model, ids, mask, GREEDY, tok.eos_token_id, tok.pad_token_id, record=True)
    assert torch.equal(first.tokens, plain.tokens) and torch.equal(shared.tokens, plain.tokens)
    # The checking call keeps the shared numbers, bit for bit: a resumed run checks on a later step.
    assert torch.equal(first.logprobs, shared.logprobs) and torch.equal(first.hidden, shared.hidden)
    assert torch.allclose(shared.logprobs, plain.logprobs, atol=1e-5)
    assert torch.allclose(shared.hidden, plain.hidden, atol=1e-5)
    assert torch.equal(shared.tokens, reference(model, tok, prompts, GREEDY))  # and generate agrees

@pytest.mark.slow
def test_compiled_step_matches_eager_and_follows_weight_updates(llama):
    model, tok = llama
    compiled = fast(model, tok, PROMPTS, GREEDY, compile=True)
    assert not decode._state(model).compile_failed
    assert same_tokens(compiled, fast(model, tok, PROMPTS, GREEDY))
    with torch.no_grad():  # an optimiser step changes weights in place; the compiled step must see it
        saved = model.lm_head.weight.clone() if not model.config.tie_word_embeddings else None
        emb = model.get_input_embeddings().weight
        backup = emb.clone()
        emb.mul_(-1.0)
    try:
        assert same_tokens(fast(model, tok, PROMPTS, GREEDY, compile=True), fast(model, tok, PROMPTS, GREEDY))
    finally:
        with torch.no_grad():
            emb.copy_(backup)
            if saved is not None:
                model.lm_head.weight.copy_(saved)
