"""Critic-free online RL: GRPO (Shao et al. 2024) and RLOO (Ahmadian et al. 2024) with a KL to the reference.

Each step samples G replies for each of a batch of prompts, scores them, and lets each reply's
group be its baseline — no value model:

    rollout = generate(prompts × G)                  # the sampling loop records each token's logprob
    scores  = score(rollout)                         # scorer, minus the missing-EOS penalty
    exp     = make_experience(rollout, scores)       # reference logprobs, KL, group advantages
    check stop criteria and the over-optimisation watch on these rollouts
    update(exp)                                      # clipped objective (+ β·k3 KL in the loss)

Advantages are GRPO's (r − group mean) / group std (``--no-scale-std``: only centred, as Dr. GRPO
argues) or RLOO's r − mean of the other G − 1 replies, from ``rlhf.algos``. The KL to the reference
goes either into the loss, as the k3 estimator per token (GRPO's choice), or into each reply's reward
as −β·Σ_t log π/π_ref before the baselines (RLOO's). The loss is averaged per token (DAPO) or per
reply (GRPO as written), ``--loss-aggregation``.

What is shared with PPO, so the two behave the same where they should: the engine section and
rollout backend (``make_backend``, per-episode seeds), the one batch record (``Experience``), the
log-probability forward (``policy_forward``, length-grouped chunks), scorer checks, prompt order
(``step_prompts``), model loading, the over-optimisation watch and the policy publisher
(``rlhf.train.ppo_loop``), checkpoints with their resume check and metrics. Stop criteria are
checked on a step's rollouts before its update, as in PPO. Exact resume: the prompts of a step are
a function of (seed, step), sampling of (seed, step, episode), minibatch shuffles of (seed, step),
and checkpoints hold the weights (or adapter), optimizer, watch and RNG state.

In the ``Experience`` record, ``rewards`` [B, R] are PPO's layout (−β·KL_t per token with
``--kl-in reward``, the score on the last token), so a reply's sum is what its group's baseline
sees; ``advantages`` [B, R] hold the reply's one advantage on each of its tokens; ``values`` stay
empty. Under ``accelerate launch`` each process samples whole groups (its share of the step's
prompts), statistics are global, and gradients are averaged as PPO's are.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import click
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf.algos import (entropy_from_logits, group_advantages, grpo_policy_loss, kl_k1, kl_penalised_scores,
                        kl_shaped_rewards, masked_mean, rloo_advantages)
from rlhf.config import config_command, config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.distributed import Distributed
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError, TrainingError
from rlhf.judges import load_scorer, score_checked
from rlhf.models.loading import load_model_weights, shipped_prompts
from rlhf.models.policy import CPU_CHUNK_OVERHEAD_POSITIONS, length_chunks, policy_forward
from rlhf.rollout.backends import RolloutBackend, make_backend
from rlhf.rollout.experience import Experience
from rlhf.rollout.generate import SamplingParams, sample_tokens
from rlhf.train.branch_packing import Segment, pack_branches, packed_logits, packing_problem, to_rows, token_logprobs
from rlhf.train.optim import adamw
from rlhf.train.ppo import episode_seeds, timed
from rlhf.train.ppo_loop import _load_models, _publish_policy, _resume_note, _Watcher, check_stops, finish_run, step_prompts
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.metrics import MetricsLogger, peak_rss_mb, read_metrics
from rlhf.utils.seed import rng_state, seed_everything, set_rng_state

@dataclass
class GRPOConfig:
    """GRPO or RLOO: G sampled replies per prompt, each scored against its group, until a stop criterion fires."""

    out: str = opt(help="Output folder: model/ (the tuned policy), checkpoints/, metrics.jsonl, tensorboard/, summary.json.")
    policy: str = opt("bundled", help="Starting policy: a local Hugging Face causal-LM folder, or 'bundled'.")
    reward: str = opt("non-toxicity", help="Scorer to maximise: rm:DIR, classifier:DIR:LABEL[:prob], non-toxicity, "
                                           "sentiment, length, weighted:... (see docs/reward.md).")
    prompts: str = opt("", help="Prompts file (JSON Lines with id and prompt); empty = the shipped training prompts.")
    reference: str = opt("", help="Reference model folder for the KL; empty = a frozen copy of --policy (with --lora: "
                                  "the policy with its adapter switched off).")
    group_size: int = opt(4, help="G: replies sampled per prompt; each reply's baseline comes from its group.")
    estimator: Literal["grpo", "rloo"] = opt("grpo", help="grpo = (r − group mean) / group std; rloo = r − mean of the "
                                                          "other G − 1 replies.")
    scale_std: bool = opt(True, help="GRPO: divide by the group's std (off = only centre, as Dr. GRPO recommends).")
    # stopping
    max_steps: int = opt(60, help="Stop after this many steps.")
    score_threshold: float | None = opt(None, help="Stop once a step's mean score reaches this value (unset = never).")
    kl_ceiling: float | None = opt(None, help="Stop once a step's mean KL from the reference (nats per reply) exceeds this.")
    # rollouts
    batch_size: int = opt(32, help="Episodes (replies) per step over all processes: batch-size / group-size prompts, "
                                   "G replies each.")
    max_new_tokens: int = opt(32, help="Longest reply in tokens.")
    temperature: float = opt(1.0, help="Sampling temperature; logprobs are computed at the same temperature.")
    top_p: float = opt(1.0, help="Nucleus sampling mass (1 = off).")
    top_k: int = opt(0, help="Top-k sampling (0 = off).")
    missing_eos_penalty: float = opt(1.0, help="Subtracted from the score of a reply that hit --max-new-tokens without EOS.")
    score_clip: float | None = opt(None, help="Clip scores to ±this before the baselines (unset = no clipping).")
    # optimisation
    ppo_epochs: int = opt(1, help="Passes over each batch of experience (GRPO's μ).")
    mini_batch_size: int = opt(32, help="Episodes per optimizer step, over all processes.")
    micro_batch_size: int = opt(16, help="Episodes per forward/backward in each process; gradients accumulate up to "
                                         "--mini-batch-size.")
    lr: float = opt(5e-5, help="AdamW learning rate (constant).")
    weight_decay: float = opt(0.0, help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")
    cliprange: float = opt(0.2, help="Ratio clip ε of the objective.")
    loss_aggregation: Literal["token", "sequence"] = opt("token", help="token = mean over the minibatch's reply tokens "
                                                                       "(DAPO); sequence = mean over replies of their "
                                                                       "token means (GRPO as published).")
    # KL to the reference
    kl_coef: float = opt(0.04, help="β of the KL to the reference (0 = none; the KL is still measured).")
    kl_in: Literal["loss", "reward"] = opt("loss", help="loss = β·k3 per token in the objective (GRPO); reward = "
                                                        "−β·Σ log π/π_ref per reply before the baselines (RLOO).")
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
    # May change on resume (rlhf/utils/checkpoint.py): when to stop and how often to save, as for PPO.
    resume_free: ClassVar[tuple[str, ...]] = ("max_steps", "save_every", "score_threshold", "kl_ceiling", "stop_on_hacking")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, rollout backend, "
                                                          "packing: a prompt read once with its G replies, ...).")

    def validate(self) -> None:
        positive = {"max_steps": self.max_steps, "batch_size": self.batch_size, "mini_batch_size": self.mini_batch_size,
                    "micro_batch_size": self.micro_batch_size, "ppo_epochs": self.ppo_epochs,
                    "max_new_tokens": self.max_new_tokens, "save_every": self.save_every, "watch_every": self.watch_every}
        for name, value in positive.items():
            if value < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be at least 1, got {value}")
        if self.group_size < 2:
            raise ConfigError(f"--group-size must be at least 2 (a reply's baseline is its group), got {self.group_size}")
        if self.batch_size % self.group_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --group-size {self.group_size}")
        if self.batch_size % self.mini_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --mini-batch-size {self.mini_batch_size}")
        if self.mini_batch_size % self.micro_batch_size:
            raise ConfigError(f"--mini-batch-size {self.mini_batch_size} must be a multiple of --micro-batch-size "
                              f"{self.micro_batch_size}")
        if self.temperature <= 0:
            raise ConfigError("--temperature must be positive (the objective needs sampled replies and their probabilities)")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.lr <= 0 or self.kl_coef < 0 or self.cliprange <= 0:
            raise ConfigError("--lr and --cliprange must be positive and --kl-coef not negative")
        if self.kl_ceiling is not None and self.kl_ceiling <= 0:
            raise ConfigError("--kl-ceiling must be positive")


def reply_logprobs(model, q: torch.Tensor, qm: torch.Tensor, r: torch.Tensor, rm: torch.Tensor, group: torch.Tensor,
                   pad_id: int, temperature: float, packing: bool, entropy: str | None = None):
    """Per-token log-probabilities [n, R] of the replies (0 past each one), and their entropy [n, R]
    without gradients when ``entropy="stats"`` (else None): packed (a prompt once with its group's
    replies as branches, rlhf/train/branch_packing.py) or padded rows (``policy_forward``)."""
    if not packing:
        out = policy_forward(model, q, qm, r, rm, temperature, entropy=entropy)
        return out.logprobs, out.entropy
    packed = pack_branches(_segments(q, qm, r, rm, group), pad_id).to(q.device)
    logits = packed_logits(model, packed, temperature)
    logprobs = to_rows(token_logprobs(logits, packed), packed, r.shape[1])
    ent = None
    if entropy is not None:
        with torch.no_grad():
            ent = to_rows(entropy_from_logits(logits.detach()), packed, r.shape[1])
    return logprobs, ent


class ReplyLogprobs(nn.Module):
    """``reply_logprobs`` of the policy as a module: what a training forward calls, and what several
    processes wrap (the packed path reaches the backbone directly, so DDP must see this forward)."""

    def __init__(self, policy: nn.Module, pad_id: int, temperature: float):
        super().__init__()
        self.policy, self.pad_id, self.temperature = policy, pad_id, temperature

    def forward(self, q, qm, r, rm, group, packing: bool, entropy: str | None = None):
        return reply_logprobs(self.policy, q, qm, r, rm, group, self.pad_id, self.temperature, packing, entropy)


class GRPOTrainer:
    """Holds the policy, reference, scorer and optimizer; ``grpo_step`` runs one iteration.

    ``dist``: the process group (default: this process alone); ``backend``: how replies are sampled
    (default: the one ``cfg.engine.rollout`` names)."""

    def __init__(self, cfg: GRPOConfig, policy, tokenizer, scorer, reference=None, device: torch.device | str | None = None,
                 dist: Distributed | None = None, backend: RolloutBackend | None = None):
        self.cfg, self.policy, self.tok, self.scorer, self.reference = cfg, policy, tokenizer, scorer, reference
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.dist = dist or Distributed(self.device.type)
        if reference is None and not hasattr(policy, "disable_adapter"):
            raise TrainingError("GRPO needs a reference model, or a LoRA policy whose adapter can be switched off")
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)
        self.params = [p for p in policy.parameters() if p.requires_grad]
        optimizer = adamw(self.params, self.device, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.actor, self.optimizer = self.dist.prepare(ReplyLogprobs(policy, tokenizer.pad_token_id, cfg.temperature),
                                                       optimizer)
        self.backend = backend or make_backend(cfg.engine, policy, tokenizer)
        self.step = 0
        self.packing: bool | None = None if cfg.engine.packing else False  # decided on the first rollout

    # --- stages ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Experience:
        """G replies for each prompt, prompt-major (prompt i's replies are rows i·G … i·G + G − 1);
        this process samples its share of those rows (whole groups)."""
        cfg = self.cfg
        episodes = [p for p in prompts for _ in range(cfg.group_size)]
        rows = self.dist.local_rows(len(episodes), "--batch-size")
        params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        seeds = episode_seeds(cfg.seed, self.step, rows.start, rows.stop - rows.start)
        self.policy.eval()
        return sample_tokens(self.policy, self.tok, episodes[rows], params, record=cfg.engine.sampler_logprobs,
                             backend=self.backend, seeds=seeds)

    @torch.no_grad()
    def score(self, exp: Experience) -> torch.Tensor:
        """Scores [B] (checked: finite, shape [B]), penalised where a reply has no EOS, optionally clipped."""
        exp.raw_scores = score_checked(self.scorer, exp.prompts, exp.texts)
        scores = exp.raw_scores - self.cfg.missing_eos_penalty * (~exp.ended_with_eos.cpu()).float()
        if self.cfg.score_clip:
            scores = scores.clamp(-self.cfg.score_clip, self.cfg.score_clip)
        exp.scores = scores.to(self.device)
        return exp.scores

    @torch.no_grad()
    def make_experience(self, exp: Experience) -> Experience:
        """Reference logprobs (and the old ones, unless the sampler recorded them), KL, the rewards
        the baselines see, and one advantage per reply from its group, on ``exp``."""
        cfg = self.cfg
        q, qm, r, rm = exp.query_ids, exp.query_mask, exp.response_ids, exp.response_mask
        group = self._groups(len(exp))
        if self.packing is None:
            self.packing = self._check_packing(q, qm, r, rm, group)
        recorded = exp.logprobs is not None
        logprobs = exp.logprobs * rm if recorded else torch.zeros(r.shape, device=r.device)
        ref_logprobs = torch.zeros(r.shape, device=r.device)
        for rows in self._chunks(qm, rm, group):  # rows are independent here: any chunking is exact
            chunk = (q[rows], qm[rows], r[rows], rm[rows], group[rows], self.tok.pad_token_id, cfg.temperature, self.packing)
            if not recorded:
                logprobs[rows] = reply_logprobs(self.policy, *chunk)[0]
            with self._reference() as ref_model:
                ref_logprobs[rows] = reply_logprobs(ref_model, *chunk)[0]
        exp.logprobs, exp.ref_logprobs, exp.hidden = logprobs, ref_logprobs, None
        exp.kl = kl_k1(logprobs, ref_logprobs) * rm
        beta = cfg.kl_coef if cfg.kl_in == "reward" else 0.0
        exp.rewards = kl_shaped_rewards(exp.scores, exp.kl, rm, beta)  # [B, R], for the record (PPO's layout)
        per_reply = kl_penalised_scores(exp.scores, exp.kl, rm, beta) if beta else exp.scores  # [B]: the same sums
        groups = per_reply.view(-1, cfg.group_size)
        if cfg.estimator == "rloo":
            advantages = rloo_advantages(groups)
        else:
            advantages = group_advantages(groups, scale_std=cfg.scale_std)
        exp.advantages = advantages.reshape(-1, 1) * rm  # [B, R]: each reply's advantage on its tokens
        return exp

    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; micro-batches accumulate gradients so that a
        minibatch's loss is one token (or reply) mean however it is split, and over however many processes."""
        cfg, dist = self.cfg, self.dist
        n = len(exp)
        mini = cfg.mini_batch_size // dist.world_size  # this process's share of a minibatch
        group = self._groups(n)
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)  # a function of (seed, step): exact resume
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        sums: dict[str, torch.Tensor] = {}
        count = 0
        self.actor.train()
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=g).to(self.device)
            for first in range(0, n, mini):
                mb_idx = perm[first:first + mini]
                # the whole minibatch's token (or reply) count, over every process
                normaliser = (dist.sum(exp.response_mask[mb_idx].sum()) if cfg.loss_aggregation == "token"
                              else len(mb_idx) * dist.world_size)
                self.optimizer.zero_grad(set_to_none=True)
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                chunks = self._chunks(exp.query_mask[mb_idx], exp.response_mask[mb_idx], group[mb_idx])
                for i, rows in enumerate(chunks):  # gradients averaged over processes once, at the last backward
                    with dist.no_sync(self.actor, skip=i < len(chunks) - 1):
                        loss, stats = self._micro_step(exp.select(mb_idx[rows]), group[mb_idx[rows]], normaliser)
                    finite &= torch.isfinite(loss)
                    for k, v in stats.items():
                        sums[k] = sums[k] + v if k in sums else v
                grad_norm = dist.clip_grad_norm_(self.actor, self.params, max_norm)
                if not bool(finite & torch.isfinite(grad_norm)):  # the one host sync of a minibatch
                    raise TrainingError(f"non-finite GRPO loss or gradient at step {self.step + 1}")
                self.optimizer.step()
                sums["grad_norm"] = sums["grad_norm"] + grad_norm if "grad_norm" in sums else grad_norm
                count += 1
        self.actor.eval()
        # Each process's statistics are its share of minibatch means; the gradient norm is already global.
        names = sorted(k for k in sums if k != "grad_norm")
        totals = dist.sum(torch.stack([sums[k].detach().float() for k in names]))
        return {**{k: float(v) / count for k, v in zip(names, totals)}, "grad_norm": float(sums["grad_norm"]) / count}

    def _micro_step(self, mb: Experience, group: torch.Tensor, normaliser) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg, rm = self.cfg, mb.response_mask
        logprobs, entropy = self.actor(mb.query_ids, mb.query_mask, mb.response_ids, rm, group, self.packing, "stats")
        beta = cfg.kl_coef if cfg.kl_in == "loss" else 0.0
        # every reply has at least one token, so column 0 holds each reply's advantage
        loss, stats = grpo_policy_loss(logprobs, mb.logprobs, mb.advantages[:, 0], rm, cfg.cliprange,
                                       mb.ref_logprobs, beta, cfg.loss_aggregation, normaliser)
        self.dist.backward(loss)  # this micro-batch's part of the minibatch loss; update() reports a non-finite one
        with torch.no_grad():
            # the loss is already this micro-batch's share; per-token statistics are weighted by token share
            share = rm.sum() / max(float(normaliser), 1.0) if cfg.loss_aggregation == "token" else len(rm) / float(normaliser)
            stats = {"policy_loss": loss.detach(), **{k: share * v for k, v in stats.items()},
                     "entropy": share * masked_mean(entropy, rm)}
        return loss.detach(), stats

    def _groups(self, n: int) -> torch.Tensor:
        """[n] which prompt's group each local row belongs to (rows are prompt-major, whole groups)."""
        return torch.arange(n, device=self.device) // self.cfg.group_size

    @torch.no_grad()
    def _check_packing(self, q, qm, r, rm, group) -> bool:
        rows = torch.arange(min(len(q), 2 * self.cfg.group_size), device=q.device)  # two groups' replies
        problem = packing_problem(self.policy, _segments(q[rows], qm[rows], r[rows], rm[rows], group[rows]),
                                  self.tok.pad_token_id,
                                  lambda m: policy_forward(m, q[rows], qm[rows], r[rows], rm[rows], self.cfg.temperature).logprobs,
                                  self.cfg.temperature)
        if problem and self.dist.is_main:
            print(f"packed groups off for this model: {problem}", file=sys.stderr)
        return all(self.dist.gather_objects(problem is None))  # every process takes the same path

    def _chunks(self, query_mask: torch.Tensor, response_mask: torch.Tensor, group: torch.Tensor) -> list[torch.Tensor]:
        """Forward chunks of at most ``micro_batch_size`` rows. Packed: consecutive rows in group order
        (a group's replies share their prompt); padded: grouped by length, as PPO chunks."""
        if self.packing:
            order = torch.sort(group, stable=True).indices
            return list(order.split(self.cfg.micro_batch_size))
        overhead = CPU_CHUNK_OVERHEAD_POSITIONS if self.device.type == "cpu" else None
        return length_chunks(query_mask, response_mask, self.cfg.micro_batch_size, overhead)

    @contextlib.contextmanager
    def _reference(self):
        if self.reference is not None:
            yield self.reference
        else:  # LoRA: the policy with its adapter off is the starting model
            with self.policy.disable_adapter():
                yield self.policy

    # --- one iteration -----------------------------------------------------------------------

    def rollout_stats(self, exp: Experience) -> dict[str, float]:
        """What the step's samples looked like (before the update), over the global batch."""
        rm = exp.response_mask.float()
        rows = torch.stack([exp.raw_scores.to(rm.device), exp.rewards.sum(dim=1), (exp.kl * rm).sum(dim=1), rm.sum(dim=1),
                            exp.ended_with_eos.float(), exp.advantages[:, 0].abs()], dim=1).float()
        raw, reward, kl, length, eos, adv = self.dist.gather(rows).unbind(dim=1)  # [B] each, global prompt-major order
        groups = raw.view(-1, self.cfg.group_size)
        return {"score_mean": float(raw.mean()), "score_std": float(raw.std()) if raw.numel() > 1 else 0.0,
                "group_score_std": float(groups.std(dim=1).mean()),
                "groups_without_signal": float((groups.max(dim=1).values == groups.min(dim=1).values).float().mean()),
                "reward_mean": float(reward.mean()), "kl": float(kl.mean()), "beta": self.cfg.kl_coef,
                "response_length": float(length.mean()), "eos_fraction": float(eos.mean()),
                "advantage_abs_mean": float(adv.mean())}

    def grpo_step(self, prompts: list[str], before_update=None) -> tuple[dict[str, float], bool]:
        """One iteration on ``prompts`` (N of them, G replies each, over all processes).
        ``before_update(exp, stats) -> bool`` may veto the update (a stop criterion fired on these
        rollouts). Returns (metrics, updated)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with timed(timings, "time_generate"):
            exp = self.generate(prompts)
        with timed(timings, "time_score"):
            self.score(exp)
        with timed(timings, "time_forward"):
            self.make_experience(exp)
        stats = self.rollout_stats(exp)
        updated = True
        if before_update is not None:
            with timed(timings, "time_watch"):
                updated = before_update(exp, stats)
        if updated:
            with timed(timings, "time_update"):
                stats.update(self.update(exp))
                self.backend.sync_weights(self.policy)
        timings["time_step"] = time.perf_counter() - t0
        stats.update(timings)
        stats["episodes_per_second"] = len(prompts) * self.cfg.group_size / timings["time_step"]
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        return stats, updated


def _segments(q: torch.Tensor, qm: torch.Tensor, r: torch.Tensor, rm: torch.Tensor, group: torch.Tensor) -> list[Segment]:
    """Rows as packing segments: one per group present, its prompt (the real tokens of its first row)
    followed by its rows' replies; sequence k is row k."""
    q, qm, r, rm, group = (t.tolist() for t in (q, qm, r, rm, group))  # one host transfer
    segments: dict[int, Segment] = {}
    for k, g in enumerate(group):
        if g not in segments:
            segments[g] = Segment([t for t, m in zip(q[k], qm[k]) if m], [])
        segments[g].replies.append((k, r[k][:sum(rm[k])]))
    return list(segments.values())


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def run_grpo(cfg: GRPOConfig) -> dict | None:
    """Run GRPO / RLOO to a stop criterion; returns the summary also written to ``out/summary.json``
    (on the main process; the others return None)."""
    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord

    rt = start(cfg.engine)
    dist, device = rt.dist, rt.device
    for name in ("batch_size", "mini_batch_size"):  # each must split evenly over processes, in whole groups
        dist.local_rows(getattr(cfg, name), f"--{name.replace('_', '-')}")
    if (cfg.batch_size // dist.world_size) % cfg.group_size:
        raise ConfigError(f"--batch-size {cfg.batch_size} over {dist.world_size} processes leaves "
                          f"{cfg.batch_size // dist.world_size} replies each, not whole groups of {cfg.group_size}")
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    prompts_path = cfg.prompts or shipped_prompts("train")
    prompts = [p.prompt for p in read_records(prompts_path, PromptRecord)]
    if not prompts:
        raise ConfigError(f"{prompts_path}: no prompts")
    policy, tok, reference = _load_models(cfg, rt)
    trainer = GRPOTrainer(cfg, policy, tok, load_scorer(cfg.reward, str(device)), reference, device, dist=dist,
                          backend=make_backend(rt.engine, policy, tok))
    watcher = _Watcher(cfg, device) if cfg.gold else None
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)

    latest = ckpts.latest() if cfg.resume else None
    stop_reason, wall_before = None, 0.0
    if latest is not None:
        state = ckpts.load_state(latest)
        check_resume_options(latest, cfg, state.get("config"))
        load_model_weights(policy, latest / "model")
        ts = ckpts.load_trainer_state(latest)
        trainer.optimizer.load_state_dict(ts["optimizer"])
        set_rng_state(ts["rng"])
        if watcher is not None and state.get("watch"):
            watcher.watch.load_state_dict(state["watch"])
        trainer.step, stop_reason, wall_before = state["step"], state.get("stop_reason"), state.get("wall_seconds", 0.0)
        if dist.is_main:
            print(f"resuming from {latest} (step {trainer.step})", file=sys.stderr)
        stop_reason = _resume_note(out, trainer.step, stop_reason, cfg.max_steps, say=dist.is_main)
    t_start = time.perf_counter() - wall_before

    def checkpoint() -> None:
        with dist.main_first() as main:  # one writer; the others wait until the checkpoint is in place
            if main:
                ckpts.save(trainer.step, lambda d: policy.save_pretrained(str(d / "model"), safe_serialization=True),
                           {"stop_reason": stop_reason, "wall_seconds": time.perf_counter() - t_start,
                            "config": config_to_dict(cfg), "processes": dist.world_size,
                            "watch": watcher.watch.state_dict() if watcher else None},
                           {"optimizer": trainer.optimizer.state_dict(), "rng": rng_state()})

    best_gold_dir = out / "best-gold"

    def before_update(exp: Experience, stats: dict) -> bool:
        """Stop criteria and the watch on this step's rollouts (as PPO checks them); False vetoes the
        update. Every input is a global statistic, so every process decides the same."""
        nonlocal stop_reason
        step = trainer.step + 1
        watch_now = watcher is not None and (watcher.due(trainer.step) or step >= cfg.max_steps)
        stop_reason = check_stops(cfg, watcher if watch_now else None, step, exp, stats, dist,
                                  lambda: _publish_policy(policy, tok, best_gold_dir))
        return stop_reason is None

    n_prompts = cfg.batch_size // cfg.group_size
    logger = MetricsLogger(out, resume_step=trainer.step if latest is not None else None) if dist.is_main else None
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc=f"{cfg.estimator}", unit="step",
               disable=not (cfg.progress and dist.is_main))
    try:
        while stop_reason is None and trainer.step < cfg.max_steps:
            stats, _ = trainer.grpo_step(step_prompts(prompts, trainer.step, n_prompts, cfg.seed), before_update)
            if logger is not None:
                logger.log(trainer.step, {**stats, "stop_reason": stop_reason} if stop_reason else stats)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}")
            if stop_reason is None and trainer.step >= cfg.max_steps:
                stop_reason = "max_steps"
            if stop_reason is not None or trainer.step % cfg.save_every == 0:
                checkpoint()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if stop_reason is None:  # resumed a run that had already finished its steps
        stop_reason = "max_steps"

    return finish_run(cfg, out, policy, tok, dist, stop_reason, best_gold_dir, watcher,
                      lambda: _summary(cfg, out, trainer, stop_reason, time.perf_counter() - t_start, watcher))


def _summary(cfg: GRPOConfig, out: Path, trainer: GRPOTrainer, stop_reason: str, wall: float, watcher) -> dict:
    rows = read_metrics(out)
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    stages = ("time_generate", "time_score", "time_forward", "time_update", "time_watch")
    totals = {k.removeprefix("time_"): round(sum(r.get(k, 0.0) for r in rows), 2) for k in stages}
    step_time = sum(r.get("time_step", 0.0) for r in rows)
    episodes = len(rows) * cfg.batch_size
    summary = {
        "model": str(out / "model"), "estimator": cfg.estimator, "group_size": cfg.group_size, "steps": trainer.step,
        "stop_reason": stop_reason, "score_first": first.get("score_mean"), "score_last": last.get("score_mean"),
        "score_best": max((r["score_mean"] for r in rows), default=None),
        "kl_last": last.get("kl"), "kl_max": max((r["kl"] for r in rows), default=None), "beta_last": cfg.kl_coef,
        "response_length_first": first.get("response_length"), "response_length_last": last.get("response_length"),
        "episodes": episodes, "episodes_per_second": round(episodes / step_time, 3) if step_time else None,
        "stage_seconds": totals, "stage_share": {k: round(v / step_time, 3) for k, v in totals.items()} if step_time else {},
        "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_rss_mb()),
    }
    if watcher is not None:
        w = watcher.watch.summary()
        summary["watch"] = {"flags": w["flags"], "best_gold_step": w["best_gold_step"], "best_gold": w["best_gold"],
                            "gao_fit": w.get("gao_fit")}
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingError(f"non-finite summary values {bad}")
    return summary


@config_command(GRPOConfig, name="grpo")
def grpo_command(cfg: GRPOConfig) -> None:
    """GRPO or RLOO against a scorer, G replies per prompt, KL to the reference in the loss or the reward, until a
    reward threshold, a KL ceiling, a reward-hacking flag or the step limit; prints a JSON summary."""
    summary = run_grpo(cfg)
    if summary is None:  # not the main process: it printed nothing and wrote nothing
        return
    click.echo(f"stopped: {summary['stop_reason']} after {summary['steps']} steps; "
               f"score {summary['score_first']:.3f} → {summary['score_last']:.3f}, KL {summary['kl_last']:.2f}", err=True)
    click.echo(json.dumps(summary))
