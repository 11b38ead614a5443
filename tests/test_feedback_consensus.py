"""Consensus and agreement math against values computed by hand (rlhf/feedback/consensus.py)."""

import random

import pytest

from rlhf.feedback.consensus import (agreement_with_consensus, borda_consensus, borda_scores, fractional_ranks,
                                     kendalls_w, pairwise_agreement)
from rlhf.feedback.simulate import noisy_ranking

A = ([0, 1, 2], [])
B = ([0, 1, 2], [])
C = ([1, 0, 2], [])


def test_fractional_ranks_share_the_mean_place_of_a_tie():
    assert fractional_ranks([2, 0, 1]) == [2.0, 3.0, 1.0]
    assert fractional_ranks([2, 0, 1], [[0, 1]]) == [2.5, 2.5, 1.0]
    with pytest.raises(ValueError, match="not a permutation"):
        fractional_ranks([0, 0, 1])


def test_kendalls_w_by_hand():
    # ranks A,B = [1,2,3], C = [2,1,3]; R = [4,5,9], mean 6, S = 4+1+9 = 14; W = 12*14 / (9*(27-3)) = 7/9
    assert kendalls_w([A, B, C]) == pytest.approx(7 / 9)
    # identical rankings agree fully; exact reversal of two labelers gives W = 0
    assert kendalls_w([A, B]) == pytest.approx(1.0)
    assert kendalls_w([A, ([2, 1, 0], [])]) == pytest.approx(0.0)


def test_kendalls_w_tie_correction_by_hand():
    # A' ranks [1, 2.5, 2.5] (tie of 2: T = 2^3 - 2 = 6), B [1,2,3]; R = [2, 4.5, 5.5], mean 4,
    # S = 4 + 0.25 + 2.25 = 6.5; W = 12*6.5 / (4*24 - 2*6) = 78/84
    assert kendalls_w([([0, 1, 2], [[1, 2]]), B]) == pytest.approx(78 / 84)


def test_kendalls_w_undefined_cases_are_none():
    assert kendalls_w([A]) is None
    assert kendalls_w([([0], []), ([0], [])]) is None
    everything_tied = ([0, 1, 2], [[0, 1, 2]])
    assert kendalls_w([everything_tied, everything_tied]) is None


def test_pairwise_agreement_by_hand():
    # A vs C disagree on (0,1) only: 2/3; A-B 3/3, A-C 2/3, B-C 2/3 -> 7/9 pooled
    assert pairwise_agreement([A, C]) == pytest.approx(2 / 3)
    assert pairwise_agreement([A, B, C]) == pytest.approx(7 / 9)
    # a tie against a strict order is a disagreement on that pair
    assert pairwise_agreement([([0, 1, 2], [[1, 2]]), B]) == pytest.approx(2 / 3)
    assert pairwise_agreement([A]) is None


def test_borda_scores_and_consensus_by_hand():
    # points = completions beaten + ties/2: A,B give [2,1,0], C gives [1,2,0] -> [5,4,0]
    assert borda_scores([A, B, C]) == [5.0, 4.0, 0.0]
    cons = borda_consensus([A, B, C])
    assert cons.ranking == [0, 1, 2] and cons.ties == []
    # equal points become a tie group, contiguous in the ranking
    cons = borda_consensus([A, C])
    assert cons.scores == [3.0, 3.0, 0.0]
    assert cons.ranking == [0, 1, 2] and cons.ties == [[0, 1]]
    # with ties in the input: [1,2.5,2.5] -> points [2, .5, .5]
    assert borda_scores([([0, 1, 2], [[1, 2]])]) == [2.0, 0.5, 0.5]
    # one labeler: the consensus is their ranking
    assert borda_consensus([([2, 0, 1], [])]).ranking == [2, 0, 1]


def test_agreement_with_leave_one_out_consensus_by_hand():
    # C vs consensus(A,B) = [0,1,2]: 2 of 3 pairs. A vs consensus(B,C) = 0~1 tied, then 2: A says 0>1, so 2 of 3.
    out = agreement_with_consensus({"item": {"a": A, "b": B, "c": C}, "solo": {"a": A}})
    assert (out["c"].agree, out["c"].compared) == (2, 3)
    assert (out["a"].agree, out["a"].compared) == (2, 3)  # the solo item gives no comparison
    assert out["b"].rate == pytest.approx(2 / 3)


def test_noisy_ranking_without_noise_follows_the_scorer():
    rng = random.Random(0)
    assert noisy_ranking([1.0, 3.0, 2.0], 0.0, rng) == ([1, 2, 0], [])
    assert noisy_ranking([1.0, 3.0, 2.0], 0.0, rng, higher_is_better=False) == ([0, 2, 1], [])
    assert noisy_ranking([1.0, 1.05, 3.0], 0.0, rng, tie_margin=0.1) == ([2, 1, 0], [[1, 0]])


def test_noisy_ranking_noise_lowers_agreement_with_the_truth():
    rng = random.Random(1)
    scores = [0.0, 1.0, 2.0, 3.0]
    truth = ([3, 2, 1, 0], [])

    def mean_agreement(noise):
        return sum(pairwise_agreement([truth, noisy_ranking(scores, noise, rng)]) for _ in range(300)) / 300

    low, high = mean_agreement(0.3), mean_agreement(5.0)
    assert low > 0.9 and 0.4 < high < 0.75 and low > high
