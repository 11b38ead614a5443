"""The ``engine`` section of every stage that trains or samples: how it runs, not what it computes.

One dataclass, passed explicitly (``cfg.engine``), shown in each verb's ``--help`` and saved in each
run's config. Nothing here touches the process: :func:`rlhf.engine.runtime.start` applies the few
settings that must be process-wide, once, in the command that runs.
"""

from __future__ import annotations

import os
import typing
import warnings
from dataclasses import dataclass, replace
from typing import Literal

from rlhf.config import opt
from rlhf.errors import ConfigError

Rollout = Literal["auto", "fast", "hf", "vllm"]
Gemm = Literal["auto", "onednn", "blas"]
DType = Literal["float32", "bfloat16", "float16"]


@dataclass
class EngineConfig:
    """How a stage runs: device and precision, CPU threads, the rollout backend and the CPU fast paths."""

    device: str = opt("auto", help="cpu, cuda, cuda:N, or auto (a GPU when there is one). Under a multi-process "
                                   "launcher each process takes the GPU of its local rank.")
    dtype: DType = opt("float32", help="Precision of the models' weights and products. float32 on CPUs (bf16 is far "
                                       "slower there); bfloat16 on recent GPUs.")
    threads: int = opt(0, help="CPU threads per process for torch's products (0 = auto: the cores this process may "
                               "use less one, shared among this machine's processes, at least 1; the free core keeps "
                               "one other busy job from stalling every parallel product, which on 2 cores made steps "
                               "several times slower).")
    rollout: Rollout = opt("auto", help="How replies are sampled: fast = our decode loop (static KV cache, lean "
                                        "steps; CPU), hf = transformers' generate (the reference path), vllm = a vLLM "
                                        "engine on the GPU that receives the policy's weights after every update "
                                        "(pip install '.[vllm]'); auto = fast on CPU, hf elsewhere.")
    rollout_threads: int = opt(0, help="CPU threads while the fast loop samples; 0 = by model size: --threads for a "
                                       "model of 20M parameters or more (its per-token products are large enough to "
                                       "split), 1 below (a tiny model's are not, and a waiting thread costs more).")
    compile: bool = opt(False, help="torch.compile the fast loop's one-token step (tens of seconds per new batch "
                                    "shape; falls back to eager if compilation fails).")
    cpu_gemm: Gemm = opt("auto", help="fp32 linear layers on a CPU: blas = torch's default BLAS (MKL), onednn = "
                                      "oneDNN, auto = per layer shape whichever a short timing on this CPU found "
                                      "faster (cached per CPU model in the user's cache folder).")
    packing: bool = opt(True, help="Reward training: padding-free batches (sequences packed end to end with a "
                                   "block-diagonal mask; same rewards and gradients as padding, less work). Checked "
                                   "on real inputs at the start; backbones it cannot reproduce are padded.")
    sampler_logprobs: bool = opt(True, help="PPO: take the old logprobs and values from the sampling loop (recorded "
                                            "per token while decoding) instead of a second forward pass over the "
                                            "replies. Off = recompute them (for samplers whose numbers differ from a "
                                            "training forward, e.g. vLLM or low precision).")
    vllm_gpu_memory: float = opt(0.3, help="vLLM: share of the GPU's memory its engine may take (weights and KV "
                                           "cache); the rest stays for training.")

    def validate(self) -> None:
        if self.threads < 0 or self.rollout_threads < 0:
            raise ConfigError("--threads and --rollout-threads must not be negative")
        if not 0 < self.vllm_gpu_memory < 1:
            raise ConfigError("--vllm-gpu-memory must be in (0, 1)")
        if self.device != "auto" and not self.device.split(":")[0] in ("cpu", "cuda", "mps", "xpu"):
            raise ConfigError(f"--device must be cpu, cuda, cuda:N or auto, got {self.device!r}")


# The environment variables that tuned these paths before this section existed. They still work,
# read when a command starts (never at import), each with a deprecation message.
LEGACY_ENV = {
    "RLHF_CPU_GEMM": ("cpu_gemm", lambda v: v.strip().lower()),
    "RLHF_FAST_DECODE": ("rollout", lambda v: "hf" if v.strip() == "0" else "fast"),
    "RLHF_DECODE_COMPILE": ("compile", lambda v: v.strip() not in ("", "0")),
    "RLHF_DECODE_THREADS": ("rollout_threads", lambda v: int(v)),
}


def with_legacy_env(engine: EngineConfig, environ: dict[str, str] | None = None) -> tuple[EngineConfig, list[str]]:
    """``engine`` with the old environment variables applied where its option is still at the default.

    Returns the new config and one deprecation message per variable that was set. A variable never
    overrides an option given on the command line or in the YAML file (one that differs from its
    default)."""
    environ = os.environ if environ is None else environ
    defaults = EngineConfig()
    changes, messages = {}, []
    for var, (name, parse) in LEGACY_ENV.items():
        raw = environ.get(var)
        if raw is None or raw.strip() == "":
            continue
        flag = "--" + name.replace("_", "-")
        try:
            value = parse(raw)
        except ValueError:
            raise ConfigError(f"{var}={raw!r} is not a valid value for {flag}") from None
        if getattr(engine, name) != getattr(defaults, name):
            messages.append(f"{var} is deprecated and ignored here: {flag} was given")
            continue
        changes[name] = value
        messages.append(f"{var} is deprecated: use {flag} {str(value).lower() if isinstance(value, bool) else value}")
    out = replace(engine, **changes)
    if changes:
        hints = typing.get_type_hints(EngineConfig)
        for name, value in changes.items():  # the same checks as a flag gets
            choices = typing.get_args(hints[name]) if typing.get_origin(hints[name]) is Literal else ()
            if choices and value not in choices:
                raise ConfigError(f"{next(v for v, (n, _) in LEGACY_ENV.items() if n == name)}={value!r}: "
                                  f"expected one of {', '.join(choices)}")
        out.validate()
    for m in messages:
        warnings.warn(m, DeprecationWarning, stacklevel=2)
    return out, messages
