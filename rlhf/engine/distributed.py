"""Several processes, one stage: data parallelism (DDP) through accelerate.

Started by ``accelerate launch`` (or ``torchrun``), every process runs the same command. Each one
reads its own shard of every global batch, and gradients are averaged across processes before
the optimizer step, so N processes take the same steps as one process with the same global batch.
Only the main process (rank 0) writes checkpoints, metrics and models; the others wait for it.

Run alone, :class:`Distributed` is a thin shell: nothing is wrapped, every collective is the
identity, and a stage computes exactly what it computed before this module existed.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any, Sequence

import torch

from rlhf.errors import ConfigError


def launched_world_size(environ: dict[str, str] | None = None) -> int:
    """How many processes the launcher started (1 when there is none)."""
    environ = os.environ if environ is None else environ
    return int(environ.get("WORLD_SIZE", "1") or 1)


def sharded_engine_requested(environ: dict[str, str] | None = None) -> str | None:
    """"FSDP" or "DeepSpeed" when the launcher's accelerate config asks for one (None otherwise).

    Read from the variables ``accelerate launch`` sets from the config file, because on a CPU
    accelerate itself drops both silently (it enables FSDP only for GPU-like devices and DeepSpeed
    only when ``cpu`` is off) and would train plain DDP under a config that says FSDP.
    """
    environ = os.environ if environ is None else environ
    for name, kind in (("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")):
        if environ.get(name, "false").lower() == "true":
            return kind
    return None


def _unsupported_engine(kind: str) -> ConfigError:
    # DeepSpeed's engine steps the optimizer inside backward() after a fixed number of accumulation
    # steps (the trainers here accumulate a varying number of length-grouped micro-batches); FSDP
    # shards the weights, which every checkpoint and PPO's sampling read whole from the main process.
    # Neither is wired in yet: refuse rather than train or save something else.
    return ConfigError(f"{kind} is not supported by rlhf's trainers yet (docs/scaling.md); use configs/accelerate/ddp.yaml")


class Distributed:
    """Rank, world size and the few collectives the trainers use. B = global batch, N = processes."""

    def __init__(self, device_type: str = "cpu"):
        self.accelerator = None
        self.rank, self.world_size, self.local_rank, self.local_world_size = 0, 1, 0, 1
        if launched_world_size() > 1:
            sharded = sharded_engine_requested()  # before accelerate, which on a CPU would quietly run DDP
            if sharded:
                raise _unsupported_engine(sharded)
            # accelerate is imported only for multi-process runs: a single process needs none of it.
            from accelerate import Accelerator
            from accelerate.utils import DistributedType

            # cpu=True makes accelerate pick gloo; on GPUs it picks NCCL and one device per process.
            self.accelerator = Accelerator(cpu=device_type == "cpu")
            state = self.accelerator.state
            if state.distributed_type == DistributedType.NO:
                raise ConfigError("WORLD_SIZE > 1 but accelerate set up no process group; start the run with "
                                  "`accelerate launch --config_file configs/accelerate/ddp.yaml ...` or torchrun")
            # Still possible past the check above, e.g. FSDP that accelerate derives from a context-parallel config.
            if state.distributed_type in (DistributedType.DEEPSPEED, DistributedType.FSDP):
                raise _unsupported_engine(state.distributed_type.value)
            self.rank, self.world_size = state.process_index, state.num_processes
            self.local_rank = state.local_process_index
            self.local_world_size = int(os.environ.get("LOCAL_WORLD_SIZE", self.world_size))

    # --- who does what ---------------------------------------------------------------------------

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def device(self) -> torch.device | None:
        """The device accelerate gave this process (None when single-process: the engine decides)."""
        return None if self.accelerator is None else self.accelerator.device

    def local_rows(self, n: int, what: str = "batch") -> slice:
        """This process's contiguous share of ``n`` global rows (ranks in order cover each row once)."""
        if n % self.world_size:
            raise ConfigError(f"a {what} of {n} does not split evenly over {self.world_size} processes; "
                              f"use a multiple of {self.world_size}")
        per = n // self.world_size
        return slice(self.rank * per, (self.rank + 1) * per)

    def shard(self, items: Sequence, what: str = "batch") -> list:
        return list(items[self.local_rows(len(items), what)])

    # --- collectives (identity for one process) ------------------------------------------------

    def sum(self, t: torch.Tensor) -> torch.Tensor:
        """Elementwise sum over processes (same shape on every one)."""
        if self.accelerator is None:
            return t
        return self.accelerator.reduce(t.clone(), reduction="sum")

    def gather(self, t: torch.Tensor) -> torch.Tensor:
        """Rows of every process, rank order: [b, ...] each → [N·b, ...] (b the same everywhere)."""
        if self.accelerator is None:
            return t
        return self.accelerator.gather(t.contiguous())

    def gather_objects(self, obj: Any) -> list:
        """One picklable object per process → the list of all of them, rank order, on every process."""
        if self.accelerator is None:
            return [obj]
        from accelerate.utils import gather_object

        return gather_object([obj])

    def barrier(self) -> None:
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    @contextlib.contextmanager
    def main_first(self):
        """The main process runs the block (e.g. writes a checkpoint); the others wait until it is done."""
        try:
            yield self.is_main
        finally:
            self.barrier()

    # --- training ------------------------------------------------------------------------------

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        """(model to call for training forwards, optimizer): DDP/FSDP/DeepSpeed-wrapped when multi-process."""
        if self.accelerator is None:
            return model, optimizer
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of this process's share. DDP averages gradients over processes, so a loss that is
        this process's part of a global sum is scaled by N here: the gradient is then the global one."""
        if self.accelerator is None:
            loss.backward()
        else:
            self.accelerator.backward(loss * self.world_size)

    def no_sync(self, model: torch.nn.Module, skip: bool = True):
        """Accumulate gradients locally (no all-reduce) for all but the last backward of a step."""
        if self.accelerator is None or not skip:
            return contextlib.nullcontext()
        return self.accelerator.no_sync(model)

    def clip_grad_norm_(self, model: torch.nn.Module, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        if self.accelerator is None:
            return torch.nn.utils.clip_grad_norm_(params, max_norm)
        return self.accelerator.clip_grad_norm_(model.parameters(), max_norm)

    def unwrap(self, model: torch.nn.Module) -> torch.nn.Module:
        return model if self.accelerator is None else self.accelerator.unwrap_model(model)

    def describe(self) -> str:
        if self.accelerator is None:
            return "1 process"
        return (f"process {self.rank} of {self.world_size} ({self.accelerator.state.distributed_type.value}, "
                f"backend {self.accelerator.state.backend})")
