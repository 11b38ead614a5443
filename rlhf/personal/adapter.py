"""A per-user LoRA adapter trained with PPO against that user's personal reward: ``rlhf personal adapter``.

The run is an ordinary ``rlhf ppo --lora`` run (rlhf/train/ppo_loop.py: KL penalty against the base
weights with the adapter off, checkpoints, exact resume), with the reward ``personal:DIR:USER@vNNNN``
pinned to the version deployed when it starts. Its runs live in ``DIR/adapter-runs/USER/vNNNN/``;
the finished adapter is published atomically to ``DIR/adapters/USER/`` with ``adapter.json``, where
the chat server (rlhf/personal/policy.py) picks it up on the user's next turn.

The reward is standardised first (``--reward-scale 0``): a personal reward is the user's log-odds,
so a confident user's rewards span tens of logits, where the KL penalty, the value head's clipped
targets and the missing-EOS penalty (all sized for rewards of order one) stop mattering and PPO
drifts into nonsense. The scale is 1 / the standard deviation of the user's reward over replies the
base policy samples for the training prompts (the distribution PPO starts from), and the mean over
those replies is subtracted (``--center-reward``): a personal reward can sit far from zero (+7
standard deviations for a user who likes long replies), and while the value head has not learned
that offset, GAE (λ < 1) hands a reply's last tokens, EOS above all, the largest share of a large
positive return, so PPO learns to stop early whatever the user wants.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass

from rlhf.config import opt
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.data.io import read_records
from rlhf.data.records import PromptRecord
from rlhf.judges.base import load_scorer, score_checked
from rlhf.models.loading import load_causal_lm, load_tokenizer, shipped_prompts
from rlhf.personal.model import ModelDir
from rlhf.personal.policy import ADAPTER_META
from rlhf.train.ppo_config import PPOConfig
from rlhf.train.ppo_loop import run_ppo
from rlhf.rollout.generate import SamplingParams, generate_completions
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
    reward_scale: float = opt(0.0, help="Multiply the user's reward by this in PPO; 0 = 1 / its standard deviation over "
                                        "base-policy replies to --calibration-prompts training prompts (unit-size rewards).")
    calibration_prompts: int = opt(64, help="Training prompts sampled once each to set --reward-scale 0 and --center-reward.")
    center_reward: bool = opt(True, help="Subtract the user's mean reward over those base-policy replies, so PPO starts "
                                         "from rewards around zero (see the module docstring for why).")

    def validate(self) -> None:
        if self.steps < 1 or not self.user.strip():
            raise ConfigError("--steps must be at least 1 and --user must name someone")
        if self.reward_scale < 0 or self.calibration_prompts < 2:
            raise ConfigError("--reward-scale must not be negative and --calibration-prompts must be at least 2")


def reward_stats(cfg: AdapterConfig, reward_spec: str) -> tuple[float, float]:
    """(mean, standard deviation) of the user's reward over one base-policy reply to each of the first
    ``calibration_prompts`` training prompts."""
    prompts = [p.prompt for p in read_records(cfg.prompts or shipped_prompts("train"), PromptRecord)][:cfg.calibration_prompts]
    tok, policy = load_tokenizer(cfg.policy), load_causal_lm(cfg.policy).eval()
    replies = [g[0] for g in generate_completions(policy, tok, prompts, 1, SamplingParams(max_new_tokens=cfg.max_new_tokens),
                                                  batch_size=32, seed=cfg.seed, progress=False)]
    scores = score_checked(load_scorer(reward_spec), prompts, replies)
    return float(scores.mean()), float(scores.std())


def train_adapter(cfg: AdapterConfig) -> dict:
    """Run PPO for the user and publish the adapter; returns the PPO summary plus where it went."""
    mdir = ModelDir(cfg.model)
    mdir.config()
    version = mdir.current()
    if version is None:
        raise ConfigError(f"{cfg.model} has no deployed user table")
    run_dir = mdir.root / "adapter-runs" / cfg.user / version
    reward = f"personal:{mdir.root}:{cfg.user}@{version}"
    mean, std = reward_stats(cfg, reward) if cfg.center_reward or not cfg.reward_scale else (0.0, 1.0)
    scale = cfg.reward_scale or 1.0 / max(std, 1e-6)
    shift = -scale * mean if cfg.center_reward else 0.0
    if scale != 1.0 or shift:
        reward = f"weighted:{scale:.6g}*{reward}" + (f"+{shift:.6g}" if shift else "")
    ppo = PPOConfig(out=str(run_dir), policy=cfg.policy, reward=reward,
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
                                                  "kl_last": summary["kl_last"], "reward_scale": scale, "reward_shift": shift,
                                                  "created": time.time()})
        publish_dir(staged, target)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    return {**summary, "adapter": str(target), "reward_version": version}
