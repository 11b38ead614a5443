"""Rollout backends: what turns left-padded prompt ids into sampled reply ids.

Every backend takes the same inputs and returns the same :class:`~rlhf.rollout.decode.Decoded`, so
``sample_tokens`` (and PPO through it) does not care which one ran:

* ``hf``: transformers' ``model.generate`` — the reference path, always available, what the tests
  compare the others against;
* ``fast``: our decode loop (rlhf/rollout/decode.py): static KV cache, lean steps, per-episode
  random streams, logprobs and hidden states recorded while sampling; falls back to ``hf`` for
  models it cannot handle;
* ``vllm``: a vLLM engine on a GPU (rlhf/rollout/vllm_backend.py), which gets the policy's
  weights after every update through ``sync_weights``.

The in-process backends sample from the live policy module itself, so their ``sync_weights`` has
nothing to do.
"""

from __future__ import annotations

import logging
from typing import Protocol

import torch

from rlhf.rollout.decode import Decoded, DecodeSettings, episode_uniforms, sample_response_ids

log = logging.getLogger(__name__)


class RolloutBackend(Protocol):
    name: str

    def decode(self, model, query_ids: torch.Tensor, query_mask: torch.Tensor, params, eos_token_id, pad_token_id: int,
               record: bool = False, seeds: list[int] | None = None) -> Decoded: ...

    def sync_weights(self, model) -> None: ...


class HFGenerate:
    """transformers' ``generate`` with its KV cache. ``seeds``: the batch's draws come from a generator
    seeded with the first episode's seed (generate has one random stream per call, not one per row)."""

    name = "hf"

    @torch.no_grad()
    def decode(self, model, query_ids, query_mask, params, eos_token_id, pad_token_id, record=False, seeds=None) -> Decoded:
        gen_kwargs = dict(max_new_tokens=params.max_new_tokens, pad_token_id=pad_token_id, eos_token_id=eos_token_id,
                          use_cache=True)
        if params.temperature > 0:
            gen_kwargs.update(do_sample=True, temperature=params.temperature, top_p=params.top_p, top_k=params.top_k)
        else:
            gen_kwargs.update(do_sample=False)
        devices = [query_ids.device] if query_ids.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices, enabled=bool(seeds)):
            if seeds:
                torch.manual_seed(int(seeds[0]))
            out = model.generate(input_ids=query_ids, attention_mask=query_mask, **gen_kwargs)
        return Decoded(out[:, query_ids.shape[1]:])

    def sync_weights(self, model) -> None:
        pass


class FastDecode:
    """Our static-cache decode loop; ``model.generate`` for models it cannot handle."""

    name = "fast"

    def __init__(self, settings: DecodeSettings | None = None):
        self.settings = settings or DecodeSettings()
        self.fallback = HFGenerate()

    def decode(self, model, query_ids, query_mask, params, eos_token_id, pad_token_id, record=False, seeds=None) -> Decoded:
        uniforms = None
        if seeds is not None and params.temperature > 0:
            uniforms = episode_uniforms(seeds, params.max_new_tokens, query_ids.device)
        out = sample_response_ids(model, query_ids, query_mask, params, eos_token_id, pad_token_id, self.settings,
                                  record=record, uniforms=uniforms)
        if out is None:
            out = self.fallback.decode(model, query_ids, query_mask, params, eos_token_id, pad_token_id, seeds=seeds)
        return out

    def sync_weights(self, model) -> None:
        pass


def default_backend(device: torch.device | str) -> RolloutBackend:
    """What ``--rollout auto`` means: the fast loop on a CPU, ``generate`` elsewhere."""
    return FastDecode() if torch.device(device).type == "cpu" else HFGenerate()


def make_backend(engine, policy=None, tokenizer=None) -> RolloutBackend:
    """The backend an engine section asks for (``engine.rollout`` resolved by rlhf.engine.start).

    vLLM needs the policy (to load its weights) and the tokenizer; it is imported only here,
    because it is a heavy optional extra."""
    if engine.rollout == "hf":
        return HFGenerate()
    if engine.rollout in ("fast", "auto"):
        if engine.rollout == "auto" and torch.device(engine.device if engine.device != "auto" else "cpu").type != "cpu":
            return HFGenerate()
        return FastDecode(DecodeSettings(compile=engine.compile, threads=engine.rollout_threads))
    if engine.rollout == "vllm":
        from rlhf.rollout.vllm_backend import VLLMBackend

        return VLLMBackend(policy, tokenizer, engine)
    raise ValueError(f"unknown rollout backend {engine.rollout!r}")
