"""How stages run: device, precision, threads, rollout backend, CPU fast paths, several processes.

* ``rlhf.engine.config.EngineConfig``: the typed ``engine`` section of every stage that trains or
  samples (its flags are in each verb's --help; it is saved in each run's config);
* ``rlhf.engine.runtime.start(cfg.engine)``: applies it to the process, once, in the command that
  runs, and returns a ``Runtime`` (resolved device, dtype, threads, and the process group);
* ``rlhf.engine.distributed.Distributed``: the process group (one process, or N under
  ``accelerate launch`` / ``torchrun``).

This package imports nothing heavy here, so a verb's ``--help`` stays fast.
"""

from rlhf.engine.config import EngineConfig

__all__ = ["EngineConfig"]
