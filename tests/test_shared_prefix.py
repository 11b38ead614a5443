"""The shared-prefix forward (rlhf/models/shared_prefix.py): the prompts' common head computed once gives
the plain forward's log-probabilities, values, entropy and gradients; models it cannot reproduce keep
the plain forward."""

import pytest
import torch

from rlhf.models import policy as P
from rlhf.models import shared_prefix as SP
from rlhf.models.loading import format_prompt, load_causal_lm, load_tokenizer

HEAD = "You are a careful assistant. Answer in one short sentence, politely and on topic. "
PROMPTS = ["hi", "my house is too hot", "a much longer prompt about a hot house " * 2, "how do I cook rice"]


def test_shared_prefix_length_by_hand():
    pad = 0
    q = torch.tensor([[pad, pad, 5, 6, 7, 8],
                      [5, 6, 7, 9, 9, 9],
                      [pad, 5, 6, 7, 8, 1]])
    m = (torch.arange(6)[None] >= torch.tensor([2, 0, 1])[:, None]).long()
    assert SP.shared_prefix_length(q, m) == 3  # 5 6 7, whatever the left padding
    m2, q2 = m.clone(), q.clone()
    q2[1, 2] = 4
    assert SP.shared_prefix_length(q2, m2) == 2
    # at most the shortest prompt less one: its last token must predict the reply in the second forward
    assert SP.shared_prefix_length(q[:1].repeat(3, 1), m[:1].repeat(3, 1)) == 3
    assert SP.shared_prefix_length(q[:1], m[:1]) == 0  # one row: nothing to share
    q3 = q.clone()
    q3[:, :] = torch.arange(6)[None] + 10 * torch.arange(3)[:, None]
    assert SP.shared_prefix_length(q3, torch.ones_like(q3)) == 0


@pytest.fixture()
def episode(tiny_model_dir):
    model, tok = load_causal_lm(tiny_model_dir).eval(), load_tokenizer(tiny_model_dir)
    enc = tok([format_prompt(tok, HEAD + p) for p in PROMPTS], return_tensors="pt", padding=True,
              padding_side="left", add_special_tokens=False)
    torch.manual_seed(0)
    r = torch.randint(5, len(tok), (len(PROMPTS), 9))
    rm = torch.ones_like(r)
    rm[0, 4:] = 0  # right-padded replies, as rollouts give them
    rm[2, 1:] = 0
    head = P.ValueHead(model.config.hidden_size)
    torch.nn.init.normal_(head.linear.weight)
    return model, enc.input_ids, enc.attention_mask, r, rm, head


def _forward_and_grads(model, head, q, qm, r, rm, min_shared, monkeypatch):
    monkeypatch.setattr(P, "MIN_SHARED_TOKENS", min_shared)
    model.zero_grad()
    head.zero_grad()
    out = P.policy_forward(model, q, qm, r, rm, 0.7, head, entropy="loss")
    (out.logprobs.sum() + out.values.sum() + out.entropy.sum()).backward()
    grads = torch.cat([p.grad.flatten() for p in list(model.parameters()) + list(head.parameters())])
    return out, grads


def test_shared_prefix_forward_matches_the_plain_one_with_gradients(episode, monkeypatch):
    model, q, qm, r, rm, head = episode
    shared = SP.shared_prefix_length(q, qm)
    assert shared >= len(HEAD.split())  # the chat template's head and the instruction, many tokens
    plain, g_plain = _forward_and_grads(model, head, q, qm, r, rm, 10**9, monkeypatch)
    calls = []
    real = SP.shared_prefix_forward
    monkeypatch.setattr(SP, "shared_prefix_forward", lambda *a, **k: calls.append(a[3]) or real(*a, **k))
    both, g_both = _forward_and_grads(model, head, q, qm, r, rm, 1, monkeypatch)
    assert calls and set(calls) == {shared}  # the shared path ran (after its one-time check)
    for name in ("logprobs", "values", "entropy"):
        a, b = getattr(plain, name), getattr(both, name)
        assert torch.allclose(a, b, atol=1e-5), (name, float((a - b).abs().max()))
        assert torch.equal(a == 0, b == 0)  # the same masked positions
    assert torch.allclose(g_plain, g_both, atol=1e-5 * float(g_plain.abs().max())), float((g_plain - g_both).abs().max())


def test_a_model_the_shared_forward_cannot_reproduce_keeps_the_plain_one(episode, monkeypatch):
    model, q, qm, r, rm, head = episode
    monkeypatch.setattr(P, "MIN_SHARED_TOKENS", 1)
    real = SP.shared_prefix_forward

    def wrong(model, ids, mask, shared, **kw):  # a backbone whose cache does not continue a prefix
        out = real(model, ids, mask, shared, **kw)
        out.logits = out.logits + 1.0 * torch.arange(out.logits.shape[-1])
        return out

    monkeypatch.setattr(SP, "shared_prefix_forward", wrong)
    with torch.no_grad():
        out = P.policy_forward(model, q, qm, r, rm, 0.7, head)
    assert "differ" in SP._VERDICT[model]
    monkeypatch.setattr(P, "MIN_SHARED_TOKENS", 10**9)
    with torch.no_grad():
        plain = P.policy_forward(model, q, qm, r, rm, 0.7, head)
    assert torch.equal(out.logprobs, plain.logprobs) and torch.equal(out.values, plain.values)


def test_the_deciding_call_costs_one_plain_forward_and_returns_what_later_calls_do(episode, monkeypatch):
    """A model's first shared call runs the shared forward (2 model calls: the head, the rows) and a
    plain forward of its first CHECK_ROWS rows to compare with, then keeps the shared result, bit for
    bit what later calls give: a resumed run decides on a later step than the uninterrupted run did."""
    model, q, qm, r, rm, head = episode
    monkeypatch.setattr(P, "MIN_SHARED_TOKENS", 1)
    monkeypatch.setattr(SP, "CHECK_ROWS", 2)  # the plain forward of the check covers 2 of the 4 rows
    assert model not in SP._VERDICT  # a fresh model: undecided
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kwargs: calls.append(kwargs["input_ids"].shape[0]),
                                           with_kwargs=True)
    try:
        first = P.policy_forward(model, q, qm, r, rm, 0.7, head, entropy="loss")
        assert SP._VERDICT[model] == "" and calls == [1, len(PROMPTS), 2]
        first.logprobs.sum().backward()  # the kept output carries gradients
        calls.clear()
        later = P.policy_forward(model, q, qm, r, rm, 0.7, head, entropy="loss")
        assert calls == [1, len(PROMPTS)]
    finally:
        hook.remove()
    for name in ("logprobs", "values", "entropy"):
        assert torch.equal(getattr(first, name), getattr(later, name)), name
