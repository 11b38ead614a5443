"""Calibration of the evaluation's "95%" bootstrap intervals: they must cover the true mean about
95% of the time, be as wide as normal theory says for a large sample, and be what `rlhf eval`
reports. A 90% interval covers ~89% and is 16% narrower (1.645 vs 1.96 standard errors): each
check below tells the two apart by several standard deviations of its own noise."""

from __future__ import annotations

import torch

from rlhf.eval.stats import bootstrap_ci, summarise


def coverage(interval, trials: int = 1000, n: int = 40, seed: int = 0) -> float:
    """Share of ``trials`` samples of n draws from Exp(1) (true mean 1, skewed like many judge scores)
    whose interval contains the true mean."""
    g = torch.Generator().manual_seed(seed)
    hits = 0
    for t in range(trials):
        x = -torch.log(torch.rand(n, generator=g, dtype=torch.float64))
        lo, hi = interval(x, t)
        hits += lo <= 1.0 <= hi
    return hits / trials


def test_bootstrap_interval_covers_the_mean_95_percent_of_the_time():
    # Percentile bootstrap under-covers a little at n = 40 on skewed data (about 93%); 1000 trials
    # give a standard error of ~0.8 points, so a 90% interval (~88%) falls far outside [0.915, 0.975].
    cov = coverage(lambda x, t: bootstrap_ci(x, n_boot=1000, seed=t))
    assert 0.915 <= cov <= 0.975, cov


def test_summaries_default_to_95_percent():
    cov = coverage(lambda x, t: (lambda s: (s.ci_low, s.ci_high))(summarise(x, n_boot=1000, seed=t)))
    assert 0.915 <= cov <= 0.975, cov


def test_large_sample_interval_has_the_normal_width():
    """n = 4000 draws of N(0, 1): the 95% interval of the mean is ±1.96/√n (±1.645/√n at 90%)."""
    x = torch.randn(4000, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    se = float(x.std()) / 4000 ** 0.5
    for lo, hi in (bootstrap_ci(x, n_boot=4000), (summarise(x, n_boot=4000).ci_low, summarise(x, n_boot=4000).ci_high)):
        ratio = (hi - lo) / (2 * 1.96 * se)
        assert 0.95 < ratio < 1.05, ratio  # bootstrap quantile noise at 4000 resamples is ~2%


def test_rlhf_eval_reports_the_95_percent_interval(tiny_model_dir):
    """What the evaluation writes is the calibrated 95% interval of the scores it computed."""
    from rlhf.eval.judging import evaluate
    from rlhf.judges.base import LengthScorer, RepetitionScorer
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.generate import SamplingParams

    model, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    result = evaluate({"m": (model, tok)}, (model, tok), ["my house is too hot", "how do I cook rice"],
                      [LengthScorer(), RepetitionScorer()], SamplingParams(max_new_tokens=8, temperature=1.0),
                      samples_per_prompt=6, batch_size=12, seed=3, n_boot=500)
    m = result.models[0]
    for judge, values in m.scores.items():
        want = summarise(torch.tensor(values), n_boot=500, confidence=0.95, seed=3)
        got = m.summaries[judge]
        assert (got.ci_low, got.ci_high) == (want.ci_low, want.ci_high), judge
        assert got.ci_low < got.ci_high or got.std == 0
