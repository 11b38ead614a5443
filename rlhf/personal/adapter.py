"""A per-user LoRA adapter trained with PPO against that user's personal reward: ``rlhf personal adapter``.

The run is an ordinary ``rlhf ppo --lora`` run (rlhf/train/ppo_loop.py: KL penalty against the base
weights with the adapter off, checkpoints, exact resume), with the reward ``personal:DIR:USER@vNNNN``
pinned to the version deployed when it starts. Its runs live in ``DIR/adapter-runs/USER/vNNNN/``;
the finished adapter is published atomically to ``DIR/adapters/USER/`` with ``adapter.json``, where
the chat server (rlhf/personal/policy.py) picks it up on the user's next turn.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from rlhf.config import opt
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.personal.model import ModelDir
from rlhf.personal.policy import ADAPTER_META
from rlhf.train.ppo_config import PPOConfig
from rlhf.train.ppo_loop import run_ppo
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir


@dataclass
class AdapterConfig:
    """Train USER's LoRA adapter with PPO against their personal reward, and publish it for the chat server."""

    model: str = opt(help="Personal reward model folder (`rlhf personal train`); the adapter goes to MODEL/adapters/USER.")
    user: str = opt(help="Whose reward to follow (a user without a row gets the generic reward, which is rarely wanted).")
    policy: str = opt("bundled", help="Base policy the adapter is trained on (the chat server must use the same).")
    prompts: str = opt("", help="Prompts file; empty = the shipped training prompts.")
    steps: int = opt(40, help="PPO steps.")
    batch_size: int = opt(32, help="Episodes per PPO step.")
    mini_batch_size: int = opt(16, help="Episodes per optimizer step.")
    lr: float = opt(3e-4, help="Learning rate of the adapter.")
    lora_r: int = opt(8, help="LoRA rank.")
    lora_alpha: int = opt(16, help="LoRA scaling numerator.")
    init_kl_coef: float = opt(0.05, help="Initial β of the KL penalty against the base policy.")
    max_new_tokens: int = opt(48, help="Longest reply in tokens.")
    seed: int = opt(0, help="Random seed.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the PPO run executes (device, threads, rollout backend, ...).")
    progress: bool = opt(True, help="Show a progress bar.")

    def validate(self) -> None:
        if self.steps < 1 or not self.user.strip():
            raise ConfigError("--steps must be at least 1 and --user must name someone")


def train_adapter(cfg: AdapterConfig) -> dict:
    """Run PPO for the user and publish the adapter; returns the PPO summary plus where it went."""
    mdir = ModelDir(cfg.model)
    mdir.config()
    version = mdir.current()
    if version is None:
        raise ConfigError(f"{cfg.model} has no deployed user table")
    run_dir = mdir.root / "adapter-runs" / cfg.user / version
    ppo = PPOConfig(out=str(run_dir), policy=cfg.policy, reward=f"personal:{mdir.root}:{cfg.user}@{version}",
                    prompts=cfg.prompts, max_steps=cfg.steps, batch_size=cfg.batch_size,
                    mini_batch_size=cfg.mini_batch_size, micro_batch_size=cfg.mini_batch_size, lr=cfg.lr,
                    lora=True, lora_r=cfg.lora_r, lora_alpha=cfg.lora_alpha, init_kl_coef=cfg.init_kl_coef,
                    max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, engine=cfg.engine,
                    progress=cfg.progress, save_every=max(1, cfg.steps // 4))
    ppo.validate()
    summary = run_ppo(ppo)
    adapter = run_dir / "model" / "adapter"
    if not (adapter / "adapter_config.json").is_file():
        raise ConfigError(f"the PPO run left no adapter in {adapter}")
    target = mdir.root / "adapters" / cfg.user
    staged = staging_dir(target)
    try:
        shutil.copytree(adapter, staged, dirs_exist_ok=True)
        atomic_write_json(staged / ADAPTER_META, {"version": f"{version}-ppo{summary['steps']}", "user": cfg.user,
                                                  "reward": ppo.reward, "policy": cfg.policy, "steps": summary["steps"],
                                                  "score_first": summary["score_first"], "score_last": summary["score_last"],
                                                  "kl_last": summary["kl_last"], "created": time.time()})
        publish_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {**summary, "adapter": str(target), "reward_version": version}
