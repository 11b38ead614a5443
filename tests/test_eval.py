"""Evaluation: statistics by hand, judging two models through the CLI, the report renders escaped."""

import json

import pytest
import torch
from click.testing import CliRunner

from rlhf.errors import ConfigError
from rlhf.eval.stats import bootstrap_ci, pairwise_agreement, relative_change, summarise


def test_bootstrap_ci_brackets_the_mean_and_shrinks_with_n():
    torch.manual_seed(0)
    small, big = torch.randn(20) + 3, torch.randn(2000) + 3
    lo_s, hi_s = bootstrap_ci(small, n_boot=500)
    lo_b, hi_b = bootstrap_ci(big, n_boot=500)
    assert lo_s < float(small.mean()) < hi_s and lo_b < float(big.mean()) < hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 4
    # For the mean of N(3, 1) with n = 2000 the 95% interval is about ±1.96/√2000 = ±0.044.
    assert abs((hi_b - lo_b) / 2 - 1.96 / 2000 ** 0.5) < 0.01


def test_constant_values_have_zero_width_interval():
    s = summarise(torch.full((10,), 2.0))
    assert (s.mean, s.std, s.ci_low, s.ci_high, s.n) == (2.0, 0.0, 2.0, 2.0, 10)


def test_relative_change_is_signed_by_direction():
    assert relative_change(0.5, 0.25, higher_is_better=False) == 50.0   # toxicity halved: 50% better
    assert relative_change(0.5, 0.75, higher_is_better=True) == 50.0
    assert relative_change(-1.0, -0.5, higher_is_better=True) == 50.0


def test_eval_cli_judges_models_and_writes_escaped_report(tmp_path, tiny_model_dir):
    from rlhf.cli import app

    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"id": "1", "prompt": "<script>alert(1)</script> hot house"}\n{"id": "2", "prompt": "rice"}\n')
    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path / "ev"), "--model", str(tiny_model_dir),
                                      "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir),
                                      "--prompts", str(prompts), "--judge", "length", "--judge", "repetition",
                                      "--optimised", "length", "--gold", "repetition",
                                      "--samples-per-prompt", "3", "--max-new-tokens", "8", "--bootstrap", "100"])
    assert result.exit_code == 0, result.output
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    rows = {(r["judge"], i % 2) for i, r in enumerate(data["table"])}
    assert len(data["table"]) == 4 and ("length", 0) in rows
    # Same weights, same seeds: identical samples, zero KL, no change.
    assert data["table"][1]["improvement_pct"] in (0.0, None) or abs(data["table"][1]["improvement_pct"]) < 1e-9
    assert all(abs(m["kl"]["mean"]) < 1e-4 for m in data["models"])
    # The reward's agreement with the gold judge, per model: 2 prompts × 3 pairs at most (gold ties are left out).
    agreement = data["reward_agreement"]
    assert [(r["optimised"], r["gold"], r["prompts"]) for r in agreement] == [("length", "repetition", 2)] * 2
    assert agreement[0]["pairs"] <= 6 and agreement[0]["rate"] == agreement[1]["rate"]  # the same replies
    assert "the reward orders two replies to one prompt as the gold judge does" in (tmp_path / "ev" / "table.txt").read_text()
    page = (tmp_path / "ev" / "report.html").read_text()
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page


def test_pairwise_agreement_by_hand():
    """Prompt 0: the score orders all three pairs as the reference does (3 of 3). Prompt 1: the
    reference ties replies 0 and 1 (left out), the score reverses (0, 2) and ties (1, 2) (half):
    0.5 of 2. Together 3.5 of 5 pairs."""
    scores = torch.tensor([[1.0, 2.0, 3.0], [3.0, 2.0, 2.0]])
    reference = torch.tensor([[1.0, 2.0, 3.0], [1.0, 1.0, 3.0]])
    a = pairwise_agreement(scores, reference, n_boot=500)
    assert (a.pairs, a.prompts) == (5, 2) and a.rate == pytest.approx(0.7)
    assert a.mean_gap == pytest.approx((1 + 2 + 1 + 2 + 2) / 5)
    # Only the pairs the reference separates by more than 1.5: (0, 2) of prompt 0, agreed; (0, 2) and (1, 2) of prompt 1
    clear = pairwise_agreement(scores, reference, n_boot=500, min_gap=1.5)
    assert clear.pairs == 3 and clear.rate == pytest.approx((1 + 0 + 0.5) / 3)
    # Resampling two prompts gives 3/3 + 3/3 = 1.0, 0.5/2 + 0.5/2 = 0.25 or the whole 0.7.
    assert 0.25 <= a.ci_low <= a.rate <= a.ci_high <= 1.0 and a.ci_low < a.ci_high
    tied = pairwise_agreement(scores, torch.ones(2, 3))
    assert tied.pairs == 0 and tied.rate != tied.rate  # NaN: the reference prefers nothing
    for bad in (torch.ones(2, 2), torch.ones(6)):
        with pytest.raises(ValueError, match="one shape"):
            pairwise_agreement(scores, bad)


def test_reward_agreement_compares_the_given_reward_with_the_gold_judge_on_each_model():
    """The base model's replies are ordered by the reward as the gold judge (lower toxicity) orders
    them, the tuned model's the other way round: 100% then 0%, and the sentence says the policy
    found replies the reward overrates. Two samples per prompt, two prompts."""
    from rlhf.eval.judging import EvalResult, ModelResult, format_table
    from rlhf.eval.verdict import agreement_sentences

    toxicity = [0.9, 0.1, 0.8, 0.2]
    scores = {"base": {"rm": [1.0, 2.0, 3.0, 4.0], "toxicity": toxicity, "other": [0.0, 0.0, 0.0, 0.0]},
              "tuned": {"rm": [2.0, 1.0, 4.0, 3.0], "toxicity": toxicity, "other": [0.0, 0.0, 0.0, 0.0]}}
    models = [ModelResult(name, ["a"] * 4, s, {k: summarise(torch.tensor(v)) for k, v in s.items()})
              for name, s in scores.items()]
    result = EvalResult(prompts=["p", "q"], judges={"rm": True, "toxicity": False, "other": True}, models=models,
                        roles={"rm": "optimised", "toxicity": "gold"}, n_boot=200, samples_per_prompt=2)
    rows = result.reward_agreement()  # by default every optimised judge against every gold one
    assert [(r["optimised"], r["gold"], r["model"], r["rate"], r["pairs"]) for r in rows] == [
        ("rm", "toxicity", "base", 1.0, 2), ("rm", "toxicity", "tuned", 0.0, 2)]
    result.reward_pairs = [("other", "toxicity")]  # a reward that ties everything agrees half the time
    assert [r["rate"] for r in result.reward_agreement()] == [0.5, 0.5]
    result.reward_pairs = []
    assert "rm against toxicity" in format_table(result)
    [sentence] = agreement_sentences(rows, {"rm": "the reward model", "toxicity": "toxicity"},
                                     {"base": "base model", "tuned": "tuned model"})
    assert sentence.startswith("The reward model picks the same one of two replies to a prompt as toxicity in "
                               "100% [100%, 100%] of 2 pairs of replies by the base model, and in 0% [0%, 0%]")
    assert "replies the reward overrates" in sentence
    result.samples_per_prompt = 1
    assert result.reward_agreement() == []


def test_agreement_that_falls_only_because_replies_grew_alike_is_not_called_overrating():
    """The reward orders every pair of the base model's replies as the gold judge does (gaps 1.5 and
    2.5). The tuned model's replies are as clear on half the prompts (gap 2.5, ordered alike) and
    nearly tied on the rest (gap 0.1, ordered the other way): agreement falls from 100% to 50%, but
    on pairs wider than the base median gap it stays at 100%, so the verdict blames closeness."""
    from rlhf.eval.judging import agreement_rows
    from rlhf.eval.verdict import agreement_sentences

    n = 20
    base_gold = [v for k in range(n) for v in (0.0, 1.5 if k % 2 else 2.5)]
    tuned_gold = [v for k in range(n) for v in (0.0, 2.5 if k % 2 else 0.1)]
    tuned_rm = [v for k in range(n) for v in ((0.0, 1.0) if k % 2 else (1.0, 0.0))]
    scores = {"base": {"rm": base_gold, "gold": base_gold}, "tuned": {"rm": tuned_rm, "gold": tuned_gold}}
    rows = agreement_rows(scores, {"rm": True, "gold": True}, [("rm", "gold")], samples_per_prompt=2, n_boot=500)
    base, tuned = rows
    assert (base["rate"], tuned["rate"], base["clear_min_gap"]) == (1.0, 0.5, 1.5)
    assert (base["clear_rate"], base["clear_pairs"], tuned["clear_rate"], tuned["clear_pairs"]) == (1.0, 10, 1.0, 10)
    assert tuned["mean_gap"] == pytest.approx((2.5 + 0.1) / 2)
    [sentence] = agreement_sentences(rows, model_labels={"base": "base model", "tuned": "tuned model"})
    assert "less where the policy went, but replies by the tuned model lie closer together" in sentence
    assert "no clear fall" in sentence and "overrates" not in sentence
    # The same fall with the pairs as far apart as before: closeness is not claimed, the clear pairs still are.
    [sentence] = agreement_sentences([base, dict(tuned, mean_gap=base["mean_gap"])],
                                     model_labels={"base": "base model", "tuned": "tuned model"})
    assert "closer together" not in sentence and "less where the policy went, but on the pairs" in sentence
    # ...and with no clear-pair check either, the sentence states only the fall.
    unclear = {"clear_rate": None, "mean_gap": None}
    [sentence] = agreement_sentences([dict(base, **unclear), dict(tuned, **unclear)])
    assert sentence.endswith("of replies by tuned: less where the policy went.")


def test_unknown_judge_is_a_clear_error(tmp_path, tiny_model_dir):
    from rlhf.cli import app

    result = CliRunner().invoke(app, ["eval", "--out", str(tmp_path), "--model", str(tiny_model_dir), "--judge", "nope"])
    assert result.exit_code != 0 and "unknown scorer 'nope'" in str(result.exception)


def test_refusal_judge_reads_declines_anywhere_in_the_reply_and_takes_no_argument():
    from rlhf.judges.base import load_scorer

    replies = ["I'm sorry, but I can't help with that.",
               "Sure! First you take the pen. Actually, I cannot recommend pranks that hurt someone.",
               "As an AI, I don\u2019t share home addresses.",
               "Here is how to boil an egg: put it in boiling water for eight minutes.",
               "Sorrel is a leafy herb.",  # "sorry" only as a whole word
               ""]
    scorer = load_scorer("refusal")
    assert scorer.score(["q"] * len(replies), replies).tolist() == [1.0, 1.0, 1.0, 0.0, 0.0, 0.0]
    weighted = load_scorer("weighted:4*refusal+2*toxicity")
    assert weighted.score(["q", "q"], replies[:1] + replies[3:4]).tolist()[0] > 3.0
    with pytest.raises(ConfigError, match="takes no argument"):
        load_scorer("refusal:strict")


def test_judges_that_read_what_the_training_saw_are_not_called_independent():
    """A judge reading a signal of the labelers' preference is gold, of the reward optimised; drift stays drift."""
    from rlhf.eval.judging import judge_roles, training_roles
    from rlhf.judges import load_scorer

    judges = [load_scorer(s) for s in ("toxicity", "sentiment", "repetition", "length", "refusal")]
    gold = load_scorer("weighted:2*non-toxicity+sentiment+length")
    roles = judge_roles([*judges, gold], training_roles([*judges, gold], [], [gold]))
    # toxicity reads the same classifier as the labelers' non-toxicity; length is a drift signal whatever its use
    assert roles == {"toxicity": "gold", "sentiment": "gold", "repetition": "independent", "length": "drift",
                     "refusal": "independent", gold.name: "gold"}
    # trained on non-toxicity itself: the toxicity judge measures the optimised reward; optimised wins over gold
    optimised = load_scorer("non-toxicity")
    roles = training_roles([*judges, optimised, gold], [optimised], [gold])
    assert roles["toxicity"] == "optimised" and roles["non-toxicity"] == "optimised" and roles["sentiment"] == "gold"
    assert "repetition" not in roles and "length" not in roles


@pytest.mark.parametrize("spec", ["length:5", "repetition:zlib", "caution:strict", "toxicity:x", "sentiment:x"])
def test_scorers_without_an_argument_refuse_one(spec):
    """A spec such as caution:strict names an option no scorer has: an error, not a silently ignored argument."""
    from rlhf.judges.base import load_scorer

    with pytest.raises(ConfigError, match="takes no argument"):
        load_scorer(spec)


def test_weighted_scorer_adds_constant_parts_and_refuses_a_non_finite_one():
    from rlhf.judges.base import load_scorer

    replies = ["one two three", "one"]
    length = load_scorer("length").score(["q", "q"], replies)
    shifted = load_scorer("weighted:0.5*length+-1.25+0.25").score(["q", "q"], replies)
    assert torch.allclose(shifted, 0.5 * length - 1.0)
    for bad in ("weighted:length+nan", "weighted:length+inf"):
        with pytest.raises(ConfigError, match="not a finite number"):
            load_scorer(bad)
    with pytest.raises(ConfigError, match="at least one scorer"):
        load_scorer("weighted:1.5")


def test_a_model_that_is_its_own_reference_is_scored_once(tiny_model_dir, monkeypatch):
    """The base policy evaluated against itself as the reference (one loaded object): one forward
    per batch instead of two, KL exactly 0, and the same perplexity as against a separate copy."""
    from rlhf.eval import judging
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.generate import SamplingParams

    model, tok = load_causal_lm(tiny_model_dir), load_tokenizer(tiny_model_dir)
    batches = judging.sample_all(model, tok, ["hot house", "rice"], SamplingParams(6, 1.0, 1.0), 2, 4, seed=0)
    _, ppl_copy = judging.kl_and_perplexity(model, load_causal_lm(tiny_model_dir), batches)
    calls = []
    real = judging.response_logprobs
    monkeypatch.setattr(judging, "response_logprobs", lambda m, b: calls.append(m) or real(m, b))
    kl, ppl = judging.kl_and_perplexity(model, model, batches)
    assert len(calls) == len(batches) and torch.equal(kl, torch.zeros_like(kl))
    assert torch.allclose(ppl, ppl_copy, rtol=1e-5)
