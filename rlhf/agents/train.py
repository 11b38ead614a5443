"""RL over multi-turn episodes: PPO where only the tokens the policy wrote are actions.

One iteration reads like the algorithm:

    episodes = run(tasks)                         # ReAct episodes sampled from the policy, tools answering
    scores   = reward(episodes)                   # exact match / F1 / a judge, plus format and tool-error terms
    batch    = make_batch(episodes, scores)       # old logprobs and values, reference logprobs, per-token KL,
                                                  # rewards, GAE advantages and returns: policy tokens only
    stats    = update(batch)                      # epochs of shuffled minibatch PPO updates

An episode is one token sequence (prompt, then turns and observations); ``response_mask`` is 1 on
the tokens the policy sampled and 0 on the observations and chat-template text between turns. The
whole sequence is fed through the model (observations are context), but the loss, the KL penalty
and the advantages exist only where ``response_mask`` is 1: ``multi_turn_advantages`` (algos.py)
treats observation tokens as part of the next state, not as steps, and the policy and value losses
are masked means over policy tokens.

Built from the public pieces of the PPO stage — ``ActorCritic``, ``episode_forward`` and
``ValueHead`` (rlhf/models/policy.py), the losses and KL estimators of rlhf/algos.py,
``CheckpointManager``, ``MetricsLogger``; episodes need two masks where PPO's single-turn batch has
one: the model attends to every real token (``attention``), and the loss is taken on the policy's
(``response_mask``). Resume is exact: sampling seeds are a function of (seed, step, episode, turn)
and checkpoints hold the optimizer, the value head, the KL coefficient and the RNG.

Several processes (``accelerate launch``, rlhf/engine/distributed.py), as in the PPO stage: each
runs its share of a step's episodes (with the same per-episode seeds, so an episode does not
depend on which process ran it), advantages are whitened and statistics taken over the global
batch, a minibatch is every process's next share, and DDP averages the gradients, normalised by
the minibatch's global count of policy tokens; only the main process writes.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import ClassVar

import click
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from rlhf.agents.episode import Episode, write_episodes
from rlhf.agents.rewards import EpisodeReward, RewardConfig, exact_match, gold_answers
from rlhf.agents.runner import AgentConfig, EpisodeRunner, Task
from rlhf.algos import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, masked_whiten, multi_turn_advantages,
                        policy_loss, token_mean, value_loss)
from rlhf.config import config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.distributed import Distributed
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError, TrainingError
from rlhf.models.loading import load_model_weights
from rlhf.models.policy import CPU_CHUNK_OVERHEAD_POSITIONS, ActorCritic, ValueHead, episode_forward
from rlhf.train.optim import adamw
from rlhf.train.ppo import timed
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.metrics import MetricsLogger
from rlhf.utils.seed import epoch_order, rng_state, seed_everything, set_rng_state


@dataclass
class EpisodePPOConfig:
    """PPO over ReAct episodes (what a step samples and how it updates)."""

    steps: int = opt(30, help="PPO iterations.")
    batch_size: int = opt(32, help="Episodes sampled per iteration.")
    mini_batch_size: int = opt(16, help="Episodes per optimizer step.")
    micro_batch_size: int = opt(16, help="Episodes per forward/backward (gradients accumulate over a minibatch).")
    ppo_epochs: int = opt(2, help="Passes over each iteration's episodes.")
    lr: float = opt(2e-5, help="AdamW learning rate of policy and value head.")
    weight_decay: float = opt(0.0, help="AdamW weight decay.")
    cliprange: float = opt(0.2, help="PPO ratio clip ε.")
    cliprange_value: float = opt(0.2, help="Value clip.")
    vf_coef: float = opt(0.5, help="Weight of the value loss.")
    ent_coef: float = opt(0.0, help="Entropy bonus weight (0 = off).")
    gamma: float = opt(1.0, help="Discount per policy token.")
    lam: float = opt(0.95, help="GAE λ.")
    init_kl_coef: float = opt(0.05, help="β of the per-token KL penalty (policy tokens only).")
    adaptive_kl: bool = opt(False, help="Move β toward --target-kl.")
    target_kl: float = opt(2.0, help="Target KL per episode (nats) of the adaptive controller.")
    kl_horizon: int = opt(2000, help="Horizon of the adaptive controller, in episodes.")
    kl_estimator: str = opt("k1", help="Per-token KL estimator: k1 or k3.")
    whiten_advantages: bool = opt(True, help="Whiten advantages over the batch's policy tokens.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")

    def validate_ppo(self) -> None:
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ConfigError(f"--kl-estimator must be one of {', '.join(KL_ESTIMATORS)}")
        if min(self.steps, self.batch_size, self.mini_batch_size, self.micro_batch_size, self.ppo_epochs) < 1:
            raise ConfigError("--steps, --batch-size, --mini-batch-size, --micro-batch-size and --ppo-epochs must be ≥ 1")


@dataclass
class EpisodeBatch:
    """Episodes as tensors. B = episodes, P = prompt (left-padded), R = the rest (right-padded)."""

    query_ids: torch.Tensor      # [B, P] the prompt: chat template + tools line + question
    query_mask: torch.Tensor     # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor   # [B, R] turns and observations, in order
    attention: torch.Tensor      # [B, R] 1 on every real token (policy's and environment's)
    response_mask: torch.Tensor  # [B, R] 1 on the policy's tokens only: what gets loss, KL and advantages
    scores: torch.Tensor         # [B] episode rewards
    logprobs: torch.Tensor | None = None      # [B, R] log π_old, 0 off response_mask
    ref_logprobs: torch.Tensor | None = None  # [B, R] log π_ref, 0 off response_mask
    values: torch.Tensor | None = None        # [B, R] V_old, 0 off response_mask
    kl: torch.Tensor | None = None            # [B, R]
    rewards: torch.Tensor | None = None       # [B, R]
    advantages: torch.Tensor | None = None    # [B, R]
    returns: torch.Tensor | None = None       # [B, R]

    def select(self, idx: torch.Tensor) -> "EpisodeBatch":
        return EpisodeBatch(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[idx] for f in fields(self)})

    @classmethod
    def from_episodes(cls, episodes: list[Episode], scores: torch.Tensor, pad_id: int, device: torch.device) -> "EpisodeBatch":
        """Split each episode at its first policy token: the prompt goes left-padded into the query,
        the rest right-padded into the response, with its two masks taken from the segments' authors."""
        prompts, rests, masks = [], [], []
        for ep in episodes:
            ids, mask = ep.ids_and_mask()
            p = ep.prompt_length()
            prompts.append(ids[:p])
            rests.append(ids[p:])
            masks.append(mask[p:])
        P, R = max(len(p) for p in prompts), max(1, max(len(r) for r in rests))
        B = len(episodes)
        q = torch.full((B, P), pad_id, dtype=torch.long)
        qm = torch.zeros((B, P), dtype=torch.long)
        r = torch.full((B, R), pad_id, dtype=torch.long)
        attn = torch.zeros((B, R), dtype=torch.long)
        rm = torch.zeros((B, R), dtype=torch.long)
        for i, (p_ids, r_ids, m) in enumerate(zip(prompts, rests, masks)):
            q[i, P - len(p_ids):] = torch.tensor(p_ids, dtype=torch.long)
            qm[i, P - len(p_ids):] = 1
            if r_ids:
                r[i, :len(r_ids)] = torch.tensor(r_ids, dtype=torch.long)
                attn[i, :len(r_ids)] = 1
                rm[i, :len(r_ids)] = torch.tensor(m, dtype=torch.long)
        return cls(q.to(device), qm.to(device), r.to(device), attn.to(device), rm.to(device), scores.to(device))


class EpisodeTrainer:
    """Policy, value head, frozen reference, optimizer and KL controller; ``step`` runs one iteration.

    ``dist``: the process group (default: this process alone). The runner's rollout backend samples
    the episodes and gets the new weights after each update."""

    def __init__(self, cfg: EpisodePPOConfig, policy, reference, tokenizer, runner: EpisodeRunner, reward: EpisodeReward,
                 temperature: float, seed: int = 0, device: torch.device | str | None = None,
                 dist: Distributed | None = None):
        cfg.validate_ppo()
        self.cfg, self.policy, self.reference, self.tok = cfg, policy, reference, tokenizer
        self.runner, self.reward, self.temperature, self.seed = runner, reward, temperature, seed
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.dist = dist or Distributed(self.device.type)
        reference.eval()
        reference.requires_grad_(False)
        self.value_head = ValueHead(policy.config.hidden_size).to(self.device)
        self.params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        optimizer = adamw(self.params, self.device, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-6)
        # What training forwards call (DDP-wrapped under several processes, so that the gradients
        # of policy and value head are averaged together).
        self.actor, self.optimizer = self.dist.prepare(ActorCritic(policy, self.value_head), optimizer)
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.init_kl_coef))
        self.kl_estimator = KL_ESTIMATORS[cfg.kl_estimator]
        self.step_count = 0

    # --- stages ------------------------------------------------------------------------------

    def rollout(self, tasks: list[Task]) -> list[Episode]:
        """This process's share of the step's episodes (``tasks`` is the global batch), each sampled
        with seeds that are a function of (seed, step, episode, turn): exact resume, and the same
        episodes however many processes share the batch."""
        rows = self.dist.local_rows(len(tasks), "--batch-size")
        return self.runner.run(tasks[rows], seed=self.seed * 1_000_003 + self.step_count, first_index=rows.start)

    @torch.no_grad()
    def make_batch(self, episodes: list[Episode], scores: torch.Tensor) -> EpisodeBatch:
        """Old logprobs and values, reference logprobs, KL, rewards, advantages: all zero off the
        policy's tokens. The forwards attend to every real token; ``response_mask`` picks the scored ones."""
        batch = EpisodeBatch.from_episodes(episodes, scores, self.tok.pad_token_id, self.device)
        rm = batch.response_mask
        self.policy.eval()
        inputs = (batch.query_ids, batch.query_mask, batch.response_ids, batch.attention, self.temperature,
                  self.cfg.micro_batch_size, CPU_CHUNK_OVERHEAD_POSITIONS if self.device.type == "cpu" else None)
        out = episode_forward(self.policy, *inputs, value_head=self.value_head)
        batch.logprobs, batch.values = out.logprobs * rm, out.values * rm
        batch.ref_logprobs = episode_forward(self.reference, *inputs).logprobs * rm
        batch.kl = self.kl_estimator(batch.logprobs, batch.ref_logprobs) * rm
        batch.rewards, batch.advantages, batch.returns = multi_turn_advantages(
            batch.scores, batch.kl, batch.values, rm, self.kl_ctl.beta, self.cfg.gamma, self.cfg.lam)
        if self.cfg.whiten_advantages:  # over the global batch when several processes share it
            batch.advantages = masked_whiten(batch.advantages, rm,
                                             all_sum=self.dist.sum if self.dist.world_size > 1 else None)
        return batch

    def update(self, batch: EpisodeBatch) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; micro-batches accumulate gradients so that a
        minibatch's loss is one mean over its policy tokens however it is split (and over processes)."""
        cfg, dist = self.cfg, self.dist
        n = batch.query_ids.shape[0]
        mini = max(1, cfg.mini_batch_size // dist.world_size)  # this process's share of a minibatch
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.step_count)
        sums: dict[str, torch.Tensor] = {}
        count = 0
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        self.actor.train()
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=g).to(self.device)
            for first in range(0, n, mini):
                mb_idx = perm[first:first + mini]
                mb_tokens = dist.sum(batch.response_mask[mb_idx].sum())  # the whole minibatch's, every process
                if int(mb_tokens) == 0:
                    continue
                self.optimizer.zero_grad(set_to_none=True)
                micro = list(range(0, len(mb_idx), cfg.micro_batch_size))
                for i, m in enumerate(micro):
                    with dist.no_sync(self.actor, skip=i < len(micro) - 1):
                        stats = self._micro_step(batch.select(mb_idx[m:m + cfg.micro_batch_size]), mb_tokens)
                    for k, v in stats.items():
                        sums[k] = sums[k] + v if k in sums else v
                grad_norm = dist.clip_grad_norm_(self.actor, self.params, max_norm)
                if not torch.isfinite(grad_norm):
                    raise TrainingError(f"non-finite gradient norm at episode-PPO step {self.step_count + 1}")
                self.optimizer.step()
                sums["grad_norm"] = sums["grad_norm"] + grad_norm if "grad_norm" in sums else grad_norm
                count += 1
        self.actor.eval()
        if not count:
            return {}
        # Each process's statistics are its share of minibatch means: summed over processes, the
        # minibatch's (the gradient norm is already global).
        names = sorted(k for k in sums if k != "grad_norm")
        totals = dist.sum(torch.stack([sums[k].detach().float() for k in names]))
        out = {k: float(v) / count for k, v in zip(names, totals)}
        out["grad_norm"] = float(sums["grad_norm"]) / count
        return out

    def _micro_step(self, mb: EpisodeBatch, mb_tokens: torch.Tensor) -> dict[str, torch.Tensor]:
        """Forward (attending to every real token) and backward of one micro-batch; losses on the
        policy's tokens only, each this micro-batch's share of the minibatch's token mean."""
        cfg, rm = self.cfg, mb.response_mask
        out = self.actor(mb.query_ids, mb.query_mask, mb.response_ids, mb.attention, self.temperature,
                         entropy="loss" if cfg.ent_coef else "stats")
        logprobs, values = out.logprobs * rm, out.values * rm
        pg, pg_stats = policy_loss(logprobs, mb.logprobs, mb.advantages, rm, cfg.cliprange, normaliser=mb_tokens)
        vl, v_stats = value_loss(values, mb.values, mb.returns, rm, cfg.cliprange_value, normaliser=mb_tokens)
        loss = pg + cfg.vf_coef * vl
        if cfg.ent_coef:
            loss = loss - cfg.ent_coef * token_mean(out.entropy, rm, mb_tokens)
        if not torch.isfinite(loss):
            raise TrainingError(f"non-finite episode-PPO loss at step {self.step_count + 1} (policy {pg.item()}, value {vl.item()})")
        self.dist.backward(loss)
        with torch.no_grad():
            share = rm.sum() / mb_tokens.clamp(min=1)
            return {"policy_loss": pg.detach(), "value_loss": vl.detach(), "clipfrac": share * pg_stats["clipfrac"],
                    "approx_kl": share * pg_stats["approx_kl"], "vf_clipfrac": share * v_stats["vf_clipfrac"],
                    "entropy": token_mean(out.entropy.detach(), rm, mb_tokens)}

    # --- one iteration -----------------------------------------------------------------------

    def step(self, tasks: list[Task]) -> tuple[dict[str, float], list[Episode]]:
        """One iteration on ``tasks`` (the global batch). Returns (statistics over the global batch,
        every process's episodes in task order)."""
        timings: dict[str, float] = {}
        with timed(timings, "time_rollout"):
            episodes = self.rollout(tasks)
        with timed(timings, "time_reward"):
            scores = self.reward(episodes)
        with timed(timings, "time_forward"):
            batch = self.make_batch(episodes, scores)
        everyone = [e for share in self.dist.gather_objects(episodes) for e in share]
        stats = episode_stats(everyone)
        rm = batch.response_mask.float()
        # One row per episode, gathered from every process: [B, 4].
        rows = torch.stack([batch.scores.float(), (batch.kl * rm).sum(dim=1), rm.sum(dim=1),
                            (batch.attention.sum(dim=1) + batch.query_mask.sum(dim=1)).float()], dim=1)
        scores_all, kl, policy_tokens, episode_tokens = self.dist.gather(rows).unbind(dim=1)
        stats.update({"reward_mean": float(scores_all.mean()), "kl": float(kl.mean()), "beta": self.kl_ctl.beta,
                      "policy_tokens": float(policy_tokens.mean()), "episode_tokens": float(episode_tokens.mean())})
        with timed(timings, "time_update"):
            stats.update(self.update(batch))
            self.runner.backend.sync_weights(self.policy)
        self.kl_ctl.update(stats["kl"], len(tasks))
        self.step_count += 1
        stats.update(timings)
        return stats, everyone

    # --- checkpoints ---------------------------------------------------------------------------

    def save(self, ckpts: CheckpointManager, extra: dict) -> None:
        """A checkpoint, written by the main process while the others wait."""
        def write(d: Path) -> None:
            self.policy.save_pretrained(str(d / "model"), safe_serialization=True)
            save_file(self.value_head.state_dict(), str(d / "value_head.safetensors"))

        with self.dist.main_first() as main:
            if main:
                ckpts.save(self.step_count, write, {**extra, "kl_ctl": self.kl_ctl.state_dict()},
                           {"optimizer": self.optimizer.state_dict(), "rng": rng_state()})

    def load(self, ckpt: Path) -> None:
        load_model_weights(self.policy, ckpt / "model")
        self.value_head.load_state_dict(load_file(str(ckpt / "value_head.safetensors")))
        ts = CheckpointManager.load_trainer_state(ckpt)
        self.optimizer.load_state_dict(ts["optimizer"])
        set_rng_state(ts["rng"])
        state = CheckpointManager.load_state(ckpt)
        self.kl_ctl.load_state_dict(state["kl_ctl"])
        self.step_count = int(state["step"])


def episode_stats(episodes: list[Episode]) -> dict[str, float]:
    """What a batch of episodes looked like: exact match, answered, validity, turns."""
    n = len(episodes)
    calls = sum(e.tool_calls for e in episodes)
    return {"exact_match": sum(exact_match(e.final_answer, gold_answers(e)) for e in episodes if gold_answers(e)) / n,
            "answered": sum(e.final_answer is not None for e in episodes) / n,
            "valid_call_rate": 1 - sum(e.invalid_calls for e in episodes) / calls if calls else 1.0,
            "turns": sum(e.turns for e in episodes) / n}


# --- the run -----------------------------------------------------------------------------------

@dataclass(kw_only=True)
class AgentTrainConfig(AgentConfig, RewardConfig, EpisodePPOConfig):
    """RL over ReAct episodes: sample episodes with tools, reward final answers, PPO on the policy's tokens."""

    out: str = opt(help="Output folder: checkpoints/, metrics.jsonl, episodes of the last step, model/ at the end.")
    tasks: str = opt(help="Tasks (JSON Lines: question, answer; other fields kept), e.g. the shipped questions.jsonl.")
    policy: str = opt("bundled", help="Starting policy (a local HF causal-LM folder, e.g. an SFT output's model/, or 'bundled').")
    index: str = opt("", help="Index folder for the search tool (rlhf index build).")
    stage: str = opt("", help="Train only on tasks whose 'stage' (or 'split') field equals this (e.g. rl); empty = all tasks.")
    eval_tasks: str = opt("", help="Tasks for greedy evaluation during training (empty = none).")
    eval_stage: str = opt("held_out", help="Filter of --eval-tasks, as --stage.")
    eval_every: int = opt(10, help="Greedy exact match on the evaluation tasks every N steps (0 = never).")
    eval_limit: int = opt(60, help="Evaluate on at most this many tasks.")
    tools: list[str] = opt(factory=lambda: ["search"], help="Built-in tools: search, calc.")
    tool: list[str] = opt(factory=list, help="A user tool as module:function (its schema comes from the signature).")
    search_k: int = opt(1, help="Passages the search tool returns.")
    search_mode: str = opt("hybrid", help="Ranking of the search tool: bm25, dense or hybrid.")
    temperature: float = opt(1.0, help="Sampling temperature of RL episodes (and of the PPO log-probabilities).")
    save_every: int = opt(10, help="Checkpoint every N steps (0 = only at the end).")
    keep_checkpoints: int = opt(2, help="Checkpoints kept.")
    seed: int = opt(0, help="Seed of task order, sampling and minibatch order.")
    resume: bool = opt(True, help="Continue from the last checkpoint in --out.")
    # May change on resume (rlhf/utils/checkpoint.py): how far to go, how often to save and to look.
    resume_free: ClassVar[tuple[str, ...]] = ("steps", "save_every", "eval_every", "eval_limit")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, rollout backend, ...).")

    def validate(self) -> None:
        self.validate_ppo()
        if self.temperature <= 0:
            raise ConfigError("--temperature must be positive for RL (sampled episodes)")
        if "search" in self.tools and not self.index:
            raise ConfigError("the search tool needs --index")
        if self.batch_size % self.mini_batch_size or self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --mini-batch-size "
                              f"{self.mini_batch_size}, and that of --micro-batch-size {self.micro_batch_size}")


def select_tasks(tasks: list[Task], stage: str) -> list[Task]:
    if not stage:
        return tasks
    chosen = [t for t in tasks if stage in (t.meta.get("stage"), t.meta.get("split"))]
    if not chosen:
        raise ConfigError(f"no task has stage or split {stage!r}")
    return chosen


def agent_config(cfg) -> AgentConfig:
    """The AgentConfig part of a larger config (its fields by name)."""
    return AgentConfig(**{f.name: getattr(cfg, f.name) for f in fields(AgentConfig)})


def train_agent(cfg: AgentTrainConfig) -> dict | None:
    """Run PPO over episodes to --steps; returns the summary also written to ``out/summary.json`` (on
    the main process; the others return None)."""
    from rlhf.agents.runner import read_tasks
    from rlhf.agents.tools import make_registry
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer, save_model
    from rlhf.retrieval.index import Index
    from rlhf.rollout.backends import make_backend
    from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir

    rt = start(cfg.engine)
    dist, device = rt.dist, rt.device
    for name in ("batch_size", "mini_batch_size"):
        dist.local_rows(getattr(cfg, name), f"--{name.replace('_', '-')}")  # each must split evenly over processes
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    tok = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy, device=device, dtype=rt.dtype)
    reference = load_causal_lm(cfg.policy, device=device, dtype=rt.dtype)
    disable_dropout(policy)  # PPO's ratio needs the same function at sampling and update time
    index = Index.load(cfg.index) if cfg.index else None
    tools = make_registry(cfg.tools, index, cfg.search_k, cfg.search_mode, cfg.tool)
    tasks = select_tasks(read_tasks(cfg.tasks), cfg.stage)
    eval_tasks = select_tasks(read_tasks(cfg.eval_tasks), cfg.eval_stage)[:cfg.eval_limit] if cfg.eval_tasks else []
    backend = make_backend(rt.engine, policy, tok)
    runner = EpisodeRunner(policy, tok, tools, agent_config(cfg), backend)
    reward = EpisodeReward(RewardConfig(cfg.reward, cfg.format_bonus, cfg.tool_error_penalty), str(device))
    trainer = EpisodeTrainer(cfg, policy, reference, tok, runner, reward, cfg.temperature, cfg.seed, device, dist)
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)
    latest = ckpts.latest() if cfg.resume else None
    if latest is not None:
        check_resume_options(latest, cfg, ckpts.load_state(latest).get("config"))
        trainer.load(latest)
        if dist.is_main:
            click.echo(f"resuming from {latest} (step {trainer.step_count} of {cfg.steps})", err=True)
    logger = MetricsLogger(out, resume_step=trainer.step_count if latest is not None else None) if dist.is_main else None
    greedy = EpisodeRunner(policy, tok, tools, replace(agent_config(cfg), temperature=0.0), backend)

    def evaluate() -> dict[str, float]:
        """Greedy episodes on the evaluation tasks, split over the processes (shares may differ by one)."""
        share = eval_tasks[dist.rank::dist.world_size]
        mine = greedy.run(share, seed=cfg.seed)
        everyone = [e for part in dist.gather_objects(mine) for e in part]
        return {f"eval_{k}": v for k, v in episode_stats(everyone).items()}

    per_epoch = max(1, len(tasks) // cfg.batch_size)
    first = last = None
    bar = tqdm(total=cfg.steps, initial=trainer.step_count, desc="agent rl", unit="step", disable=not dist.is_main)
    t0 = time.perf_counter()
    try:
        while trainer.step_count < cfg.steps:
            epoch, within = divmod(trainer.step_count, per_epoch)
            order = epoch_order(len(tasks), cfg.seed, epoch) * (cfg.batch_size // len(tasks) + 1)  # repeat when tasks < batch
            chosen = [tasks[i] for i in order[within * cfg.batch_size:(within + 1) * cfg.batch_size]]
            if eval_tasks and cfg.eval_every and trainer.step_count % cfg.eval_every == 0:
                eval_stats = evaluate()
            else:
                eval_stats = {}
            stats, episodes = trainer.step(chosen)
            stats.update(eval_stats)
            if logger is not None:
                logger.log(trainer.step_count, stats)
                write_episodes(out / "episodes-last-step.jsonl", episodes)
            first = first or stats
            last = stats
            bar.update(1)
            bar.set_postfix(em=f"{stats['exact_match']:.2f}", kl=f"{stats['kl']:.2f}")
            if cfg.save_every and trainer.step_count % cfg.save_every == 0 and trainer.step_count < cfg.steps:
                trainer.save(ckpts, {"config": config_to_dict(cfg)})
        final_eval = evaluate() if eval_tasks else {}
        if final_eval and logger is not None:
            logger.log(trainer.step_count, final_eval)
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    trainer.save(ckpts, {"config": config_to_dict(cfg)})
    summary = None
    with dist.main_first() as main:
        if main:
            staged = staging_dir(out / "model")
            save_model(policy, tok, staged)
            publish_dir(staged, out / "model")
            summary = {"steps": trainer.step_count, "model": str(out / "model"),
                       "seconds_this_run": round(time.perf_counter() - t0, 1), "processes": dist.world_size,
                       "first_step": first, "last_step": last, "final_eval": final_eval, "config": config_to_dict(cfg)}
            atomic_write_json(out / "summary.json", summary)
    return summary
