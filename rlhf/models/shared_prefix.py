"""A forward that computes the tokens every prompt of a batch starts with once, not once per row.

Chat templates put the same tokens in front of every prompt: SmolLM2's adds a default system prompt
("You are a helpful AI assistant named SmolLM, …") and the user turn's header: 24 of the ~35
tokens of the demo's prompts. A training forward over prompt + reply computes them for every row, and
the backward goes through them again. Here the batch's common prefix runs once as a batch of one;
its keys and values are repeated for every row as the KV cache of a second forward over the rest
of each prompt and the reply. The rows' logits and hidden states are those of the full forward
(the prefix's keys and values are identical in every row: a causal model's state at a position
depends only on the tokens up to it), and gradients reach the prefix through the cache, summed
over the rows, as they would be summed over its copies.

    rows (left-padded):   _ _ P P P a b | y y      P = the shared prefix
    prefix forward:       P P P                     positions 0..S-1, batch of one → KV cache
    second forward:       _ _ _ a b y y (+ cache)   pads where the prefix was; positions S..

Used by ``rlhf.models.policy.policy_forward`` when the prefix is long enough to pay for the extra
forward call (``MIN_SHARED_TOKENS``), through ``forward_sharing_prefix``: a model must give the same
log-probabilities as the plain forward on its first real inputs, else the plain forward is kept for it.
"""

from __future__ import annotations

import inspect
import logging
import weakref

import torch

from rlhf.algos import rounding_gap
from rlhf.models.loading import unwrap_peft

log = logging.getLogger(__name__)

# Below this many shared tokens the second forward call costs more than it saves (on CPU a call's
# fixed cost is worth a few dozen positions of a small model; see CPU_CHUNK_OVERHEAD_POSITIONS).
MIN_SHARED_TOKENS = 8

_VERDICT: "weakref.WeakKeyDictionary[torch.nn.Module, str]" = weakref.WeakKeyDictionary()  # "" = usable


def shared_prefix_length(query_ids: torch.Tensor, query_mask: torch.Tensor) -> int:
    """How many leading real tokens every row's prompt shares (left padding skipped), at most the
    shortest prompt's length less one, so each row keeps its last prompt token (it predicts the first
    reply token) in the second forward."""
    lengths = query_mask.sum(dim=1)
    shortest = int(lengths.min()) if len(lengths) else 0
    if len(lengths) < 2 or shortest < 2:
        return 0
    start = query_mask.shape[1] - lengths  # left padding: row r's tokens begin here
    cols = start[:, None] + torch.arange(shortest - 1, device=query_ids.device)
    heads = query_ids.gather(1, cols)  # [B, shortest - 1] each row's first real tokens
    differs = (heads != heads[:1]).any(dim=0)
    return int(differs.nonzero()[0]) if bool(differs.any()) else shortest - 1


def cache_argument(model) -> str | None:
    """The name forward() takes the KV cache under ("cache" from transformers 5.24, which still accepts
    the old name with a deprecation warning on every call; else "past_key_values"), or None."""
    params = inspect.signature(unwrap_peft(model).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


def head_cache(model, head_ids: torch.Tensor, **kwargs):
    """The KV cache (a transformers DynamicCache) of ``head_ids`` [1, S] run alone from position 0."""
    out = model(input_ids=head_ids, attention_mask=torch.ones_like(head_ids),
                position_ids=torch.arange(head_ids.shape[1], device=head_ids.device)[None], use_cache=True, **kwargs)
    return getattr(out, "cache", None) or getattr(out, "past_key_values", None)


def rest_of_rows(mask: torch.Tensor, start: torch.Tensor, shared: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``mask`` [B, L] with each row's first ``shared`` real tokens (row r's begin at ``start[r]``) turned
    into padding, and the position ids of what is left, continuing from ``shared``: [B, L] each."""
    cols = torch.arange(mask.shape[1], device=mask.device)[None]
    rest = mask * (cols >= (start + shared)[:, None]).to(mask.dtype)
    return rest, (shared + rest.cumsum(dim=1) - 1).clamp(min=shared)


def shared_prefix_forward(model, ids: torch.Tensor, mask: torch.Tensor, shared: int, **kwargs):
    """``model``'s output over ``ids`` [B, L] (``mask`` [B, L]: left padding, then real tokens, then
    possibly right padding, as prompt + reply rows are) with the first ``shared``
    real tokens of every row computed once. Takes the keyword arguments of a plain forward
    (``logits_to_keep``, ``output_hidden_states``, ...); only positions after the prefix are returned,
    so callers must read the tail (as policy_forward does: the reply and the last prompt token)."""
    start = mask.argmax(dim=1)  # each row's first real token (replies may be right-padded after it)
    cache = head_cache(model, ids[:1, int(start[0]):int(start[0]) + shared], logits_to_keep=1)
    cache.batch_repeat_interleave(ids.shape[0])  # the prefix's keys and values for every row
    # The prefix's slots become padding in the rows: what is left is each row's rest, still left-padded.
    rest, positions = rest_of_rows(mask, start, shared)
    keep = rest.any(dim=0).nonzero()
    first = int(keep[0]) if keep.numel() else mask.shape[1] - 1
    full_mask = torch.cat([torch.ones(ids.shape[0], shared, dtype=mask.dtype, device=ids.device), rest[:, first:]], dim=1)
    return model(input_ids=ids[:, first:], attention_mask=full_mask, position_ids=positions[:, first:], use_cache=True,
                 **{cache_argument(model): cache}, **kwargs)


def _structural_problem(model) -> str | None:
    """Why ``model``'s forward cannot take a prefix's cache at all (None when it can)."""
    lm = unwrap_peft(model)
    if cache_argument(model) is None or "position_ids" not in inspect.signature(lm.forward).parameters:
        return f"{type(lm).__name__}.forward() takes no KV cache or position ids"
    if getattr(lm.config, "is_encoder_decoder", False) or not getattr(lm, "_supports_default_dynamic_cache", lambda: True)():
        return f"{type(lm).__name__} keeps a non-standard cache"
    return None


# Rows the deciding call's plain forward covers: enough to see a model that cannot continue a prefix
# (every row is affected alike), few enough that the check costs a fraction of a forward (an
# evaluation's 32-row batch of 86-token sequences takes SmolLM2 ~12 s to run plainly on 2 cores).
CHECK_ROWS = 4


def forward_sharing_prefix(model, ids: torch.Tensor, mask: torch.Tensor, shared: int, plain, score, **kwargs):
    """``model``'s output over ``ids`` with the first ``shared`` real tokens computed once
    (:func:`shared_prefix_forward`), where this model reproduces the plain forward; else ``plain()``.

    Decided once per model, on its first call: the shared output's first ``CHECK_ROWS`` rows are
    scored (``score(logits, rows)`` → those rows' [b, R] log-probabilities from their logits) against
    a no-grad ``plain(rows)`` (the plain forward over those rows alone) and kept when they agree, so
    the deciding call costs a plain forward of a few rows and returns what later calls would (a run
    resumed from a checkpoint decides on a later step than the uninterrupted run did)."""
    verdict = _VERDICT.get(model)
    if verdict == "":
        return shared_prefix_forward(model, ids, mask, shared, **kwargs)
    if verdict is not None:
        return plain()
    problem, out = _structural_problem(model), None
    if problem is None:
        try:
            out = shared_prefix_forward(model, ids, mask, shared, **kwargs)
        except Exception as err:  # noqa: BLE001 - any failure means "use the plain forward"
            problem = f"the shared-prefix forward failed ({type(err).__name__}: {err})"
    if problem is None:
        rows = slice(0, CHECK_ROWS)
        with torch.no_grad():
            expect, got = score(plain(rows).logits, rows), score(out.logits[rows], rows)
        gap = rounding_gap(expect, got)
        if gap is not None:
            problem = f"shared-prefix and plain log-probabilities differ by {gap:.2e} on the same inputs"
    _VERDICT[model] = problem or ""
    if problem:
        log.info("shared-prefix forward off for %s: %s", type(unwrap_peft(model)).__name__, problem)
        return plain()
    return out
