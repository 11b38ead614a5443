"""Fast per-user refits on cached features, gated by held-out accuracy: ``rlhf personal update`` and the loop.

With the backbone, the generic head and the basis B fixed, one user's row e_u is a logistic
regression on the features of their pairs (``rlhf.algos.fit_user_embedding``): no backbone pass
for any text seen before (the feature cache), milliseconds of Newton steps, and nobody else's row
changes. A candidate is fitted on all but the user's most recent feedback and judged on those
recent choices against the deployed row (zeros for a new user: the generic reward). It becomes a
new version either way, so its accuracy is on record in ``versions.jsonl``; it is deployed only when
it is not worse: higher held-out accuracy, or equal accuracy and no lower held-out log-likelihood.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F

from rlhf.algos import fit_user_embedding
from rlhf.data.records import PairRecord
from rlhf.errors import ConfigError
from rlhf.personal.model import PersonalReward, UserTable, generic_reward

# Prior precisions λ that cross-validation chooses from (a user part on unit-scaled feature groups:
# λ = 1 lets one group move the reward by about one logit per unit of evidence).
PRIOR_GRID = (0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0)


@dataclass
class RefitResult:
    """One candidate for one user: what it was fitted on, how it and the deployed row did on held-out choices."""

    user: str
    train_pairs: int
    heldout_pairs: int
    accuracy_deployed: float | None
    accuracy_candidate: float | None
    loglik_deployed: float | None
    loglik_candidate: float | None
    deployed: bool
    version: str | None
    parent: str
    reason: str
    fit_seconds: float


def margins(reward: PersonalReward, pairs: list[PairRecord], basis: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g [N], z [N, D]): generic margins r₀(c) − r₀(r) and basis margins B(h_c − h_r) of ``pairs``."""
    if not pairs:
        return torch.zeros(0), torch.zeros(0, basis.shape[0])
    prompts = [p.prompt for p in pairs]
    fc, fr = reward.features(prompts, [p.chosen for p in pairs]), reward.features(prompts, [p.rejected for p in pairs])
    with torch.no_grad():
        g = (generic_reward(reward.rm, fc) - generic_reward(reward.rm, fr)).cpu()
    return g, (fc - fr) @ basis.T


def heldout_stats(g: torch.Tensor, z: torch.Tensor, e: torch.Tensor) -> tuple[float, float]:
    """(accuracy with ties counted half, mean log-likelihood log σ(margin)) of a user row on pairs."""
    m = g + z @ e
    acc = float(((m > 0).float() + 0.5 * (m == 0).float()).mean())
    return acc, float(F.logsigmoid(m).mean())


def split_heldout(pairs: list[PairRecord], fraction: float) -> tuple[list[PairRecord], list[PairRecord]]:
    """The pairs of the most recent ``fraction`` of the user's feedback records held out (at least one
    record when there are two or more); the pairs of one record stay together."""
    ids: list[Any] = []
    for p in pairs:
        if p.extra.get("feedback_id") not in ids:
            ids.append(p.extra.get("feedback_id"))
    k = min(len(ids) - 1, max(1, math.ceil(fraction * len(ids)))) if len(ids) >= 2 and fraction > 0 else 0
    held = set(ids[len(ids) - k:]) if k else set()
    return [p for p in pairs if p.extra.get("feedback_id") not in held], [p for p in pairs if p.extra.get("feedback_id") in held]


def group_scales(diffs: torch.Tensor, groups: list[slice]) -> torch.Tensor:
    """s [F]: one scale per feature group so that the group's part of a chosen-minus-rejected feature
    difference has unit size on average (mean norm for a block, standard deviation for a single column).
    diffs [N, F]. An isotropic prior on s ⊙ φ then weighs each group alike, whatever its width."""
    s = torch.ones(diffs.shape[1])
    for g in groups:
        block = diffs[:, g].double()
        size = float(block.std()) if block.shape[1] == 1 and len(block) > 1 else float(block.norm(dim=1).mean())
        s[g] = 1.0 / size if size > 1e-12 else 1.0
    return s


def fit_row(generic_margin: torch.Tensor, basis_margin: torch.Tensor, prior: float,
            init: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`rlhf.algos.fit_user_embedding`, in the span of the pairs when there are fewer pairs than dimensions.

    With z = U S Vᵀ (thin SVD, V [D, r]) the likelihood sees e only through Vᵀe and the prior pulls
    the rest to zero, so the optimum is e = V c with c fitted on z V = U S [N, r]: the same
    answer, with Newton steps on r ≤ N unknowns instead of D (a 770-wide row on 10 pairs: 10)."""
    n, dim = basis_margin.shape
    if n >= dim:
        return fit_user_embedding(generic_margin, basis_margin, prior, init=init)
    z = basis_margin.double()
    _, _, vh = torch.linalg.svd(z, full_matrices=False)  # vh [N, D]: orthonormal rows spanning the pairs
    c0 = None if init is None else vh @ init.double()
    return (vh.T @ fit_user_embedding(generic_margin, z @ vh.T, prior, init=c0).double()).float()


def record_folds(ids: list, folds: int) -> torch.Tensor:
    """Fold [N] of each pair: the k-th distinct feedback record (in order) goes to fold k mod ``folds``,
    so the pairs of one record never sit on both sides of a split."""
    order = {rid: k % folds for k, rid in enumerate(dict.fromkeys(ids))}
    return torch.tensor([order[r] for r in ids], dtype=torch.long)


def cross_fitted_margins(z: torch.Tensor, ids: list, prior: float, folds: int = 5) -> torch.Tensor:
    """[N]: each pair's margin z_i·w under a row w fitted (MAP, λ = ``prior``) on the other folds only.

    A row fitted on all pairs has seen each one, so its margins on them are optimistic; a second
    fit on top of them (a user's row on the generic reward) would find too little left to explain."""
    fold, out = record_folds(ids, folds), torch.zeros(len(z), dtype=torch.float64)
    for k in range(folds):
        held = fold == k
        if held.any():
            out[held] = z[held].double() @ fit_row(torch.zeros(int((~held).sum())), z[~held], prior).double()
    return out


def choose_prior(users: list[tuple[torch.Tensor, torch.Tensor, list]], grid=PRIOR_GRID, folds: int = 5) -> tuple[float, dict]:
    """The prior precision λ with the best cross-validated log-likelihood over every user's training comparisons.

    users: per user (g [N], z [N, D], record id of each pair); the pairs of one feedback record stay
    in one fold, and record k of a user (in time order) goes to fold k mod ``folds``. Each fold's
    rows are fitted exactly (:func:`rlhf.algos.fit_user_embedding`) on the other folds and scored on
    it; the held-out mean log σ(margin) is pooled over users. Ties go to the larger λ (nearer the
    generic reward). Returns (λ, {λ: mean held-out log-likelihood}).
    """
    scores = {}
    for lam in grid:
        total, count = 0.0, 0
        for g, z, ids in users:
            fold = record_folds(ids, folds)
            for k in range(folds):
                held = fold == k
                if held.all() or not held.any():
                    continue
                e = fit_row(g[~held], z[~held], lam)
                total += float(F.logsigmoid(g[held] + z[held] @ e).sum())
                count += int(held.sum())
        scores[lam] = total / max(1, count)
    best = max(grid, key=lambda lam: (round(scores[lam], 12), lam))
    return best, scores


def fit_user(reward: PersonalReward, table: UserTable, user: str, pairs: list[PairRecord]) -> torch.Tensor:
    """The user's MAP row from ``pairs`` (warm-started at their current row): [D]."""
    g, z = margins(reward, pairs, table.basis)
    return fit_row(g, z, reward.config.prior_precision, init=table.embedding(user))


def refit_user(reward: PersonalReward, user: str, pairs: list[PairRecord], holdout: float = 0.2,
               gate: bool = True) -> RefitResult:
    """Fit a candidate for ``user``, write it as a version, deploy it unless it is worse; log it either way."""
    reward.refresh()
    parent, table = reward.version, reward.table
    train, held = split_heldout(pairs, holdout)
    if not train:
        raise ConfigError(f"user {user!r} has no comparisons to fit on yet")
    t0 = time.perf_counter()
    candidate = fit_user(reward, table, user, train)
    fit_s = time.perf_counter() - t0
    acc_old = acc_new = ll_old = ll_new = None
    if held:
        g, z = margins(reward, held, table.basis)
        acc_old, ll_old = heldout_stats(g, z, table.embedding(user))
        acc_new, ll_new = heldout_stats(g, z, candidate)
    if not gate:
        ok, reason = True, "deployed without a gate"
    elif not held:
        ok, reason = False, "no held-out choices yet to judge it by"
    elif (acc_new, ll_new) >= (acc_old, ll_old):
        ok, reason = True, "not worse on held-out choices"
    else:
        ok, reason = False, "worse on held-out choices than the deployed version"
    new_table = table.with_user(user, candidate, len(train))
    stats = {"user": user, "train_pairs": len(train), "heldout_pairs": len(held), "accuracy_deployed": acc_old,
             "accuracy_candidate": acc_new, "loglik_deployed": ll_old, "loglik_candidate": ll_new}
    version = reward.dir.write_version(new_table, {"parent": parent, "source": "refit", **stats})
    if ok:
        reward.dir.deploy(version)
        reward.refresh()
    result = RefitResult(user, len(train), len(held), acc_old, acc_new, ll_old, ll_new, ok, version, parent, reason,
                         round(fit_s, 4))
    reward.dir.log({"time": time.time(), **asdict(result)})
    return result
