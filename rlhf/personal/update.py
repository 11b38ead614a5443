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
from rlhf.personal.model import PersonalReward, UserTable


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
        device = reward.rm.head.weight.device
        g = (reward.rm.reward_from(fc.to(device)) - reward.rm.reward_from(fr.to(device))).cpu()
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


def fit_user(reward: PersonalReward, table: UserTable, user: str, pairs: list[PairRecord]) -> torch.Tensor:
    """The user's MAP row from ``pairs`` (warm-started at their current row): [D]."""
    g, z = margins(reward, pairs, table.basis)
    return fit_user_embedding(g, z, reward.config.prior_precision, init=table.embedding(user))


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
