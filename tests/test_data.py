"""Data contracts: readers, every bad-input case, rankings → pairs, other pair layouts, atomic writes."""

import gzip
import json

import pytest

from conftest import hh_missing_reason
from rlhf.data import (PairStats, PromptRecord, RankingRecord, load_pairs, ranking_to_pairs, read_records,
                       records_to_dataset, dataset_to_records, write_records)
from rlhf.data.pairs import rankings_to_pairs
from rlhf.errors import DataError


def write_lines(path, objs):
    path.write_text("".join((o if isinstance(o, str) else json.dumps(o)) + "\n" for o in objs))
    return path


RANK = {"prompt": "p", "completions": ["a", "b", "c"], "ranking": [2, 0, 1], "labeler": "ann", "criterion": "helpfulness"}


def test_ranking_gives_all_ordered_pairs_preferred_first():
    rec = RankingRecord.from_json(RANK)
    pairs = ranking_to_pairs(rec)
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "b"), ("a", "b")]
    assert all(p.extra["labeler"] == "ann" for p in pairs)


@pytest.mark.parametrize("k", [2, 3, 4, 6])
def test_k_completions_give_k_choose_2_pairs(k):
    rec = RankingRecord.from_json({"prompt": "p", "completions": [f"c{i}" for i in range(k)], "ranking": list(range(k))[::-1]})
    assert len(ranking_to_pairs(rec)) == k * (k - 1) // 2


def test_ties_and_skips_give_no_pair_but_are_kept():
    tied = RankingRecord.from_json({**RANK, "ranking": [2, 0, 1], "ties": [[0, 1]]})
    stats = PairStats()
    pairs = ranking_to_pairs(tied, stats)
    assert [(p.chosen, p.rejected) for p in pairs] == [("c", "a"), ("c", "b")]
    assert stats.tied_pairs == 1
    skipped = RankingRecord.from_json({"prompt": "p", "completions": ["a", "b"], "skipped": True, "skip_reason": "unclear"})
    assert ranking_to_pairs(skipped, stats) == [] and stats.skipped_items == 1
    assert skipped.to_json()["skipped"] is True and tied.to_json()["ties"] == [[0, 1]]


def test_gold_items_give_pairs_only_when_asked():
    gold = RankingRecord.from_json({**RANK, "ranking": [2, 0, 1], "gold": True, "labeler": "ann"})
    stats = PairStats()
    assert ranking_to_pairs(gold, stats) == [] and stats.gold_items == 1 and stats.pairs == 0
    assert len(ranking_to_pairs(gold, stats, include_gold=True)) == 3


def test_identical_completions_make_no_pair():
    rec = RankingRecord.from_json({"prompt": "p", "completions": ["same", "same", "other"], "ranking": [0, 1, 2]})
    stats = PairStats()
    assert len(ranking_to_pairs(rec, stats)) == 2 and stats.identical_pairs == 1


@pytest.mark.parametrize("line, message, field", [
    ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 2]}', "out of range", "ranking"),
    ('{"prompt": "p", "completions": ["a", "b"], "ranking": [0, 0]}', "appears twice", "ranking"),
    ('{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1]}', "missing indices [2]", "ranking"),
    ('{"prompt": "p", "completions": ["a", ""], "ranking": [0, 1]}', "completion 1 is empty", "completions"),
    ('{"completions": ["a", "b"], "ranking": [0, 1]}', "missing required field", "prompt"),
    ('{"prompt": "p", "completions": ["a", "b"]}', "missing required field", "ranking"),
    ('{"prompt": "p", "completions": ["a", "b", "c"], "ranking": [0, 1, 2], "ties": [[0, 2]]}', "not contiguous", "ties"),
    ('{"prompt": "p", "completions": ["a", "b"], "ranking": ["x", 1]}', "integer indices", "ranking"),
])
def test_bad_rankings_name_file_line_and_field(tmp_path, line, message, field):
    path = write_lines(tmp_path / "r.jsonl", [RANK, line])
    with pytest.raises(DataError) as err:
        read_records(path, "rankings")
    text = str(err.value)
    assert f"r.jsonl:2" in text and f"field {field!r}" in text and message in text


def test_malformed_json_names_line(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"id": "1", "prompt": "hi"}, "", '{"id": "2", "prompt": ', ])
    with pytest.raises(DataError, match=r"p.jsonl:3: malformed JSON"):
        read_records(path, "prompts")


def test_non_object_line_and_missing_file(tmp_path):
    with pytest.raises(DataError, match=r":1: expected a JSON object"):
        read_records(write_lines(tmp_path / "x.jsonl", ["[1, 2]"]), "prompts")
    with pytest.raises(DataError, match="file not found"):
        read_records(tmp_path / "nope.jsonl", "prompts")


def test_completions_and_prompts_roundtrip_through_jsonl_gz_and_datasets(tmp_path):
    recs = [PromptRecord("p1", "my house is too hot"), PromptRecord("p2", "how do I cook rice")]
    write_records(tmp_path / "p.jsonl.gz", recs)
    assert read_records(tmp_path / "p.jsonl.gz", "prompts") == recs
    ds = records_to_dataset(recs)
    assert ds.column_names == ["id", "prompt"] and dataset_to_records(ds, "prompts") == recs
    ds.save_to_disk(str(tmp_path / "ds"))
    assert read_records(tmp_path / "ds", "prompts") == recs


def test_pairs_in_trl_and_hh_layouts(tmp_path):
    rows = [
        {"prompt": "hi", "chosen": "hello!", "rejected": "go away"},
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "hello!"}],
         "rejected": [{"role": "assistant", "content": "go away"}]},
        {"chosen": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello!"}],
         "rejected": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "go away"}]},
        {"chosen": "\n\nHuman: hi\n\nAssistant: hello!", "rejected": "\n\nHuman: hi\n\nAssistant: go away"},
    ]
    pairs = load_pairs(write_lines(tmp_path / "pairs.jsonl", rows))
    assert [(p.chosen, p.rejected) for p in pairs] == [("hello!", "go away")] * 4
    assert pairs[1].prompt == "hi" and pairs[2].prompt == "hi"
    assert pairs[3].prompt == "\n\nHuman: hi\n\nAssistant:"


def test_hh_split_keeps_shared_multi_turn_prefix():
    from rlhf.data.records import PairRecord

    prefix = "\n\nHuman: a\n\nAssistant: b\n\nHuman: c\n\nAssistant:"
    p = PairRecord.from_json({"chosen": prefix + " I can't help with that.", "rejected": prefix + " I can help with that."})
    assert p.prompt == prefix and p.chosen == "I can't help with that." and p.rejected == "I can help with that."


@pytest.mark.parametrize("row, message", [
    ({"prompt": "p", "chosen": "same", "rejected": "same"}, "identical"),
    ({"prompt": "p", "chosen": "  ", "rejected": "x"}, "is empty"),
    ({"prompt": "p", "chosen": "x"}, "missing required field"),
    ({"chosen": "abc", "rejected": "xyz"}, "share no dialogue prefix"),
])
def test_bad_pairs(tmp_path, row, message):
    with pytest.raises(DataError, match=message):
        load_pairs(write_lines(tmp_path / "bad.jsonl", [row]))


def test_pairs_skip_mode_counts_reasons(tmp_path):
    path = write_lines(tmp_path / "p.jsonl", [{"prompt": "p", "chosen": "a", "rejected": "b"},
                                              {"prompt": "p", "chosen": "a", "rejected": "a"}])
    skipped: list[str] = []
    assert len(load_pairs(path, on_error="skip", skipped=skipped)) == 1
    assert len(skipped) == 1 and "p.jsonl:2" in skipped[0]


def test_load_pairs_converts_a_rankings_file(tmp_path):
    path = write_lines(tmp_path / "r.jsonl", [RANK])
    assert len(load_pairs(path)) == 3


def test_real_hh_pairs_parse(hh_dir):
    pairs = load_pairs(hh_dir / "validation.jsonl.gz", on_error="skip", skipped=(skipped := []))
    assert len(pairs) + len(skipped) == 250 and len(pairs) >= 240
    assert all(p.prompt.endswith("Assistant:") and p.chosen and p.rejected for p in pairs)


def test_cli_pairs_writes_atomically_and_reports(tmp_path):
    from click.testing import CliRunner

    from rlhf.cli import app

    rankings = write_lines(tmp_path / "r.jsonl", [RANK, {**RANK, "ties": [[0, 1]]}, {**RANK, "ranking": [], "skipped": True}])
    out = tmp_path / "pairs.jsonl"
    result = CliRunner().invoke(app, ["data", "pairs", "--rankings", str(rankings), "--out", str(out)])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert summary["pairs"] == 5 and summary["skipped_items"] == 1 and summary["tied_pairs_dropped"] == 1
    assert len(out.read_text().splitlines()) == 5
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_bad_input_leaves_no_output(tmp_path):
    from rlhf.cli import main

    bad = write_lines(tmp_path / "r.jsonl", [RANK, {**RANK, "ranking": [0, 1, 7]}])
    out = tmp_path / "pairs.jsonl"
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "pairs", "--rankings", str(bad), "--out", str(out)])
    assert exit_info.value.code == 2 and not out.exists()


def test_gzip_rankings_conversion(tmp_path):
    path = tmp_path / "r.jsonl.gz"
    path.write_bytes(gzip.compress((json.dumps(RANK) + "\n").encode()))
    assert len(rankings_to_pairs(read_records(path, "rankings"))) == 3


def test_tests_needing_real_pairs_say_where_the_public_data_comes_from(tmp_path):
    reason = hh_missing_reason(tmp_path / "hh-harmless")
    assert str(tmp_path / "hh-harmless") in reason and "DEVELOPERS.md" not in reason
    assert "Anthropic" in reason and "hh-rlhf" in reason and "harmless-base" in reason
    assert "https://huggingface.co/datasets/Anthropic/hh-rlhf" in reason


def test_preferred_completion_is_the_borda_winner_of_each_items_labelers():
    from rlhf.data.pairs import PreferredStats, preferred_completions

    def rec(ranking, labeler, prompt="p", **extra):
        return RankingRecord.from_json({"prompt": prompt, "completions": ["a", "b", "c"], "ranking": ranking,
                                        "labeler": labeler, **extra})

    stats = PreferredStats()
    out = preferred_completions([
        # p: ann ranks c > a > b, bob a > c > b, cat c > b > a. Borda points (one per completion beaten):
        # a 1 + 2 + 0 = 3, b 0 + 0 + 1 = 1, c 2 + 1 + 2 = 5 → c, although bob put a first.
        rec([2, 0, 1], "ann"), rec([0, 2, 1], "bob"), rec([2, 1, 0], "cat"),
        # q: two labelers put different completions first with the rest equal: a tie at the top, no example.
        rec([0, 1, 2], "ann", "q"), rec([1, 0, 2], "bob", "q"),
        # r: one labeler, with a tie below the top; a skipped ranking and a gold item add nothing.
        rec([1, 0, 2], "ann", "r", ties=[[0, 2]]), rec([], "bob", "r", skipped=True),
        rec([0, 1, 2], "ann", "gold-item", gold=True),
    ], stats)
    assert [(e.prompt, e.completion) for e in out] == [("p", "c"), ("r", "b")]
    assert (stats.items, stats.kept, stats.tied_best, stats.skipped_rankings, stats.gold_rankings) == (3, 2, 1, 1, 1)


def test_cli_preferred_writes_sft_records(tmp_path):
    from rlhf.cli import main

    rankings = write_lines(tmp_path / "r.jsonl", [RANK, {**RANK, "labeler": "bob", "ranking": [2, 1, 0]}])
    out = tmp_path / "sft.jsonl"
    main(["data", "preferred", "--rankings", str(rankings), "--out", str(out)])
    assert read_records(out, "sft")[0].completion == "c"
    bad = write_lines(tmp_path / "bad.jsonl", [RANK, {**RANK, "ranking": [0, 1, 7]}])
    with pytest.raises(SystemExit) as exit_info:
        main(["data", "preferred", "--rankings", str(bad), "--out", str(tmp_path / "none.jsonl")])
    assert exit_info.value.code == 2 and not (tmp_path / "none.jsonl").exists()
