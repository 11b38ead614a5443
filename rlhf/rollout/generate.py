"""Sampling completions: batched, left-padded, with a static KV cache, stopping at EOS.

``sample_tokens`` is the rollout primitive PPO builds on (token ids and masks); ``generate_completions``
wraps it for the ``rlhf generate`` verb (K texts per prompt).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from rlhf.models.loading import format_prompt, stop_token_ids
from rlhf.rollout.decode import Decoded, sample_response_ids


@dataclass
class SamplingParams:
    max_new_tokens: int = 48
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class SampledBatch:
    """One batch of rollouts. B = batch, P = prompt length (left-padded), R = response length."""

    query_ids: torch.Tensor       # [B, P] prompt tokens, left-padded
    query_mask: torch.Tensor      # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor    # [B, R] sampled tokens; pad after the first EOS
    response_mask: torch.Tensor   # [B, R] 1 up to and including the first EOS
    ended_with_eos: torch.Tensor  # [B] bool: False when the reply hit max_new_tokens unfinished
    # Recorded while sampling when asked for (``record=True``) and the fast loop served the batch;
    # else None. 0 / junk where response_mask is 0 (see rlhf.rollout.decode.sample_response_ids).
    logprobs: torch.Tensor | None = None  # [B, R] log π(y_t) at the sampling temperature, before top-k/top-p
    hidden: torch.Tensor | None = None    # [B, R, H] final hidden state that predicted y_t


def response_mask_from_ids(response_ids: torch.Tensor, eos_token_id: int | list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Mask [B, R] covering tokens up to and including the first EOS; and whether an EOS occurred [B]."""
    eos_ids = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id])
    is_eos = torch.isin(response_ids, eos_ids.to(response_ids.device))
    ended = is_eos.any(dim=1)
    # Position of the first EOS; rows without one keep every token.
    first = torch.where(ended, is_eos.int().argmax(dim=1), torch.full_like(ended, response_ids.shape[1] - 1, dtype=torch.long))
    positions = torch.arange(response_ids.shape[1], device=response_ids.device)
    return (positions[None, :] <= first[:, None]).long(), ended


def sample_tokens(model, tokenizer, prompts: list[str], params: SamplingParams, record: bool = False) -> SampledBatch:
    """Sample one reply per prompt (prompts are raw user texts; the chat template is applied here).

    Decoding uses our static-cache loop (rlhf/rollout/decode.py) and falls back to ``model.generate``
    for models that loop cannot handle; both give the same SampledBatch contract. ``record`` asks for
    each token's log-probability and final hidden state as well (only the fast loop records them).
    """
    texts = [format_prompt(tokenizer, p) for p in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False, padding_side="left")
    device = next(model.parameters()).device
    query_ids, query_mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    # Stop at the chat template's end of turn as well as EOS (they differ in some tokenizers).
    eos, pad = stop_token_ids(tokenizer), tokenizer.pad_token_id
    was_training = model.training
    model.eval()
    try:
        decoded = sample_response_ids(model, query_ids, query_mask, params, eos, pad, record=record)
        if decoded is None:
            decoded = Decoded(_generate_with_hf(model, query_ids, query_mask, params, eos, pad))
    finally:
        model.train(was_training)
    response_ids = decoded.tokens
    if response_ids.shape[1] == 0:  # max_new_tokens=0 or immediate stop: keep one pad column for shapes
        response_ids = torch.full((query_ids.shape[0], 1), pad, device=device)
        decoded = Decoded(response_ids)
    mask, ended = response_mask_from_ids(response_ids, eos)
    response_ids = torch.where(mask.bool(), response_ids, torch.full_like(response_ids, pad))
    logprobs = None if decoded.logprobs is None else decoded.logprobs * mask
    return SampledBatch(query_ids, query_mask, response_ids, mask, ended, logprobs, decoded.hidden)


@torch.no_grad()
def _generate_with_hf(model, query_ids, query_mask, params: SamplingParams, eos, pad) -> torch.Tensor:
    """The reference path: transformers' ``generate`` with its KV cache (reply tokens only)."""
    gen_kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad, eos_token_id=eos, use_cache=True)
    if params.temperature > 0:
        gen_kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
    else:
        gen_kwargs.update(do_sample=False)
    out = model.generate(input_ids=query_ids, attention_mask=query_mask, **gen_kwargs)
    return out[:, query_ids.shape[1]:]


def decode_responses(tokenizer, batch: SampledBatch) -> list[str]:
    """Reply texts without the EOS token or padding."""
    texts = []
    for ids, mask, ended in zip(batch.response_ids, batch.response_mask, batch.ended_with_eos):
        n = int(mask.sum()) - int(ended)
        texts.append(tokenizer.decode(ids[:n], skip_special_tokens=True).strip())
    return texts


def generate_completions(model, tokenizer, prompts: list[str], num_completions: int, params: SamplingParams,
                         batch_size: int = 16, seed: int = 0, progress: bool = True) -> list[list[str]]:
    """``num_completions`` sampled replies for each prompt, in prompt order."""
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(num_completions)]
    replies: list[str] = []
    bar = tqdm(total=len(flat), desc="generating", unit="completion", disable=not progress)
    for start in range(0, len(flat), batch_size):
        chunk = flat[start:start + batch_size]
        replies.extend(decode_responses(tokenizer, sample_tokens(model, tokenizer, chunk, params)))
        bar.update(len(chunk))
    bar.close()
    return [replies[i * num_completions:(i + 1) * num_completions] for i in range(len(prompts))]
