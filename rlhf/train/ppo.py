"""PPO with a per-token KL penalty against the frozen reference (Ziegler et al. 2019; Ouyang et al. 2022).

``PPOTrainer.ppo_step`` reads like the algorithm, one record (:class:`Experience`) filled in order:

    exp = generate(prompts)          # sample replies (old logprobs and hidden states recorded on the way)
    score(exp)                       # the reward model / classifier, once per reply
    make_experience(exp)             # values, reference logprobs, KL-shaped rewards, GAE advantages and returns
    check stop criteria on exp       # reward threshold, KL ceiling, hacking watch
    update(exp)                      # epochs of shuffled minibatch PPO updates
    sync the rollout backend         # (vLLM: the new weights; in-process backends share them)

The policy and a linear value head share the LM's forward pass (:class:`ActorCritic`). The
reference is a frozen copy of the starting policy, or — with ``--lora`` — the same weights with
the adapter switched off (no second copy).

Several processes (rlhf/engine/distributed.py): each samples, scores and shapes its own share of
the global batch, with per-episode seeds (so an episode's reply does not depend on which process
drew it); advantages are whitened and statistics taken over the global batch; a minibatch is
every process's next share, and DDP averages the gradients, normalised by the minibatch's global
token count, so the step is the one a single process would take on the same episodes.

Departures from the papers, and why: the score is read once per reply (on its last token) and the
KL penalty on every token, as in InstructGPT; stop criteria are checked on a step's rollouts before
its update, so the final policy is the one whose samples met the criterion; every random choice is
a function of (seed, step, episode), which makes a resumed run exact.
"""

from __future__ import annotations

import contextlib
import time

import torch

from rlhf.algos import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, gae, kl_k1, kl_shaped_rewards,
                        masked_whiten, policy_loss, token_mean, value_loss)
from rlhf.engine.distributed import Distributed
from rlhf.errors import TrainingError
from rlhf.judges.base import score_checked
from rlhf.models.policy import (CPU_CHUNK_OVERHEAD_POSITIONS, ActorCritic, ValueHead, episode_forward, length_chunks)
from rlhf.rollout.backends import RolloutBackend, make_backend
from rlhf.rollout.experience import Experience
from rlhf.rollout.generate import SamplingParams, sample_tokens
from rlhf.train.optim import adamw
from rlhf.train.ppo_config import PPOConfig

__all__ = ["Experience", "PPOTrainer", "episode_seeds", "timed"]


def episode_seeds(seed: int, step: int, start: int, count: int) -> list[int]:
    """Sampling seeds of episodes ``start .. start + count − 1`` (global indices) of step ``step``:
    a function of (seed, step, episode) alone, so a reply is the same whichever process or batch
    sampled it, and a resumed run samples exactly what the uninterrupted one did."""
    base = (seed * 1_000_003 + step) * 100_003
    return [(base + start + i) % 2**63 for i in range(count)]


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


class PPOTrainer:
    """Holds the models, optimizer and KL controller; ``ppo_step`` runs one iteration.

    ``dist``: the process group (default: this process alone); ``backend``: how replies are sampled
    (default: the one ``cfg.engine.rollout`` names)."""

    def __init__(self, cfg: PPOConfig, policy, tokenizer, scorer, reference=None, device: torch.device | str | None = None,
                 dist: Distributed | None = None, backend: RolloutBackend | None = None):
        self.cfg, self.policy, self.tok, self.scorer = cfg, policy, tokenizer, scorer
        self.device = torch.device(device) if device is not None else next(policy.parameters()).device
        self.dist = dist or Distributed(self.device.type)
        self.reference = reference
        if reference is None and not hasattr(policy, "disable_adapter"):
            raise TrainingError("PPO needs a reference model, or a LoRA policy whose adapter can be switched off")
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)
        self.value_head = ValueHead(policy.config.hidden_size).to(self.device)
        self.params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        optimizer = adamw(self.params, self.device, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-6)
        # What training forwards call: the policy and value head as one module (DDP-wrapped when
        # several processes run, so that their gradients are averaged together).
        self.actor, self.optimizer = self.dist.prepare(ActorCritic(policy, self.value_head), optimizer)
        self.backend = backend or make_backend(cfg.engine, policy, tokenizer)
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.init_kl_coef))
        self.kl_estimator = KL_ESTIMATORS[cfg.kl_estimator]
        self.step = 0
        self.sampler_gap: torch.Tensor | None = None  # (Σ|Δ log π|, tokens) when an outside sampler gave logprobs

    # --- stages ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Experience:
        """Sample this process's share of the step's ``prompts`` (the global batch)."""
        rows = self.dist.local_rows(len(prompts), "--batch-size")
        params = SamplingParams(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, self.cfg.top_k)
        seeds = episode_seeds(self.cfg.seed, self.step, rows.start, rows.stop - rows.start)
        self.policy.eval()  # dropout is off anyway; eval() also tells HF layers they are not training
        return sample_tokens(self.policy, self.tok, prompts[rows], params, record=self.cfg.engine.sampler_logprobs,
                             backend=self.backend, seeds=seeds)

    @torch.no_grad()
    def score(self, exp: Experience) -> torch.Tensor:
        """Scores [B] from the scorer (checked: finite, shape [B]), penalised where a reply has no EOS."""
        exp.raw_scores = score_checked(self.scorer, exp.prompts, exp.texts)
        scores = exp.raw_scores - self.cfg.missing_eos_penalty * (~exp.ended_with_eos.cpu()).float()
        if self.cfg.score_clip:
            scores = scores.clamp(-self.cfg.score_clip, self.cfg.score_clip)
        exp.scores = scores.to(self.device)
        return exp.scores

    @torch.no_grad()
    def make_experience(self, exp: Experience) -> Experience:
        """Values, reference logprobs, KL-shaped rewards, GAE — all without gradients, on ``exp``.

        When the sampler recorded each token's logprob and final hidden state (``--sampler-logprobs``),
        those are the old logprobs and, through the value head, the values: the same numbers a forward
        over the finished replies gives (up to float rounding between a cached step and a full pass),
        so that forward is skipped and only the reference runs here."""
        cfg, rm = self.cfg, exp.response_mask
        episodes = (exp.query_ids, exp.query_mask, exp.response_ids, rm, cfg.temperature, cfg.micro_batch_size,
                    self._chunk_overhead())
        self.sampler_gap = None
        if exp.logprobs is not None and exp.hidden is not None:
            exp.logprobs, exp.values = exp.logprobs * rm, self.value_head(exp.hidden) * rm
        else:
            out = episode_forward(self.policy, *episodes, value_head=self.value_head)
            if exp.logprobs is not None:  # a sampler outside this process (vLLM): how far its numbers are
                self.sampler_gap = self.dist.sum(torch.stack([((exp.logprobs - out.logprobs).abs() * rm).sum(),
                                                              rm.sum().float()]))
            exp.logprobs, exp.values = out.logprobs, out.values
        exp.hidden = None  # [B, R, H]: not needed past this point
        with self._reference() as ref_model:
            exp.ref_logprobs = episode_forward(ref_model, *episodes).logprobs
        exp.kl = self.kl_estimator(exp.logprobs, exp.ref_logprobs) * rm
        exp.rewards = kl_shaped_rewards(exp.scores, exp.kl, rm, self.kl_ctl.beta)
        advantages, exp.returns = gae(exp.rewards, exp.values, rm, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:  # over the global batch when several processes share it
            advantages = masked_whiten(advantages, rm, all_sum=self.dist.sum if self.dist.world_size > 1 else None)
        exp.advantages = advantages
        return exp

    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; micro-batches accumulate gradients so that a
        minibatch's loss is one token mean however it is split (and over however many processes).

        Statistics stay tensors until the end of the step (one host sync per minibatch, for the
        finiteness check, instead of a dozen ``.item()`` calls per micro-batch)."""
        cfg, dist = self.cfg, self.dist
        n = len(exp)
        mini = cfg.mini_batch_size // dist.world_size  # this process's share of a minibatch
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)  # a function of (seed, step): exact resume
        sums: dict[str, torch.Tensor] = {}
        count = 0
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        self.actor.train()
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=g).to(self.device)
            for start in range(0, n, mini):
                mb_idx = perm[start:start + mini]
                mb_tokens = dist.sum(exp.response_mask[mb_idx].sum())  # the whole minibatch's, over every process
                self.optimizer.zero_grad(set_to_none=True)
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                losses = []
                # Length-bucketed micro-batches: the minibatch (and so its gradient, a token mean
                # over it) is the shuffle's; only how it is split into forwards changes. Gradients
                # are averaged over processes once, at the minibatch's last backward.
                chunks = self._chunks(exp.query_mask[mb_idx], exp.response_mask[mb_idx])
                for i, rows in enumerate(chunks):
                    with dist.no_sync(self.actor, skip=i < len(chunks) - 1):
                        loss, stats = self._micro_step(exp.select(mb_idx[rows]), mb_tokens)
                    finite &= torch.isfinite(loss)
                    losses.append((stats["policy_loss"], stats["value_loss"]))
                    for k, v in stats.items():
                        sums[k] = sums[k] + v if k in sums else v
                grad_norm = dist.clip_grad_norm_(self.actor, self.params, max_norm)
                if not bool(finite & torch.isfinite(grad_norm)):  # the one sync of a minibatch
                    if not bool(finite):
                        pg, vl = next((p, v) for p, v in losses if not torch.isfinite(p + v))
                        raise TrainingError(f"non-finite PPO loss at step {self.step + 1} (policy {pg.item()}, value {vl.item()})")
                    raise TrainingError(f"non-finite gradient norm at PPO step {self.step + 1}")
                self.optimizer.step()
                sums["grad_norm"] = sums["grad_norm"] + grad_norm if "grad_norm" in sums else grad_norm
                count += 1
        self.actor.eval()
        # Each process's statistics are its share of minibatch means: their sum over processes is the
        # minibatch's (the gradient norm is already global, the same on every process).
        names = sorted(k for k in sums if k != "grad_norm")
        totals = dist.sum(torch.stack([sums[k].detach().float() for k in names])) if names else []
        out = {k: float(v) / count for k, v in zip(names, totals)}
        out["grad_norm"] = float(sums["grad_norm"]) / count
        return out

    def _micro_step(self, mb: Experience, mb_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; returns its loss and statistics as tensors."""
        cfg, rm = self.cfg, mb.response_mask
        out = self.actor(mb.query_ids, mb.query_mask, mb.response_ids, rm, cfg.temperature,
                         entropy="loss" if cfg.ent_coef else "stats")
        pg, pg_stats = policy_loss(out.logprobs, mb.logprobs, mb.advantages, rm, cfg.cliprange, normaliser=mb_tokens)
        vl, v_stats = value_loss(out.values, mb.values, mb.returns, rm, cfg.cliprange_value, normaliser=mb_tokens)
        loss = pg + cfg.vf_coef * vl
        if cfg.ent_coef:
            loss = loss - cfg.ent_coef * token_mean(out.entropy, rm, mb_tokens)
        self.dist.backward(loss)  # a non-finite loss is reported by update(), before any optimizer step
        # Losses are already this micro-batch's share of the minibatch token mean; per-token
        # statistics are weighted by token share, so the sums over micro-batches are minibatch means.
        with torch.no_grad():
            share = rm.sum() / mb_tokens.clamp(min=1)
            stats = {"policy_loss": pg.detach(), "value_loss": vl.detach(), "clipfrac": share * pg_stats["clipfrac"],
                     "approx_kl": share * pg_stats["approx_kl"], "vf_clipfrac": share * v_stats["vf_clipfrac"],
                     "entropy": token_mean(out.entropy.detach(), rm, mb_tokens)}
        return loss.detach(), stats

    def _chunk_overhead(self) -> float | None:
        """On CPU a chunk may be smaller when that saves more padded positions than a forward's fixed
        cost; accelerators take as few chunks as possible."""
        return CPU_CHUNK_OVERHEAD_POSITIONS if self.device.type == "cpu" else None

    def _chunks(self, query_mask: torch.Tensor, response_mask: torch.Tensor) -> list[torch.Tensor]:
        """Forward chunks of at most ``micro_batch_size`` rows, grouped by length: a micro-batch of
        short and long replies may run as two forwards instead of padding every row to the longest."""
        return length_chunks(query_mask, response_mask, self.cfg.micro_batch_size, self._chunk_overhead())

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
        length = rm.sum(dim=1)
        # One row per episode, gathered from every process: [B, 11].
        rows = torch.stack([
            exp.raw_scores.to(rm.device), exp.scores, (kl_k1(exp.logprobs, exp.ref_logprobs) * rm).sum(dim=1),
            (exp.kl * rm).sum(dim=1), exp.rewards.sum(dim=1) - exp.scores, length, exp.ended_with_eos.float(),
            (exp.advantages * rm).sum(dim=1), (exp.values * rm).sum(dim=1), (exp.returns * rm).sum(dim=1),
        ], dim=1).float()
        (raw, scores, k1, seq_kl, non_score, length, eos, adv, val, ret) = self.dist.gather(rows).unbind(dim=1)
        tokens = length.sum().clamp(min=1)
        return {"score_mean": float(raw.mean()), "score_std": float(raw.std()) if raw.numel() > 1 else 0.0,
                "reward_mean": float(scores.mean()), "kl": float(k1.mean()), "kl_estimate": float(seq_kl.mean()),
                "non_score_reward": float(non_score.mean()), "beta": self.kl_ctl.beta,
                "response_length": float(length.mean()), "eos_fraction": float(eos.mean()),
                "advantage_mean": float(adv.sum() / tokens), "value_mean": float(val.sum() / tokens),
                "return_mean": float(ret.sum() / tokens),
                **({} if self.sampler_gap is None else
                   {"sampler_logprob_gap": float(self.sampler_gap[0] / self.sampler_gap[1].clamp(min=1))})}

    def ppo_step(self, prompts: list[str], before_update=None) -> tuple[dict[str, float], bool]:
        """One PPO iteration on ``prompts`` (the step's global batch; each process takes its share).
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
            self.kl_ctl.update(stats["kl_estimate"], len(prompts))
        timings["time_step"] = time.perf_counter() - t0
        stats.update(timings)
        stats["episodes_per_second"] = len(prompts) / timings["time_step"]
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        return stats, updated
