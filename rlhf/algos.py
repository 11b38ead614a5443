"""The math of RLHF as pure tensor functions (torch only): reward-model, PPO, DPO/IPO and GRPO/RLOO losses.

Every function documents its tensor shapes and the paper it follows. Nothing here knows about
models, tokenizers or files, so each piece is tested by hand-computed cases, loop-vs-vectorised
comparisons and padding invariance (tests/test_algos*.py).
"""

from __future__ import annotations

from typing import Callable

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


def pairwise_accuracy(r_chosen: torch.Tensor, r_rejected: torch.Tensor) -> torch.Tensor:
    """Share of pairs [B] the rewards order right; a tie counts half (a coin flip). Returns a scalar."""
    diff = (r_chosen - r_rejected).double()
    return ((diff > 0).double() + 0.5 * (diff == 0).double()).mean()


# ---------------------------------------------------------------------------------------------
# Personal rewards: a generic reward plus a low-rank per-user part. N = items, D = user dimension,
# H = the backbone's pooled width.
# ---------------------------------------------------------------------------------------------

def personal_rewards(generic: torch.Tensor, features: torch.Tensor, user_basis: torch.Tensor,
                     user_embedding: torch.Tensor) -> torch.Tensor:
    """r_u(x, y) = r₀(x, y) + e_uᵀ B h(x, y): everyone's reward plus where this user departs from it.

    generic [N]: the shared head's reward r₀; features [N, H]: the pooled backbone state h of each
    (prompt, reply); user_basis B [D, H], shared by all users; user_embedding [N, D]: the row e_u of
    each item's user, zeros for the generic reward (where a new user starts). Returns [N].
    Users live in one D-dimensional space of reward directions learned from everyone, as in
    P-RLHF (Li et al. 2024) and PAL (Chen et al. 2024), so a few comparisons place a new user.
    """
    return generic + ((features @ user_basis.T) * user_embedding).sum(dim=-1)


def personal_preference_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, user_embedding: torch.Tensor,
                             user_pairs: torch.Tensor, prior_precision: float) -> torch.Tensor:
    """Bradley-Terry loss of each pair under its user's reward, plus a Gaussian prior on the users.

    r_chosen, r_rejected [B]: personal rewards; user_embedding [B, D]: the embedding each pair was
    scored with (zeros when scored generically); user_pairs [B]: n_u, the training pairs of that
    pair's user. Returns the scalar mean_i[−log σ(r_c − r_r) + λ‖e_u‖² / (2 n_u)]: over a whole
    training set that is (Σ BT + Σ_u λ/2 ‖e_u‖²) / N, the MAP objective under e_u ~ N(0, I/λ), so a
    minibatch mean estimates it without bias and a user with few pairs stays near the generic reward.
    """
    prior = 0.5 * prior_precision * (user_embedding ** 2).sum(dim=-1) / user_pairs.to(user_embedding.dtype)
    return bradley_terry_loss(r_chosen, r_rejected) + prior.mean()


def fit_user_embedding(generic_margin: torch.Tensor, basis_margin: torch.Tensor, prior_precision: float,
                       init: torch.Tensor | None = None, max_iter: int = 50, tol: float = 1e-10) -> torch.Tensor:
    """One user's MAP embedding with everything else fixed: argmin_e Σ_i −log σ(g_i + z_iᵀe) + λ/2 ‖e‖².

    generic_margin g [N]: r₀(chosen) − r₀(rejected) of the user's pairs; basis_margin z [N, D]:
    B(h_chosen − h_rejected). With the backbone frozen this is a logistic regression, strictly
    convex for λ > 0, solved by Newton's method with backtracking (a few iterations, milliseconds;
    no backbone pass). No pairs gives e = 0, the generic reward. Returns e [D] in float32.
    """
    if prior_precision <= 0:
        raise ValueError("the prior precision must be positive (without it a separable user has no finite fit)")
    g, z = generic_margin.double(), basis_margin.double()
    e = torch.zeros(z.shape[1], dtype=torch.float64) if init is None else init.detach().double().clone()

    def objective(v: torch.Tensor) -> torch.Tensor:
        return -F.logsigmoid(g + z @ v).sum() + 0.5 * prior_precision * (v @ v)

    current = objective(e)
    for _ in range(max_iter):
        m = g + z @ e
        p_wrong = torch.sigmoid(-m)                      # ∂/∂m of −log σ(m) is −σ(−m)
        grad = -(z * p_wrong[:, None]).sum(0) + prior_precision * e
        hess = (z * (p_wrong * (1 - p_wrong))[:, None]).T @ z + prior_precision * torch.eye(len(e), dtype=torch.float64)
        step = torch.linalg.solve(hess, grad)
        t, trial = 1.0, objective(e - step)
        while trial > current and t > 1e-8:
            t *= 0.5
            trial = objective(e - t * step)
        if trial > current:  # no descent left: at the optimum up to rounding
            break
        e, previous, current = e - t * step, current, trial
        if previous - current <= tol * max(1.0, abs(float(current))):
            break
    return e.float()


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


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  all_sum: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """(x − mean) / std over the masked positions; masked positions come out 0.

    ``shift_mean=False`` only rescales (used for rewards, whose sign carries meaning).
    ``all_sum``: when the batch is split over processes, a function that sums a tensor over all of
    them; mean and variance are then those of the whole batch (two passes, as for one process), so
    every share is whitened exactly as the whole batch would be.
    """
    if all_sum is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask)
    else:
        real = mask.bool()
        n_sum = all_sum(torch.stack([torch.where(real, x, torch.zeros_like(x)).sum(), mask.to(x.dtype).sum()]))
        n = n_sum[1].clamp(min=1.0)
        mean = n_sum[0] / n
        var = all_sum(torch.where(real, (x - mean) ** 2, torch.zeros_like(x)).sum()) / (n - 1).clamp(min=1.0)
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
    per_token, was_clipped = clipped_surrogate(log_ratio, advantages, clip)
    loss = token_mean(per_token, response_mask, normaliser)
    with torch.no_grad():
        stats = {"clipfrac": masked_mean(was_clipped.float(), response_mask),
                 "approx_kl": masked_mean(0.5 * log_ratio ** 2, response_mask)}
    return loss, stats


def clipped_surrogate(log_ratio: torch.Tensor, advantages: torch.Tensor, clip: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token −min(ρA, clip(ρ, 1−ε, 1+ε)A) with ρ = exp(log_ratio), and where the clipped term won.

    log_ratio, advantages: [B, R] (advantages may be [B, 1] to broadcast one per sequence). The one
    copy of the clipped objective, shared by PPO's ``policy_loss`` and GRPO's ``grpo_policy_loss``.
    """
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip, 1.0 + clip)
    return torch.maximum(unclipped, clipped), clipped > unclipped


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, response_mask: torch.Tensor,
               clip: float = 0.2, normaliser: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss ½·max((V − R)², (V_clip − R)²), V_clip = V_old + clip(V − V_old, ±ε), per token [B, R]."""
    clipped_values = old_values + torch.clamp(values - old_values, -clip, clip)
    unclipped_sq = (values - returns) ** 2
    clipped_sq = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(unclipped_sq, clipped_sq)
    loss = token_mean(per_token, response_mask, normaliser)
    with torch.no_grad():
        stats = {"vf_clipfrac": masked_mean((clipped_sq > unclipped_sq).float(), response_mask)}
    return loss, stats


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of the categorical distribution at every position: logits [B, R, V] → [B, R]."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at ``tokens``: logits [..., V], tokens [...] → [...].

    The gather − logsumexp form never materialises a full log-softmax copy of the vocabulary.
    Scale the logits by 1/temperature first to score the distribution that was sampled from.
    """
    picked = logits.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return picked - torch.logsumexp(logits, dim=-1)


def token_mean(per_token: torch.Tensor, mask: torch.Tensor, normaliser: torch.Tensor | float | None = None) -> torch.Tensor:
    """Sum of ``per_token`` [B, R] over the masked positions, divided by their count or by ``normaliser``
    (the token count of a whole minibatch, so that its micro-batches add up to its token mean)."""
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


def rounding_gap(expect: torch.Tensor, got: torch.Tensor) -> float | None:
    """The largest difference between two computations of the same numbers (a fast path against its
    reference) when it is more than float32 rounding explains (1e-4 relative to ``expect``'s largest
    magnitude, 1e-4 absolute below 1), else None: the fast path may replace the reference."""
    gap = float((expect - got).abs().max())
    return None if gap <= 1e-4 * max(1.0, float(expect.abs().max())) else gap


# ---------------------------------------------------------------------------------------------
# Multi-turn episodes: the policy's tokens are interleaved with observation tokens it did not write
# ---------------------------------------------------------------------------------------------

def pack_by_mask(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-align, row by row, the positions of ``x`` where ``mask`` is 1, keeping their order.

    x, mask: [B, T]. Returns (packed [B, L], packed_mask [B, L]) with L the largest row count;
    packed_mask is contiguous from position 0 and packed is 0 past each row's count.
    """
    keep = mask.bool()
    counts = keep.sum(dim=1)
    width = int(counts.max()) if counts.numel() else 0
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]  # kept positions first, in order
    packed_mask = (torch.arange(width, device=x.device)[None, :] < counts[:, None]).to(mask.dtype)
    packed = torch.where(packed_mask.bool(), x.gather(1, order), torch.zeros((), dtype=x.dtype, device=x.device))
    return packed, packed_mask


def unpack_by_mask(packed: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`pack_by_mask`: packed [B, L] back to [B, T] at the positions where
    ``mask`` [B, T] is 1, zeros elsewhere."""
    keep = mask.bool()
    out = torch.zeros(mask.shape, dtype=packed.dtype, device=packed.device)
    width = packed.shape[1]
    order = torch.argsort((~keep).to(torch.int8), dim=1, stable=True)[:, :width]
    valid = torch.arange(width, device=mask.device)[None, :] < keep.sum(dim=1)[:, None]
    return out.scatter(1, order, torch.where(valid, packed, torch.zeros((), dtype=packed.dtype, device=packed.device)))


def multi_turn_advantages(scores: torch.Tensor, kl: torch.Tensor, values: torch.Tensor, loss_mask: torch.Tensor,
                          beta: float, gamma: float = 1.0, lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL-shaped rewards, GAE advantages and returns for episodes whose policy tokens are interleaved
    with tokens the policy did not write (observations, chat-template text).

    scores [B]; kl, values, loss_mask [B, T] with loss_mask 1 on the policy's tokens (any pattern).
    Only the policy's tokens are steps of the decision process: the others are part of the next
    state, not actions, so they get no reward, no KL and no advantage, and the value after a
    turn's last token is the value at the next turn's first token. Computed by packing the policy's
    tokens (:func:`pack_by_mask`), applying :func:`kl_shaped_rewards` and :func:`gae` (score on the
    last policy token), and unpacking. Returns (rewards, advantages, returns), each [B, T] and 0
    wherever loss_mask is 0, whatever kl or values hold there.
    """
    p_kl, p_mask = pack_by_mask(kl, loss_mask)
    p_values, _ = pack_by_mask(values, loss_mask)
    rewards = kl_shaped_rewards(scores, p_kl, p_mask, beta)
    advantages, returns = gae(rewards, p_values, p_mask, gamma, lam)
    return unpack_by_mask(rewards, loss_mask), unpack_by_mask(advantages, loss_mask), unpack_by_mask(returns, loss_mask)


# ---------------------------------------------------------------------------------------------
# Offline preference optimisation from pairs: DPO (Rafailov et al. 2023) and IPO (Azar et al. 2023).
# A "log-ratio" is log π(y|x) − log π_ref(y|x) of a whole reply, one per pair and side: [B].
# ---------------------------------------------------------------------------------------------

def sequence_logprobs(logprobs: torch.Tensor, response_mask: torch.Tensor, average: bool = False) -> torch.Tensor:
    """log π(y|x) of each reply from its per-token log-probabilities: [B, R] → [B].

    The sum over the masked tokens (the sequence's log-likelihood), or with ``average`` their mean
    (a length-normalised log-likelihood; a reply without tokens gives 0 either way).
    """
    total = torch.where(response_mask.bool(), logprobs, torch.zeros_like(logprobs)).sum(dim=-1)
    if not average:
        return total
    return total / response_mask.sum(dim=-1).clamp(min=1).to(total.dtype)


def implicit_reward_stats(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
                          beta: float) -> dict[str, torch.Tensor]:
    """DPO's implicit rewards β·log(π/π_ref) of each side, their margin and the pairwise accuracy (no gradient)."""
    with torch.no_grad():
        chosen, rejected = beta * chosen_logratios.detach(), beta * rejected_logratios.detach()
        return {"rewards_chosen": chosen.mean(), "rewards_rejected": rejected.mean(),
                "margin": (chosen - rejected).mean(), "accuracy": pairwise_accuracy(chosen, rejected)}


def dpo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor, beta: float,
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO's sigmoid loss −log σ(β·h), h = log-ratio(chosen) − log-ratio(rejected), averaged over pairs.

    chosen_logratios, rejected_logratios: [B]. ``label_smoothing`` ε treats each label as wrong with
    probability ε (conservative DPO, Mitchell 2023): −(1−ε)·log σ(βh) − ε·log σ(−βh). Returns
    (scalar loss, implicit-reward statistics). ``logsigmoid`` keeps large margins finite.
    """
    h = beta * (chosen_logratios - rejected_logratios)
    per_pair = -F.logsigmoid(h)
    if label_smoothing:
        per_pair = (1.0 - label_smoothing) * per_pair - label_smoothing * F.logsigmoid(-h)
    return per_pair.mean(), implicit_reward_stats(chosen_logratios, rejected_logratios, beta)


def ipo_loss(chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor,
             beta: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """IPO's squared loss (h − 1/(2β))², h = log-ratio(chosen) − log-ratio(rejected), averaged over pairs.

    chosen_logratios, rejected_logratios: [B]. Unlike DPO's sigmoid, the loss has a finite target
    margin 1/(2β), so deterministic preferences cannot push the policy arbitrarily far from the
    reference (Azar et al. 2023, eq. 17; β plays the role of their τ). Returns (loss, statistics).
    """
    h = chosen_logratios - rejected_logratios
    return ((h - 1.0 / (2.0 * beta)) ** 2).mean(), implicit_reward_stats(chosen_logratios, rejected_logratios, beta)


# ---------------------------------------------------------------------------------------------
# Critic-free online RL: G sampled replies per prompt, each reply's baseline from its group.
# Scores are laid out [N, G] (N prompts, G replies each); ``mask`` [N, G] marks the replies that
# count (1) and padding (0), so groups of unequal size share one tensor.
# ---------------------------------------------------------------------------------------------

def group_advantages(scores: torch.Tensor, mask: torch.Tensor | None = None, scale_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's group-relative advantages: (r − mean of the group) / (std of the group + eps).

    scores, mask: [N, G] → advantages [N, G], 0 on padding (Shao et al. 2024, DeepSeekMath §4.1).
    The std is Bessel-corrected over the group's real members. ``scale_std=False`` only centres
    (Liu et al. 2025, "Dr. GRPO": dividing by the std weights near-unanimous groups up). A group
    whose members all score the same gets advantage 0 whatever eps is.
    """
    mask = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
    n = mask.sum(dim=1, keepdim=True)
    mean = (scores * mask).sum(dim=1, keepdim=True) / n.clamp(min=1.0)
    centred = torch.where(mask.bool(), scores - mean, torch.zeros_like(scores))
    if not scale_std:
        return centred
    std = ((centred ** 2).sum(dim=1, keepdim=True) / (n - 1).clamp(min=1.0)).sqrt()
    return torch.where(std > 0, centred / (std + eps), torch.zeros_like(centred))


def rloo_advantages(scores: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """REINFORCE leave-one-out: each reply's baseline is the mean score of the other replies of its group.

    scores, mask: [N, G] → advantages [N, G], 0 on padding and in groups with one real member
    (nothing to compare with). A_i = r_i − (Σ_j r_j − r_i)/(n − 1) = n/(n − 1)·(r_i − mean), an
    unbiased baseline because it never uses r_i itself (Kool et al. 2019; Ahmadian et al. 2024).
    """
    mask = torch.ones_like(scores) if mask is None else mask.to(scores.dtype)
    n = mask.sum(dim=1, keepdim=True)
    total = (scores * mask).sum(dim=1, keepdim=True)
    baseline = (total - scores) / (n - 1).clamp(min=1.0)
    return torch.where(mask.bool() & (n > 1), scores - baseline, torch.zeros_like(scores))


def kl_penalised_scores(scores: torch.Tensor, kl: torch.Tensor, response_mask: torch.Tensor, beta: float) -> torch.Tensor:
    """The KL penalty in the reward instead of the loss: r − β·Σ_t KL_t per reply.

    scores [B]; kl, response_mask [B, R] → [B]. The sequence-level counterpart of
    ``kl_shaped_rewards`` (its per-token rewards summed over a reply give the same number), for
    estimators that need one reward per reply (RLOO as in Ahmadian et al. 2024).
    """
    return scores - beta * torch.where(response_mask.bool(), kl, torch.zeros_like(kl)).sum(dim=-1)


LOSS_AGGREGATIONS = ("token", "sequence")


def aggregate_loss(per_token: torch.Tensor, response_mask: torch.Tensor, level: str = "token",
                   normaliser: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reduce a per-token loss [B, R] to a scalar, at the token or the sequence level.

    ``token``: sum over every real token / number of tokens, so each token weighs the same and a
    long reply counts more (Yu et al. 2025, DAPO). ``sequence``: each reply's token mean, then the
    mean over replies, so each reply weighs the same (GRPO as Shao et al. 2024 write it).
    ``normaliser``: the whole minibatch's token count (token level) or reply count (sequence level),
    so that gradient-accumulated micro-batches add up to the minibatch's loss.
    """
    masked = torch.where(response_mask.bool(), per_token, torch.zeros_like(per_token))
    if level == "token":
        denominator = response_mask.sum() if normaliser is None else normaliser
        return masked.sum() / max(float(denominator), 1.0)
    if level == "sequence":
        per_reply = masked.sum(dim=-1) / response_mask.sum(dim=-1).clamp(min=1).to(masked.dtype)
        denominator = per_token.shape[0] if normaliser is None else normaliser
        return per_reply.sum() / max(float(denominator), 1.0)
    raise ValueError(f"loss aggregation must be one of {LOSS_AGGREGATIONS}, got {level!r}")


def grpo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     response_mask: torch.Tensor, clip: float = 0.2, ref_logprobs: torch.Tensor | None = None,
                     beta: float = 0.0, level: str = "token",
                     normaliser: torch.Tensor | float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO's objective per token: the clipped surrogate with one advantage per reply, plus β·k3 KL.

    logprobs, old_logprobs, ref_logprobs, response_mask: [B, R]; advantages: [B], broadcast over
    each reply's tokens. The KL to the reference sits in the loss as the k3 estimator
    (r − 1) − log r, r = π_ref/π, whose gradient pulls π toward π_ref (Shao et al. 2024, eq. 4).
    Reduced by ``aggregate_loss`` (``level``, ``normaliser``). Returns (loss, stats) where stats
    hold the clip fraction, ½·E[(log ρ)²] and the mean k3 per token (when ``ref_logprobs`` is given).
    """
    log_ratio = logprobs - old_logprobs
    per_token, was_clipped = clipped_surrogate(log_ratio, advantages.unsqueeze(-1), clip)
    stats: dict[str, torch.Tensor] = {}
    if ref_logprobs is not None:
        k3 = kl_k3(logprobs, ref_logprobs)
        if beta:
            per_token = per_token + beta * k3
        with torch.no_grad():
            stats["kl_k3"] = masked_mean(k3.detach(), response_mask)
    loss = aggregate_loss(per_token, response_mask, level, normaliser)
    with torch.no_grad():
        stats["clipfrac"] = masked_mean(was_clipped.float(), response_mask)
        stats["approx_kl"] = masked_mean(0.5 * log_ratio.detach() ** 2, response_mask)
    return loss, stats
