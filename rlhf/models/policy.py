"""The PPO policy's forward pass: per-token log-probabilities of sampled replies, values, entropy.

One forward of the causal LM over prompt + reply gives all three: the logits that predicted each
reply token (divided by the sampling temperature, so the distribution scored is the one sampled
from), their entropy, and the final hidden state at the same positions, which a linear value head
turns into V_t.

Everything here takes and returns full-width episode tensors ([B, P] prompts, [B, R] replies):
padding that every row of a call shares is trimmed inside (a chunk of short replies does not pay
for the batch's longest one) and the outputs are padded back, so callers never see two widths.
Only the last R + 1 positions reach the LM head (``logits_to_keep``): prompts are left-padded and
replies right-padded, so the reply region is the tail of the sequence, and the prompt's logits —
most of a long prompt's vocabulary-sized rows — are never computed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from rlhf.algos import entropy_from_logits, token_logprobs
from rlhf.models.loading import unwrap_peft
from rlhf.models.shared_prefix import MIN_SHARED_TOKENS, forward_sharing_prefix, shared_prefix_length


@dataclass
class PolicyOutput:
    logprobs: torch.Tensor               # [B, R] log π(y_t | x, y_<t); 0 where response_mask is 0
    values: torch.Tensor | None          # [B, R] V_t from the value head, or None
    entropy: torch.Tensor | None         # [B, R] entropy of the temperature-scaled distribution, or None


class ValueHead(nn.Module):
    """Linear map from the policy's final hidden state to a scalar value, zero-initialised so the
    first value estimates are 0 and the first advantages are the returns themselves."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.linear = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, R, H] → values [B, R] (float32)."""
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


def _accepts_logits_to_keep(model) -> bool:
    return "logits_to_keep" in inspect.signature(unwrap_peft(model).forward).parameters


def _trim(query_ids, query_mask, response_ids, response_mask):
    """Drop prompt columns that are padding in every row (left) and reply columns past the longest
    reply (right). Positions come from the mask, so the result scores exactly the same tokens."""
    real_q = query_mask.any(dim=0).nonzero()
    start = int(real_q[0]) if real_q.numel() else query_ids.shape[1] - 1
    width = max(1, int(response_mask.sum(dim=1).max()))
    return query_ids[:, start:], query_mask[:, start:], response_ids[:, :width], response_mask[:, :width]


def _pad_to(x: torch.Tensor | None, width: int) -> torch.Tensor | None:
    if x is None or x.shape[1] == width:
        return x
    return nn.functional.pad(x, (0, width - x.shape[1]))


def policy_forward(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, temperature: float = 1.0, value_head: ValueHead | None = None,
                   entropy: str | None = None) -> PolicyOutput:
    """Log-probabilities (and values, and entropy) of ``response_ids`` given left-padded ``query_ids``.

    query_ids, query_mask: [B, P]; response_ids, response_mask: [B, R]; every output [B, R], 0 where
    response_mask is 0. Differentiable unless called under ``torch.no_grad``. ``entropy``: None (not
    computed), "stats" (computed without gradients, for logging) or "loss" (with gradients).
    """
    width = response_ids.shape[1]
    query_ids, query_mask, response_ids, response_mask = _trim(query_ids, query_mask, response_ids, response_mask)
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    r = response_ids.shape[1]
    extra = dict(output_hidden_states=value_head is not None)
    if _accepts_logits_to_keep(model):
        extra["logits_to_keep"] = r + 1

    def plain(rows: slice = slice(None)):
        position_ids = (mask[rows].cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
        return model(input_ids=ids[rows], attention_mask=mask[rows], position_ids=position_ids, use_cache=False, **extra)

    def score(logits, rows: slice):  # the replies' log-probabilities from a forward over ids[rows]
        return _reply_logprobs(logits, response_ids[rows], r, temperature) * response_mask[rows]

    shared = shared_prefix_length(query_ids, query_mask) if "logits_to_keep" in extra else 0
    if shared >= MIN_SHARED_TOKENS:  # the prompts' common head once, where the model reproduces plain()
        out = forward_sharing_prefix(model, ids, mask, shared, plain, score, **extra)
    else:
        out = plain()
    logits = out.logits[:, -(r + 1):-1].float()  # the logits that predicted each reply token
    if temperature != 1.0:
        logits = logits / temperature
    logprobs = token_logprobs(logits, response_ids) * response_mask
    values = value_head(out.hidden_states[-1][:, -(r + 1):-1]) * response_mask if value_head is not None else None
    ent = None
    if entropy is not None:
        with torch.set_grad_enabled(torch.is_grad_enabled() and entropy == "loss"):
            ent = entropy_from_logits(logits) * response_mask
    return PolicyOutput(_pad_to(logprobs, width), _pad_to(values, width), _pad_to(ent, width))


def _reply_logprobs(logits: torch.Tensor, response_ids: torch.Tensor, r: int, temperature: float) -> torch.Tensor:
    """[B, R] log-probabilities of the reply tokens from a forward's logits (for comparing two forwards)."""
    return token_logprobs(logits[:, -(r + 1):-1].float() / temperature, response_ids)


class ActorCritic(nn.Module):
    """The policy and its value head as one module: what a training forward calls, and what
    several processes wrap together (DDP averages the gradients of both)."""

    def __init__(self, policy: nn.Module, value_head: ValueHead):
        super().__init__()
        self.policy, self.value_head = policy, value_head

    def forward(self, query_ids, query_mask, response_ids, response_mask, temperature: float = 1.0,
                entropy: str | None = None) -> PolicyOutput:
        return policy_forward(self.policy, query_ids, query_mask, response_ids, response_mask, temperature,
                              self.value_head, entropy)


@torch.no_grad()
def episode_forward(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                    response_mask: torch.Tensor, temperature: float, max_rows: int, overhead_positions: float | None,
                    value_head: ValueHead | None = None) -> PolicyOutput:
    """``policy_forward`` over a whole batch of episodes, without gradients, in length-grouped chunks
    of at most ``max_rows`` (rows are independent, so chunking is exact). Outputs [B, R]."""
    b, width = response_ids.shape
    logprobs = torch.zeros(b, width, device=response_ids.device)
    values = torch.zeros(b, width, device=response_ids.device) if value_head is not None else None
    for rows in length_chunks(query_mask, response_mask, max_rows, overhead_positions):
        out = policy_forward(model, query_ids[rows], query_mask[rows], response_ids[rows], response_mask[rows],
                             temperature, value_head)
        logprobs[rows] = out.logprobs
        if values is not None:
            values[rows] = out.values
    return PolicyOutput(logprobs, values, None)


# A forward + backward has a fixed cost (Python, module calls, kernel launches) on top of its work
# per position; in positions, about this many on CPU for the bundled model (measured: ~5 ms against
# ~0.12 ms a position). Larger models make it relatively smaller, so this errs toward fewer splits.
CPU_CHUNK_OVERHEAD_POSITIONS = 32


def length_chunks(query_mask: torch.Tensor, response_mask: torch.Tensor, max_rows: int,
                  overhead_positions: float | None = None) -> list[torch.Tensor]:
    """Split rows into forward chunks of at most ``max_rows``, consecutive in length order, so as to
    minimise the padded positions computed (a chunk costs rows × (longest prompt + longest reply))
    plus ``overhead_positions`` per chunk. A dynamic programme over the sorted rows (n × max_rows).

    ``overhead_positions=None`` means "as few chunks as possible" (accelerators, where a smaller
    forward saves little); the result is a function of the masks alone, so resume stays exact.
    Returns index tensors into the rows (on the masks' device).
    """
    q_len, r_len = query_mask.sum(dim=1), response_mask.sum(dim=1).clamp(min=1)
    order = torch.sort(q_len + r_len, stable=True).indices
    ql, rl = q_len[order].tolist(), r_len[order].tolist()  # one host transfer
    n = len(ql)
    overhead = float(n * (max(ql, default=0) + max(rl, default=0)) + 1) if overhead_positions is None else overhead_positions
    best, cut = [0.0] + [float("inf")] * n, [0] * (n + 1)
    for end in range(1, n + 1):
        mq = mr = 0
        for start in range(end - 1, max(-1, end - 1 - max_rows), -1):
            mq, mr = max(mq, ql[start]), max(mr, rl[start])
            cost = best[start] + (end - start) * (mq + mr) + overhead
            if cost < best[end]:
                best[end], cut[end] = cost, start
    chunks, end = [], n
    while end > 0:
        chunks.append(order[cut[end]:end])
        end = cut[end]
    return chunks[::-1]
