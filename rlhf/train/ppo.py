"""PPO with a per-token KL penalty against the frozen reference (Ziegler et al. 2019; Ouyang et al. 2022).

``PPOTrainer.ppo_step`` reads like the algorithm:

    rollout  = generate(prompts)                        # sample replies from the policy
    scores   = score(rollout)                           # the reward model / classifier, once per reply
    exp      = make_experience(rollout, scores)         # old logprobs, values, reference logprobs,
                                                        # KL-shaped rewards, GAE advantages and returns
    check stop criteria on these rollouts               # reward threshold, KL ceiling, hacking watch
    stats    = update(exp)                              # epochs of shuffled minibatch PPO updates

One typed record, :class:`Experience`, carries a batch between those stages. The policy and a
linear value head share the LM's forward pass. The reference is a frozen copy of the starting
policy, or — with ``--lora`` — the same weights with the adapter switched off (no second copy).

Departures from the papers, and why: the score is read once per reply (on its last token) and the
KL penalty on every token, as in InstructGPT; stop criteria are checked on a step's rollouts before
its update, so the final policy is the one whose samples met the criterion; every random choice is
a function of (seed, step) or of the checkpointed RNG, which makes a resumed run exact.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, fields
from pathlib import Path

import torch

from rlhf.algos import (KL_ESTIMATORS, AdaptiveKLController, FixedKLController, entropy_from_logits, gae,
                        kl_shaped_rewards, masked_mean, masked_whiten, policy_loss, value_loss)
from rlhf.errors import TrainingError
from rlhf.models.policy import CPU_CHUNK_OVERHEAD_POSITIONS, ValueHead, length_chunks, policy_forward, trim_padding
from rlhf.train.optim import adamw
from rlhf.train.ppo_config import PPOConfig


@dataclass
class Experience:
    """One PPO batch. B = episodes, P = prompt length (left-padded), R = reply length (right-padded)."""

    query_ids: torch.Tensor      # [B, P]
    query_mask: torch.Tensor     # [B, P]
    response_ids: torch.Tensor   # [B, R]
    response_mask: torch.Tensor  # [B, R] 1 up to and including EOS
    logprobs: torch.Tensor       # [B, R] log π_old(y_t), the policy that sampled
    ref_logprobs: torch.Tensor   # [B, R] log π_ref(y_t)
    values: torch.Tensor         # [B, R] V_old(s_t)
    scores: torch.Tensor         # [B] scorer output after the missing-EOS penalty and clipping
    kl: torch.Tensor             # [B, R] per-token KL estimate used in the rewards
    rewards: torch.Tensor        # [B, R] −β·KL_t, plus the score on the last token
    advantages: torch.Tensor     # [B, R] GAE advantages (whitened if configured)
    returns: torch.Tensor        # [B, R] advantages + values, before whitening

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows ``idx`` of every field (a minibatch)."""
        return Experience(**{f.name: getattr(self, f.name)[idx] for f in fields(self)})


@dataclass
class Rollout:
    prompts: list[str]
    texts: list[str]
    query_ids: torch.Tensor
    query_mask: torch.Tensor
    response_ids: torch.Tensor
    response_mask: torch.Tensor
    ended_with_eos: torch.Tensor  # [B] bool
    raw_scores: torch.Tensor | None = None
    logprobs: torch.Tensor | None = None  # [B, R] recorded by the sampler (None: compute them in make_experience)
    hidden: torch.Tensor | None = None    # [B, R, H] final hidden states recorded by the sampler (for the values)


@contextlib.contextmanager
def timed(timings: dict[str, float], name: str):
    t = time.perf_counter()
    try:
        yield
    finally:
        timings[name] = timings.get(name, 0.0) + time.perf_counter() - t


class PPOTrainer:
    """Holds the models, optimizer and KL controller; ``ppo_step`` runs one iteration."""

    def __init__(self, cfg: PPOConfig, policy, tokenizer, scorer, reference=None, device: torch.device | str = "cpu"):
        self.cfg, self.policy, self.tok, self.scorer = cfg, policy, tokenizer, scorer
        self.device = torch.device(device)
        self.reference = reference
        if reference is None and not hasattr(policy, "disable_adapter"):
            raise TrainingError("PPO needs a reference model, or a LoRA policy whose adapter can be switched off")
        if reference is not None:
            reference.eval()
            reference.requires_grad_(False)
        self.value_head = ValueHead(policy.config.hidden_size).to(self.device)
        params = [p for p in policy.parameters() if p.requires_grad] + list(self.value_head.parameters())
        self.params = params
        self.optimizer = adamw(params, self.device, lr=cfg.lr, weight_decay=cfg.weight_decay, eps=1e-6)
        self.kl_ctl = (AdaptiveKLController(cfg.init_kl_coef, cfg.target_kl, cfg.kl_horizon) if cfg.adaptive_kl
                       else FixedKLController(cfg.init_kl_coef))
        self.kl_estimator = KL_ESTIMATORS[cfg.kl_estimator]
        self.step = 0

    # --- stages ------------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str]) -> Rollout:
        from rlhf.rollout.generate import SamplingParams, decode_responses, sample_tokens

        params = SamplingParams(self.cfg.max_new_tokens, self.cfg.temperature, self.cfg.top_p, self.cfg.top_k)
        self.policy.eval()  # dropout is off anyway; eval() also tells HF layers they are not training
        batch = sample_tokens(self.policy, self.tok, prompts, params, record=self.cfg.sampler_logprobs)
        texts = decode_responses(self.tok, batch)
        return Rollout(prompts, texts, batch.query_ids, batch.query_mask, batch.response_ids, batch.response_mask,
                       batch.ended_with_eos, logprobs=batch.logprobs, hidden=batch.hidden)

    @torch.no_grad()
    def score(self, rollout: Rollout) -> torch.Tensor:
        """Scores [B] from the scorer (checked: finite, shape [B]), penalised where a reply has no EOS."""
        from rlhf.judges.base import score_checked

        raw = score_checked(self.scorer, rollout.prompts, rollout.texts)
        rollout.raw_scores = raw
        scores = raw - self.cfg.missing_eos_penalty * (~rollout.ended_with_eos.cpu()).float()
        if self.cfg.score_clip:
            scores = scores.clamp(-self.cfg.score_clip, self.cfg.score_clip)
        return scores.to(self.device)

    @torch.no_grad()
    def make_experience(self, rollout: Rollout, scores: torch.Tensor) -> Experience:
        """Old logprobs and values, reference logprobs, KL-shaped rewards, GAE — all without gradients.

        When the sampler recorded each token's logprob and final hidden state (``--sampler-logprobs``),
        those are the old logprobs and, through the value head, the values: the same numbers a forward
        over the finished replies gives (up to float rounding between a cached step and a full pass),
        so that forward is skipped and only the reference runs here."""
        cfg = self.cfg
        q, qm, r, rm = rollout.query_ids, rollout.query_mask, rollout.response_ids, rollout.response_mask
        width = r.shape[1]
        recorded = rollout.logprobs is not None and rollout.hidden is not None
        if recorded:
            logprobs = rollout.logprobs * rm
            values = self.value_head(rollout.hidden) * rm
        else:
            logprobs, values = torch.zeros(r.shape, device=r.device), torch.zeros(r.shape, device=r.device)
        ref_logprobs = torch.zeros(r.shape, device=r.device)
        # Rows are independent here (no gradients, masks decide what each row sees), so chunking
        # them by length is exact and each chunk pads only to its own longest prompt + reply.
        for rows in self._chunks(qm, rm):
            tq, tqm, tr, trm = trim_padding(q[rows], qm[rows], r[rows], rm[rows])
            if not recorded:
                out = policy_forward(self.policy, tq, tqm, tr, trm, cfg.temperature, self.value_head)
                logprobs[rows] = _pad_to(out.logprobs, width)
                values[rows] = _pad_to(out.values, width)
            with self._reference() as ref_model:
                ref_logprobs[rows] = _pad_to(policy_forward(ref_model, tq, tqm, tr, trm, cfg.temperature).logprobs, width)
        kl = self.kl_estimator(logprobs, ref_logprobs) * rm
        rewards = kl_shaped_rewards(scores, kl, rm, self.kl_ctl.beta)
        advantages, returns = gae(rewards, values, rm, cfg.gamma, cfg.lam)
        if cfg.whiten_advantages:
            advantages = masked_whiten(advantages, rm)
        return Experience(q, qm, r, rm, logprobs, ref_logprobs, values, scores, kl, rewards, advantages, returns)

    def update(self, exp: Experience) -> dict[str, float]:
        """``ppo_epochs`` passes of shuffled minibatches; micro-batches accumulate gradients so that a
        minibatch's loss is one token mean however it is split.

        Statistics stay tensors until the end of the step (one host sync per minibatch, for the
        finiteness check, instead of a dozen ``.item()`` calls per micro-batch)."""
        cfg = self.cfg
        n = exp.query_ids.shape[0]
        g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + self.step)  # a function of (seed, step): exact resume
        sums: dict[str, torch.Tensor] = {}
        count = 0
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        self.policy.train()
        for _ in range(cfg.ppo_epochs):
            perm = torch.randperm(n, generator=g).to(self.device)
            for start in range(0, n, cfg.mini_batch_size):
                mb_idx = perm[start:start + cfg.mini_batch_size]
                mb_tokens = exp.response_mask[mb_idx].sum()
                self.optimizer.zero_grad(set_to_none=True)
                finite = torch.ones((), dtype=torch.bool, device=self.device)
                losses = []
                # Length-bucketed micro-batches: the minibatch (and so its gradient, a token mean
                # over it) is the shuffle's; only how it is split into forwards changes.
                for rows in self._chunks(exp.query_mask[mb_idx], exp.response_mask[mb_idx]):
                    mb = exp.select(mb_idx[rows])
                    loss, stats = self._micro_step(mb, mb_tokens)
                    finite &= torch.isfinite(loss)
                    losses.append((stats["policy_loss"], stats["value_loss"]))
                    for k, v in stats.items():
                        sums[k] = sums[k] + v if k in sums else v
                grad_norm = torch.nn.utils.clip_grad_norm_(self.params, max_norm)
                if not bool(finite & torch.isfinite(grad_norm)):  # the one sync of a minibatch
                    if not bool(finite):
                        pg, vl = next((p, v) for p, v in losses if not torch.isfinite(p + v))
                        raise TrainingError(f"non-finite PPO loss at step {self.step + 1} (policy {pg.item()}, value {vl.item()})")
                    raise TrainingError(f"non-finite gradient norm at PPO step {self.step + 1}")
                self.optimizer.step()
                sums["grad_norm"] = sums["grad_norm"] + grad_norm if "grad_norm" in sums else grad_norm
                count += 1
        self.policy.eval()
        return {k: float(v) / count for k, v in sums.items()}

    def _micro_step(self, mb: Experience, mb_tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Forward and backward of one micro-batch; returns its loss and statistics as tensors."""
        cfg = self.cfg
        tq, tqm, tr, trm = trim_padding(mb.query_ids, mb.query_mask, mb.response_ids, mb.response_mask)
        width = tr.shape[1]
        out = policy_forward(self.policy, tq, tqm, tr, trm, cfg.temperature, self.value_head)
        pg, pg_stats = policy_loss(out.logprobs, mb.logprobs[:, :width], mb.advantages[:, :width], trm,
                                   cfg.cliprange, normaliser=mb_tokens)
        vl, v_stats = value_loss(out.values, mb.values[:, :width], mb.returns[:, :width], trm,
                                 cfg.cliprange_value, normaliser=mb_tokens)
        loss = pg + cfg.vf_coef * vl
        if cfg.ent_coef:
            entropy = entropy_from_logits(out.logits)
            loss = loss - cfg.ent_coef * (entropy * trm).sum() / mb_tokens
        else:
            with torch.no_grad():
                entropy = entropy_from_logits(out.logits)
        loss.backward()  # a non-finite loss is reported by update(), before any optimizer step
        # Losses are already this micro-batch's share of the minibatch token mean; per-token
        # statistics are weighted by token share, so the sums over micro-batches are minibatch means.
        with torch.no_grad():
            share = trm.sum() / mb_tokens.clamp(min=1)
            stats = {"policy_loss": pg.detach(), "value_loss": vl.detach(), "clipfrac": share * pg_stats["clipfrac"],
                     "approx_kl": share * pg_stats["approx_kl"], "vf_clipfrac": share * v_stats["vf_clipfrac"],
                     "entropy": share * masked_mean(entropy.detach(), trm)}
        return loss.detach(), stats

    def _chunks(self, query_mask: torch.Tensor, response_mask: torch.Tensor) -> list[torch.Tensor]:
        """Forward chunks of at most ``micro_batch_size`` rows, grouped by length. On CPU a chunk may
        be smaller when that saves more padded positions than a forward's fixed cost: a micro-batch of
        short and long replies then runs as two forwards instead of padding every row to the longest."""
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

    def rollout_stats(self, rollout: Rollout, exp: Experience) -> dict[str, float]:
        """What the step's samples looked like (before the update)."""
        rm = exp.response_mask.float()
        seq_kl = (exp.kl * rm).sum(dim=1)
        k1 = ((exp.logprobs - exp.ref_logprobs) * rm).sum(dim=1)
        raw = rollout.raw_scores
        return {"score_mean": float(raw.mean()), "score_std": float(raw.std()) if raw.numel() > 1 else 0.0,
                "reward_mean": float(exp.scores.mean()), "kl": float(k1.mean()), "kl_estimate": float(seq_kl.mean()),
                "non_score_reward": float((exp.rewards.sum(dim=1) - exp.scores).mean()), "beta": self.kl_ctl.beta,
                "response_length": float(rm.sum(dim=1).mean()), "eos_fraction": float(rollout.ended_with_eos.float().mean()),
                "advantage_mean": float(masked_mean(exp.advantages, rm)), "value_mean": float(masked_mean(exp.values, rm)),
                "return_mean": float(masked_mean(exp.returns, rm))}

    def ppo_step(self, prompts: list[str], before_update=None) -> tuple[dict[str, float], bool]:
        """One PPO iteration on ``prompts``. ``before_update(rollout, stats) -> bool`` may veto the update
        (a stop criterion fired on these rollouts). Returns (metrics, updated)."""
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        with timed(timings, "time_generate"):
            rollout = self.generate(prompts)
        with timed(timings, "time_score"):
            scores = self.score(rollout)
        with timed(timings, "time_forward"):
            exp = self.make_experience(rollout, scores)
        stats = self.rollout_stats(rollout, exp)
        updated = True
        if before_update is not None:
            with timed(timings, "time_watch"):
                updated = before_update(rollout, stats)
        if updated:
            with timed(timings, "time_update"):
                stats.update(self.update(exp))
            self.kl_ctl.update(stats["kl_estimate"], len(prompts))
        timings["time_step"] = time.perf_counter() - t0
        stats.update(timings)
        stats["episodes_per_second"] = len(prompts) / timings["time_step"]
        stats["lr"] = self.optimizer.param_groups[0]["lr"]
        self.step += 1
        return stats, updated


def _pad_to(x: torch.Tensor, width: int) -> torch.Tensor:
    """Right-pad [B, w] with zeros to [B, width] (micro-batches were trimmed to their own longest reply)."""
    if x.shape[1] == width:
        return x
    return torch.nn.functional.pad(x, (0, width - x.shape[1]))
