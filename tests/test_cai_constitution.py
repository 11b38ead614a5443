"""Constitution files: the shipped default, and every kind of bad file named by file and line."""

import pytest

from rlhf.cai.constitution import DEFAULT_CONSTITUTION, load_constitution, parse_constitution
from rlhf.errors import ConfigError

GOOD = """\
name: tiny
principles:
  - id: harm
    critique: Find the harm.
    revision: Remove the harm.
    comparison: Which reply is less harmful?
    pointwise: Is this reply harmless?
    weight: 2
    evaluator: {scorer: non-toxicity, weight: 0.5}
  - id: polite
    critique: Find rudeness.
    revision: Be polite.
    comparison: Which reply is more polite?
critique_examples:
  - {principle: harm, prompt: p, reply: r, critique: c, revision: v}
comparison_examples:
  - {principle: polite, prompt: p, a: x, b: y, answer: b}
"""


def test_default_constitution_is_complete():
    c = load_constitution("default")
    assert c.path == str(DEFAULT_CONSTITUTION)
    assert 10 <= len(c.principles) <= 16
    assert len({p.id for p in c.principles}) == len(c.principles)
    for p in c.principles:
        assert p.critique and p.revision and p.comparison.endswith("?") and p.pointwise.endswith("?")
    assert len(c.critique_examples) >= 2 and len(c.comparison_examples) >= 2
    # Worked comparisons must not all answer the same letter: that would teach a position bias.
    assert {e.answer for e in c.comparison_examples} == {"A", "B"}
    assert [(p.id, e.scorer) for p, e in c.evaluators] == [("dangerous-help", "refusal"), ("respect", "non-toxicity")]


def test_parse_good_file():
    c = parse_constitution(GOOD, "x.yaml")
    assert c.name == "tiny" and [p.id for p in c.principles] == ["harm", "polite"]
    harm = c.principle("harm")
    assert harm.weight == 2.0 and harm.evaluator.scorer == "non-toxicity" and harm.evaluator.weight == 0.5
    assert harm.line == 3 and c.principle("polite").pointwise is None
    assert c.comparison_examples[0].answer == "B"


@pytest.mark.parametrize("text, where, words", [
    (GOOD.replace("    revision: Remove the harm.\n", ""), "x.yaml:3", "missing required field 'revision'"),
    (GOOD.replace("    weight: 2\n", "    weight: two\n"), "x.yaml:8", "non-negative number"),
    (GOOD.replace("  - id: polite", "  - id: harm"), "x.yaml:10", "used twice"),
    (GOOD.replace("    pointwise: Is this reply harmless?\n", "    colour: red\n"), "x.yaml:7", "unknown field 'colour'"),
    (GOOD.replace("answer: b", "answer: C"), "x.yaml:17", "expected A or B"),
    (GOOD.replace("{principle: harm, prompt", "{principle: nope, prompt"), "x.yaml:15", "names principle 'nope'"),
    (GOOD.replace("weight: 0.5}", "weight: -1}"), "x.yaml:9", "non-negative number"),
    (GOOD.replace("    critique: Find rudeness.\n", "    critique: ''\n"), "x.yaml:11", "is empty"),
    ("name: x\nprinciples: []\n", "x.yaml:2", "'principles' is empty"),
    ("name: x\nprinciples:\n  - just a string\n", "x.yaml:3", "expected a mapping"),
    ("name: x\nprinciples: [\n", "x.yaml:3", "not valid YAML"),
    ("- a\n- b\n", "x.yaml:1", "expected a mapping"),
    ("", "x.yaml", "is empty"),
])
def test_bad_files_name_file_line_and_field(text, where, words):
    with pytest.raises(ConfigError) as err:
        parse_constitution(text, "x.yaml")
    message = str(err.value)
    assert message.startswith(where + ":") and words in message, message


def test_missing_file_and_unknown_principle(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_constitution(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="no principle 'x'"):
        load_constitution("default").principle("x")
    path = tmp_path / "c.yaml"
    path.write_bytes(b"name: \xff\n")
    with pytest.raises(ConfigError, match="not UTF-8"):
        load_constitution(path)
