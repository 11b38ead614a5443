"""oneDNN linear layers (rlhf/models/cpu_gemm.py): the same outputs and gradients as nn.Linear,
switched on and off by --cpu-gemm (chosen per layer shape by a cached timing in auto mode), and
invisible to weights, state dicts and copies."""

import copy
import json

import pytest
import torch
from torch import nn

from rlhf.models import cpu_gemm

needs_onednn = pytest.mark.skipif(not (torch.backends.mkldnn.is_available()
                                       and hasattr(torch.ops.mkldnn, "_linear_pointwise")),
                                  reason="this torch build has no oneDNN linear op")


@pytest.fixture
def gemm_mode():
    before = cpu_gemm.configured_mode()
    yield cpu_gemm.configure
    cpu_gemm.configure(before)


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
    with pytest.raises(ValueError, match="--cpu-gemm"):
        gemm_mode("fastest")
    with pytest.raises(ValueError, match="--cpu-gemm"):
        cpu_gemm.use_fast_cpu_linears(tiny_llama(), mode="fastest")


def test_nothing_is_switched_until_a_command_configures_it():
    """A library user who never starts an engine gets torch's own path (the reference)."""
    import subprocess
    import sys

    code = ("from rlhf.models import cpu_gemm; from torch import nn; "
            "print(cpu_gemm.configured_mode(), cpu_gemm.use_fast_cpu_linears(nn.Sequential(nn.Linear(512, 512))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["blas", "0"]


@needs_onednn
def test_auto_mode_routes_each_shape_by_its_cached_timing(gemm_mode, monkeypatch, tmp_path):
    """auto: a layer goes through oneDNN only where the timing found it faster; the timing runs once
    per shape and CPU, and later models take the cached decision (deterministic from then on)."""
    gemm_mode("auto")
    timed = []
    fake = {(32, 48): {"blas": 1.0, "onednn": 0.5}, (48, 32): {"blas": 1.0, "onednn": 0.99}}

    def fake_time(k, n, **kw):
        timed.append((k, n))
        return fake.get((k, n), {"blas": 1.0, "onednn": 2.0})

    monkeypatch.setattr(cpu_gemm, "time_shape", fake_time)
    monkeypatch.setattr(cpu_gemm, "cache_path", lambda: tmp_path / "cpu-gemm.json")
    monkeypatch.setattr(cpu_gemm, "machine_load", lambda: 0.0)  # a quiet machine
    model = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32), nn.Linear(32, 48))
    assert cpu_gemm.use_fast_cpu_linears(model) == 2  # the two 32→48 layers; 48→32 is within the 5% margin
    assert "forward" in model[0].__dict__ and "forward" not in model[1].__dict__
    assert sorted(timed) == [(32, 48), (48, 32)]  # each shape timed once
    cached = json.loads((tmp_path / "cpu-gemm.json").read_text())
    (entry,) = cached.values()
    assert entry["32x48"]["onednn"] is True and entry["48x32"]["onednn"] is False
    # A second model: decided from the cache, nothing timed again
    again = nn.Sequential(nn.Linear(32, 48), nn.Linear(48, 32))
    assert cpu_gemm.use_fast_cpu_linears(again) == 1 and len(timed) == 2
    # A damaged cache is measured again, not trusted
    (tmp_path / "cpu-gemm.json").write_text("{not json")
    assert cpu_gemm.use_fast_cpu_linears(nn.Sequential(nn.Linear(32, 48))) == 1 and len(timed) == 3
    # On a busy machine nothing is timed (it would cache noise): new shapes keep BLAS, cached ones their choice
    monkeypatch.setattr(cpu_gemm, "machine_load", lambda: 1000.0)
    busy = nn.Sequential(nn.Linear(32, 48), nn.Linear(16, 16))
    assert cpu_gemm.use_fast_cpu_linears(busy) == 1 and "forward" not in busy[1].__dict__ and len(timed) == 3
    assert "16x16" not in next(iter(json.loads((tmp_path / "cpu-gemm.json").read_text()).values()))


@needs_onednn
def test_decode_sized_and_training_sized_inputs_follow_their_own_timing(gemm_mode, monkeypatch, tmp_path):
    """A shape whose decode-sized product (a few rows, forward only) is faster in oneDNN but whose
    training-sized products are not takes oneDNN for small inputs only, and the reverse."""
    gemm_mode("auto")
    timed = []
    fake = {(256, 512, False): 0.5, (256, 512, True): 2.0, (512, 256, False): 2.0, (512, 256, True): 0.5}

    def fake_time(k, n, rows=cpu_gemm.TIMING_ROWS, backward=True, **kw):
        timed.append((k, n, rows, backward))
        return {"blas": 1.0, "onednn": fake.get((k, n, backward), 2.0)}

    monkeypatch.setattr(cpu_gemm, "time_shape", fake_time)
    monkeypatch.setattr(cpu_gemm, "cache_path", lambda: tmp_path / "cpu-gemm.json")
    monkeypatch.setattr(cpu_gemm, "machine_load", lambda: 0.0)
    model = nn.Sequential(nn.Linear(256, 512), nn.Linear(512, 256), nn.Linear(16, 16))
    assert cpu_gemm.use_fast_cpu_linears(model) == 2
    small, large = cpu_gemm.SMALL_TIMING_ROWS, cpu_gemm.TIMING_ROWS
    # 16x16's decode-sized products can never reach MIN_ONEDNN_MACS, so only its training size is timed
    assert sorted(timed) == [(16, 16, large, True), (256, 512, small, False), (256, 512, large, True),
                             (512, 256, small, False), (512, 256, large, True)]
    (entry,) = json.loads((tmp_path / "cpu-gemm.json").read_text()).values()
    assert entry[f"256x512@{small}"]["onednn"] is True and entry["256x512"]["onednn"] is False
    calls = []
    real = cpu_gemm._linear
    monkeypatch.setattr(cpu_gemm, "_linear", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    with torch.no_grad():
        for rows in (16, cpu_gemm.SMALL_ROWS, cpu_gemm.SMALL_ROWS + 1, 512):
            x = torch.randn(rows, 256)
            assert torch.allclose(model[1](model[0](x)), nn.functional.linear(
                nn.functional.linear(x, model[0].weight, model[0].bias), model[1].weight, model[1].bias), atol=1e-4)
    # the 256→512 layer took oneDNN for inputs of up to SMALL_ROWS rows, the 512→256 layer above that
    assert calls == [16, cpu_gemm.SMALL_ROWS, cpu_gemm.SMALL_ROWS + 1, 512]
    # a second model takes both verdicts from the cache
    assert cpu_gemm.use_fast_cpu_linears(nn.Sequential(nn.Linear(256, 512))) == 1 and len(timed) == 5


@needs_onednn
def test_time_shape_measures_both_paths():
    for backward in (True, False):
        t = cpu_gemm.time_shape(64, 96, rows=32, repeats=2, backward=backward)
        assert set(t) == {"blas", "onednn"} and all(0 < v < 1 for v in t.values())
