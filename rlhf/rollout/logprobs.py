"""Per-token log-probabilities of sampled replies under a model (policy, reference, or any LM)."""

from __future__ import annotations

import torch

from rlhf.models.policy import policy_forward
from rlhf.rollout.generate import SampledBatch


def response_logprobs(model, batch: SampledBatch, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) for every response token: [B, R], zero where response_mask is 0.

    The same forward PPO uses (rlhf.models.policy.policy_forward), so evaluation's KL and
    perplexity score replies exactly as training does.
    """
    return policy_forward(model, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask,
                          temperature).logprobs
