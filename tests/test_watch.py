"""The over-optimisation watch: the Gao et al. fit recovers known coefficients; flags fire when they should."""

import math

from rlhf.eval.watch import OveroptimisationWatch, WatchPoint, fit_gao_rl


def point(step, kl, proxy, gold, length=10.0, repetition=0.1):
    return WatchPoint(step, kl, proxy, gold, length, repetition)


def test_gao_fit_recovers_alpha_and_beta():
    alpha, beta = 1.0, 0.5
    pts = [point(0, 0.0, 0, 2.0)]
    for i, d in enumerate([0.5, 1.0, 2.0, 4.0, 8.0]):
        pts.append(point(i + 1, d * d, i, 2.0 + d * (alpha - beta * math.log(d))))
    a, b = fit_gao_rl(pts)
    assert abs(a - alpha) < 1e-9 and abs(b - beta) < 1e-9
    assert abs(OveroptimisationWatch(points=pts).summary()["gao_fit"]["peak_sqrt_kl"] - math.exp(alpha / beta - 1)) < 1e-6


def test_flags_when_proxy_rises_while_gold_falls_for_patience_evaluations():
    w = OveroptimisationWatch(patience=3)
    golds = [0.0, 0.5, 0.8, 0.7, 0.6, 0.5]
    flags = [w.update(point(i, i * 0.1, proxy=i, gold=g)) for i, g in enumerate(golds)]
    assert flags[:5] == [None] * 5 and flags[5] is not None and "gold judge fell" in flags[5]
    assert w.best_gold_step == 2


def test_a_gold_recovery_resets_the_streak():
    w = OveroptimisationWatch(patience=3)
    for i, g in enumerate([0.0, 1.0, 0.9, 0.8, 0.85, 0.8, 0.7]):
        assert w.update(point(i, i * 0.1, proxy=i, gold=g)) is None


def test_length_and_repetition_drift_flags():
    w = OveroptimisationWatch(max_length_ratio=2.0)
    assert w.update(point(0, 0, 0, 0, length=10)) is None
    assert w.update(point(1, 0.1, 1, 0.1, length=19)) is None
    assert "length drifted" in w.update(point(2, 0.2, 2, 0.2, length=21))
    short = OveroptimisationWatch(max_length_ratio=2.0)
    short.update(point(0, 0, 0, 0, length=10))
    assert short.update(point(1, 0.1, 1, 0.1, length=5.5)) is None
    assert "length collapsed" in short.update(point(2, 0.2, 2, 0.2, length=4.5))
    r = OveroptimisationWatch(max_repetition_increase=0.2)
    r.update(point(0, 0, 0, 0, repetition=0.1))
    assert "repetition rose" in r.update(point(1, 0.1, 1, 0.1, repetition=0.35))


def test_state_round_trip_for_resume():
    w = OveroptimisationWatch()
    for i in range(4):
        w.update(point(i, i, i, -i))
    clone = OveroptimisationWatch()
    clone.load_state_dict(w.state_dict())
    assert clone.summary() == w.summary()
    assert clone.update(point(5, 5, 5, -5)) == w.update(point(5, 5, 5, -5))
