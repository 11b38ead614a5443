"""Applying an :class:`EngineConfig` to the running process: the one place that changes process-wide state.

A command calls :func:`start` once, before it loads a model. It resolves ``auto`` choices (device,
threads), sets torch's thread count, bounds oneDNN's primitive caches, tells the CPU linear layers
which BLAS to use, joins the process group when a launcher started several processes, and logs
one line saying what it chose. Importing any module of this package changes nothing.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, replace

import torch

from rlhf.engine.config import EngineConfig, with_legacy_env
from rlhf.engine.distributed import Distributed
from rlhf.models import cpu_gemm
from rlhf.rollout.decode import SPLIT_MIN_PARAMETERS

log = logging.getLogger("rlhf.engine")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# oneDNN and ideep (its C++ wrapper in torch) cache a primitive, with packed weight copies, per
# product shape, up to 1024 of each. PPO's row counts change with every length-grouped chunk, and
# with the default caches the bundled model's RSS grew by ~130 MB a PPO step (449 → 981 MB in 4
# steps); with 16 entries it stays flat (573 MB, MKL: 564) at no measured cost in speed. Both are
# read when the first oneDNN primitive is made, so they are set before any model runs.
ONEDNN_CACHES = {"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "16", "LRU_CACHE_CAPACITY": "16"}


@dataclass
class Runtime:
    """What :func:`start` resolved: pass it (or its fields) to the code that loads and runs models."""

    engine: EngineConfig   # with auto choices resolved (device, threads, rollout)
    device: torch.device
    dtype: torch.dtype
    dist: Distributed

    @property
    def is_main(self) -> bool:
        return self.dist.is_main


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def auto_threads(cores: int, processes_here: int) -> int:
    """Threads per process when --threads is 0: the cores this process may use less one, shared among
    the processes of this machine, at least one.

    One core stays free for everything else, so that one other busy job (a second run, a test
    suite, the labeling server) never leaves more runnable threads than cores. When it does, an
    OpenMP thread that loses its core stalls every parallel product of its siblings at the next
    barrier: on 2 cores, reward training took 629 s instead of 145 s with one other CPU-bound job
    and torch's default of 2 threads (issue 16). The rule depends on the machine alone, not on its
    load at start, so a resumed run uses the same thread count, and computes the same bits, as the
    run it continues.
    """
    return max(1, (cores - 1) // max(1, processes_here))


def resolve(engine: EngineConfig, dist: Distributed) -> EngineConfig:
    """``engine`` with device, threads and rollout backend decided (pure: changes nothing)."""
    device = engine.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and dist.world_size > 1:
        device = f"cuda:{dist.local_rank}"
    threads = engine.threads or auto_threads(usable_cores(), dist.local_world_size)
    rollout = engine.rollout
    if rollout == "auto":
        rollout = "fast" if device == "cpu" else "hf"
    # rollout_threads 0 stays 0 (decided per model when it decodes: rlhf.rollout.decode.decode_threads),
    # unless --threads leaves nothing to decide.
    return replace(engine, device=device, threads=threads, rollout=rollout,
                   rollout_threads=engine.rollout_threads or (1 if threads == 1 else 0))


def start(engine: EngineConfig, *, quiet: bool = False) -> Runtime:
    """Apply ``engine`` to this process (once per command) and return what was resolved."""
    engine, deprecated = with_legacy_env(engine)
    dist = Distributed(device_type="cpu" if engine.device == "cpu" or
                       (engine.device == "auto" and not torch.cuda.is_available()) else "cuda")
    resolved = resolve(engine, dist)
    device = torch.device(resolved.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    for name, value in ONEDNN_CACHES.items():
        os.environ.setdefault(name, value)
    if torch.get_num_threads() != resolved.threads:
        torch.set_num_threads(resolved.threads)
    cpu_gemm.configure(resolved.cpu_gemm)
    runtime = Runtime(resolved, device, DTYPES[resolved.dtype], dist)
    line = describe(runtime)
    for message in deprecated if dist.is_main else []:
        print(f"warning: {message}", file=sys.stderr)
    if not quiet and dist.is_main and line != _said.get("last"):  # a demo's stages repeat the same section
        print(f"engine: {line}", file=sys.stderr)
        _said["last"] = line
    log.info("engine: %s", line)
    return runtime


_said: dict[str, str] = {}


def describe(rt: Runtime) -> str:
    e = rt.engine
    parts = [f"{rt.device} {e.dtype}", f"{e.threads} thread{'s' if e.threads != 1 else ''} per process "
             f"({usable_cores()} cores)", f"rollout {e.rollout}"]
    if e.rollout == "fast":
        count = (f"{e.rollout_threads} thread{'s' if e.rollout_threads != 1 else ''}" if e.rollout_threads
                 else f"1 thread, {e.threads} for models of {SPLIT_MIN_PARAMETERS // 1_000_000}M+ parameters")
        parts[-1] += f" ({count}{', compiled' if e.compile else ''})"
    if rt.device.type == "cpu":
        parts.append(f"cpu-gemm {e.cpu_gemm}")
    parts.append(rt.dist.describe())
    return ", ".join(parts)
