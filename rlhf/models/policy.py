"""The PPO policy's forward pass: per-token log-probabilities of sampled replies, and values.

One forward of the causal LM over prompt + reply gives both: the logits that predicted each reply
token (divided by the sampling temperature, so the distribution scored is the one sampled from)
and the final hidden state at the same positions, which a linear value head turns into V_t.

Only the last R + 1 positions reach the LM head (``logits_to_keep``): prompts are left-padded and
replies right-padded, so the reply region is the tail of the sequence, and the prompt's logits —
most of a long prompt's vocabulary-sized rows — are never computed.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class PolicyOutput:
    logprobs: torch.Tensor               # [B, R] log π(y_t | x, y_<t); 0 where response_mask is 0
    values: torch.Tensor | None          # [B, R] V_t from the value head, or None
    logits: torch.Tensor                 # [B, R, V] temperature-scaled logits (for entropy)


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
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "logits_to_keep" in inspect.signature(base.forward).parameters


def trim_padding(query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                 response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Drop prompt columns that are padding in every row (left) and reply columns past the longest
    reply (right). Positions come from the mask, so the result scores exactly the same tokens with
    less work — a micro-batch of short replies no longer pays for the batch's longest one."""
    real_q = query_mask.any(dim=0).nonzero()
    start = int(real_q[0]) if real_q.numel() else query_ids.shape[1] - 1
    width = max(1, int(response_mask.sum(dim=1).max()))
    return query_ids[:, start:], query_mask[:, start:], response_ids[:, :width], response_mask[:, :width]


def policy_forward(model, query_ids: torch.Tensor, query_mask: torch.Tensor, response_ids: torch.Tensor,
                   response_mask: torch.Tensor, temperature: float = 1.0, value_head: ValueHead | None = None) -> PolicyOutput:
    """Log-probabilities (and values) of ``response_ids`` given left-padded ``query_ids``.

    query_ids, query_mask: [B, P]; response_ids, response_mask: [B, R]. Differentiable unless called
    under ``torch.no_grad``. The gather − logsumexp form never materialises a full log-softmax copy.
    """
    ids = torch.cat([query_ids, response_ids], dim=1)
    mask = torch.cat([query_mask, response_mask], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    r = response_ids.shape[1]
    kwargs = dict(input_ids=ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                  output_hidden_states=value_head is not None)
    keep = _accepts_logits_to_keep(model)
    if keep:
        kwargs["logits_to_keep"] = r + 1
    out = model(**kwargs)
    logits = out.logits[:, -(r + 1):-1].float()  # the logits that predicted each reply token
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, response_ids.unsqueeze(-1)).squeeze(-1)
    logprobs = (picked - torch.logsumexp(logits, dim=-1)) * response_mask
    values = None
    if value_head is not None:
        values = value_head(out.hidden_states[-1][:, -(r + 1):-1]) * response_mask
    return PolicyOutput(logprobs, values, logits)


def length_order(query_mask: torch.Tensor, response_mask: torch.Tensor) -> torch.Tensor:
    """Row indices sorted by real length (prompt + reply tokens), stable: chunks of consecutive rows
    then pad to similar widths. A function of the masks alone, so a resumed run chunks identically."""
    lengths = query_mask.sum(dim=1) + response_mask.sum(dim=1)
    return torch.sort(lengths, stable=True).indices
