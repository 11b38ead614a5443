"""The optimizer every training stage uses: AdamW, with the fused kernel where the device has one."""

from __future__ import annotations

import torch


def adamw(params, device: torch.device, **kwargs) -> torch.optim.AdamW:
    """``torch.optim.AdamW`` over ``params`` (tensors or param groups); ``kwargs`` as AdamW takes them.

    The fused kernel updates every weight in one pass instead of a loop of tensor ops: measured on
    2 CPU threads, 1.8 s → 0.4 s a step for MiniLM's 22.7M weights, and on one thread 69 → 15 ms for
    a 26.5M-parameter Llama (PPO takes 8 such steps per iteration). The update is the same AdamW
    (equal within float rounding); devices without the kernel get the default implementation.
    """
    fused = True if torch.device(device).type in ("cpu", "cuda") else None
    return torch.optim.AdamW(params, fused=fused, **kwargs)
