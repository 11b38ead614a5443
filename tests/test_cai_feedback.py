"""The AI labeler on a tiny model: option probabilities against a hand computation, shared prefixes,
position debiasing, evaluators, the answer cache."""

import math

import pytest
import torch

from rlhf.cai import prompts as P
from rlhf.cai.constitution import parse_constitution
from rlhf.cai.labeler import AILabeler, Comparison, LabelerSettings
from rlhf.cai.local import LocalFeedbackModel
from rlhf.errors import ConfigError

CONSTITUTION = """\
principles:
  - id: polite
    critique: Find rudeness.
    revision: Be polite.
    comparison: Which reply is more polite?
    pointwise: Is it polite?
  - id: topic
    critique: Find what is off topic.
    revision: Stay on topic.
    comparison: Which reply is on topic?
"""
ITEMS = [Comparison("how do I cook rice", "rinse the rice, add water, simmer", "figure it out yourself"),
         Comparison("my house is too hot", "I like turtles", "open the windows at night")]


@pytest.fixture(scope="module")
def feedback(tiny_model_dir):
    return LocalFeedbackModel(str(tiny_model_dir), device="cpu", batch_size=3)


def plain_logprob(fb, text: str, continuation: str) -> float:
    """log p(continuation | text) from one full forward pass of the raw model (the hand computation)."""
    ids = fb.tokenizer(text, add_special_tokens=False)["input_ids"]
    cont = fb.tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = fb.model(torch.tensor([ids + cont])).logits[0].double()
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(ids) - 1 + k, t]) for k, t in enumerate(cont))


def test_option_logprobs_equal_plain_forward_passes_and_share_prefixes(feedback):
    c = parse_constitution(CONSTITUTION)
    groups = [[feedback.format(P.comparison_messages(it.prompt, it.first, it.second, p), P.ANSWER_PREFIX)
               for p in c.principles] for it in ITEMS]
    before = feedback.scorer.forwards
    got = feedback.option_logprobs(groups, ["A", "B"])
    shared_cost = feedback.scorer.forwards - before
    for g, rows in zip(groups, got):
        for text, row in zip(g, rows):
            assert torch.allclose(row, torch.tensor([plain_logprob(feedback, text, "A"), plain_logprob(feedback, text, "B")],
                                                    dtype=torch.float64), atol=1e-4)
    alone = sum(len(feedback.tokenizer(t, add_special_tokens=False)["input_ids"]) for g in groups for t in g)
    assert shared_cost < 0.75 * alone  # the conversation and replies ran once per group, not once per principle
    # Labels of several tokens ("Yes" is three bytes here) are summed over their tokens.
    yes = feedback.option_logprobs([[groups[0][0]]], ["Yes", "No"])[0][0]
    assert math.isclose(float(yes[0]), plain_logprob(feedback, groups[0][0], "Yes"), abs_tol=1e-4)


def test_verdict_equals_the_hand_computation(feedback):
    c = parse_constitution(CONSTITUTION)
    polite = c.principle("polite")
    it = ITEMS[0]

    def log_odds(first: str, second: str) -> float:
        text = feedback.format(P.comparison_messages(it.prompt, first, second, polite), P.ANSWER_PREFIX)
        return plain_logprob(feedback, text, "A") - plain_logprob(feedback, text, "B")

    l1, l2 = log_odds(it.first, it.second), log_odds(it.second, it.first)
    expected = {"logit": 1 / (1 + math.exp(-(l1 - l2) / 2)),
                "average": 0.5 * (1 / (1 + math.exp(-l1)) + 1 - 1 / (1 + math.exp(-l2))),
                "none": 1 / (1 + math.exp(-l1))}
    one = parse_constitution(CONSTITUTION.split("  - id: topic")[0])
    for debias, want in expected.items():
        labeler = AILabeler(one, feedback, LabelerSettings(method="choice", debias=debias), progress=False)
        v = labeler.judge([it])[0]
        assert math.isclose(v.probability, want, abs_tol=1e-5), debias
        assert v.principles == ["polite"] and v.sources[0]["principles"] == {"polite": round(want, 4)}


def test_position_debiasing_makes_the_swap_the_complement(feedback):
    c = parse_constitution(CONSTITUTION)
    swapped = [Comparison(it.prompt, it.second, it.first) for it in ITEMS]
    for method, debias in (("choice", "logit"), ("choice", "average"), ("pointwise", "logit")):
        labeler = AILabeler(c, feedback, LabelerSettings(method=method, debias=debias), progress=False)
        p = [v.probability for v in labeler.judge(ITEMS + swapped)]
        for a, b in zip(p[:2], p[2:]):
            assert math.isclose(a + b, 1.0, abs_tol=1e-6), (method, debias)


def test_pointwise_by_hand(feedback):
    c = parse_constitution(CONSTITUTION.split("  - id: topic")[0])
    it = ITEMS[1]

    def yes_odds(reply: str) -> float:
        text = feedback.format(P.pointwise_messages(it.prompt, reply, c.principles[0]))
        return plain_logprob(feedback, text, "Yes") - plain_logprob(feedback, text, "No")

    labeler = AILabeler(c, feedback, LabelerSettings(method="pointwise"), progress=False)
    want = 1 / (1 + math.exp(-(yes_odds(it.first) - yes_odds(it.second))))
    assert math.isclose(labeler.judge([it])[0].probability, want, abs_tol=1e-5)


def test_evaluators_decide_with_their_weights_and_are_recorded(feedback):
    with_length = CONSTITUTION.replace("    pointwise: Is it polite?\n",
                                       "    pointwise: Is it polite?\n    evaluator: {scorer: length, weight: 3}\n")
    c = parse_constitution(with_length)
    only_evaluator = AILabeler(c, None, LabelerSettings(), progress=False).judge(ITEMS)
    # length is "higher is better": the longer reply wins, by (difference / spread) in log-odds.
    assert only_evaluator[0].probability > 0.5 and only_evaluator[1].probability < 0.5
    assert only_evaluator[0].decided_by == ["evaluator:polite:length"]
    both = AILabeler(c, feedback, LabelerSettings(method="choice"), progress=False).judge(ITEMS)
    names = [s["source"] for s in both[0].sources]
    assert names == ["feedback", "evaluator:polite:length"]
    fb, ev = (torch.tensor(s["probability"]) for s in both[0].sources)
    pooled = torch.sigmoid((torch.logit(fb.double()) * 1 + torch.logit(ev.double()) * 3) / 4)
    assert math.isclose(both[0].probability, float(pooled), abs_tol=2e-3)  # sources are rounded to 4 places
    with pytest.raises(ConfigError, match="nothing could decide"):
        AILabeler(parse_constitution(CONSTITUTION), None, LabelerSettings())


def test_cache_makes_a_rerun_free(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache.sqlite"
    texts = [["<|user|>which is better\n<|assistant|>The answer is (", "<|user|>which is worse\n<|assistant|>The answer is ("]]
    first = LocalFeedbackModel(str(tiny_model_dir), device="cpu", cache=cache)
    a = first.option_logprobs(texts, ["A", "B"])[0]
    assert first.scorer.forwards > 0
    again = LocalFeedbackModel(str(tiny_model_dir), device="cpu", cache=cache)
    b = again.option_logprobs(texts, ["A", "B"])[0]
    assert again.scorer.forwards == 0 and torch.equal(a, b)


def test_the_bundled_model_is_refused_as_a_judge():
    with pytest.raises(ConfigError, match="too small"):
        LocalFeedbackModel("bundled")


def test_likelihood_method_by_hand(feedback):
    c = parse_constitution(CONSTITUTION.replace("    pointwise: Is it polite?\n",
                                                "    pointwise: Is it polite?\n    persona: You are always polite.\n"))
    gains = []
    for it in ITEMS:
        persona = feedback.format(P.persona_messages(it.prompt, c.principles))
        plain = feedback.format(P.dialogue_messages(it.prompt))
        assert "You are always polite." in persona and "always polite" not in plain
        for reply in (it.first, it.second):
            n = len(feedback.tokenizer(reply, add_special_tokens=False)["input_ids"])
            gains.append((plain_logprob(feedback, persona, reply) - plain_logprob(feedback, plain, reply)) / n)
    scale = torch.tensor(gains, dtype=torch.float64).std()
    labeler = AILabeler(c, feedback, LabelerSettings(method="likelihood"), progress=False)
    got = [v.probability for v in labeler.judge(ITEMS)]
    for k, p in enumerate(got):
        want = 1 / (1 + math.exp(-(gains[2 * k] - gains[2 * k + 1]) / float(scale)))
        assert math.isclose(p, want, abs_tol=1e-4)


SHOTS = CONSTITUTION + """\
critique_examples:
  - {principle: topic, prompt: how do I cook rice, reply: I like turtles, critique: off topic, revision: rinse and simmer}
  - {prompt: hi, reply: go away, critique: rude, revision: hello there}
comparison_examples:
  - {principle: polite, prompt: hi, a: hello, b: go away, answer: A}
  - {prompt: "rice?", a: rinse it, b: turtles, answer: A}
"""


def test_worked_examples_are_shown_under_the_principle_they_answer():
    """An example's answer answers its own principle's question: under any other principle it would
    teach a wrong answer. One naming no principle is shown under the principle asked."""
    c = parse_constitution(SHOTS)
    polite, topic = c.principle("polite"), c.principle("topic")
    shots = P.examples_for(c, "comparison", 2)
    assert [w.id if w else None for _, w in shots] == ["polite", None]
    msgs = P.comparison_messages("q", "x", "y", topic, shots)
    assert msgs[0]["content"].endswith(f"{polite.comparison} Answer with A or B.")   # its own question
    assert msgs[2]["content"].endswith(f"{topic.comparison} Answer with A or B.")    # no principle: the one asked
    assert msgs[-1]["content"].endswith(f"{topic.comparison} Answer with A or B.")
    chats = P.revision_messages("q", "r", "c", polite, P.examples_for(c, "critique", 1))
    assert chats[2]["content"] == f"Critique request: {topic.critique}" and chats[3]["content"] == "Critique: off topic"
    assert chats[4]["content"] == f"Revision request: {topic.revision}"
    assert chats[-3]["content"] == f"Critique request: {polite.critique}"
    assert chats[-1]["content"] == f"Revision request: {polite.revision}"


@pytest.fixture(scope="module")
def long_feedback(tiny_tokenizer, tmp_path_factory):
    """The tiny model with room for worked examples (the shared one holds 256 positions; a longer prompt
    would be cut on the left, and then neither shared nor equal to a plain forward pass)."""
    from rlhf.models.architecture import ModelShape, new_causal_lm

    out = tmp_path_factory.mktemp("tiny-long")
    new_causal_lm(tiny_tokenizer, ModelShape(hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
                                             max_positions=2048), seed=0).save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return LocalFeedbackModel(str(out), device="cpu", batch_size=3)


def test_fewshot_questions_share_the_examples_and_conversation_across_principles(long_feedback):
    """With every example under its own principle, the prompts for several principles differ only in
    the last question: the local model runs the examples and the conversation once per pair."""
    feedback = long_feedback
    c = parse_constitution(SHOTS.replace("  - {prompt: \"rice?\"", "  - {principle: topic, prompt: \"rice?\""))
    shots = P.examples_for(c, "comparison", 2)
    it = ITEMS[0]
    texts = [feedback.format(P.comparison_messages(it.prompt, it.first, it.second, p, shots), P.ANSWER_PREFIX)
             for p in c.principles]
    ids = [feedback.tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    common = next(k for k, (a, b) in enumerate(zip(*ids)) if a != b)
    tail = max(len(x) for x in ids) - common
    assert max(len(x) for x in ids) <= feedback.max_length, [len(x) for x in ids]
    assert tail < 0.2 * common  # only the final question differs
    before = feedback.scorer.forwards
    got = feedback.option_logprobs([texts], ["A", "B"])[0]
    assert feedback.scorer.forwards - before <= common + sum(len(x) - common for x in ids)
    for text, row in zip(texts, got):
        assert math.isclose(float(row[0]), plain_logprob(feedback, text, "A"), abs_tol=1e-4)
