"""The chat load test, small: 6 concurrent chat users against a real `rlhf personal serve` process, a
SIGKILL in the middle, a restart; runs benchmarks/personal_load.py's own code."""

import pytest

from conftest import load_benchmark


P = load_benchmark("personal_load")


@pytest.mark.slow
def test_sigkill_mid_chat_load_loses_and_doubles_no_acknowledged_choice(tmp_path):
    cfg = P.LoadConfig(users=6, choices=36, kill_at=0.4, max_new_tokens=8, max_seconds=300.0)
    r = P.run(cfg, tmp_path)
    kill, down, final = r["kill"], r["kill"]["export_while_down"], r["export"]
    assert "error" not in kill, kill
    assert kill["in_flight_at_kill"] > 0  # the kill came in the middle of the load
    before = kill["acknowledged_before_kill"]
    assert before >= int(cfg.choices * cfg.kill_at)
    assert down["found_exactly_once"] == down["acknowledged"] == before and down["missing"] == down["doubled"] == 0, down
    assert r["transport_errors"] > 0  # the users saw the server go away and carried on by retrying
    assert r["acknowledged"] == cfg.choices
    assert final["found_exactly_once"] == final["acknowledged"] == cfg.choices and final["changed"] == 0, final
    assert final["stored_but_never_acknowledged"] == 0  # every stored choice was acknowledged in the end
    assert kill["resend_after_restart"] == {"idempotent": before}
    assert P.passed(r)


def test_checks_catch_a_lost_a_doubled_and_a_changed_choice():
    ack = P.Ack("ann", 1, "p", 0, None, {}, True)
    rec = {"id": "t1", "user": "ann", "choice": 0, "edit": None}
    assert P.check([ack], [rec])["found_exactly_once"] == 1
    assert P.check([ack], [])["missing"] == 1
    assert P.check([ack], [rec, rec])["doubled"] == 1
    assert P.check([ack], [{**rec, "choice": 1}])["changed"] == 1
    assert P.check([], [rec])["stored_but_never_acknowledged"] == 1
