"""The labeling load test, small: 8 concurrent labelers against a real `rlhf label serve` process,
then the same with a SIGKILL and restart in the middle, on SQLite and on PostgreSQL. Runs
benchmarks/label_load.py's own code."""

import pytest

from conftest import load_benchmark


L = load_benchmark("label_load")
SMALL = L.LoadConfig(labelers=8, submissions=80, crash_submissions=80, kill_at=0.4, items=40, labels_per_item=3,
                     admin_poll_s=0.5, max_seconds=150.0)  # a bound for loaded machines, not a target


def test_concurrent_labelers_every_ack_exported_exactly_once(tmp_path, store_url):
    r = L.run_steady_phase(SMALL, tmp_path, store_url)
    assert r["backend"] == ("sqlite" if "://" not in store_url else "postgresql")
    assert r["http_5xx"] == 0 and r["http_4xx"] == 0, r["status_counts"]
    assert r["acknowledged"] == SMALL.submissions and r["transport_errors"] == 0
    ex = r["export"]
    assert ex["found_exactly_once"] == ex["acknowledged"] == ex["export_records"] == SMALL.submissions, ex
    assert ex["missing"] == ex["duplicated"] == ex["mismatched"] == ex["stored_but_never_acknowledged"] == 0
    assert ex["items_ranked_more_than_n"] == 0 and r["counter_drift"] == []
    assert r["latency_ms"]["submit"]["n"] == SMALL.submissions and r["latency_ms"]["submit"]["p99"] > 0
    assert L.phase_ok(r)


def test_sigkill_mid_load_loses_nothing_acknowledged_and_resends_are_idempotent(tmp_path, store_url):
    r = L.run_crash_phase(SMALL, tmp_path, store_url)
    kill = r["kill"]
    assert "error" not in kill, kill
    assert kill["in_flight_at_kill"] > 0  # the kill really came in the middle of the load
    before = kill["acknowledged_before_kill"]
    assert before >= int(SMALL.crash_submissions * SMALL.kill_at)
    down = kill["export_while_down"]
    # read straight from the database the killed server left: every acknowledged label is there once
    assert down["found_exactly_once"] == down["acknowledged"] == before and down["missing"] == 0, down
    assert r["transport_errors"] > 0  # the labelers saw the server go away, and carried on by retrying
    assert r["http_5xx"] == 0 and r["http_4xx"] == 0, r["status_counts"]
    assert r["acknowledged"] == SMALL.crash_submissions
    ex = r["export"]
    assert ex["found_exactly_once"] == ex["acknowledged"] == ex["export_records"], ex
    assert ex["items_ranked_more_than_n"] == 0
    assert kill["resubmit_after_restart"] == {"sent": before, "idempotent": before}
    assert kill["export_records_changed_by_resubmit"] == 0
    assert r["counter_drift"] == []  # the counters next-item relies on survived the kill too
    assert L.phase_ok(r)


def test_checks_catch_a_lost_a_doubled_and_a_changed_label():
    ack = L.Ack("ann", "p", ["a", "b"], [], False, {}, True)
    other = L.Ack("bob", "p", ["b", "a"], [], False, {}, True)
    rec = {"labeler": "ann", "prompt": "p", "completions": ["a", "b"], "ranking": [0, 1]}
    assert L.check_export([ack], [rec], 3)["found_exactly_once"] == 1
    assert L.check_export([ack, other], [rec], 3)["missing"] == 1
    assert L.check_export([ack], [rec, rec], 3)["duplicated"] == 1
    assert L.check_export([ack], [{**rec, "ranking": [1, 0]}], 3)["mismatched"] == 1
    assert L.check_export([ack], [rec, {**rec, "labeler": "cid"}], 1)["items_ranked_more_than_n"] == 1
    assert L.check_export([ack], [rec, {**rec, "labeler": "cid"}], 3)["stored_but_never_acknowledged"] == 1


def test_percentile_is_nearest_rank():
    xs = [float(i) for i in range(1, 101)]
    assert L.percentile(xs, 50) == 50.0 and L.percentile(xs, 99) == 99.0 and L.percentile([], 50) is None
    with pytest.raises(L.LoadTestError, match="cannot take"):
        L.LoadConfig(items=10, labels_per_item=2, submissions=100).validate()
