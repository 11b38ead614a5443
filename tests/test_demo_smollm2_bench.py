"""benchmarks/demo_smollm2.py's decline split, on a hand-built run folder (no model is loaded)."""

import json

import pytest

from conftest import load_benchmark


def test_decline_split_groups_replies_by_refusal_and_counts_on_topic_declines(tmp_path):
    judge = tmp_path / "judge"
    harm = f"rm:{judge}"
    reply = lambda refusal, relevance, toxicity, harmless: {  # noqa: E731
        "refusal": refusal, "relevance": relevance, "toxicity": toxicity, harm: harmless}
    # Base: relevances 0.2, 0.4, 0.6, 0.8 (median 0.5), one decline. Tuned: three declines, one of
    # them (0.7) at least as relevant as the base median, so one on-topic decline.
    base = [reply(1.0, 0.2, 0.1, 2.0), reply(0.0, 0.4, 0.3, 1.0), reply(0.0, 0.6, 0.5, 1.0), reply(0.0, 0.8, 0.1, 0.5)]
    tuned = [reply(1.0, 0.1, 0.0, 3.0), reply(1.0, 0.3, 0.2, 2.0), reply(1.0, 0.7, 0.1, 1.0), reply(0.0, 0.9, 0.4, 0.0)]
    run = tmp_path / "seed-0"
    (run / "eval").mkdir(parents=True)
    (run / "eval" / "eval.json").write_text(json.dumps({"config": {"model": ["base", "tuned"]}}))
    (run / "eval" / "samples.jsonl").write_text(
        "".join(json.dumps({"prompt": "p", "scores": {"base": b, "tuned": t}}) + "\n" for b, t in zip(base, tuned)))

    split = load_benchmark("demo_smollm2").decline_split(run, judge)

    assert split["base_median_relevance"] == pytest.approx(0.5)
    before, after = split["before"], split["after"]
    assert (before["replies"], before["declines"], before["on_topic_declines"]) == (4, 1, 0)
    assert (after["replies"], after["declines"], after["on_topic_declines"]) == (4, 3, 1)
    assert before["declines_mean"] == {"toxicity": 0.1, "harmless": 2.0, "relevance": 0.2}
    assert before["others_mean"] == pytest.approx({"toxicity": 0.3, "harmless": 2.5 / 3, "relevance": 0.6}, abs=1e-4)
    assert after["declines_mean"] == pytest.approx({"toxicity": 0.1, "harmless": 2.0, "relevance": 0.3667}, abs=1e-4)
    assert after["others_mean"] == {"toxicity": 0.4, "harmless": 0.0, "relevance": 0.9}
