"""Sampling completions: batched, left-padded, stopping at EOS, through a rollout backend.

``sample_tokens`` is the rollout primitive PPO builds on: it formats and tokenizes the prompts,
lets a backend (rlhf/rollout/backends.py: our fast loop, transformers' generate, or vLLM) sample,
and returns the rollout part of an :class:`~rlhf.rollout.experience.Experience`.
``generate_completions`` wraps it for the ``rlhf generate`` verb (K texts per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.models.loading import format_prompt, stop_token_ids
from rlhf.rollout.backends import HFGenerate, RolloutBackend, default_backend
from rlhf.rollout.decode import Decoded
from rlhf.rollout.experience import Experience


@dataclass
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


# What sampling returns is the rollout part of an Experience (the name evaluation code knows it by).
SampledBatch = Experience


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, R] covering tokens up to and including the first EOS; and whether an EOS occurred [B]."""
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    is_eos = torch.isin(response_ids, eos_ids.to(response_ids.device))
    ended = is_eos.any(dim=1)
    # Position of the first EOS; rows without one keep every token.
    first = torch.where(ended, is_eos.int().argmax(dim=1), torch.full_like(ended, response_ids.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    return (positions[None, :] <= first[:, None]).long(), ended


def sample_tokens(model, tokenizer, prompts: list[str], params: SamplingParams, record: bool = False,
                  backend: RolloutBackend | None = None, seeds: list[int] | None = None) -> Experience:
    """Sample one reply per prompt (prompts are raw user texts; the chat template is applied here).

    ``backend``: how to sample (default: the fast loop on CPU, ``generate`` elsewhere); every backend
    gives the same contract. ``record`` asks for each token's log-probability and final hidden state
    as well (the fast loop records both, vLLM the log-probabilities). ``seeds`` [B]: one seed per
    episode, so that an episode's reply depends on its seed, not on the batch it was sampled in
    (honoured per row by the fast loop and vLLM; ``generate`` seeds the batch with the first one).
    """
    backend = backend or default_backend(next(model.parameters()).device)
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    device = next(model.parameters()).device
    query_ids, query_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    # Stop at the chat template's end of turn as well as EOS (they differ in some tokenizers).
    eos, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    try:
        decoded = backend.decode(model, query_ids, query_mask, params, eos, pad, record=record, seeds=seeds)
    finally:
        model.train(was_training)
    response_ids = decoded.tokens.to(device)
    if response_ids.shape[1] == 0:  # max_new_tokens=0 or immediate stop: keep one pad column for shapes
        response_ids = torch.full((query_ids.shape[0], 1), pad, device=device)
        decoded = Decoded(response_ids)
    mask, ended = response_mask_from_ids(response_ids, eos)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad))
    logprobs = None if decoded.logprobs is None else decoded.logprobs.to(device) * mask
    batch = Experience(query_ids, query_mask, response_ids, mask, ended, prompts=list(prompts), logprobs=logprobs,
                       hidden=decoded.hidden)
    batch.texts = decode_responses(tokenizer, batch)
    return batch


def _generate_with_hf(model, query_ids, query_mask, params: SamplingParams, eos, pad) -> torch.Tensor:
    """The reference path: transformers' ``generate`` with its KV cache (reply tokens only)."""
    return HFGenerate().decode(model, query_ids, query_mask, params, eos, pad).tokens


def decode_responses(tokenizer, batch: Experience) -> list[str]:
    """Reply texts without the EOS token or padding."""
    texts = []
    for ids, mask, ended in zip(batch.response_ids, batch.response_mask, batch.ended_with_eos):
        n = int(mask.sum()) - int(ended)
        texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True).strip())
    return texts


def generate_completions(model, tokenizer, prompts: list[str], num_completions: int, params: SamplingParams,
                         batch_size: int = 16, seed: int = 0, progress: bool = True,
                         backend: RolloutBackend | None = None) -> list[list[str]]:
    """``num_completions`` sampled replies for each prompt, in prompt order."""
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(num_completions)]
    replies: list[str] = []
    bar = tqdm(total=len(flat), desc="generating", unit="completion", disable=not progress)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        replies.extend(sample_tokens(model, tokenizer, chunk, params, backend=backend).texts)
        bar.update(len(chunk))
    bar.close()
    return [replies[i * num_completions:(i + 1) * num_completions] for i in range(len(prompts))]
