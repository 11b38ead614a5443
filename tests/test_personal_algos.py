"""The per-user reward math (rlhf/algos.py): by hand, loop against vectorised, and invariances."""

import math

import pytest
import torch

from rlhf.algos import bradley_terry_loss, fit_user_embedding, personal_preference_loss, personal_rewards


def test_personal_rewards_by_hand():
    # h = (1, 2), B = [[1, 0], [0, 1]] (D = 2), e = (0.5, -1): offset 0.5·1 − 1·2 = −1.5 on top of r0 = 3.
    r = personal_rewards(torch.tensor([3.0, 3.0]), torch.tensor([[1.0, 2.0], [1.0, 2.0]]), torch.eye(2),
                         torch.tensor([[0.5, -1.0], [0.0, 0.0]]))
    assert r.tolist() == [1.5, 3.0]  # the second item is scored generically: r0 unchanged


def test_personal_rewards_loop_equals_vectorised_and_generic_rows_are_the_generic_reward():
    torch.manual_seed(0)
    n, h, d = 7, 5, 3
    generic, feats, basis, emb = torch.randn(n), torch.randn(n, h), torch.randn(d, h), torch.randn(n, d)
    emb[2] = 0
    loop = torch.stack([generic[i] + sum(emb[i, k] * (basis[k] @ feats[i]) for k in range(d)) for i in range(n)])
    got = personal_rewards(generic, feats, basis, emb)
    assert torch.allclose(got, loop, atol=1e-5)
    assert got[2] == generic[2]
    # an item's reward depends on its own row only: scoring a subset gives the same numbers
    assert torch.allclose(personal_rewards(generic[3:], feats[3:], basis, emb[3:]), got[3:], atol=1e-6)


def test_personal_preference_loss_by_hand():
    # one pair, margin 1, user with 2 pairs, ‖e‖² = 4, λ = 0.5: −log σ(1) + 0.5·4/(2·2) = 0.31326 + 0.5
    loss = personal_preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.tensor([[2.0, 0.0]]),
                                    torch.tensor([2]), 0.5)
    assert abs(loss.item() - (math.log1p(math.exp(-1.0)) + 0.5)) < 1e-6
    # a generically scored pair (zero embedding) is plain Bradley-Terry
    plain = personal_preference_loss(torch.tensor([1.0]), torch.tensor([0.0]), torch.zeros(1, 2), torch.tensor([2]), 0.5)
    assert abs(plain.item() - bradley_terry_loss(torch.tensor([1.0]), torch.tensor([0.0])).item()) < 1e-7


def test_personal_preference_loss_sums_to_the_map_objective_and_halves_agree():
    torch.manual_seed(1)
    users = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2])
    table = torch.randn(3, 4)
    counts = torch.bincount(users).float()
    rc, rr = torch.randn(8), torch.randn(8)
    lam = 0.7
    loss = personal_preference_loss(rc, rr, table[users], counts[users], lam)
    # the whole-set objective written as a loop over pairs and users
    bt = sum(-math.log(1 / (1 + math.exp(-(rc[i] - rr[i]).item()))) for i in range(8))
    prior = sum(0.5 * lam * float(table[u] @ table[u]) for u in range(3))
    assert abs(loss.item() - (bt + prior) / 8) < 1e-5
    halves = (personal_preference_loss(rc[:4], rr[:4], table[users[:4]], counts[users[:4]], lam)
              + personal_preference_loss(rc[4:], rr[4:], table[users[4:]], counts[users[4:]], lam)) / 2
    assert torch.allclose(loss, halves, atol=1e-6)


def _objective(g, z, lam, e):
    return float(-torch.nn.functional.logsigmoid(g.double() + z.double() @ e.double()).sum() + 0.5 * lam * (e.double() @ e.double()))


def test_fit_user_embedding_one_dimension_by_hand():
    # One pair, g = 0, z = 1, λ = 1: the gradient −σ(−e) + e vanishes at e = 1/(1 + exp e) ≈ 0.4010581375.
    e = fit_user_embedding(torch.tensor([0.0]), torch.tensor([[1.0]]), 1.0)
    assert abs(e.item() - 0.4010581375) < 1e-6
    # no pairs: the prior's mode, the generic reward
    assert fit_user_embedding(torch.zeros(0), torch.zeros(0, 3), 1.0).tolist() == [0.0, 0.0, 0.0]


def test_fit_user_embedding_matches_plain_gradient_descent():
    torch.manual_seed(2)
    g, z = 0.3 * torch.randn(30), torch.randn(30, 4)
    e = fit_user_embedding(g, z, 0.5)
    v = torch.zeros(4, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([v], lr=1, max_iter=500, tolerance_grad=1e-12, tolerance_change=1e-14)

    def closure():
        opt.zero_grad()
        loss = -torch.nn.functional.logsigmoid(g.double() + z.double() @ v).sum() + 0.25 * (v @ v)
        loss.backward()
        return loss

    opt.step(closure)
    assert torch.allclose(e.double(), v.detach(), atol=1e-5)
    assert _objective(g, z, 0.5, e) <= _objective(g, z, 0.5, v.detach().float()) + 1e-9


def test_fit_user_embedding_invariances():
    torch.manual_seed(3)
    g, z = torch.randn(12), torch.randn(12, 3)
    e = fit_user_embedding(g, z, 1.0)
    perm = torch.randperm(12)
    assert torch.allclose(fit_user_embedding(g[perm], z[perm], 1.0), e, atol=1e-6)  # pair order is irrelevant
    # every pair twice with twice the prior: the same objective up to a factor 2, the same optimum
    assert torch.allclose(fit_user_embedding(torch.cat([g, g]), torch.cat([z, z]), 2.0), e, atol=1e-6)
    # starting from another point changes nothing (strictly convex)
    assert torch.allclose(fit_user_embedding(g, z, 1.0, init=torch.tensor([5.0, -5.0, 5.0])), e, atol=1e-5)
    # a separable user stays finite thanks to the prior
    sep = fit_user_embedding(torch.zeros(5), torch.ones(5, 1) * 3, 0.1)
    assert torch.isfinite(sep).all() and sep.item() > 0
    with pytest.raises(ValueError):
        fit_user_embedding(g, z, 0.0)


# -- the linear user part: feature-group scales and the prior chosen by cross-validation (rlhf/personal/update.py)

def test_group_scales_give_each_group_unit_size_by_hand():
    from rlhf.personal.update import group_scales

    # a 2-wide block with difference norms 3 and 5 (mean 4), and one column with values 1, 3 (std √2)
    diffs = torch.tensor([[3.0, 0.0, 1.0], [0.0, 5.0, 3.0]])
    s = group_scales(diffs, [slice(0, 2), slice(2, 3)])
    assert torch.allclose(s, torch.tensor([0.25, 0.25, 1 / math.sqrt(2)]))
    # a group that never varies keeps scale 1 (nothing to normalise, no division by zero)
    assert group_scales(torch.zeros(4, 2), [slice(0, 2)]).tolist() == [1.0, 1.0]


def _users(n_users, pairs, signal, seed):
    """Per user (g, z, record ids): choices from a hidden row of the given strength on 3-d features."""
    gen = torch.Generator().manual_seed(seed)
    users = []
    for _ in range(n_users):
        w = signal * torch.randn(3, generator=gen)
        z = torch.randn(pairs, 3, generator=gen)
        flip = torch.rand(pairs, generator=gen) > torch.sigmoid(z @ w)  # the user chose the other reply
        z[flip] = -z[flip]
        users.append((torch.zeros(pairs, dtype=torch.float64), z, [i // 2 for i in range(pairs)]))  # 2 pairs a record
    return users


def test_choose_prior_follows_the_evidence():
    from rlhf.personal.update import PRIOR_GRID, choose_prior

    strong, scores = choose_prior(_users(4, 60, 4.0, seed=0))
    noise, _ = choose_prior(_users(4, 60, 0.0, seed=0))
    assert strong < 3.0 and noise >= 30.0  # clear users: a weak prior; coin-flipping users: stay at the generic reward
    assert set(scores) == set(PRIOR_GRID) and max(scores.values()) == scores[strong]


def test_choose_prior_by_hand_and_keeps_records_together():
    from rlhf.personal.update import choose_prior

    # one user, two records of one pair each, 2 folds: each fold fits on the other record's pair (g = 0, z = 1:
    # the one-dimensional fit by hand above gives e = 0.4010581375 at λ = 1) and scores log σ(z e) on its own
    e1 = 0.4010581375
    lam, scores = choose_prior([(torch.zeros(2, dtype=torch.float64), torch.ones(2, 1), ["a", "b"])], grid=(1.0,), folds=2)
    assert lam == 1.0 and abs(scores[1.0] - math.log(1 / (1 + math.exp(-e1)))) < 1e-6
    # the pairs of one record are never split: with all pairs in one record there is no other fold to fit on
    _, scores = choose_prior([(torch.zeros(3, dtype=torch.float64), torch.ones(3, 1), ["a", "a", "a"])], grid=(1.0,), folds=2)
    assert scores[1.0] == 0.0
