"""Padding-free batches that read each prompt once: a prompt followed by all of its replies, as branches.

DPO scores two replies per prompt (chosen, rejected) and GRPO G replies per prompt. A padded batch
computes one row per reply, as long as the batch's longest prompt + reply: every prompt once per
reply, plus padding. Here a prompt and its replies form one segment, and an attention mask shaped
like a tree lets each reply see the prompt and its own earlier tokens but no other reply; each
reply's position ids restart where the prompt ends, so every reply token computes exactly what it
computes after the prompt alone. Segments are laid end to end in rows no longer than the longest
one (first-fit decreasing, as ``rlhf.models.packing`` packs reward-model batches), a token sees
only its own segment, and the LM head runs only on the hidden states that predict a reply token
(the prompt's last state predicts the first token of every reply).

    slots:    p0 p1 p2 a0 a1 a2 b0 b1      positions 0 1 2 3 4 5 3 4
    b0 sees:  p0 p1 p2 .  .  .  b0         (reply a is hidden from reply b)

This needs a backbone that takes position ids and honours a 4D mask, and an LM head that is the
output embedding alone (no logit scaling or soft-capping after it). ``packing_problem`` checks that
on real inputs against the padded forward before a run uses it; callers fall back to padding.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rlhf.algos import rounding_gap
from rlhf.models.loading import unwrap_peft


@dataclass
class Segment:
    """One prompt and the replies that continue it; ``seq`` numbers each reply in the caller's order."""

    prompt_ids: list[int]
    replies: list[tuple[int, list[int]]]   # (sequence index, reply token ids)


@dataclass
class PackedBranches:
    """S replies in W rows of C slots; T reply tokens in all."""

    input_ids: torch.Tensor       # [W, C]
    position_ids: torch.Tensor    # [W, C] the prompt from 0, each reply continuing from the prompt's end
    attention_mask: torch.Tensor  # [W, 1, C, C] bool: query slot i may attend to key slot j
    predictor: torch.Tensor       # [T] flat slot (in [W·C]) whose hidden state predicts reply token t
    target: torch.Tensor          # [T] the reply token's id
    owner: torch.Tensor           # [T] its reply's sequence index
    offset: torch.Tensor          # [T] its position inside the reply (0 = first reply token)
    lengths: torch.Tensor         # [S] tokens per reply

    def to(self, device) -> "PackedBranches":
        return PackedBranches(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pack_branches(segments: list[Segment], pad_id: int) -> PackedBranches:
    """Pack ``segments`` into tree-masked rows. Every reply needs at least one token, every prompt too."""
    sizes = [len(s.prompt_ids) + sum(len(r) for _, r in s.replies) for s in segments]
    capacity = max(sizes)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(segments)), key=lambda i: -sizes[i]):
        r = next((r for r, f in enumerate(free) if f >= sizes[i]), None)
        if r is None:
            rows.append([]), free.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= sizes[i]

    n_seq = sum(len(s.replies) for s in segments)
    width = len(rows)
    ids = torch.full((width, capacity), pad_id, dtype=torch.long)
    pos = torch.zeros((width, capacity), dtype=torch.long)
    seg = torch.full((width, capacity), -1, dtype=torch.long)     # which segment each slot holds (-1: none)
    branch = torch.full((width, capacity), -1, dtype=torch.long)  # which reply (-1: the prompt)
    predictor, target, owner, offset = [], [], [], []
    lengths = torch.zeros(n_seq, dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            s = segments[i]
            lp = len(s.prompt_ids)
            ids[r, at:at + lp] = torch.tensor(s.prompt_ids)
            pos[r, at:at + lp] = torch.arange(lp)
            seg[r, at:at + lp] = i
            last_prompt = r * capacity + at + lp - 1
            at += lp
            for k, (seq, reply) in enumerate(s.replies):
                n = len(reply)
                ids[r, at:at + n] = torch.tensor(reply)
                pos[r, at:at + n] = torch.arange(lp, lp + n)
                seg[r, at:at + n] = i
                branch[r, at:at + n] = k
                # token 0 is predicted by the prompt's last slot, token j by the slot of token j − 1
                predictor += [last_prompt] + list(range(r * capacity + at, r * capacity + at + n - 1))
                target += reply
                owner += [seq] * n
                offset += list(range(n))
                lengths[seq] = n
                at += n
    causal = torch.tril(torch.ones(capacity, capacity, dtype=torch.bool))
    visible = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None] & causal
    # a reply's token sees the prompt (branch −1) and its own reply, never another reply
    visible &= (branch[:, None, :] == -1) | (branch[:, :, None] == branch[:, None, :])
    mask = (visible | torch.eye(capacity, dtype=torch.bool))[:, None]  # unused slots see themselves (finite softmax)
    return PackedBranches(ids, pos, mask, torch.tensor(predictor), torch.tensor(target), torch.tensor(owner),
                          torch.tensor(offset), lengths)


def packed_logits(model, packed: PackedBranches, temperature: float = 1.0) -> torch.Tensor:
    """Temperature-scaled logits [T, V] (float32) that predicted each reply token, from one backbone
    pass over the packed rows; differentiable unless called under no_grad."""
    lm = unwrap_peft(model)
    hidden = lm.base_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                           position_ids=packed.position_ids, use_cache=False).last_hidden_state
    states = hidden.reshape(-1, hidden.shape[-1])[packed.predictor]
    logits = lm.get_output_embeddings()(states).float()
    return logits / temperature if temperature != 1.0 else logits


def token_logprobs(logits: torch.Tensor, packed: PackedBranches) -> torch.Tensor:
    """log π(y_t) [T] of each reply token from ``packed_logits``: gather − logsumexp (no full log-softmax copy)."""
    return logits.gather(-1, packed.target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def per_sequence_sums(values: torch.Tensor, packed: PackedBranches, average: bool = False) -> torch.Tensor:
    """[T] per-token values → [S] sums over each reply (or with ``average`` means), in sequence order."""
    sums = torch.zeros(len(packed.lengths), dtype=values.dtype, device=values.device).index_add(0, packed.owner, values)
    return sums / packed.lengths.clamp(min=1).to(sums.dtype) if average else sums


def to_rows(values: torch.Tensor, packed: PackedBranches, width: int) -> torch.Tensor:
    """[T] per-token values → [S, width] right-padded rows (0 after each reply), the padded layout."""
    out = torch.zeros(len(packed.lengths), width, dtype=values.dtype, device=values.device)
    return out.index_put((packed.owner, packed.offset), values)


@torch.no_grad()
def packing_problem(model, segments: list[Segment], pad_id: int, padded_logprobs, temperature: float = 1.0) -> str | None:
    """Why packed rows would not reproduce the padded forward for this model (None when they do).

    ``padded_logprobs(model)`` computes the same replies' per-token log-probabilities the padded way,
    as [S, R] rows. Checks the signature (position ids, an attention implementation that honours a
    4D mask, a base model and an output embedding), then compares the numbers on these inputs.
    """
    lm = unwrap_peft(model)
    backbone = getattr(lm, "base_model", None)
    if backbone is None or backbone is lm or lm.get_output_embeddings() is None:
        return f"{type(lm).__name__} has no separate backbone and LM head"
    if "position_ids" not in inspect.signature(backbone.forward).parameters:
        return f"{type(backbone).__name__}.forward() takes no position_ids"
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} may not honour a 4D mask"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        expect = padded_logprobs(model)
        packed = pack_branches(segments, pad_id).to(device)
        got = to_rows(token_logprobs(packed_logits(model, packed, temperature), packed), packed, expect.shape[1])
    finally:
        model.train(was_training)
    gap = rounding_gap(expect, got)
    return None if gap is None else f"packed and padded log-probabilities differ by {gap:.2e} on the same inputs"
