"""The math of RLHF as pure tensor functions (torch only): reward-model and PPO losses.

Every function documents its tensor shapes and the paper it follows. Nothing here knows about
models, tokenizers or files, so each piece is tested by hand-computed cases, loop-vs-vectorised
comparisons and padding invariance (tests/test_algos*.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coef: float = 0.0, target: torch.Tensor | None = None) -> torch.Tensor:
    """Pairwise reward-model loss −log σ(r_c − r_r − m), averaged over the batch (Ouyang et al. 2022).

    r_chosen, r_rejected: [B] scalar rewards. margin: optional [B] or scalar m the chosen reply
    should win by (Touvron et al. 2023, Llama 2). center_coef: weight of E[(r_c + r_r)²], which
    keeps rewards centred on zero (Eisenstein et al. 2023) since the pairwise loss alone leaves
    the offset free. Returns a scalar. ``logsigmoid`` keeps large differences finite.

    target: optional [B] soft labels p = P(chosen preferred), e.g. an AI labeler's probabilities
    (Bai et al. 2022 train on such). The loss is then the cross-entropy of the Bradley-Terry
    probability against p, −[p·log σ(d) + (1 − p)·log σ(−d)], smallest where σ(d) = p; p = 1 gives
    the plain loss.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    if target is None:
        loss = -F.logsigmoid(diff).mean()
    else:
        target = target.to(diff.dtype)
        loss = -(target * F.logsigmoid(diff) + (1.0 - target) * F.logsigmoid(-diff)).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss


# ---------------------------------------------------------------------------------------------
# Masked statistics. B = batch, R = response length; mask [B, R] is 1 on real response tokens.
# ---------------------------------------------------------------------------------------------

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over positions where ``mask`` is 1 (all of them, or along ``dim``).

    x, mask: same shape. Masked positions contribute nothing, whatever they hold (even inf/nan
    would; ``torch.where`` keeps them out rather than multiplying by zero).
    """
    mask = mask.to(x.dtype)
    x = torch.where(mask.bool(), x, torch.zeros_like(x))
    if dim is None:
        return x.sum() / mask.sum().clamp(min=1.0)
    return x.sum(dim=dim) / mask.sum(dim=dim).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of ``x`` over the masked positions (a scalar); Bessel-corrected when ``unbiased``."""
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)
    if unbiased:
        n = mask.sum()
        var = var * n / (n - 1).clamp(min=1.0)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x − mean) / std over the masked positions; masked positions come out 0.

    ``shift_mean=False`` only rescales (used for rewards, whose sign carries meaning).
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    white = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        white = white + mean
    return white * mask.to(x.dtype)


# ---------------------------------------------------------------------------------------------
# KL between the policy and the frozen reference, per token
# ---------------------------------------------------------------------------------------------

def kl_k1(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k1 = log π(y_t) − log π_ref(y_t), per sampled token [B, R] (Schulman 2020, "Approximating KL").

    Unbiased for KL(π‖π_ref) when y_t ~ π, but single samples can be negative.
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: torch.Tensor, ref_logprobs: torch.Tensor) -> torch.Tensor:
    """k3 = (r − 1) − log r with r = π_ref/π, per token [B, R] (Schulman 2020).

    Unbiased and never negative, with lower variance than k1 when π is close to π_ref.
    """
    log_ratio = ref_logprobs - logprobs
    return torch.expm1(log_ratio) - log_ratio


KL_ESTIMATORS = {"k1": kl_k1, "k3": kl_k3}


def kl_shaped_rewards(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """Per-token PPO rewards: −β·KL_t on every response token, the score added on the last one.

    scores [B]; kl, response_mask [B, R] with the mask contiguous from position 0 (1 up to and
    including EOS). Returns rewards [B, R], 0 on padding. Ziegler et al. 2019, Ouyang et al. 2022.
    """
    mask = response_mask.to(kl.dtype)
    rewards = -beta * kl * mask
    last = (response_mask.sum(dim=1) - 1).clamp(min=0).long()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, last] += scores.to(rewards.dtype) * (response_mask.sum(dim=1) > 0).to(rewards.dtype)
    return rewards


# ---------------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------------

def gae(rewards: torch.Tensor, values: torch.Tensor, response_mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016) over response tokens.

    rewards, values, response_mask: [B, R]. The episode ends after the last masked token: the
    value after it is 0 and padded positions neither give nor take value. Returns
    (advantages [B, R], returns [B, R]), both 0 on padding; returns = advantages + values.
        δ_t = r_t + γ·V_{t+1} − V_t,   A_t = δ_t + γλ·A_{t+1}
    """
    mask = response_mask.to(values.dtype)
    values = values * mask
    rewards = rewards * mask
    length = rewards.shape[1]
    advantages = torch.zeros_like(rewards)
    next_adv = torch.zeros_like(rewards[:, 0])
    for t in reversed(range(length)):
        next_value = values[:, t + 1] if t + 1 < length else torch.zeros_like(values[:, 0])
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


# ---------------------------------------------------------------------------------------------
# PPO losses (Schulman et al. 2017), averaged over response tokens
# ---------------------------------------------------------------------------------------------

def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, response_mask: torch.Tensor,
                clip: float = 0.2, normaliser: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate −min(ρA, clip(ρ, 1−ε, 1+ε)A) with ρ = π/π_old, per token [B, R].

    ``normaliser``: divide the masked sum by this many tokens instead of this batch's count, so that
    gradient-accumulated micro-batches add up to the minibatch's token mean. Returns (loss, stats)
    where stats hold the clip fraction and the approximate KL(π_old‖π) ½·E[(log ρ)²].
    """
    log_ratio = logprobs - old_logprobs
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    per_token = torch.maximum(unclipped, clipped)
    loss = _token_mean(per_token, response_mask, normaliser)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean((clipped > unclipped).float(), response_mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, response_mask)}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               clip: float = 0.2, normaliser: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε), per token [B, R]."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    loss = _token_mean(per_token, response_mask, normaliser)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), response_mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: logits [B, R, V] → [B, R]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def _token_mean(per_token: torch.Tensor, mask: torch.Tensor, normaliser: torch.Tensor | float | None) -> torch.Tensor:
    if normaliser is None:
        return masked_mean(per_token, mask)
    total = torch.where(mask.bool(), per_token, torch.zeros_like(per_token)).sum()
    return total / max(float(normaliser), 1.0)


# ---------------------------------------------------------------------------------------------
# KL coefficient controllers (Ziegler et al. 2019, §2.2)
# ---------------------------------------------------------------------------------------------

class FixedKLController:
    """β stays where it was set."""

    def __init__(self, beta: float):
        self.beta = float(beta)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"beta": self.beta}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.beta = float(state["beta"])


class AdaptiveKLController(FixedKLController):
    """Moves β toward a target KL: e = clip(KL/target − 1, ±0.2), β ← β·(1 + e·n/horizon).

    ``n_steps`` is the number of episodes since the last update, so the horizon is in episodes.
    """

    def __init__(self, beta: float, target: float, horizon: int):
        super().__init__(beta)
        if target <= 0 or horizon <= 0:
            raise ValueError("the adaptive KL controller needs a positive target and horizon")
        self.target, self.horizon = float(target), int(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        error = min(max(current_kl / self.target - 1.0, -0.2), 0.2)
        self.beta *= 1.0 + error * n_steps / self.horizon
