"""Per-token log-probabilities of sampled replies under a model (policy, reference, or any LM)."""

from __future__ import annotations

import torch

from rlhf.rollout.generate import SampledBatch


def response_logprobs(model, batch: SampledBatch, temperature: float = 1.0) -> torch.Tensor:
    """log π(y_t | x, y_<t) for every response token: [B, R], zero where response_mask is 0.

    Logits are divided by the sampling temperature so that the distribution scored is the one that
    was sampled from. Gathering via logsumexp avoids materialising a full-vocabulary log-softmax.
    """
    ids = torch.cat([batch.query_ids, batch.response_ids], dim=1)
    mask = torch.cat([batch.query_mask, batch.response_mask], dim=1)
    position_ids = (mask.cumsum(dim=1) - 1).clamp(min=0)  # left padding: real tokens start at position 0
    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids).logits
    p = batch.query_ids.shape[1]
    logits = logits[:, p - 1:-1].float()  # the logits that predicted each response token
    if temperature != 1.0:
        logits = logits / temperature
    picked = logits.gather(-1, batch.response_ids.unsqueeze(-1)).squeeze(-1)
    return (picked - torch.logsumexp(logits, dim=-1)) * batch.response_mask
