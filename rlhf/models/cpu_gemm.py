"""fp32 linear layers through oneDNN on CPUs where it beats the BLAS that torch calls by default.

PyTorch's CPU builds multiply fp32 matrices with MKL. MKL picks its kernels by CPU vendor: on Intel
CPUs it runs AVX-512 code, on others (AMD EPYC / Ryzen) its AVX2 code even when the CPU has
AVX-512. oneDNN, which the same torch build also ships, picks by instruction set. Measured on this
project's 2-core AMD EPYC (AVX-512), one thread, fp32 (benchmarks/RESULTS.md):

    [688×512]·[512×1536] (a 30M model's MLP, PPO update):   MKL  99 GFLOP/s, oneDNN 240 GFLOP/s
    same product, backward shapes (transposed operands):      MKL 101–103,      oneDNN 187–221
    [16×192]·[192×1570] (the bundled model's decode step):   MKL  81,          oneDNN 126

Both are plain IEEE fp32 (no bf16/tf32 shortcut): they differ only in summation order, at the
1e-6 relative level. So on such CPUs every ``nn.Linear`` of a model we train or sample from
is switched to an autograd function whose forward and both backward products are oneDNN matmuls.

``RLHF_CPU_GEMM`` chooses: ``auto`` (default: oneDNN on CPUs whose vendor is not Intel, when the
op exists and passes a numerical check), ``onednn`` (always, where available) or ``blas`` (never).
The choice is made from the CPU and the environment, not from a timing, so two runs on the same
machine always compute the same numbers. Models on other devices or in other dtypes are untouched.
"""

from __future__ import annotations

import functools
import logging
import os
import types

import torch
from torch import nn

log = logging.getLogger(__name__)

# oneDNN and ideep (its C++ wrapper in torch) cache a primitive, with packed weight copies, per
# product shape, up to 1024 of each. PPO's row counts change with every length-grouped chunk, and
# with the default caches the bundled model's RSS grew by ~130 MB a PPO step (449 → 981 MB in 4
# steps); with 16 entries it stays flat (573 MB, MKL: 564) at no measured cost in speed. Both are
# read when the first oneDNN primitive is made, so set them here, before any model runs.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "16")
os.environ.setdefault("LRU_CACHE_CAPACITY", "16")


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [..., K] · weightᵀ (+ bias) → [..., N], weight [N, K] of any strides: oneDNN's fp32 matmul."""
    y = torch.ops.mkldnn._linear_pointwise(x.reshape(-1, x.shape[-1]), weight, bias, "none", [], "")
    return y.reshape(*x.shape[:-1], weight.shape[0])


class _OneDNNLinear(torch.autograd.Function):
    """y = x Wᵀ + b with oneDNN products in the forward and in both gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
        ctx.save_for_backward(x, weight)
        ctx.has_bias = bias is not None
        return _linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        x, weight = ctx.saved_tensors
        gy = grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = _linear(grad_y, weight.t())                            # [..., N] · [N, K]
        if ctx.needs_input_grad[1]:
            grad_w = _linear(gy.t(), x.reshape(-1, x.shape[-1]).t())       # [N, M] · [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = gy.sum(dim=0)
        return grad_x, grad_w, grad_b


# Below about this many multiply-adds per product MKL's lower call overhead wins (one thread,
# measured: at 16 rows a 192×192 product takes MKL 16 µs and oneDNN 19–24 µs; from 16×192×1570 on,
# oneDNN is 1.5–2.3× faster). The path is a function of the shapes alone, so runs stay repeatable.
MIN_ONEDNN_MACS = 2**21


def _onednn_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    # Under torch.compile the graph is traced from the plain op (inductor picks its own kernels);
    # inputs that do not fit (another dtype or device after a .to()) take the plain op as well.
    if (torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
            or self.weight.dtype != torch.float32 or self.weight.device.type != "cpu"
            or x.numel() * self.weight.shape[0] < MIN_ONEDNN_MACS):
        return nn.functional.linear(x, self.weight, self.bias)
    if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
        # Nothing to differentiate (sampling, scoring, reference passes): the op alone, without an
        # autograd node, whose Python overhead would cost more than the product at decode sizes.
        return _linear(x, self.weight, self.bias)
    return _OneDNNLinear.apply(x, self.weight, self.bias)


def _cpu_vendor() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("vendor_id"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


@functools.lru_cache(maxsize=None)
def onednn_linear_enabled() -> bool:
    """Whether this process routes fp32 CPU linears through oneDNN (decided once, see module doc)."""
    mode = os.environ.get("RLHF_CPU_GEMM", "auto").strip().lower() or "auto"
    if mode not in ("auto", "onednn", "blas"):
        raise ValueError(f"RLHF_CPU_GEMM must be auto, onednn or blas, got {mode!r}")
    if mode == "blas" or (mode == "auto" and _cpu_vendor() in ("GenuineIntel", "")):
        return False
    if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
        log.info("oneDNN linear unavailable in this torch build; using the default BLAS")
        return False
    try:  # a product oneDNN must get right before it is trusted with training
        g = torch.Generator().manual_seed(0)
        a, w, b = torch.randn(37, 48, generator=g), torch.randn(29, 48, generator=g), torch.randn(29, generator=g)
        ok = torch.allclose(_OneDNNLinear.apply(a, w, b), nn.functional.linear(a, w, b), rtol=1e-4, atol=1e-4)
    except Exception as err:  # noqa: BLE001 - a private op may change between torch releases
        log.warning("oneDNN linear failed its check (%s); using the default BLAS", err)
        return False
    if not ok:
        log.warning("oneDNN linear disagreed with the default BLAS; using the default BLAS")
    return ok


def use_fast_cpu_linears(model: nn.Module) -> int:
    """Route ``model``'s fp32 CPU ``nn.Linear`` layers through oneDNN where that is enabled; returns
    how many were switched. Weights, state dicts and saved checkpoints are unchanged."""
    if not onednn_linear_enabled():
        return 0
    count = 0
    for module in model.modules():
        if (type(module) is nn.Linear and module.weight.device.type == "cpu"
                and module.weight.dtype == torch.float32 and "forward" not in module.__dict__):
            module.forward = types.MethodType(_onednn_forward, module)
            count += 1
    return count
