"""Rollouts through vLLM on a GPU (``--rollout vllm``; ``pip install '.[vllm]'``).

A vLLM engine runs in the training process, on the same GPU, with its own copy of the policy's
weights (``--vllm-gpu-memory`` bounds its share of the GPU's memory). It samples with per-episode
seeds and returns the sampled tokens with their log-probabilities; after every optimizer step the
trainer calls :meth:`VLLMBackend.sync_weights` and the engine takes the policy's new weights:

* a full policy: every parameter is handed to the vLLM model's ``load_weights`` (which maps
  Hugging Face parameter names onto its fused layers), then the prefix cache is dropped, since
  cached keys and values were computed with the old weights;
* a LoRA policy (peft): only the adapter changes, so it is written to a fresh folder and the next
  requests name it as a new LoRA adapter (vLLM loads it once per version); the base weights in
  the engine never change.

vLLM computes in its own kernels (and by default in lower precision), so its log-probabilities are
close to, not equal to, a training forward's: PPO therefore recomputes the old log-probabilities
and values with a forward pass (vLLM gives no hidden states), and the gap between the two is
logged as ``sampler_logprob_gap`` — a stale engine (weights not synced) shows up there at once.

Tested against the Hugging Face path (equal greedy replies before and after a weight sync, for a
full and a LoRA policy) in tests/test_vllm.py, which skips without a GPU or vLLM.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from rlhf.errors import ConfigError
from rlhf.rollout.decode import Decoded

log = logging.getLogger(__name__)


def _peft(model) -> bool:
    return hasattr(model, "peft_config")


class VLLMBackend:
    """A vLLM engine holding a copy of ``policy``; ``decode`` has the signature of every rollout backend."""

    name = "vllm"

    def __init__(self, policy, tokenizer, engine):
        if not torch.cuda.is_available():
            raise ConfigError("--rollout vllm needs a CUDA GPU; use --rollout fast (CPU) or hf")
        try:
            # vLLM is a heavy optional extra: imported only when this backend is asked for. Its engine
            # core runs in this process, so that its model can take new weights by reference.
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
            from vllm import LLM
        except ImportError:
            raise ConfigError("--rollout vllm needs vLLM: pip install '.[vllm]' (a CUDA machine)") from None
        self.policy, self.tokenizer = policy, tokenizer
        self.lora = _peft(policy)
        self._dir = Path(tempfile.mkdtemp(prefix="rlhf-vllm-"))
        base = self._dir / "base"
        # The engine starts from the policy's current weights (for LoRA: the base model, the adapter
        # follows as a LoRA request), written once in HF format.
        (policy.get_base_model() if self.lora else policy).save_pretrained(str(base), safe_serialization=True)
        tokenizer.save_pretrained(str(base))
        dtype = str(next(policy.parameters()).dtype).removeprefix("torch.")
        kwargs = dict(model=str(base), dtype=dtype, gpu_memory_utilization=engine.vllm_gpu_memory, seed=0,
                      enable_prefix_caching=True)
        if self.lora:
            rank = int(next(iter(policy.peft_config.values())).r)
            supported = [r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= rank]  # vLLM's allowed maxima
            if not supported:
                raise ConfigError(f"--lora-r {rank} is above the largest LoRA rank vLLM serves (512)")
            kwargs.update(enable_lora=True, max_lora_rank=supported[0], max_loras=1)
        self.llm = LLM(**kwargs)
        self._lora_version = 0
        self._lora_request = None
        self.sync_weights(policy)

    # --- sampling --------------------------------------------------------------------------------

    def decode(self, model, query_ids: torch.Tensor, query_mask: torch.Tensor, params, eos_token_id, pad_token_id: int,
               record: bool = False, seeds: list[int] | None = None) -> Decoded:
        """Sampled reply ids [B, R] (pad after EOS) and, with ``record``, their log-probabilities [B, R]
        where vLLM's are of the distribution PPO scores (temperature 1, no top-k/top-p filter)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos = eos_token_id if isinstance(eos_token_id, list) else [eos_token_id]
        prompts = [TokensPrompt(prompt_token_ids=ids[m.bool()].tolist()) for ids, m in zip(query_ids.cpu(), query_mask.cpu())]
        # vLLM reports log-probabilities before temperature and filters; they equal the scored
        # distribution only at temperature 1 without filters, and are recorded only then.
        comparable = params.temperature == 1.0 and params.top_p >= 1.0 and not params.top_k
        want_logprobs = record and comparable
        common = dict(n=1, max_tokens=params.max_new_tokens, temperature=float(params.temperature),
                      top_p=float(params.top_p), stop_token_ids=eos, logprobs=0 if want_logprobs else None,
                      detokenize=False)
        if params.top_k:  # left out when off: vLLM versions disagree on the value that means "off"
            common["top_k"] = int(params.top_k)
        sampling = [SamplingParams(**common, seed=None if s is None else int(s) % 2**31)
                    for s in (seeds if seeds is not None else [None] * len(prompts))]
        outputs = self.llm.generate(prompts, sampling, use_tqdm=False, lora_request=self._lora_request)
        width = max(1, max(len(o.outputs[0].token_ids) for o in outputs))
        tokens = torch.full((len(outputs), width), pad_token_id, dtype=torch.long)
        logprobs = torch.zeros(len(outputs), width) if want_logprobs else None
        for i, o in enumerate(outputs):
            ids = list(o.outputs[0].token_ids)
            tokens[i, :len(ids)] = torch.tensor(ids, dtype=torch.long)
            if logprobs is not None:
                logprobs[i, :len(ids)] = torch.tensor([step[t].logprob for step, t in zip(o.outputs[0].logprobs, ids)])
        device = query_ids.device
        return Decoded(tokens.to(device), None if logprobs is None else logprobs.to(device))

    # --- weights ---------------------------------------------------------------------------------

    @torch.no_grad()
    def sync_weights(self, model) -> None:
        """Give the engine ``model``'s current weights (called after every optimizer step)."""
        if self.lora:
            self._lora_version += 1
            folder = self._dir / f"adapter-{self._lora_version}"
            model.save_pretrained(str(folder), safe_serialization=True)
            from vllm.lora.request import LoRARequest

            self._lora_request = LoRARequest(f"policy-{self._lora_version}", self._lora_version, str(folder))
            old = self._dir / f"adapter-{self._lora_version - 2}"
            shutil.rmtree(old, ignore_errors=True)  # keep the one in use and the one before it
            return
        weights = [(name, p.detach()) for name, p in model.named_parameters()]
        self._load(weights)
        self.llm.reset_prefix_cache()

    def _load(self, weights: list[tuple[str, torch.Tensor]]) -> None:
        def load(vllm_model):
            vllm_model.load_weights(weights)
            return True

        # ``apply_model`` runs a function on the engine's model in every worker (vLLM ≥ 0.8); with the
        # engine core in this process the tensors are passed by reference, not copied through a pipe.
        self.llm.apply_model(load)

    def __del__(self):
        shutil.rmtree(getattr(self, "_dir", ""), ignore_errors=True)
