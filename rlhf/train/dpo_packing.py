"""Padding-free preference batches that read each prompt once: [prompt | chosen | rejected] per pair.

A padded DPO batch computes 2B rows as long as the batch's longest prompt + reply: every prompt
twice, and padding up to the longest. Here a pair is one segment, the prompt followed by both
replies, and an attention mask shaped like a tree lets the rejected reply see the prompt but not
the chosen one; its position ids restart where the prompt ends, so each reply token computes exactly
what it computes after the prompt alone. Segments are laid end to end in rows no longer than the
longest one (first-fit decreasing, as ``rlhf.models.packing`` packs reward-model batches), and a
token sees only its own segment. The LM head runs only on the hidden states that predict a reply
token (the prompt's last state predicts the first token of both replies).

    slots:    p0 p1 p2 c0 c1 c2 r0 r1      positions 0 1 2 3 4 5 3 4
    r0 sees:  p0 p1 p2 .  .  .  r0         (c0..c2 hidden from it)

This needs a backbone that takes position ids and honours a 4D mask, and an LM head that is the
output embedding alone (no logit scaling or soft-capping after it). ``pair_packing_problem`` checks
that on real pairs against the padded forward before a run uses it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch

from rlhf.models.loading import unwrap_peft

PROMPT, CHOSEN, REJECTED = 0, 1, 2


@dataclass
class PackedPairs:
    """B pairs in W rows of C slots; T reply tokens in all (both sides)."""

    input_ids: torch.Tensor       # [W, C]
    position_ids: torch.Tensor    # [W, C] the prompt from 0, each reply continuing from the prompt's end
    attention_mask: torch.Tensor  # [W, 1, C, C] bool: query slot i may attend to key slot j
    predictor: torch.Tensor       # [T] flat slot (in [W·C]) whose hidden state predicts reply token t
    target: torch.Tensor          # [T] the reply token's id
    owner: torch.Tensor           # [T] its sequence: pair i's chosen reply is i, its rejected reply B + i
    lengths: torch.Tensor         # [2B] reply tokens per sequence, chosen replies first

    def to(self, device) -> "PackedPairs":
        return PackedPairs(*(getattr(self, f).to(device) for f in self.__dataclass_fields__))


def pack_pairs(pairs: list, pad_id: int) -> PackedPairs:
    """Pack ``pairs`` (``EncodedPair``: prompt_ids, chosen_ids, rejected_ids) into tree-masked rows."""
    sizes = [len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs]
    capacity = max(sizes)
    rows: list[list[int]] = []
    free: list[int] = []
    for i in sorted(range(len(pairs)), key=lambda i: -sizes[i]):
        r = next((r for r, f in enumerate(free) if f >= sizes[i]), None)
        if r is None:
            rows.append([]), free.append(capacity)
            r = len(rows) - 1
        rows[r].append(i)
        free[r] -= sizes[i]

    n, width = len(pairs), len(rows)
    ids = torch.full((width, capacity), pad_id, dtype=torch.long)
    pos = torch.zeros((width, capacity), dtype=torch.long)
    seg = torch.full((width, capacity), -1, dtype=torch.long)     # which pair each slot holds (-1: none)
    branch = torch.full((width, capacity), PROMPT, dtype=torch.long)
    predictor, target, owner = [], [], []
    for r, members in enumerate(rows):
        at = 0
        for i in members:
            p = pairs[i]
            lp, lc, lr = len(p.prompt_ids), len(p.chosen_ids), len(p.rejected_ids)
            ids[r, at:at + lp + lc + lr] = torch.tensor(p.prompt_ids + p.chosen_ids + p.rejected_ids)
            pos[r, at:at + lp + lc] = torch.arange(lp + lc)
            pos[r, at + lp + lc:at + lp + lc + lr] = torch.arange(lp, lp + lr)
            seg[r, at:at + lp + lc + lr] = i
            branch[r, at + lp:at + lp + lc] = CHOSEN
            branch[r, at + lp + lc:at + lp + lc + lr] = REJECTED
            base = r * capacity + at
            last_prompt = base + lp - 1
            # chosen token k is predicted by the slot before it; rejected token 0 by the prompt's last slot
            predictor += [last_prompt + k for k in range(lc)]
            predictor += [last_prompt] + [base + lp + lc + k - 1 for k in range(1, lr)]
            target += p.chosen_ids + p.rejected_ids
            owner += [i] * lc + [n + i] * lr
            at += lp + lc + lr
    causal = torch.tril(torch.ones(capacity, capacity, dtype=torch.bool))
    same = (seg[:, :, None] == seg[:, None, :]) & (seg >= 0)[:, :, None] & causal
    # a rejected-reply token never sees the chosen reply before it in the row
    same &= ~((branch[:, :, None] == REJECTED) & (branch[:, None, :] == CHOSEN))
    mask = (same | torch.eye(capacity, dtype=torch.bool))[:, None]  # unused slots see themselves (finite softmax)
    lengths = torch.tensor([len(p.chosen_ids) for p in pairs] + [len(p.rejected_ids) for p in pairs])
    return PackedPairs(ids, pos, mask, torch.tensor(predictor), torch.tensor(target), torch.tensor(owner), lengths)


def packed_pair_logprobs(model, packed: PackedPairs, average: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_c|x), log π(y_r|x) per pair ([B], [B], float32) from one backbone pass over packed rows:
    the sum (or with ``average`` the mean) of the reply tokens' log-probabilities, as
    ``rlhf.algos.sequence_logprobs`` aggregates them on the padded path."""
    lm = unwrap_peft(model)
    hidden = lm.base_model(input_ids=packed.input_ids, attention_mask=packed.attention_mask,
                           position_ids=packed.position_ids, use_cache=False).last_hidden_state
    states = hidden.reshape(-1, hidden.shape[-1])[packed.predictor]        # [T, H]
    logits = lm.get_output_embeddings()(states).float()                    # [T, V]
    token_logps = logits.gather(-1, packed.target[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    sums = torch.zeros(len(packed.lengths), dtype=token_logps.dtype, device=token_logps.device)
    sums = sums.index_add(0, packed.owner, token_logps)
    if average:
        sums = sums / packed.lengths.clamp(min=1).to(sums.dtype)
    half = len(packed.lengths) // 2
    return sums[:half], sums[half:]


@torch.no_grad()
def pair_packing_problem(model, pairs: list, pad_id: int, padded_logprobs) -> str | None:
    """Why packed pairs would not reproduce the padded forward for this model (None when they do).

    ``padded_logprobs(model, pairs)`` is the reference computation ([B], [B]). Checks the signature
    (position ids, an attention implementation that honours a 4D mask, a base model and an output
    embedding), then scores the same pairs both ways.
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
        expect = torch.cat(padded_logprobs(model, pairs))
        got = torch.cat(packed_pair_logprobs(model, pack_pairs(pairs, pad_id).to(device), False))
    finally:
        model.train(was_training)
    gap = float((expect - got).abs().max())
    if not gap <= 1e-4 * max(1.0, float(expect.abs().max())):
        return f"packed and padded log-probabilities differ by {gap:.2e} on the same pairs"
    return None
