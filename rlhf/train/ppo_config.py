"""Options of a PPO run (``rlhf ppo --help`` lists them with their defaults)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from rlhf.config import opt
from rlhf.data.context import LONG_PROMPT_HELP, LongPromptPolicy
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError


@dataclass
class PPOConfig:
    """PPO with a per-token KL penalty against the frozen reference, until a stop criterion fires."""

    out: str = opt(help="Output folder: model/ (the tuned policy), checkpoints/, metrics.jsonl, tensorboard/, summary.json.")
    policy: str = opt("bundled", help="Starting policy: a local Hugging Face causal-LM folder, or 'bundled'.")
    reward: str = opt("non-toxicity", help="Scorer to maximise: a reward-model folder (rm:DIR), classifier:DIR:LABEL[:prob], "
                                           "non-toxicity, sentiment, length, ... (see docs/reward.md).")
    prompts: str = opt("", help="Prompts file (JSON Lines with id and prompt); empty = the shipped training prompts.")
    reference: str = opt("", help="Reference model folder for the KL penalty; empty = a frozen copy of --policy "
                                  "(with --lora: the policy with its adapter switched off, no second copy).")
    # stopping
    max_steps: int = opt(60, help="Stop after this many PPO steps.")
    score_threshold: float | None = opt(None, help="Stop once a step's mean score reaches this value (unset = never).")
    kl_ceiling: float | None = opt(None, help="Stop once a step's mean KL from the reference (nats per reply) exceeds this (unset = never).")
    # rollouts
    batch_size: int = opt(32, help="Episodes (prompt + sampled reply) per PPO step, over all processes.")
    max_new_tokens: int = opt(32, help="Longest reply in tokens.")
    temperature: float = opt(1.0, help="Sampling temperature; logprobs are computed at the same temperature.")
    top_p: float = opt(1.0, help="Nucleus sampling mass (1 = off). Below 1 the sampled and scored distributions differ.")
    top_k: int = opt(0, help="Top-k sampling (0 = off).")
    long_prompts: LongPromptPolicy = opt("truncate", help=LONG_PROMPT_HELP)
    missing_eos_penalty: float = opt(1.0, help="Subtracted from the score of a reply that hit --max-new-tokens without EOS.")
    score_clip: float | None = opt(None, help="Clip scores to ±this before shaping (unset = no clipping).")
    # optimisation
    ppo_epochs: int = opt(4, help="Passes over each batch of experience.")
    mini_batch_size: int = opt(16, help="Episodes per optimizer step, over all processes.")
    micro_batch_size: int = opt(16, help="Episodes per forward/backward in each process; gradients accumulate up to "
                                         "--mini-batch-size.")
    lr: float = opt(5e-5, help="AdamW learning rate (constant).")
    weight_decay: float = opt(0.0, help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")
    cliprange: float = opt(0.2, help="PPO ratio clip ε for the policy loss.")
    cliprange_value: float = opt(0.2, help="Clip range for the value loss.")
    vf_coef: float = opt(0.1, help="Weight of the value loss.")
    ent_coef: float = opt(0.0, help="Weight of an entropy bonus (0 = off; entropy is logged either way).")
    gamma: float = opt(1.0, help="Discount γ of GAE.")
    lam: float = opt(0.95, help="λ of GAE.")
    whiten_advantages: bool = opt(True, help="Whiten advantages over each batch's response tokens.")
    # KL penalty
    init_kl_coef: float = opt(0.2, help="Initial β of the per-token KL penalty.")
    adaptive_kl: bool = opt(True, help="Adapt β toward --target-kl (Ziegler et al. 2019); off = fixed β.")
    target_kl: float = opt(4.0, help="Target KL per reply (nats) for the adaptive controller.")
    kl_horizon: int = opt(512, help="Horizon (episodes) of the adaptive KL controller: β moves by at most 20%·batch/horizon a step.")
    kl_estimator: Literal["k1", "k3"] = opt("k1", help="Per-token KL estimator in the penalty: k1 = log π/π_ref, k3 = non-negative (Schulman).")
    # LoRA
    lora: bool = opt(False, help="Train a LoRA adapter (peft); the reference is the same weights with the adapter off.")
    lora_r: int = opt(16, help="LoRA rank.")
    lora_alpha: int = opt(32, help="LoRA scaling numerator.")
    # over-optimisation watch
    gold: str = opt("", help="Held-out judge the policy is not trained on (scorer spec); empty = no watch.")
    watch_every: int = opt(5, help="Score with the gold judge every N steps.")
    watch_patience: int = opt(3, help="Flag reward hacking after this many evaluations of rising proxy and falling gold.")
    max_length_ratio: float = opt(2.0, help="Flag when mean reply length exceeds this multiple of the first evaluation's.")
    max_repetition_increase: float = opt(0.25, help="Flag when repetition rises this much above the first evaluation's.")
    stop_on_hacking: bool = opt(True, help="Stop when the watch flags reward hacking, keeping the best-gold policy as model/.")
    # bookkeeping
    save_every: int = opt(10, help="Checkpoint every N steps (and at the end).")
    keep_checkpoints: int = opt(2, help="How many recent checkpoints to keep.")
    seed: int = opt(0, help="Random seed: prompt order, sampling, minibatch shuffles.")
    resume: bool = opt(True, help="Continue from the last checkpoint in --out if there is one.")
    progress: bool = opt(True, help="Show a progress bar.")
    # May change on resume (rlhf/utils/checkpoint.py): how far to go and when to stop, not what a step does.
    resume_free: ClassVar[tuple[str, ...]] = ("max_steps", "save_every", "score_threshold", "kl_ceiling", "stop_on_hacking")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, rollout backend, ...).")

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "mini_batch_size": self.mini_batch_size,
                    "micro_batch_size": self.micro_batch_size, "ppo_epochs": self.ppo_epochs,
                    "max_new_tokens": self.max_new_tokens, "save_every": self.save_every, "watch_every": self.watch_every,
                    "kl_horizon": self.kl_horizon}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --mini-batch-size {self.mini_batch_size}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"--mini-batch-size {self.mini_batch_size} must be a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be positive (PPO needs sampled replies and their probabilities)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.lr <= 0 or self.init_kl_coef < 0 or self.target_kl <= 0:
            raise ConfigError("--lr and --target-kl must be positive and --init-kl-coef not negative")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise ConfigError("--gamma and --lam must be in [0, 1]")
        if self.kl_ceiling is not None and self.kl_ceiling <= 0:
            raise ConfigError("--kl-ceiling must be positive")
