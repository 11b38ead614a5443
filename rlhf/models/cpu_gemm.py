"""fp32 linear layers through oneDNN where, on this CPU, it beats the BLAS that torch calls by default.

PyTorch's CPU builds multiply fp32 matrices with MKL, which picks its kernels by CPU vendor: AVX-512
code on Intel, AVX2 code on AMD even when the CPU has AVX-512. oneDNN, shipped in the same torch
build, picks by instruction set. Which one is faster therefore depends on the CPU and on the
shapes (benchmarks/RESULTS.md): on an AMD EPYC with AVX-512 (family 26) oneDNN was 1.5-2.4x faster
on a 30M model's products; on an AMD EPYC without AVX-512 (family 25, Zen 3) only 0.96-1.15x, and
routing every layer there made PPO on the bundled model ~10% slower. So the choice is measured,
not assumed from the vendor.

Modes (``--cpu-gemm``, set for the process by :func:`configure` when a command starts):

* ``blas``: nothing is switched; torch's default path (also what a library user gets who never
  calls :func:`configure`);
* ``onednn``: every fp32 CPU ``nn.Linear`` goes through oneDNN;
* ``auto``: for each (in, out) shape of the model's linear layers, short timings of oneDNN against
  BLAS decide, separately for two regimes: training-sized products (the forward and both backward
  products at ``TIMING_ROWS`` rows) and decode-sized ones (the forward alone at ``SMALL_TIMING_ROWS``
  rows, used for inputs of at most ``SMALL_ROWS`` rows: one token per sequence). A layer takes
  oneDNN in a regime when it is at least 5% faster there. The regimes disagree in both directions:
  on a Zen 2 EPYC with two threads, MKL does not split a 16-row product with SmolLM2's 49152-row
  LM head across threads (62 ms, oneDNN 25 ms), while 16-row products with its 576-wide layers
  are 1.2-1.4x faster in MKL even where oneDNN wins at 512 rows. Results are cached per CPU model,
  torch version and thread count (``~/.cache/rlhf/cpu-gemm.json``, with the load average at the time), so a run on
  a machine that has measured once is deterministic: the same layers always take the same path.
  On a busy machine (load average above the core count) nothing is timed: other jobs preempt the
  products and the timing would cache noise, so such a run keeps BLAS for unmeasured shapes and
  a later, quieter run measures them. Delete the file to time again.

Both are plain IEEE fp32 (no bf16/tf32 shortcut): they differ only in summation order, at the
1e-6 relative level. A switched layer's forward and both gradients are oneDNN matmuls (an autograd
function), its weights, state dict and checkpoints unchanged. Models on other devices or in other
dtypes are untouched.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import platform
import time
import types
from pathlib import Path
from typing import NamedTuple

import torch
from torch import nn

log = logging.getLogger(__name__)

MODES = ("auto", "onednn", "blas")
_configured = {"mode": "blas"}  # the process's mode, set by configure() when a command starts


def configure(mode: str) -> None:
    """Set the routing mode for models loaded from now on in this process (called by rlhf.engine.start)."""
    if mode not in MODES:
        raise ValueError(f"--cpu-gemm must be one of {', '.join(MODES)}, got {mode!r}")
    _configured["mode"] = mode


def configured_mode() -> str:
    return _configured["mode"]


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
    # inputs that do not fit (another dtype or device after a .to()) take the plain op as well, and
    # so do inputs in a regime (decode-sized or training-sized) where BLAS was the faster path.
    small = x.numel() <= SMALL_ROWS * x.shape[-1]
    if (not (self._onednn_small if small else self._onednn_large)
            or torch.compiler.is_compiling() or x.device.type != "cpu" or x.dtype != torch.float32
            or self.weight.dtype != torch.float32 or self.weight.device.type != "cpu"
            or x.numel() * self.weight.shape[0] < MIN_ONEDNN_MACS):
        return nn.functional.linear(x, self.weight, self.bias)
    if not (torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad)):
        # Nothing to differentiate (sampling, scoring, reference passes): the op alone, without an
        # autograd node, whose Python overhead would cost more than the product at decode sizes.
        return _linear(x, self.weight, self.bias)
    return _OneDNNLinear.apply(x, self.weight, self.bias)


def cpu_model() -> str:
    """The CPU's model name and family (what the routing cache is keyed by)."""
    name, family = "", ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                key = line.split(":", 1)[0].strip()
                if key == "model name" and not name:
                    name = line.split(":", 1)[1].strip()
                elif key == "cpu family" and not family:
                    family = line.split(":", 1)[1].strip()
                if name and family:
                    break
    except OSError:
        pass
    return f"{name or platform.processor() or platform.machine()} (family {family or '?'})"


@functools.lru_cache(maxsize=None)
def onednn_available() -> bool:
    """Whether this torch build has oneDNN's linear op and it computes the right numbers."""
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


# Rows of the timed products: a training micro-batch's positions (PPO: 16 replies of ~40 tokens;
# reward training: 32 packed sequences of ~60), and a decode step's (one new token for each of a
# batch of sequences). Inputs of up to SMALL_ROWS rows take the decode-sized verdict.
TIMING_ROWS = 512
SMALL_TIMING_ROWS = 16
SMALL_ROWS = 64
ONEDNN_MARGIN = 0.95  # oneDNN must be this much faster (time ratio) to replace the default


def _best_seconds(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def time_shape(in_features: int, out_features: int, rows: int = TIMING_ROWS, repeats: int = 5,
               backward: bool = True) -> dict[str, float]:
    """Seconds for one layer's forward (+ both backward products), BLAS and oneDNN, best of ``repeats``
    (interleaved, so a burst of load from another process hits both alike)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, in_features, generator=g)
    w = torch.randn(out_features, in_features, generator=g)
    gy = torch.randn(rows, out_features, generator=g)
    if backward:
        paths = {
            "blas": lambda: (nn.functional.linear(x, w), gy @ w, gy.t() @ x),
            "onednn": lambda: (_linear(x, w), _linear(gy, w.t()), _linear(gy.t(), x.t())),
        }
    else:
        paths = {"blas": lambda: nn.functional.linear(x, w), "onednn": lambda: _linear(x, w)}
    for fn in paths.values():
        fn()  # warm up: oneDNN builds its primitives, BLAS its buffers
    best = {k: float("inf") for k in paths}
    for _ in range(repeats):
        for k, fn in paths.items():
            best[k] = min(best[k], _best_seconds(fn, 1))
    return best


def machine_load() -> float:
    """The 1-minute load average (runnable threads, ours included), 0 where the OS has none."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def cache_path() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "rlhf" / "cpu-gemm.json"


class Routing(NamedTuple):
    """Whether a layer shape's products go through oneDNN, per regime."""

    large: bool  # training-sized inputs (more than SMALL_ROWS rows)
    small: bool  # decode-sized inputs (SMALL_ROWS rows or fewer)


def _small_reaches_onednn(shape: tuple[int, int]) -> bool:
    """Whether a decode-sized input of this shape can pass MIN_ONEDNN_MACS at all (else BLAS, untimed)."""
    return SMALL_ROWS * shape[0] * shape[1] >= MIN_ONEDNN_MACS


def _entry_names(shape: tuple[int, int]) -> tuple[str, str]:
    """A shape's cache entries, in Routing's order: "KxN" for the training-sized timing (the name older
    caches used), "KxN@16" for the decode-sized one."""
    k, n = shape
    return f"{k}x{n}", f"{k}x{n}@{SMALL_TIMING_ROWS}"


def _timings_to_run(shape: tuple[int, int]) -> dict[str, dict]:
    """The cache entries a shape needs, by name, with time_shape's arguments for each."""
    large, small = _entry_names(shape)
    todo = {large: dict(rows=TIMING_ROWS, backward=True)}
    if _small_reaches_onednn(shape):
        todo[small] = dict(rows=SMALL_TIMING_ROWS, backward=False)
    return todo


def measured_routing(shapes: set[tuple[int, int]], path: Path | None = None) -> dict[tuple[int, int], Routing]:
    """For each (in, out) shape, whether oneDNN is the faster path on this CPU in each regime: from
    the cache, or timed now (and cached). Keyed by CPU model, torch version and torch's thread count."""
    from rlhf.utils.io import atomic_write_json

    path = path or cache_path()
    key = f"{cpu_model()} | torch {torch.__version__} | {torch.get_num_threads()} threads"
    try:
        cache = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    except (OSError, json.JSONDecodeError):
        cache = {}  # a damaged cache is measured again, never trusted
    entries = cache.setdefault(key, {})
    todo = {name: (shape, args) for shape in sorted(shapes) for name, args in _timings_to_run(shape).items()
            if name not in entries}
    load = machine_load()

    def routing(shape) -> Routing:  # an entry not (yet) timed keeps BLAS
        return Routing(*(bool(entries.get(name, {}).get("onednn", False)) for name in _entry_names(shape)))

    if todo and load > (os.cpu_count() or 1):
        # Other jobs preempt the timed products (a 10 ms product spans several scheduler slices),
        # so a timing now would cache noise for good: keep the default for this run, time later.
        log.warning("CPU GEMM routing: the machine is busy (load %.1f on %d cores); using the default BLAS for "
                    "%d untimed layer shape(s) this run, and timing them when it is quieter",
                    load, os.cpu_count() or 1, len(todo))
        return {s: routing(s) for s in shapes}
    for name, ((k, n), args) in todo.items():
        t = time_shape(k, n, **args)
        entries[name] = {"blas_ms": round(t["blas"] * 1e3, 4), "onednn_ms": round(t["onednn"] * 1e3, 4),
                         "onednn": t["onednn"] < ONEDNN_MARGIN * t["blas"], "load_average": round(load, 2)}
    if todo:
        try:
            atomic_write_json(path, cache)
        except OSError as err:  # a read-only home still runs, it just measures again next time
            log.warning("could not write the CPU GEMM routing cache %s: %s", path, err)
        log.info("timed %d linear product(s) on %s: %s", len(todo), key, {name: entries[name] for name in todo})
    return {s: routing(s) for s in shapes}


def _eligible(model: nn.Module) -> list[nn.Linear]:
    return [m for m in model.modules() if type(m) is nn.Linear and m.weight.device.type == "cpu"
            and m.weight.dtype == torch.float32 and "forward" not in m.__dict__]


def use_fast_cpu_linears(model: nn.Module, mode: str | None = None) -> int:
    """Route ``model``'s fp32 CPU ``nn.Linear`` layers through oneDNN as ``mode`` (default: the
    process's configured mode) decides; returns how many were switched (in either regime). Weights, state dicts and
    saved checkpoints are unchanged."""
    mode = mode or configured_mode()
    if mode not in MODES:
        raise ValueError(f"--cpu-gemm must be one of {', '.join(MODES)}, got {mode!r}")
    if mode == "blas":
        return 0
    layers = _eligible(model)
    if not layers or not onednn_available():
        return 0
    if mode == "auto":
        routes = measured_routing({(m.in_features, m.out_features) for m in layers})
    else:
        routes = {(m.in_features, m.out_features): Routing(True, True) for m in layers}
    switched = 0
    for m in layers:
        route = routes[(m.in_features, m.out_features)]
        if route.large or route.small:
            m._onednn_large, m._onednn_small = route
            m.forward = types.MethodType(_onednn_forward, m)
            switched += 1
    return switched
