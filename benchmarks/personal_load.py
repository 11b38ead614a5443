"""Durability of chat feedback under load: concurrent chat users over HTTP, a SIGKILL of the server in
the middle, no acknowledged choice lost or doubled. The method of benchmarks/label_load.py (whose
helpers it imports), applied to ``rlhf personal serve``.

    .venv/bin/python benchmarks/personal_load.py                     # 20 users, 300 choices, SIGKILL at 40%
    .venv/bin/python benchmarks/personal_load.py --users 6 --choices 40

Start ``rlhf personal serve`` (the bundled model, plain samples) as a subprocess on a fresh database,
create the chat users through the admin API, and let every user work concurrently (one thread and
one HTTP connection each) the way the page does: ``POST /api/chat/ask`` with a fresh ask id, then
``POST /api/chat/choose`` with a fresh submission id and a choice (A, B or both bad; sometimes an
edit), each request retried unchanged after a network failure or a 503. Every 2xx answer to a
choice is an acknowledged choice. Once ``kill_at`` of them are in, the server gets SIGKILL; while it
is down, ``rlhf personal export`` must already hold every choice acknowledged before the kill, exactly
once and as sent. The server restarts on the same database and port, the users' retries carry on
(a retried ask gets the turn stored before the kill, if it was), and at the end every choice
acknowledged before the kill is sent again: each must be answered 2xx with ``stored: false``, and
the final export must hold every acknowledged choice exactly once.

Writes benchmarks/results/personal_load.json and personal_load.md.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from label_load import (HOST, LoadTestError, child_env, free_port, http_client, machine, markdown_table,  # noqa: E402
                        percentile, rlhf_command, run_cli, text_table)

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results" / "personal_load.json"
PROMPTS = ["my house is too hot", "how do I cook rice", "I can not sleep", "how can I save money", "my plant is dying",
           "how do I start running", "what should I read next", "my phone is slow"]


@dataclass
class LoadConfig:
    users: int = 20
    choices: int = 300        # acknowledged choices to reach, over all users
    kill_at: float = 0.4      # share of ``choices`` acknowledged when the server is killed
    both_bad_rate: float = 0.1
    edit_rate: float = 0.1
    max_new_tokens: int = 16  # short replies: this measures the feedback path, not generation
    max_seconds: float = 600.0
    start_timeout_s: float = 120.0  # for the server to answer after a (re)start
    client_timeout_s: float = 30.0  # per request; an ask waits behind every other user's generation on a busy CPU
    seed: int = 0


@dataclass
class Ack:
    user: str
    turn: int
    prompt: str
    choice: int | None
    edit: str | None
    body: dict[str, Any]
    stored: bool


@dataclass
class Recorder:
    """Thread-safe tallies: acknowledged choices, statuses, latencies, network errors."""

    alarm_at: int
    acks: list[Ack] = field(default_factory=list)
    statuses: Counter = field(default_factory=Counter)
    latencies: dict[str, list[float]] = field(default_factory=lambda: {"ask": [], "choose": []})
    transport_errors: int = 0
    in_flight: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)
    alarm: threading.Event = field(default_factory=threading.Event)

    def ack(self, a: Ack) -> None:
        with self.lock:
            self.acks.append(a)
            if len(self.acks) >= self.alarm_at:
                self.alarm.set()

    def snapshot(self) -> list[Ack]:
        with self.lock:
            return list(self.acks)


class ChatServer:
    """``rlhf personal serve`` on 127.0.0.1:port; start, SIGKILL, restart (as label_load's ServerProcess)."""

    def __init__(self, db: Path, port: int, log: Path, max_new_tokens: int):
        self.db, self.port, self.log, self.max_new_tokens = db, port, log, max_new_tokens
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> float:
        t0 = time.monotonic()
        with open(self.log, "a", encoding="utf-8") as log:
            self.proc = subprocess.Popen(rlhf_command("personal", "serve", "--db", str(self.db), "--host", HOST, "--port",
                                                      str(self.port), "--max-new-tokens", str(self.max_new_tokens),
                                                      "--device", "cpu", "--no-access-log"),
                                         stdout=log, stderr=subprocess.STDOUT, env=child_env())
        with http_client(self.url) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise LoadTestError(f"chat server exited with {self.proc.returncode}; see {self.log}")
                try:
                    if probe.get("/healthz").status_code == 200:
                        return time.monotonic() - t0
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > timeout_s:
                    self.stop()
                    raise LoadTestError(f"chat server not answering on {self.url} after {timeout_s:.0f} s")
                time.sleep(0.1)

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.kill()


def call(client: httpx.Client, rec: Recorder, kind: str, path: str, body: dict, deadline: float) -> httpx.Response | None:
    """POST ``body`` until a non-503 answer arrives (the same body each time: the server keeps it once)."""
    while time.monotonic() < deadline:
        t0 = time.perf_counter()
        with rec.lock:
            rec.in_flight += 1
        try:
            r = client.post(path, json=body)
        except httpx.TransportError:
            with rec.lock:
                rec.transport_errors += 1
            time.sleep(0.2)
            continue
        finally:
            with rec.lock:
                rec.in_flight -= 1
        with rec.lock:
            rec.statuses[f"{kind} {r.status_code}"] += 1
            rec.latencies[kind].append(time.perf_counter() - t0)
        if r.status_code == 503:
            time.sleep(0.2)
            continue
        return r
    return None


def user_loop(url: str, name: str, token: str, rec: Recorder, budget: list[int], cfg: LoadConfig, deadline: float) -> None:
    rng = random.Random(f"{cfg.seed}:{name}")
    with http_client(url, token) as client:
        client.timeout = httpx.Timeout(cfg.client_timeout_s)
        while time.monotonic() < deadline:
            with rec.lock:
                if budget[0] <= 0:
                    return
                budget[0] -= 1
            prompt = rng.choice(PROMPTS)
            r = call(client, rec, "ask", "/api/chat/ask", {"prompt": prompt, "ask_id": uuid.uuid4().hex}, deadline)
            if r is None or r.status_code != 200:
                return
            turn = r.json()["turn"]
            roll = rng.random()
            choice = None if roll < cfg.both_bad_rate else rng.choice([0, 1])
            edit = f"{name} rewrote this ({uuid.uuid4().hex[:6]})." if rng.random() < cfg.edit_rate else None
            body = {"turn": turn["id"], "submission_id": uuid.uuid4().hex, "choice": choice, "edit": edit}
            r = call(client, rec, "choose", "/api/chat/choose", body, deadline)
            if r is None or r.status_code != 200:
                return
            rec.ack(Ack(name, turn["id"], prompt, choice, edit, body, bool(r.json()["stored"])))


def export(db: Path, out: Path) -> list[dict[str, Any]]:
    run_cli("personal", "export", "--db", str(db), "--out", str(out))
    return [json.loads(ln) for ln in out.read_text(encoding="utf-8").splitlines() if ln.strip()]


def check(acks: list[Ack], records: list[dict[str, Any]]) -> dict[str, Any]:
    """Every acknowledged choice exactly once, as sent (user, turn, choice, edit)."""
    by_turn: dict[str, list[dict]] = {}
    for r in records:
        by_turn.setdefault(r["id"], []).append(r)
    missing = [a for a in acks if f"t{a.turn}" not in by_turn]
    doubled = [a for a in acks if len(by_turn.get(f"t{a.turn}", [])) > 1]
    changed = [a for a in acks if len(by_turn.get(f"t{a.turn}", [])) == 1 and
               (by_turn[f"t{a.turn}"][0]["user"], by_turn[f"t{a.turn}"][0]["choice"], by_turn[f"t{a.turn}"][0]["edit"])
               != (a.user, a.choice, a.edit)]
    acked = {f"t{a.turn}" for a in acks}
    return {"acknowledged": len(acks), "records": len(records), "distinct_turns_acked": len(acked),
            "found_exactly_once": len(acks) - len(missing) - len(doubled) - len(changed), "missing": len(missing),
            "doubled": len(doubled), "changed": len(changed),
            "stored_but_never_acknowledged": sum(1 for k in by_turn if k not in acked)}


def run(cfg: LoadConfig, work: Path) -> dict[str, Any]:
    from rlhf.feedback.store import open_store

    work.mkdir(parents=True, exist_ok=True)
    db = work / "labels.sqlite"
    store = open_store(db)
    _, admin_token = store.add_user("load-admin", "admin", None)
    store.close()
    server = ChatServer(db, free_port(), work / "server.log", cfg.max_new_tokens)
    first_start = server.start(cfg.start_timeout_s)
    tokens = {}
    with http_client(server.url, admin_token) as admin:
        for i in range(cfg.users):
            r = admin.post("/api/admin/chat/users", json={"name": f"user-{i + 1:02d}"})
            if r.status_code != 200:
                raise LoadTestError(f"creating chat user {i + 1}: HTTP {r.status_code}: {r.text[:200]}")
            tokens[r.json()["user"]] = r.json()["token"]
    rec = Recorder(alarm_at=max(1, int(cfg.choices * cfg.kill_at)))
    crash: dict[str, Any] = {}
    before: list[Ack] = []
    deadline = time.monotonic() + cfg.max_seconds
    stop_killer = threading.Event()

    def killer() -> None:
        while not rec.alarm.wait(0.2):
            if stop_killer.is_set():
                return
        crash["in_flight_at_kill"] = rec.in_flight
        t0 = time.monotonic()
        server.kill()
        time.sleep(0.3)  # answers already written by the dead server may still reach clients
        before.extend(rec.snapshot())
        try:
            crash["export_while_down"] = check(before, export(db, work / "export-down.jsonl"))
            crash["restart_s"] = round(server.start(cfg.start_timeout_s), 2)
        except LoadTestError as exc:
            crash["error"] = str(exc)
        crash["downtime_s"] = round(time.monotonic() - t0, 2)

    budget = [cfg.choices]
    threads = [threading.Thread(target=user_loop, args=(server.url, n, t, rec, budget, cfg, deadline)) for n, t in tokens.items()]
    kthread = threading.Thread(target=killer)
    t0 = time.monotonic()
    try:
        kthread.start()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.monotonic() - t0
        stop_killer.set()
        kthread.join()
        if "export_while_down" not in crash:
            raise LoadTestError(f"the load ended before the kill point ({len(rec.acks)} acknowledged)")
        resend: Counter = Counter()
        for ack in before:
            with http_client(server.url, tokens[ack.user]) as c:
                r = c.post("/api/chat/choose", json=ack.body)
                resend["idempotent" if r.status_code == 200 and not r.json()["stored"] else f"other {r.status_code}"] += 1
        final = check(rec.snapshot(), export(db, work / "export.jsonl"))
    finally:
        stop_killer.set()
        server.stop()
    acks = rec.snapshot()

    def ms(xs: list[float], p: float) -> float | None:
        v = percentile(xs, p)
        return None if v is None else round(1000 * v, 1)

    return {"users": cfg.users, "target": cfg.choices, "acknowledged": len(acks), "both_bad": sum(a.choice is None for a in acks),
            "edits": sum(a.edit is not None for a in acks), "answered_stored_false": sum(not a.stored for a in acks),
            "statuses": dict(rec.statuses), "transport_errors": rec.transport_errors, "wall_s": round(wall, 1),
            "first_start_s": round(first_start, 1),
            "latency_ms": {k: {"p50": ms(v, 50), "p99": ms(v, 99), "n": len(v)} for k, v in rec.latencies.items()},
            "kill": {**crash, "acknowledged_before_kill": len(before), "resend_after_restart": dict(resend)},
            "export": final}


def passed(r: dict[str, Any]) -> bool:
    down, final, resend = r["kill"].get("export_while_down", {}), r["export"], r["kill"]["resend_after_restart"]
    fivexx = sum(n for k, n in r["statuses"].items() if k.split()[-1].startswith("5") and not k.endswith("503"))
    return ("error" not in r["kill"] and fivexx == 0 and down.get("found_exactly_once") == r["kill"]["acknowledged_before_kill"] > 0
            and final["found_exactly_once"] == final["acknowledged"] == r["acknowledged"] > 0
            and resend == {"idempotent": r["kill"]["acknowledged_before_kill"]})


def table(r: dict[str, Any]) -> list[tuple[str, str]]:
    k, down, final = r["kill"], r["kill"].get("export_while_down", {}), r["export"]
    lat = r["latency_ms"]
    return [("", "chat load with SIGKILL"),
            ("concurrent chat users", str(r["users"])),
            ("choices acknowledged / target", f"{r['acknowledged']} / {r['target']}"),
            ("  of which both bad, with an edit", f"{r['both_bad']}, {r['edits']}"),
            ("HTTP answers", ", ".join(f"{k2}: {n}" for k2, n in sorted(r["statuses"].items()))),
            ("network errors (retried)", str(r["transport_errors"])),
            ("ask latency p50 / p99 (ms)", f"{lat['ask']['p50']} / {lat['ask']['p99']}"),
            ("choose latency p50 / p99 (ms)", f"{lat['choose']['p50']} / {lat['choose']['p99']}"),
            ("wall time (s)", str(r["wall_s"])),
            ("SIGKILL: requests in flight", str(k.get("in_flight_at_kill"))),
            ("acked before kill, in export while down", f"{down.get('found_exactly_once')} / {k['acknowledged_before_kill']} "
                                                        f"(lost {down.get('missing')}, doubled {down.get('doubled')})"),
            ("  stored but unacknowledged at the kill", str(down.get("stored_but_never_acknowledged"))),
            ("  retries answered stored: false", str(r["answered_stored_false"])),
            ("down time incl. restart (s)", f"{k.get('downtime_s')} (restart {k.get('restart_s')})"),
            ("resent after restart: idempotent", f"{k['resend_after_restart'].get('idempotent', 0)} / {k['acknowledged_before_kill']}"),
            ("acks in final export exactly once", f"{final['found_exactly_once']} / {final['acknowledged']} "
                                                  f"(lost {final['missing']}, doubled {final['doubled']}, changed {final['changed']})"),
            ("result", "PASS" if passed(r) else "FAIL")]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LoadConfig()
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default: {value}")
    ap.add_argument("--workdir", default=None, help="keep the database, exports and server log here")
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    cfg = LoadConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    command = " ".join([".venv/bin/python", "benchmarks/personal_load.py", *(argv if argv is not None else sys.argv[1:])])
    tmp = tempfile.mkdtemp(prefix="personal-load-") if args.workdir is None else None
    try:
        result = run(cfg, Path(args.workdir or tmp))
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    rows = table(result)
    print(text_table(rows))
    from rlhf.utils.io import atomic_write_json, atomic_write_text

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    m = machine()
    atomic_write_json(Path(args.results), {"date": when, "command": command, "machine": m, "config": asdict(cfg),
                                           "result": result, "pass": passed(result)})
    atomic_write_text(Path(args.results).with_suffix(".md"),
                      f"{when}, {m['cpu_cores']} CPU cores (1-minute load average {m['load_average_1min']} at the end)\n\n"
                      f"```bash\n{command}\n```\n\n{markdown_table(rows)}\n")
    return 0 if passed(result) else 1


if __name__ == "__main__":
    sys.exit(main())
