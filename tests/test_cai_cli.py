"""`rlhf cai label | calibrate | revise` through the real CLI on a tiny model, and AI labels on to a reward model."""

import json

import pytest
from click.testing import CliRunner

from conftest import safetensors_weights
from rlhf.cli import app
from rlhf.data.io import read_records
from rlhf.data.records import PairRecord, RankingRecord

CONSTITUTION = """\
principles:
  - id: polite
    critique: Find rudeness.
    revision: Be polite.
    comparison: Which reply is more polite?
    evaluator: {scorer: length, weight: 1}
  - id: topic
    critique: Find what is off topic.
    revision: Stay on topic.
    comparison: Which reply is on topic?
critique_examples:
  - {prompt: hi, reply: go away, critique: rude, revision: hello there}
comparison_examples:
  - {prompt: hi, a: hello, b: go away, answer: A}
"""
POLITE = ["Thank you for asking! Open the windows at night.", "Sure, here is a simple recipe: rinse and simmer."]
RUDE = ["That is a stupid question.", "Whatever. I do not care."]


def write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture()
def constitution(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text(CONSTITUTION)
    return path


def invoke(args):
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    return result


def test_label_writes_rankings_with_soft_preferences_that_train_a_reward_model(tiny_model_dir, constitution, tmp_path):
    comps = write(tmp_path / "c.jsonl", [
        {"prompt_id": f"p{i}", "prompt": f"how do I cook rice ({i})", "completions": [POLITE[i % 2], RUDE[i % 2], RUDE[i % 2]]}
        for i in range(4)])
    out = tmp_path / "r.jsonl"
    result = invoke(["cai", "label", "--constitution", str(constitution), "--feedback-model", str(tiny_model_dir),
                     "--completions", str(comps), "--out", str(out), "--method", "choice", "--principles-per-pair", "1",
                     "--threads", "1"])
    assert result.exit_code == 0, result.output
    assert "UNCALIBRATED" in result.stderr
    records = read_records(out, RankingRecord)  # the contract's reader validates the probability matrix too
    assert len(records) == 4
    for rec in records:
        prob = rec.extra["probabilities"]
        assert rec.labeler == f"ai:{tiny_model_dir}" and rec.criterion in ("polite", "topic")
        assert all(abs(prob[i][j] + prob[j][i] - 1) < 1e-5 for i in range(3) for j in range(3) if i != j)
        assert prob[1][2] == 0.5 and [1, 2] in rec.ties  # identical completions: tied, nobody asked
        pairs = rec.extra["ai_feedback"]["pairs"]
        assert len(pairs) == 2 and all(p["decided_by"] for p in pairs)
        # The ranking follows the mean probability of beating the others.
        wins = [sum(prob[i][j] for j in range(3) if j != i) for i in range(3)]
        assert wins[rec.ranking[0]] == max(wins)
    summary = json.loads((tmp_path / "r.jsonl.summary.json").read_text())
    assert summary["comparisons"] == 8 and summary["labeler"] == f"ai:{tiny_model_dir}"

    pairs_file = tmp_path / "pairs.jsonl"
    assert invoke(["data", "pairs", "--rankings", str(out), "--out", str(pairs_file)]).exit_code == 0
    pairs = read_records(pairs_file, PairRecord)
    assert len(pairs) == 8 and all(p.probability is not None for p in pairs)
    # The soft label of a pair is the labeler's probability of its chosen side (≥ ½ up to ranking order).
    rec0 = records[0]
    first = [p for p in pairs if p.prompt == rec0.prompt]
    best, second = rec0.ranking[0], rec0.ranking[1]
    assert first[0].probability == pytest.approx(rec0.extra["probabilities"][best][second])


def test_soft_targets_of_one_half_leave_the_reward_model_where_it_started(tiny_model_dir, tmp_path):
    # With P = ½ for every pair the gradient of the soft loss at equal rewards is zero: a trainer that
    # ignored the targets (or used 1) would move the weights.
    pairs = [{"prompt": f"q{i}", "chosen": POLITE[i % 2], "rejected": RUDE[i % 2], "probability": 0.5} for i in range(8)]
    data = write(tmp_path / "pairs.jsonl", pairs)
    common = ["reward", "train", "--pairs", str(data), "--base", str(tiny_model_dir), "--val-fraction", "0",
              "--batch-size", "4", "--epochs", "1", "--weight-decay", "0", "--no-dropout", "--threads", "1",
              "--no-packing"]
    soft, hard = tmp_path / "soft", tmp_path / "hard"
    assert invoke(common + ["--out", str(soft), "--max-steps", "1"]).exit_code == 0
    assert invoke(common + ["--out", str(hard), "--max-steps", "1", "--no-soft-targets"]).exit_code == 0
    start = tmp_path / "start"
    assert invoke(common + ["--out", str(start), "--max-steps", "1", "--lr", "0", "--head-lr", "0"]).exit_code == 0
    w_soft, w_hard, w0 = (safetensors_weights(d / "model") for d in (soft, hard, start))
    assert all((w_soft[k] == w0[k]).all() for k in w0)
    assert any((w_hard[k] != w0[k]).any() for k in w0)
    assert json.loads((soft / "summary.json").read_text())["soft_target_pairs"] == 8


def test_bad_probabilities_name_file_line_and_field(tmp_path):
    from rlhf.errors import DataError

    bad = write(tmp_path / "r.jsonl", [{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]},
                                       {"prompt": "p", "completions": ["a", "b"], "ranking": [0, 1],
                                        "probabilities": [[0.5, 1.2], [-0.2, 0.5]]}])
    with pytest.raises(DataError, match=r"r.jsonl:2: field 'probabilities\[0\]\[1\]': expected a probability"):
        read_records(bad, RankingRecord)
    pairs = write(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b", "probability": "high"}])
    with pytest.raises(DataError, match=r"p.jsonl:1: field 'probability'"):
        read_records(pairs, PairRecord)


def test_calibrate_reports_every_method_and_reading(tiny_model_dir, constitution, tmp_path):
    pairs = write(tmp_path / "h.jsonl", [{"prompt": f"q{i}", "chosen": POLITE[i % 2] + " ok" * (i % 3),
                                          "rejected": RUDE[i % 2]} for i in range(6)])
    out = tmp_path / "cal"
    result = invoke(["cai", "calibrate", "--constitution", str(constitution), "--feedback-model", str(tiny_model_dir),
                     "--pairs", str(pairs), "--out", str(out), "--methods", "choice", "--methods", "pointwise",
                     "--methods", "fewshot", "--methods", "likelihood", "--draw", "1", "--reference", "length", "--threads", "1"])
    assert result.exit_code == 0, result.output
    cal = json.loads((out / "calibration.json").read_text())
    names = {r["name"] for r in cal["rows"]}
    for want in ("choice/none | polite", "choice/average | all 2 pooled", "choice/logit | 1 drawn per pair",
                 "fewshot/logit | topic", "pointwise | all 2 pooled", "choice/logit + evaluators",
                 "likelihood | all 2 personas", "likelihood + evaluators",
                 "evaluator:polite:length", "shorter reply", "reference length"):
        assert want in names, want
    rows = {r["name"]: r for r in cal["rows"]}
    # Every chosen reply here is longer: the shorter-reply baseline never agrees; length always does.
    assert rows["shorter reply"]["accuracy"] == 0.0 and rows["reference length"]["accuracy"] == 1.0
    assert rows["evaluator:polite:length"]["accuracy"] == 1.0
    assert all(0 <= r["accuracy"] <= 1 and r["ci95"][0] <= r["accuracy"] <= r["ci95"][1] for r in cal["rows"])
    assert len(cal["raw"]) == 6 and set(cal["raw"][0]) == {"first_is_human_choice", "choice", "pointwise", "fewshot",
                                                                 "likelihood"}
    assert (out / "table.txt").read_text().startswith("agreement with human choices on 6 pairs")
    # A labeler reading this calibration hears that its judge is near chance.
    comps = write(tmp_path / "c.jsonl", [{"prompt": "q", "completions": POLITE}])
    result = invoke(["cai", "label", "--constitution", str(constitution), "--feedback-model", str(tiny_model_dir),
                     "--completions", str(comps), "--out", str(tmp_path / "r.jsonl"), "--method", "choice",
                     "--calibration", str(out / "calibration.json"), "--no-evaluators"])
    assert result.exit_code == 0 and "NEAR CHANCE" in result.stderr


def test_calibrate_pools_the_evaluators_without_a_feedback_model():
    import torch

    from rlhf.cai.calibrate import calibrate
    from rlhf.cai.constitution import parse_constitution
    from rlhf.cai.labeler import LabelerSettings
    from rlhf.data.records import PairRecord

    two = CONSTITUTION.replace("    comparison: Which reply is on topic?\n",
                               "    comparison: Which reply is on topic?\n    evaluator: {scorer: refusal, weight: 3}\n")
    c = parse_constitution(two, "two.yaml")
    long_yes, short_no = "Sure, here is a long and detailed answer for you.", "I'm sorry, I can't."
    pairs = [PairRecord(prompt="q", chosen=short_no, rejected=long_yes),           # refusal right, length wrong
             PairRecord(prompt="q", chosen=long_yes + " More.", rejected=long_yes),  # length right, refusal ties
             PairRecord(prompt="q", chosen=long_yes, rejected="I'm sorry."),       # length right, refusal wrong
             PairRecord(prompt="q", chosen="I won't.", rejected="Yes: do it.")]    # refusal right, length wrong
    rows = {r["name"]: r for r in calibrate(c, None, pairs, [], [], 0, [], LabelerSettings(), progress=False)["rows"]}
    # By hand: log-odds are score differences over each scorer's spread; the pool is their weighted mean.
    chosen, rejected = [p.chosen for p in pairs], [p.rejected for p in pairs]
    length = torch.tensor([len(s.split()) for s in chosen + rejected], dtype=torch.float64)
    refusal = torch.tensor([1.0, 0, 0, 1, 0, 0, 1, 0], dtype=torch.float64)
    pooled = ((length[:4] - length[4:]) / length.std() + 3 * (refusal[:4] - refusal[4:]) / refusal.std()) / 4
    assert (pooled > 0).tolist() == [True, True, False, True]
    assert rows["evaluator:polite:length"]["accuracy"] == pytest.approx(2 / 4)
    assert rows["evaluator:topic:refusal"]["accuracy"] == pytest.approx(2.5 / 4)   # the tie counts half
    assert rows["evaluators pooled"]["accuracy"] == pytest.approx(3 / 4)            # better than either alone
    assert rows["evaluators pooled"]["kind"] == "evaluator"


def test_the_warning_reads_the_row_of_the_labeler_that_runs():
    from rlhf.cai.calibrate import labeler_row
    from rlhf.cai.labeler import LabelerSettings

    def row(name, acc, lo):
        return {"name": name, "accuracy": acc, "ci95": [lo, acc + 0.05], "n": 249, "near_chance": acc < 0.55 or lo <= 0.5}

    result = {"rows": [row("likelihood | all 12 personas", 0.558, 0.494), row("likelihood + evaluators", 0.598, 0.538),
                       row("choice/logit | all 12 pooled", 0.49, 0.43), row("choice/logit | 2 drawn per pair", 0.51, 0.45)]}
    # The labeler `rlhf cai label` runs by default (likelihood with the evaluators) is not the feedback model alone.
    assert labeler_row(result, LabelerSettings(), with_evaluators=True)["name"] == "likelihood + evaluators"
    assert labeler_row(result, LabelerSettings(), with_evaluators=False)["name"] == "likelihood | all 12 personas"
    drawn = LabelerSettings(method="choice", principles_per_pair=2)
    assert labeler_row(result, drawn, with_evaluators=False)["name"] == "choice/logit | 2 drawn per pair"
    # Its combined row was not measured: fall back to the pooled one rather than report nothing.
    assert labeler_row(result, drawn, with_evaluators=True)["name"] == "choice/logit | all 12 pooled"
    assert labeler_row(result, LabelerSettings(method="pointwise"), with_evaluators=True) is None


def test_revise_writes_every_step_and_resumes(tiny_model_dir, constitution, tmp_path):
    prompts = write(tmp_path / "p.jsonl", [{"id": f"p{i}", "prompt": t} for i, t in
                                           enumerate(["how do I cook rice", "my house is too hot", "I feel tired"])])
    out = tmp_path / "sl"
    args = ["cai", "revise", "--constitution", str(constitution), "--model", str(tiny_model_dir), "--prompts", str(prompts),
            "--out", str(out), "--rounds", "2", "--max-new-tokens", "6", "--examples", "1", "--batch-size", "2"]
    assert invoke(args).exit_code == 0
    chains = [json.loads(line) for line in (out / "chains.jsonl").read_text().splitlines()]
    sft = [json.loads(line) for line in (out / "sft.jsonl").read_text().splitlines()]
    assert [c["prompt_id"] for c in chains] == ["p0", "p1", "p2"]
    for c, s in zip(chains, sft):
        assert [st["round"] for st in c["steps"]] == [1, 2]
        assert all(st["principle"] in ("polite", "topic") and "critique" in st for st in c["steps"])
        assert c["final"] == c["steps"][-1]["revision"] and s == {"prompt": c["prompt"], "completion": c["final"]}
    before = (out / "chains.jsonl").read_text()
    assert invoke(args).exit_code == 0 and (out / "chains.jsonl").read_text() == before  # finished chains are kept
    result = CliRunner().invoke(app, args[:4] + ["--model", "bundled"] + args[6:])
    assert result.exit_code != 0 and "too small" in str(result.exception)
