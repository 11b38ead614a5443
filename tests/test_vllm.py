"""The vLLM rollout backend against the Hugging Face reference path: equal greedy replies, before
and after the policy's weights change and are synced (a full policy and a LoRA adapter), sampled
log-probabilities close to a training forward, per-episode seeds honoured. Skipped, with the
reason, where there is no CUDA GPU or vLLM is not installed (pip install '.[vllm]')."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from rlhf.engine.config import EngineConfig
from rlhf.rollout.backends import HFGenerate
from rlhf.rollout.generate import SamplingParams, sample_tokens

if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU: the vLLM rollout backend runs on GPUs only", allow_module_level=True)
if importlib.util.find_spec("vllm") is None:
    pytest.skip("vLLM is not installed (pip install '.[vllm]')", allow_module_level=True)

PROMPTS = ["hi", "my house is too hot", "a much longer prompt about a hot house " * 3, "how do I cook rice"]
GREEDY = SamplingParams(max_new_tokens=16, temperature=0.0)


def same_tokens(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to trailing all-pad columns (either side may stop once every row has ended)."""
    r = min(a.shape[1], b.shape[1])
    return torch.equal(a[:, :r].cpu(), b[:, :r].cpu())


@pytest.fixture(scope="module")
def gpu_llama(tiny_model_dir):
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    return load_causal_lm(tiny_model_dir, device="cuda"), load_tokenizer(tiny_model_dir)


def backend_for(policy, tok):
    from rlhf.rollout.vllm_backend import VLLMBackend

    return VLLMBackend(policy, tok, EngineConfig(device="cuda", rollout="vllm", vllm_gpu_memory=0.2))


def test_greedy_equals_hf_before_and_after_a_weight_sync(gpu_llama):
    model, tok = gpu_llama
    vllm = backend_for(model, tok)
    ours = sample_tokens(model, tok, PROMPTS, GREEDY, backend=vllm).response_ids
    assert same_tokens(ours, sample_tokens(model, tok, PROMPTS, GREEDY, backend=HFGenerate()).response_ids)
    with torch.no_grad():  # an update: the policy changes, the engine must follow after the sync
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    stale = sample_tokens(model, tok, PROMPTS, GREEDY, backend=vllm).response_ids
    vllm.sync_weights(model)
    synced = sample_tokens(model, tok, PROMPTS, GREEDY, backend=vllm).response_ids
    reference = sample_tokens(model, tok, PROMPTS, GREEDY, backend=HFGenerate()).response_ids
    assert same_tokens(synced, reference) and not same_tokens(stale, reference)


def test_lora_adapter_is_synced(tiny_model_dir):
    from peft import LoraConfig, get_peft_model

    from rlhf.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    policy = get_peft_model(load_causal_lm(tiny_model_dir, device="cuda"),
                            LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    vllm = backend_for(policy, tok)
    with torch.no_grad():
        for name, p in policy.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    vllm.sync_weights(policy)
    ours = sample_tokens(policy, tok, PROMPTS, GREEDY, backend=vllm).response_ids
    assert same_tokens(ours, sample_tokens(policy, tok, PROMPTS, GREEDY, backend=HFGenerate()).response_ids)


def test_sampled_logprobs_match_a_forward_and_seeds_are_per_episode(gpu_llama):
    from rlhf.models.policy import policy_forward

    model, tok = gpu_llama
    vllm = backend_for(model, tok)
    params = SamplingParams(max_new_tokens=12, temperature=1.0)
    exp = sample_tokens(model, tok, PROMPTS, params, record=True, backend=vllm, seeds=[1, 2, 3, 4])
    with torch.no_grad():
        lp = policy_forward(model, exp.query_ids, exp.query_mask, exp.response_ids, exp.response_mask).logprobs
    assert torch.allclose(exp.logprobs, lp, atol=2e-3)
    again = sample_tokens(model, tok, PROMPTS[2:], params, backend=vllm, seeds=[3, 4])
    assert again.texts == exp.texts[2:]
