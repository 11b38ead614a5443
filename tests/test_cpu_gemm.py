"""oneDNN linear layers (rlhf/models/cpu_gemm.py): the same outputs and gradients as nn.Linear,
switched on and off by RLHF_CPU_GEMM, and invisible to weights, state dicts and copies."""

import copy

import pytest
import torch
from torch import nn

from rlhf.models import cpu_gemm

needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this torch build has no oneDNN linear op")


@pytest.fixture
def gemm_mode(monkeypatch):
    def set_mode(mode: str):
        monkeypatch.setenv("RLHF_CPU_GEMM", mode)
        cpu_gemm.onednn_linear_enabled.cache_clear()
    yield set_mode
    cpu_gemm.onednn_linear_enabled.cache_clear()


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                        num_key_value_heads=2, intermediate_size=48, max_position_embeddings=32))


@needs_onednn
@pytest.mark.parametrize("bias", [True, False])
def test_function_matches_linear_in_values_and_gradients(bias):
    torch.manual_seed(0)
    layer = nn.Linear(24, 40, bias=bias)
    x = torch.randn(3, 7, 24, requires_grad=True)
    want = layer(x)
    want.pow(2).sum().backward()
    grads = [x.grad.clone()] + [p.grad.clone() for p in layer.parameters()]
    x.grad = None
    layer.zero_grad()
    got = cpu_gemm._OneDNNLinear.apply(x, layer.weight, layer.bias)
    got.pow(2).sum().backward()
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5)
    for g, w in zip([x.grad] + [p.grad for p in layer.parameters()], grads):
        assert torch.allclose(g, w, atol=1e-4)


@needs_onednn
def test_a_switched_model_trains_like_the_original(gemm_mode, monkeypatch):
    gemm_mode("onednn")
    monkeypatch.setattr(cpu_gemm, "MIN_ONEDNN_MACS", 0)  # the tiny model's products all go through oneDNN
    plain, fast = tiny_llama(), tiny_llama()
    n = cpu_gemm.use_fast_cpu_linears(fast)
    assert n == sum(type(m) is nn.Linear for m in fast.modules()) > 0
    assert cpu_gemm.use_fast_cpu_linears(fast) == 0  # already switched: nothing to do twice
    calls = []
    real = cpu_gemm._OneDNNLinear.apply
    monkeypatch.setattr(cpu_gemm._OneDNNLinear, "apply", lambda *a: calls.append(1) or real(*a))
    ids = torch.randint(0, 64, (2, 9))
    for model in (plain, fast):
        model(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == n  # every linear of the forward with gradients ran the oneDNN function
    assert torch.allclose(plain(input_ids=ids).logits, fast(input_ids=ids).logits, atol=1e-5)
    for (name, p), q in zip(plain.named_parameters(), fast.parameters()):
        assert torch.allclose(p.grad, q.grad, atol=1e-4), name
    # weights and their names are untouched, and a copy keeps working on its own weights
    assert plain.state_dict().keys() == fast.state_dict().keys()
    twin = copy.deepcopy(fast)
    with torch.no_grad():
        twin.lm_head.weight.add_(1.0)
    assert not torch.allclose(twin(input_ids=ids).logits, fast(input_ids=ids).logits)


def test_blas_mode_switches_nothing_and_bad_modes_are_refused(gemm_mode):
    gemm_mode("blas")
    assert cpu_gemm.use_fast_cpu_linears(tiny_llama()) == 0
    gemm_mode("fastest")
    with pytest.raises(ValueError, match="RLHF_CPU_GEMM"):
        cpu_gemm.onednn_linear_enabled()


def test_auto_mode_follows_the_cpu_vendor(gemm_mode, monkeypatch):
    gemm_mode("auto")
    monkeypatch.setattr(cpu_gemm, "_cpu_vendor", lambda: "GenuineIntel")  # MKL's own AVX-512 kernels
    assert not cpu_gemm.onednn_linear_enabled()
    cpu_gemm.onednn_linear_enabled.cache_clear()
    monkeypatch.setattr(cpu_gemm, "_cpu_vendor", lambda: "AuthenticAMD")
    has_op = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    assert cpu_gemm.onednn_linear_enabled() == has_op
