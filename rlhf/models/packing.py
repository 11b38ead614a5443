"""Padding-free batches for reward models: several sequences share one row, and a block-diagonal
attention mask keeps each one to itself.

A right-padded batch computes every row to the batch's longest sequence: on hh-harmless at 128
tokens, 318k positions an epoch for 283k real tokens with length-sorted batches, 401k with random
ones. Packed rows no longer than the longest sequence cut the sorted case to 298k slots (sequences
of similar length rarely share a row; measured 3% faster, benchmarks/RESULTS.md) and help more the
more a batch's lengths vary. Packing lays the sequences end to end in
rows no longer than the longest one (first-fit decreasing), restarts position ids at every
sequence, and gives the backbone a 4D boolean mask in which a token sees only tokens of its own
sequence (and only earlier ones for a causal backbone). Every real token then computes exactly
what it computes in a padded batch; the few leftover slots at a row's end attend to themselves
only (a fully masked row would turn softmax into NaN) and are never pooled.

Rows are never longer than the padded batch's rows, so the attention mask and scores are no
larger than they would be with padding either.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rlhf.algos import rounding_gap
from rlhf.models.loading import unwrap_peft
from rlhf.models.reward_model import Encoded, RewardModel, collate


@dataclass
class PackedBatch:
    """N sequences in R rows of C slots. Model inputs are [R, C]; the index tensors are [N]."""

    input_ids: torch.Tensor        # [R, C] token ids (pad id in unused slots)
    position_ids: torch.Tensor     # [R, C] restarting at 0 for every sequence
    attention_mask: torch.Tensor   # [R, 1, C, C] bool: query slot i may attend to key slot j
    token_type_ids: torch.Tensor | None  # [R, C], for backbones with token types
    flat_start: torch.Tensor       # [N] index of each sequence's first token in the flattened [R * C]
    lengths: torch.Tensor          # [N] tokens per sequence

    def to(self, device) -> "PackedBatch":
        move = (lambda t: None if t is None else t.to(device))
        return PackedBatch(*(move(getattr(self, f)) for f in self.__dataclass_fields__))


def pack(items: list[Encoded], pad_id: int, causal: bool) -> PackedBatch:
    """Pack ``items`` (in any order; the index tensors keep their order) into rows as long as the
    longest item, first-fit decreasing."""
    capacity = max(len(e.ids) for e in items)
    rows: list[list[int]] = []    # item indices per row
    free: list[int] = []          # free slots per row
    for i in sorted(range(len(items)), key=lambda i: -len(items[i].ids)):
        n = len(items[i].ids)
        r = next((r for r, f in enumerate(free) if f >= n), None)
        if r is None:
            rows.append([]), free.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= n

    n_rows = len(rows)
    ids = torch.full((n_rows, capacity), pad_id, dtype=torch.long)
    pos = torch.zeros((n_rows, capacity), dtype=torch.long)
    seg = torch.full((n_rows, capacity), -1, dtype=torch.long)  # which item each slot holds (-1: none)
    types = torch.zeros((n_rows, capacity), dtype=torch.long) if items[0].types is not None else None
    flat_start = torch.empty(len(items), dtype=torch.long)
    lengths = torch.empty(len(items), dtype=torch.long)
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            e, n = items[i], len(items[i].ids)
            ids[r, at:at + n] = torch.tensor(e.ids)
            pos[r, at:at + n] = torch.arange(n)
            seg[r, at:at + n] = i
            if types is not None:
                types[r, at:at + n] = torch.tensor(e.types)
            flat_start[i], lengths[i] = r * capacity + at, n
            at += n
    same = seg[:, :, None] == seg[:, None, :]
    same &= (seg >= 0)[:, :, None]
    eye = torch.eye(capacity, dtype=torch.bool)
    if causal:
        same &= torch.tril(torch.ones(capacity, capacity, dtype=torch.bool))
    mask = (same | eye)[:, None]  # unused slots see themselves: finite, never pooled
    return PackedBatch(ids, pos, mask, types, flat_start, lengths)


def pool_packed(hidden: torch.Tensor, packed: PackedBatch, pooling: str) -> torch.Tensor:
    """hidden [R, C, H] → [N, H]: the same ``last`` / ``mean`` / ``cls`` pooling as ``pool_hidden``,
    per packed sequence."""
    flat = hidden.reshape(-1, hidden.shape[-1])
    if pooling in ("cls", "pooler"):  # pooler: RewardModel.reward_from applies the pooler layer
        return flat[packed.flat_start]
    if pooling == "last":
        return flat[packed.flat_start + packed.lengths - 1]
    if pooling == "mean":
        # Sum each sequence's slots with one index_add (differentiable), then divide by its length.
        offsets = torch.arange(int(packed.lengths.max()), device=flat.device)
        valid = offsets[None, :] < packed.lengths[:, None]                     # [N, Lmax]
        slots = (packed.flat_start[:, None] + offsets[None, :])[valid]        # [T] real token slots
        owner = torch.arange(len(packed.lengths), device=flat.device)[:, None].expand_as(valid)[valid]
        sums = torch.zeros(len(packed.lengths), flat.shape[-1], dtype=flat.dtype, device=flat.device)
        sums = sums.index_add(0, owner, flat[slots])
        return sums / packed.lengths[:, None].to(flat.dtype)
    raise ValueError(f"unknown pooling {pooling!r}")


def packed_rewards(model: RewardModel, packed: PackedBatch) -> torch.Tensor:
    """Rewards [N] (float32, in item order) of a packed batch: ``RewardModel.forward`` without padding."""
    kwargs = {"input_ids": packed.input_ids, "attention_mask": packed.attention_mask, "position_ids": packed.position_ids}
    if packed.token_type_ids is not None:
        kwargs["token_type_ids"] = packed.token_type_ids
    hidden = model.backbone(**kwargs).last_hidden_state
    return model.reward_from(pool_packed(hidden, packed, model.spec.pooling))


@torch.no_grad()
def packing_problem(model: RewardModel, items: list[Encoded], pad_id: int) -> str | None:
    """Why packed batches would not reproduce padded ones for this model (None when they do).

    Beyond the signature (position ids, an attention implementation that honours a 4D mask), the
    check scores a few real inputs both ways: an architecture whose positions do not simply count
    from 0 (RoBERTa starts after its pad id) or that rebuilds masks its own way shows up here
    instead of silently training on different numbers.
    """
    base = unwrap_peft(model.backbone)
    if "position_ids" not in inspect.signature(base.forward).parameters:
        return f"{type(base).__name__}.forward() takes no position_ids"
    impl = getattr(base.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention implementation {impl!r} may not honour a 4D mask"
    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        padded = model(**{k: v.to(device) for k, v in collate(items, pad_id).items()})
        packed = packed_rewards(model, pack(items, pad_id, model.spec.backbone_kind == "causal").to(device))
    finally:
        model.train(was_training)
    gap = rounding_gap(padded, packed)
    return None if gap is None else f"packed and padded rewards differ by {gap:.2e} on the same inputs"


class RewardForward(torch.nn.Module):
    """A reward model's training forward over a batch of encoded sequences, packed or padded, as one
    module: what several processes wrap (DDP averages the gradients of whatever its forward ran)."""

    def __init__(self, model: RewardModel, pad_id: int, packing: bool):
        super().__init__()
        self.model, self.pad_id, self.packing = model, pad_id, packing

    def forward(self, items: list[Encoded]) -> torch.Tensor:
        """Rewards [N] (float32, in item order)."""
        device = next(self.model.parameters()).device
        if self.packing:
            return packed_rewards(self.model, pack(items, self.pad_id, self.model.spec.backbone_kind == "causal").to(device))
        return self.model(**{k: v.to(device) for k, v in collate(items, self.pad_id).items()})
