"""What a report says: a verdict per judge by its direction and group, raw changes with arrows, the gold
peak after which the gold judge fell, the Gao fit only where determined, plots with units, scores
beside samples, names never cut, files readable by others."""

from __future__ import annotations

import math
import os
import re
import stat

import pytest
import torch

from rlhf.eval.console import LogFriendlyStream, StageClock, duration, verdict_lines
from rlhf.eval.judging import EvalResult, ModelResult, format_table
from rlhf.eval.report import ReportInput, TrainingInfo, write_report
from rlhf.eval.stats import summarise
from rlhf.eval.verdict import ROLE_TITLES, change_word, gold_story, judge_verdicts, watch_sentences
from rlhf.eval.watch import OveroptimisationWatch, WatchPoint, gao_fit_report

BASE = "bundled"
TUNED = "/very/long/path/to/a/run/folder/that/goes/on/and/on/ppo/model"
RM = "rm:/very/long/path/to/a/run/folder/that/goes/on/and/on/reward/model"
GOLD = "weighted:4*relevance+2*toxicity+sentiment"


def model(name: str, scores: dict[str, list[float]]) -> ModelResult:
    return ModelResult(name, [f"reply {i}" for i in range(len(next(iter(scores.values()))))], scores,
                       {k: summarise(torch.tensor(v), n_boot=300) for k, v in scores.items()},
                       kl=summarise(torch.tensor([3.9, 4.1, 4.0, 4.2]), n_boot=300),
                       ref_perplexity=summarise(torch.tensor([5.0, 6.0, 5.5, 5.2]), n_boot=300))


@pytest.fixture
def result() -> EvalResult:
    g = torch.Generator().manual_seed(0)
    noise = lambda: (torch.randn(40, generator=g) * 0.02).tolist()  # noqa: E731
    before = {"toxicity": [0.244 + e for e in noise()], "repetition": [0.10 + e for e in noise()],
              "length": [20 + e for e in noise()], "relevance": [0.11 + e for e in noise()],
              GOLD: [0.5 + e for e in noise()], RM: [0.0 + e for e in noise()]}
    after = {"toxicity": [0.038 + e for e in noise()], "repetition": [0.15 + e for e in noise()],
             "length": [26 + e for e in noise()], "relevance": [0.11 + 0.001 * e for e in noise()],
             GOLD: [0.9 + e for e in noise()], RM: [1.5 + e for e in noise()]}
    after["relevance"] = [b + e * 5 for b, e in zip(before["relevance"], noise())]  # no clear change
    higher = {"toxicity": False, "repetition": False, "length": True, "relevance": True, GOLD: True, RM: True}
    roles = {"length": "drift", GOLD: "gold", RM: "optimised"}
    return EvalResult(prompts=["p"] * 40, judges=higher, models=[model(BASE, before), model(TUNED, after)],
                      roles=roles, n_boot=300)


def test_change_words_follow_each_judges_direction_and_length_is_never_better():
    assert change_word(-0.2, -0.25, -0.15, higher_is_better=False, role="independent") == "better"  # toxicity fell
    assert change_word(0.05, 0.03, 0.07, higher_is_better=False, role="independent") == "worse"      # repetition rose
    assert change_word(6.0, 5.0, 7.0, higher_is_better=True, role="drift") == "rose"
    assert change_word(0.01, -0.02, 0.04, higher_is_better=True, role="independent") == "no clear change"


def test_verdicts_are_grouped_with_raw_changes_and_arrows(result):
    verdicts = {v.judge: v for v in judge_verdicts(result.to_json())}
    assert [v.role for v in judge_verdicts(result.to_json())] == ["optimised", "gold", "independent", "independent",
                                                                  "independent", "drift"]
    tox, rep, length = verdicts["toxicity"], verdicts["repetition"], verdicts["length"]
    assert tox.word == "better" and tox.change_text().startswith("↓ 0.2") and "lower is better" in tox.sentence()
    assert rep.word == "worse" and rep.change_text().startswith("↑ 0.05")
    assert length.word == "rose" and "better" not in length.sentence() and "drift" in length.sentence()
    assert verdicts["relevance"].word == "no clear change"
    assert "%" not in tox.sentence().replace("95% CI", "")  # no relative percentages that flip sign by direction
    lo, hi = (float(x) for x in re.search(r"95% CI ([\d.]+) to ([\d.]+)", tox.sentence()).groups())
    assert 0 < lo < abs(tox.change) < hi  # the interval is given in the arrow's direction


def test_the_paired_change_interval_is_in_the_table(result):
    row = next(r for r in result.table() if r["judge"] == "toxicity" and r["model"] == TUNED)
    assert row["change_ci_low"] < row["change"] < row["change_ci_high"] < 0 and row["verdict"] == "better"
    assert row["role"] == "independent"


def test_eval_table_keeps_whole_model_paths_and_aligns_long_judge_names(result):
    text = format_table(result)
    assert TUNED in text and RM in text  # nothing cut from the left (or anywhere)
    rows = [ln for ln in text.splitlines() if re.match(r"  \[\d\] ", ln)]
    assert len(rows) == 2 * len(result.judges) + 2  # and the two KL rows
    assert len({ln.index("±") for ln in rows}) == 1, text  # the numbers line up under long names
    assert "↓ 0.2" in text and "better" in text and "%" not in text.replace("95% CI", "")


def test_gold_story_reports_a_fall_after_the_peak_while_the_proxy_rises():
    rows = [{"step": s, "score_mean": s / 10, "gold_mean": g} for s, g in
            [(1, 0.0), (6, 0.5), (11, 0.9), (16, 1.2), (21, 1.5), (26, 1.3), (31, 1.0), (36, 0.8)]]
    story = gold_story(rows)
    assert (story.peak_step, story.peak, story.last) == (21, 1.5, 0.8) and story.fell_after_peak and story.proxy_kept_rising
    text = " ".join(watch_sentences(story, [], "runs/demo/ppo/best-gold"))
    assert "raised no flag" in text and "peaked at step 21" in text and "over-optimisation" in text
    assert "47%" in text and "runs/demo/ppo/best-gold" in text
    # a small dip after the peak is not called a fall
    calm = gold_story([{"step": 1, "score_mean": 0, "gold_mean": 0}, {"step": 2, "score_mean": 1, "gold_mean": 1.0},
                       {"step": 3, "score_mean": 2, "gold_mean": 0.9}])
    assert not calm.fell_after_peak and "no clear fall" in " ".join(watch_sentences(calm, []))
    # lower-is-better gold: the peak is the minimum
    assert gold_story([{"step": 1, "gold_mean": 3.0}, {"step": 2, "gold_mean": 1.0}, {"step": 3, "gold_mean": 2.5}],
                      higher_is_better=False).peak_step == 2


def test_gao_fit_is_reported_only_when_well_determined():
    alpha, beta = 1.0, 0.5
    exact = [WatchPoint(0, 0.0, 0, 2.0, 10, 0.1)] + [
        WatchPoint(i + 1, d * d, i, 2.0 + d * (alpha - beta * math.log(d)), 10, 0.1) for i, d in enumerate([0.5, 1, 2, 4, 8])]
    fit = gao_fit_report(exact)
    assert fit["well_determined"] and abs(fit["peak_sqrt_kl"] - math.exp(1)) < 1e-6 and abs(fit["peak_kl"] - math.e ** 2) < 1e-5
    # A gold curve that is flat plus noise: β is noise, and d* = exp(α/β − 1) would be a huge number.
    g = torch.Generator().manual_seed(1)
    flat = [WatchPoint(i, (i * 0.4) ** 2, i, 1.0 + 0.05 * float(torch.randn(1, generator=g)), 10, 0.1) for i in range(9)]
    fit = gao_fit_report(flat)
    assert not fit["well_determined"] and fit["peak_sqrt_kl"] is None and fit["why"]
    summary = OveroptimisationWatch(points=flat).summary()["gao_fit"]
    assert summary["peak_sqrt_kl"] is None and summary["peak_kl"] is None


def metrics_rows() -> list[dict]:
    rows = []
    for s in range(1, 41):
        row = {"step": s, "score_mean": s / 20, "kl": min(4.5, s / 6), "beta": 0.1 + s / 400, "response_length": 18 + s / 8}
        if s % 5 == 1:
            row["gold_mean"] = 1.5 - abs(s - 21) / 15
        rows.append(row)
    return rows


def test_report_opens_with_the_verdict_and_marks_the_gold_peak(result, tmp_path):
    ev = result.to_json()
    samples = [{"prompt": "my house is too hot", BASE: "Whatever.", TUNED: "Open the windows at night.",
                "scores": {BASE: {"toxicity": 0.31, "length": 1.0}, TUNED: {"toxicity": 0.02, "length": 5.0}}}]
    page = write_report(tmp_path, ReportInput(
        title="t", metrics=metrics_rows(), eval_json=ev, samples=samples, judge_labels={GOLD: "labelers' preference (gold)"},
        model_labels={BASE: "base model", TUNED: "tuned model"},
        training=TrainingInfo(target_kl=4.0, kl_ceiling=12.0, kl_last=4.5, gold_judge=GOLD,
                              watch={"flags": [], "gao_fit": {"well_determined": False, "why": "too few points"}}))).read_text()
    text = re.sub(r"<[^>]+>", " ", page)
    assert page.index("Verdict") < page.index("Training curves") < page.index("Before and after")
    assert "Independent judges, tuned against base model: 1 better (toxicity); 1 worse (repetition); 1 no clear change" in text
    for title in ROLE_TITLES.values():
        assert title in text
    assert "peaked at step 21" in text and "raised no flag" in text and "not well determined" in text
    assert "nats per reply" in text and "nats/seq" not in page and "nats/reply" not in page
    table = text.split("Before and after")[1].split("Samples side by side")[0]
    assert "%" not in table.replace("95%", "") and "↓" in table and "↑" in table
    # each sample carries every judge's score of that reply
    sample_part = text.split("Samples side by side")[1]
    assert "toxicity:   0.020" in sample_part or re.search(r"toxicity:\s+0\.020", sample_part)
    # plots: larger, with the target line and the gold peak in their captions
    from PIL import Image

    for name in ("reward_gold", "kl", "beta", "response_length"):
        with Image.open(tmp_path / f"{name}.png") as im:
            assert im.size[0] >= 800, (name, im.size)
    assert "dashed target of 4.000" in text and "peaked at step 21 (red star" in text


def test_results_are_written_with_the_users_umask(result, tmp_path):
    old = os.umask(0o022)
    try:
        write_report(tmp_path / "r", ReportInput(title="t", eval_json=result.to_json()))
        from rlhf.utils.io import atomic_write_json, staging_dir

        atomic_write_json(tmp_path / "r" / "summary.json", {"a": 1})
        staged = staging_dir(tmp_path / "r" / "model")
    finally:
        os.umask(old)
    for f in ("report.html", "summary.json"):
        assert stat.S_IMODE((tmp_path / "r" / f).stat().st_mode) == 0o644, f
    assert stat.S_IMODE(staged.stat().st_mode) == 0o755


def test_terminal_verdict_is_aligned_with_long_names(result):
    verdicts = judge_verdicts(result.to_json(), {RM: "reward model (what PPO optimised)"})
    lines = [ln for ln in verdict_lines(verdicts, ROLE_TITLES) if "→" in ln]
    assert len(lines) == len(result.judges)
    assert len({ln.index("→") for ln in lines}) == 1, "\n".join(lines)


def test_stage_clock_scales_by_work_and_by_measured_slowdown():
    clock = StageClock.for_run(prompts=53, eval_prompts=26, num_completions=4, labelers=3, reward_epochs=3.0,
                               ppo_steps=120, ppo_batch_size=32, eval_samples=8)
    assert clock.expected("ppo") == pytest.approx(2 * 48.3)  # twice the reference steps
    clock.finished("generate", 2.9 * 3)  # this machine runs 3× slower than the reference
    assert clock.slowdown == pytest.approx(3.0) and clock.expected("reward") == pytest.approx(3 * 57.5)
    assert "3.0× slower" in clock.announce("reward", ["reward", "ppo"]) and duration(400) == "about 7 min"


def test_log_friendly_stream_turns_bar_redraws_into_occasional_lines():
    import io

    now = [0.0]
    out = io.StringIO()
    s = LogFriendlyStream(out, interval_s=30, clock=lambda: now[0])
    for i in range(100):
        now[0] = i
        s.write(f"\rreward: {i}/100")
    s.write("\n")
    s.write("[reward] done in 100 s\n")
    text = out.getvalue()
    with pytest.raises(TypeError):
        s.write(b"")  # a text stream: click must not mistake it for a binary one
    assert "\r" not in text
    assert text.splitlines() == ["reward: 0/100", "reward: 30/100", "reward: 60/100", "reward: 90/100", "reward: 99/100",
                                 "[reward] done in 100 s"]


def test_a_kl_estimate_near_or_below_zero_is_not_called_a_move():
    from rlhf.eval.verdict import kl_sentence

    assert "has not measurably moved" in kl_sentence(-0.024) and "-0.024" in kl_sentence(-0.024)
    assert kl_sentence(4.2, 4.0, 12.0).startswith("The tuned model moved 4.200 nats per reply")
