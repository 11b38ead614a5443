"""Load test of the labeling web app: concurrent labelers over HTTP, exactly-once export, and a
SIGKILL of the server in the middle of the load.

    .venv/bin/python benchmarks/label_load.py                   # 50 labelers, 2,000 + 1,000 submissions
    .venv/bin/python benchmarks/label_load.py --labelers 8 --submissions 80 --crash-submissions 80
    .venv/bin/python benchmarks/label_load.py --backend both    # SQLite, then PostgreSQL (a local server)

Phase "steady": start ``rlhf label serve`` as a subprocess on a free port with a fresh database,
import a generated completions file (K completions per prompt), create the labelers through the
admin API, then let every labeler work concurrently (one thread and one HTTP connection each),
doing what the web page does: ``GET /api/next``, then ``POST /api/submit`` with a fresh
submission id, retrying a request that failed on the network with the same body. An admin polls
``/api/admin/summary`` meanwhile, as the admin page does. Every 2xx answer to a submission is an
acknowledged submission; afterwards each one must be in ``rlhf label export`` exactly once, with
the ranking the labeler sent, and no request may get a 5xx.

Phase "crash": the same on a fresh database, but once a share of the submissions is acknowledged
the server gets SIGKILL. While it is down, ``rlhf label export`` must already hold every
submission acknowledged before the kill, exactly once. The server then restarts on the same
database and port, the labelers' retries carry on, and at the end every acknowledged
submission before the kill is resent: each must be answered 2xx with ``stored: false``
(idempotent), and the final export must still hold every acknowledged submission exactly once.

``--backend postgresql`` (or ``both``) runs the phases on PostgreSQL too: a throwaway server
started on 127.0.0.1 (rlhf/feedback/pg_local.py; fsync on), a fresh database per phase, or the
server of ``--postgres-url``. All traffic goes to 127.0.0.1; the run is bounded by --max-seconds per phase. Writes
benchmarks/results/label_load.json and label_load.md (the table, date, machine and command; merged into benchmarks/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import httpx

REPO = Path(__file__).resolve().parent.parent
HOST = "127.0.0.1"  # the only address this script sends anything to
RESULTS = REPO / "benchmarks" / "results" / "label_load.json"


class LoadTestError(RuntimeError):
    """The load test could not run (server did not start, a CLI step failed); not a failed check."""


@dataclass
class LoadConfig:
    labelers: int = 50
    submissions: int = 2000  # steady phase: submissions sent in total, over all labelers
    crash_submissions: int = 1000  # crash phase: the same, with one SIGKILL and restart in the middle
    kill_at: float = 0.4  # share of crash_submissions acknowledged when the server is killed
    items: int = 500
    k: int = 4  # completions per item
    labels_per_item: int = 6
    tie_rate: float = 0.1  # share of rankings with the top two tied
    skip_rate: float = 0.02  # share of submissions that skip the item (with a reason)
    admin_poll_s: float = 2.0  # the admin page's refresh; 0 = no admin traffic
    max_seconds: float = 240.0  # hard bound on one phase's load; the labelers stop when it passes
    synchronous: str = "FULL"
    seed: int = 0

    def validate(self) -> None:
        if self.labelers < 1 or self.submissions < 1 or self.crash_submissions < 1:
            raise LoadTestError("labelers and submissions must be at least 1")
        if not 0 < self.kill_at < 1:
            raise LoadTestError("kill_at must be between 0 and 1 (a share of crash_submissions)")
        if self.k < 2 or self.items < 1 or self.labels_per_item < 1:
            raise LoadTestError("need at least 1 item with at least 2 completions and labels_per_item >= 1")
        # Skips do not count toward an item's N, so this capacity is a floor; a shortfall would make
        # labelers run out of items and the phase end short of its target.
        need = max(self.submissions, self.crash_submissions)
        if self.items * min(self.labels_per_item, self.labelers) < need:
            raise LoadTestError(f"{self.items} items x {self.labels_per_item} labels per item cannot take {need} "
                                "submissions; raise --items or --labels-per-item")


# -- the server and the CLI, as subprocesses -------------------------------------------------------

def rlhf_command(*args: str) -> list[str]:
    """The installed ``rlhf`` console script next to this interpreter (fallback: ``python -m``)."""
    script = Path(sys.executable).parent / "rlhf"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "rlhf.cli"]
    return head + list(args)


def child_env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_cli(*args: str, timeout_s: float = 120.0) -> str:
    proc = subprocess.run(rlhf_command(*args), capture_output=True, text=True, timeout=timeout_s, env=child_env())
    if proc.returncode != 0:
        raise LoadTestError(f"`rlhf {' '.join(args)}` exited {proc.returncode}: {proc.stderr.strip()[-2000:]}")
    return proc.stdout


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def http_client(base_url: str, token: str | None = None) -> httpx.Client:
    # trust_env=False: no proxy from the environment may carry this traffic off the machine.
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.Client(base_url=base_url, headers=headers, timeout=30.0, trust_env=False)


class ServerProcess:
    """``rlhf label serve`` on 127.0.0.1:port, its output in a log file; start, SIGKILL, restart."""

    def __init__(self, db: str, port: int, log: Path, synchronous: str = "FULL"):
        self.db, self.port, self.log, self.synchronous = db, port, log, synchronous
        self.url = f"http://{HOST}:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout_s: float = 120.0) -> float:
        """Start and wait until /healthz answers; returns the seconds that took."""
        t0 = time.monotonic()
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"--- start at {datetime.now(timezone.utc).isoformat()}\n")
            log.flush()
            self.proc = subprocess.Popen(
                rlhf_command("label", "serve", "--db", str(self.db), "--host", HOST, "--port", str(self.port),
                             "--synchronous", self.synchronous, "--no-access-log"),
                stdout=log, stderr=subprocess.STDOUT, env=child_env())
        with http_client(self.url) as probe:
            while True:
                if self.proc.poll() is not None:
                    raise LoadTestError(f"labeling server exited with {self.proc.returncode}; log: {self.log_tail()}")
                try:
                    if probe.get("/healthz").status_code == 200:
                        return time.monotonic() - t0
                except httpx.TransportError:
                    pass
                if time.monotonic() - t0 > timeout_s:
                    self.stop()
                    raise LoadTestError(f"labeling server not answering on {self.url} after {timeout_s:.0f} s; "
                                        f"log: {self.log_tail()}")
                time.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown handler runs, open transactions and sockets die with the process."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_tail(self, chars: int = 2000) -> str:
        try:
            return self.log.read_text(encoding="utf-8", errors="replace")[-chars:]
        except OSError:
            return "(no log)"


# -- the campaign ----------------------------------------------------------------------------------

_TOPICS = ["cook rice", "fix a bike tyre", "sleep better", "learn Spanish", "cool a hot house", "write a cover letter",
           "start running", "save money", "plant tomatoes", "clean an oven"]
_WORDS = "first then carefully simply about minutes water gently check again keep warm slowly every day".split()


def write_completions(path: Path, items: int, k: int, seed: int) -> Path:
    """A completions file with unique prompts and distinct completions of varied length, so that
    (labeler, prompt) names one label and a ranking can be compared by completion text."""
    rng = random.Random(f"completions:{seed}")
    with open(path, "w", encoding="utf-8") as f:
        for i in range(items):
            prompt = f"Question {i}: how do I {_TOPICS[i % len(_TOPICS)]}?"
            completions = [f"Reply {j} to question {i}: " + " ".join(rng.choices(_WORDS, k=rng.randint(5, 60)))
                           for j in range(k)]
            f.write(json.dumps({"prompt_id": f"q{i}", "prompt": prompt, "completions": completions}) + "\n")
    return path


@dataclass
class Campaign:
    db: str  # a SQLite file or a postgresql:// URL
    admin_token: str
    tokens: dict[str, str] = field(default_factory=dict)  # labeler name -> token


def create_campaign(workdir: Path, cfg: LoadConfig, db: str | None = None) -> Campaign:
    """Import the generated file and make an admin, with the library calls the CLI verbs make
    (in this process: two fewer interpreter start-ups per phase). ``db``: an empty database's URL
    (default: a new SQLite file in ``workdir``)."""
    from rlhf.feedback.campaign import import_campaign
    from rlhf.feedback.store import open_store

    comp = write_completions(workdir / "completions.jsonl", cfg.items, cfg.k, cfg.seed)
    db = db or str(workdir / "labels.sqlite")
    store = open_store(db)
    try:
        import_campaign(store, comp, "helpfulness", cfg.labels_per_item, name="load")
        _, admin_token = store.add_user("load-admin", "admin", None)
    finally:
        store.close()
    return Campaign(db, admin_token)


def add_labelers(url: str, campaign: Campaign, n: int) -> None:
    """Create labelers through the admin API (what the admin page's "add labeler" does)."""
    with http_client(url, campaign.admin_token) as admin:
        for i in range(n):
            r = admin.post("/api/admin/labelers", json={"name": f"labeler-{i + 1:03d}"})
            if r.status_code != 200:
                raise LoadTestError(f"creating labeler {i + 1}: HTTP {r.status_code}: {r.text[:300]}")
            campaign.tokens[r.json()["labeler"]] = r.json()["token"]


def export_records(db: str, out: Path) -> list[dict[str, Any]]:
    """``rlhf label export`` into ``out``, read back."""
    run_cli("label", "export", "--db", str(db), "--out", str(out))
    with open(out, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def stored_labels(db: str) -> int:
    """How many labels the database holds, read directly (cheaper than a whole export)."""
    from rlhf.feedback.store import open_store

    store = open_store(db)
    try:
        return store.count_labels()
    finally:
        store.close()


# -- the labelers ----------------------------------------------------------------------------------

@dataclass
class Ack:
    """A submission the server answered 2xx, with what the labeler meant (completion texts)."""

    labeler: str
    prompt: str
    ranked: list[str]  # completion texts, best first ([] when skipped)
    ties: list[list[str]]
    skipped: bool
    body: dict[str, Any]  # the exact request body, to resend it
    stored: bool  # the answer's "stored": false when an earlier attempt had already stored it


class Recorder:
    """Every response, network failure and acknowledged submission, shared by the labeler threads."""

    def __init__(self, ack_alarm: int | None = None):
        self.lock = threading.Lock()
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: Counter[tuple[str, int]] = Counter()
        self.transport_errors: Counter[str] = Counter()
        self.acks: list[Ack] = []
        self.in_flight = 0
        self.ack_alarm = ack_alarm  # when this many acks are in, `alarm` is set (the crash phase kills then)
        self.alarm = threading.Event()

    def response(self, endpoint: str, status: int, seconds: float) -> None:
        with self.lock:
            self.statuses[(endpoint, status)] += 1
            if 200 <= status < 300:
                self.latencies[endpoint].append(seconds)

    def transport_error(self, endpoint: str) -> None:
        with self.lock:
            self.transport_errors[endpoint] += 1

    def ack(self, ack: Ack) -> None:
        with self.lock:
            self.acks.append(ack)
            if self.ack_alarm is not None and len(self.acks) >= self.ack_alarm:
                self.alarm.set()

    def acks_so_far(self) -> list[Ack]:
        with self.lock:
            return list(self.acks)

    def count(self, lo: int, hi: int) -> int:
        return sum(n for (_, status), n in self.statuses.items() if lo <= status < hi)


class Budget:
    """Submission slots shared by all labelers, so the phase sends exactly its target."""

    def __init__(self, n: int):
        self.left, self.lock = n, threading.Lock()

    def take(self) -> bool:
        with self.lock:
            if self.left <= 0:
                return False
            self.left -= 1
            return True

    def give_back(self) -> None:
        with self.lock:
            self.left += 1


class LabelerClient:
    """One labeler's HTTP connection; network failures are retried with the same request, as the
    page does (a resent submission carries the same submission id)."""

    def __init__(self, url: str, name: str, token: str, rec: Recorder, stop: threading.Event, retry_for_s: float = 60.0):
        self.name, self.rec, self.stop, self.retry_for_s = name, rec, stop, retry_for_s
        self.http = http_client(url, token)

    def call(self, method: str, path: str, endpoint: str, body: dict | None = None) -> httpx.Response | None:
        """The response (any status), or None when the server stayed unreachable or the phase stopped."""
        deadline = time.monotonic() + self.retry_for_s
        while True:
            t0 = time.perf_counter()
            with self.rec.lock:
                self.rec.in_flight += 1
            try:
                r = self.http.request(method, path, json=body)
            except httpx.TransportError:
                self.rec.transport_error(endpoint)
                if time.monotonic() > deadline or self.stop.is_set():
                    return None
                time.sleep(0.1)
                continue
            finally:
                with self.rec.lock:
                    self.rec.in_flight -= 1
            self.rec.response(endpoint, r.status_code, time.perf_counter() - t0)
            return r

    def close(self) -> None:
        self.http.close()


def choose_answer(item: dict[str, Any], rng: random.Random, cfg: LoadConfig) -> dict[str, Any]:
    """A skip, or a ranking of the shown positions (longer replies preferred, with noise; sometimes a tie)."""
    from rlhf.feedback.simulate import noisy_ranking

    if rng.random() < cfg.skip_rate:
        return {"skipped": True, "skip_reason": "load test: skipped on purpose"}
    order, _ = noisy_ranking([float(len(c.split())) for c in item["completions"]], 10.0, rng)
    ties = [[order[0], order[1]]] if rng.random() < cfg.tie_rate else []
    return {"ranking": order, "ties": ties}


def labeler_loop(client: LabelerClient, budget: Budget, rng: random.Random, cfg: LoadConfig) -> None:
    errors = 0
    while not client.stop.is_set() and errors < 10 and budget.take():
        r = client.call("GET", "/api/next", "next")
        if r is None or r.status_code != 200:
            budget.give_back()
            errors += 1
            continue
        item = r.json()["item"]
        if item is None:  # nothing left for this labeler
            budget.give_back()
            return
        answer = choose_answer(item, rng, cfg)
        body = {"item": item["id"], "submission_id": uuid.uuid4().hex, **answer}
        r = client.call("POST", "/api/submit", "submit", body)
        if r is None or not 200 <= r.status_code < 300:
            errors += 1  # counted by the recorder; the item stays open and comes back from /api/next
            budget.give_back()
            continue
        shown = item["completions"]
        client.rec.ack(Ack(client.name, item["prompt"], [shown[s] for s in answer.get("ranking", [])],
                           [[shown[s] for s in g] for g in answer.get("ties", [])], bool(answer.get("skipped")),
                           body, bool(r.json().get("stored"))))


def admin_loop(url: str, token: str, rec: Recorder, stop: threading.Event, every_s: float) -> None:
    with http_client(url, token) as admin:
        while not stop.wait(every_s):
            t0 = time.perf_counter()
            try:
                r = admin.get("/api/admin/summary")
            except httpx.TransportError:
                rec.transport_error("admin_summary")
                continue
            rec.response("admin_summary", r.status_code, time.perf_counter() - t0)


def drive(url: str, campaign: Campaign, n_submissions: int, cfg: LoadConfig, rec: Recorder) -> float:
    """Run every labeler concurrently until ``n_submissions`` are sent (or max_seconds); returns wall seconds."""
    stop, done = threading.Event(), threading.Event()
    budget = Budget(n_submissions)
    clients = [LabelerClient(url, name, token, rec, stop) for name, token in campaign.tokens.items()]
    threads = [threading.Thread(target=labeler_loop, args=(c, budget, random.Random(f"{cfg.seed}:{c.name}"), cfg),
                                name=f"labeler-{c.name}") for c in clients]
    admin = None
    if cfg.admin_poll_s > 0:
        admin = threading.Thread(target=admin_loop, args=(url, campaign.admin_token, rec, done, cfg.admin_poll_s))
        admin.start()
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=max(0.0, cfg.max_seconds - (time.monotonic() - t0)))
        if t.is_alive():
            stop.set()  # out of time: the labelers finish their current request and stop
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    done.set()
    if admin is not None:
        admin.join()
    for c in clients:
        c.close()
    return wall


# -- checks and figures ----------------------------------------------------------------------------

def check_export(acks: list[Ack], records: list[dict[str, Any]], labels_per_item: int) -> dict[str, Any]:
    """Every acknowledged submission in the export exactly once, with the ranking that was sent;
    and no item ranked by more than N labelers (claims are taken under one lock, so concurrency
    must not hand an item out too often)."""
    by_key: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    ranked_per_item: Counter[str] = Counter()
    for rec in records:
        by_key[(rec["labeler"], rec["prompt"])].append(rec)
        if not rec.get("skipped"):
            ranked_per_item[rec["prompt"]] += 1
    missing, duplicated, mismatched = [], [], []
    for ack in acks:
        found = by_key.get((ack.labeler, ack.prompt), [])
        if not found:
            missing.append(f"{ack.labeler} / {ack.prompt}")
        elif len(found) > 1:
            duplicated.append(f"{ack.labeler} / {ack.prompt} ({len(found)} records)")
        else:
            rec = found[0]
            ranked = [rec["completions"][i] for i in rec["ranking"]]
            ties = sorted(sorted(rec["completions"][i] for i in g) for g in rec.get("ties", []))
            if (ranked, ties, bool(rec.get("skipped"))) != (ack.ranked, sorted(sorted(g) for g in ack.ties), ack.skipped):
                mismatched.append(f"{ack.labeler} / {ack.prompt}")
    acked_keys = {(a.labeler, a.prompt) for a in acks}
    return {"acknowledged": len(acks), "export_records": len(records),
            "found_exactly_once": len(acks) - len(missing) - len(duplicated) - len(mismatched),
            "missing": len(missing), "duplicated": len(duplicated), "mismatched": len(mismatched),
            "acks_for_the_same_label": len(acks) - len(acked_keys),
            "stored_but_never_acknowledged": sum(1 for k in by_key if k not in acked_keys),
            "items_ranked_more_than_n": sum(1 for n in ranked_per_item.values() if n > labels_per_item),
            "examples": (missing + duplicated + mismatched)[:5]}


def percentile(xs: list[float], p: float) -> float | None:
    """Nearest-rank percentile (no interpolation), or None for no data."""
    if not xs:
        return None
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(p / 100 * len(s)) - 1))]


def figures(rec: Recorder, wall_s: float) -> dict[str, Any]:
    def ms(x: float | None) -> float | None:
        return None if x is None else round(1000 * x, 1)

    acks = rec.acks_so_far()
    requests = sum(rec.statuses.values())
    return {
        "acknowledged": len(acks), "ranked": sum(not a.skipped for a in acks), "skipped": sum(a.skipped for a in acks),
        "with_tie": sum(bool(a.ties) for a in acks), "answered_stored_false": sum(not a.stored for a in acks),
        "requests": requests, "http_2xx": rec.count(200, 300), "http_4xx": rec.count(400, 500),
        "http_5xx": rec.count(500, 600), "transport_errors": sum(rec.transport_errors.values()),
        "status_counts": {f"{ep} {st}": n for (ep, st), n in sorted(rec.statuses.items())},
        "wall_s": round(wall_s, 2),
        "submissions_per_s": round(len(acks) / wall_s, 1) if wall_s > 0 else None,
        "requests_per_s": round(requests / wall_s, 1) if wall_s > 0 else None,
        "latency_ms": {ep: {"p50": ms(percentile(xs, 50)), "p99": ms(percentile(xs, 99)), "max": ms(max(xs)), "n": len(xs)}
                       for ep, xs in sorted(rec.latencies.items()) if xs},
    }


# -- the two phases --------------------------------------------------------------------------------

def start_phase(workdir: Path, cfg: LoadConfig, db: str | None = None) -> tuple[Campaign, ServerProcess]:
    workdir.mkdir(parents=True, exist_ok=True)
    campaign = create_campaign(workdir, cfg, db)
    server = ServerProcess(campaign.db, free_port(), workdir / "server.log", cfg.synchronous)
    server.start()
    try:
        add_labelers(server.url, campaign, cfg.labelers)
    except BaseException:
        server.stop()
        raise
    return campaign, server


def counter_drift(db: str) -> list[str]:
    """The store's kept counters against a recount of its rows (empty when they agree)."""
    from rlhf.feedback.store import open_store

    store = open_store(db)
    try:
        return store.counter_drift()[:5]
    finally:
        store.close()


def backend_of(db: str) -> str:
    return "postgresql" if db.startswith(("postgresql://", "postgres://")) else "sqlite"


def run_steady_phase(cfg: LoadConfig, workdir: Path, db: str | None = None) -> dict[str, Any]:
    campaign, server = start_phase(workdir, cfg, db)
    rec = Recorder()
    try:
        wall = drive(server.url, campaign, cfg.submissions, cfg, rec)
        records = export_records(campaign.db, workdir / "export.jsonl")
    finally:
        server.stop()
    drift = counter_drift(campaign.db)
    return {"phase": "steady", "counter_drift": drift, "backend": backend_of(campaign.db), "labelers": cfg.labelers,
            "target": cfg.submissions,
            **figures(rec, wall),
            "export": check_export(rec.acks_so_far(), records, cfg.labels_per_item)}


def resubmit(url: str, campaign: Campaign, acks: list[Ack]) -> dict[str, int]:
    """Send acknowledged submissions again, unchanged: each must be a 2xx saying stored: false."""
    by_labeler: dict[str, list[Ack]] = defaultdict(list)
    for ack in acks:
        by_labeler[ack.labeler].append(ack)

    def resend(name: str) -> Counter[str]:
        out: Counter[str] = Counter()
        with http_client(url, campaign.tokens[name]) as client:
            for ack in by_labeler[name]:
                try:
                    r = client.post("/api/submit", json=ack.body)
                except httpx.TransportError:
                    out["network_error"] += 1
                    continue
                ok = 200 <= r.status_code < 300
                out[("stored_again" if r.json().get("stored") else "idempotent") if ok else f"http_{r.status_code}"] += 1
        return out

    with ThreadPoolExecutor(max_workers=8) as pool:
        outcomes = sum(pool.map(resend, list(by_labeler)), Counter())
    return {"sent": len(acks), **outcomes}


def run_crash_phase(cfg: LoadConfig, workdir: Path, db: str | None = None) -> dict[str, Any]:
    campaign, server = start_phase(workdir, cfg, db)
    kill_after = max(1, int(cfg.crash_submissions * cfg.kill_at))
    rec = Recorder(ack_alarm=kill_after)
    crash: dict[str, Any] = {}
    before_kill: list[Ack] = []
    aborted = threading.Event()  # the load failed before the kill point: the killer must not act

    def killer() -> None:
        # Waits for the alarm the recorder raises at kill_after acks, then kills mid-load.
        if not rec.alarm.wait(timeout=cfg.max_seconds) or aborted.is_set():
            crash["error"] = "the load never reached the kill point"
            return
        crash["in_flight_at_kill"] = rec.in_flight
        t_kill = time.monotonic()
        server.kill()
        time.sleep(0.3)  # answers the dead server had already written may still be read by clients
        before_kill.extend(rec.acks_so_far())
        try:
            # The database as the crash left it, read while no server runs: nothing acknowledged lost.
            down = export_records(campaign.db, workdir / "export-down.jsonl")
            crash["export_while_down"] = check_export(before_kill, down, cfg.labels_per_item)
            crash["restart_s"] = round(server.start(), 2)
        except LoadTestError as exc:  # reported with the phase; the labelers give up after their retry window
            crash["error"] = str(exc)
        crash["downtime_s"] = round(time.monotonic() - t_kill, 2)

    killer_thread = threading.Thread(target=killer, name="killer")
    killer_thread.start()
    try:
        wall = drive(server.url, campaign, cfg.crash_submissions, cfg, rec)
        killer_thread.join()
        crash["acknowledged_before_kill"] = len(before_kill)
        if server.proc is None or server.proc.poll() is not None:
            raise LoadTestError(f"the server is not running after the restart; log: {server.log_tail()}")
        count_before = stored_labels(campaign.db)
        crash["resubmit_after_restart"] = resubmit(server.url, campaign, before_kill)
        records = export_records(campaign.db, workdir / "export.jsonl")
        crash["export_records_changed_by_resubmit"] = len(records) - count_before
    finally:
        aborted.set()
        rec.alarm.set()  # releases the killer if the load failed before the kill point
        killer_thread.join()
        server.stop()
    return {"phase": "crash", "counter_drift": counter_drift(campaign.db), "backend": backend_of(campaign.db),
            "labelers": cfg.labelers,
            "target": cfg.crash_submissions, **figures(rec, wall),
            "export": check_export(rec.acks_so_far(), records, cfg.labels_per_item), "kill": crash}


def phase_ok(result: dict[str, Any]) -> bool:
    """The pass criteria: no 5xx, every ack exactly once; for the crash phase also nothing lost
    at the kill and every resend idempotent."""
    ex = result["export"]
    ok = result["http_5xx"] == 0 and ex["found_exactly_once"] == ex["acknowledged"] > 0
    ok = ok and ex["items_ranked_more_than_n"] == 0 and not result.get("counter_drift")
    if result["phase"] == "crash":
        kill = result["kill"]
        down = kill.get("export_while_down", {})
        resend = kill.get("resubmit_after_restart", {})
        ok = ok and "error" not in kill and down.get("found_exactly_once") == kill["acknowledged_before_kill"] > 0
        ok = ok and resend.get("idempotent") == resend.get("sent") and kill.get("export_records_changed_by_resubmit") == 0
    return ok


# -- report ----------------------------------------------------------------------------------------

def table_rows(results: list[dict[str, Any]]) -> list[tuple[str, ...]]:
    def lat(r: dict, ep: str) -> str:
        v = r["latency_ms"].get(ep, {})
        return f"{v['p50']:.1f} / {v['p99']:.1f}" if v else "–"

    rows = [("", *(f"{r.get('backend', 'sqlite')} {r['phase']}" for r in results))]
    for label, cell in [
        ("concurrent labelers", lambda r: r["labelers"]),
        ("submissions acknowledged / sent", lambda r: f"{r['acknowledged']} / {r['target']}"),
        ("  of which skips, with a tie", lambda r: f"{r['skipped']}, {r['with_tie']}"),
        ("HTTP requests (2xx / 4xx / 5xx)", lambda r: f"{r['requests']} ({r['http_2xx']} / {r['http_4xx']} / {r['http_5xx']})"),
        ("network errors (retried)", lambda r: r["transport_errors"]),
        ("submit latency p50 / p99 (ms)", lambda r: lat(r, "submit")),
        ("next-item latency p50 / p99 (ms)", lambda r: lat(r, "next")),
        ("admin summary p50 / p99 (ms)", lambda r: lat(r, "admin_summary")),
        ("throughput (submissions/s, requests/s)", lambda r: f"{r['submissions_per_s']}, {r['requests_per_s']}"),
        ("wall time of the load (s)", lambda r: r["wall_s"]),
        ("acks in export exactly once", lambda r: f"{r['export']['found_exactly_once']} / {r['export']['acknowledged']}"),
        ("items ranked by more than N labelers", lambda r: r["export"]["items_ranked_more_than_n"]),
    ]:
        rows.append((label, *(str(cell(r)) for r in results)))
    def crash_cell(fn):
        def cell(r: dict) -> str:
            if r["phase"] != "crash":
                return ""
            k = r["kill"]
            return str(fn(r, k, k.get("export_while_down", {}), k.get("resubmit_after_restart", {})))
        return cell

    if any(r["phase"] == "crash" for r in results):
        for label, fn in [
            ("SIGKILL: requests in flight", lambda r, k, down, resend: k.get("in_flight_at_kill")),
            ("acked before kill, in export while down", lambda r, k, down, resend:
             f"{down.get('found_exactly_once')} / {k.get('acknowledged_before_kill')} (lost {down.get('missing')})"),
            ("  stored but unacknowledged at the kill", lambda r, k, down, resend: down.get("stored_but_never_acknowledged")),
            ("  retries answered stored: false", lambda r, k, down, resend: r["answered_stored_false"]),
            ("down time incl. restart (s)", lambda r, k, down, resend: f"{k.get('downtime_s')} (restart {k.get('restart_s')})"),
            ("resent after restart: idempotent", lambda r, k, down, resend: f"{resend.get('idempotent', 0)} / "
             f"{resend.get('sent')} (records changed {k.get('export_records_changed_by_resubmit')})"),
        ]:
            rows.append((label, *(crash_cell(fn)(r) for r in results)))
    rows.append(("result", *("PASS" if phase_ok(r) else "FAIL" for r in results)))
    return rows


def markdown_table(rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + " --- |" * len(rows[0])]
    lines += ["| " + " | ".join(r) + " |" for r in rows[1:]]
    return "\n".join(lines)


def text_table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def postgres_version() -> str | None:
    from rlhf.feedback.pg_local import find_binary

    binary = find_binary("postgres")
    if binary is None:
        return None
    out = subprocess.run([binary, "--version"], capture_output=True, text=True).stdout
    found = re.search(r"\d+(\.\d+)+", out)  # "postgres (PostgreSQL) 15.18 (Debian 15.18-0+deb12u1)"
    return found.group(0) if found else None


def machine() -> dict[str, Any]:
    # The load average says how busy the (shared) machine was while the figures were taken.
    return {"cpu_cores": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
            "sqlite": sqlite3.sqlite_version, "postgresql": postgres_version(),
            "processor": platform.processor() or platform.machine(), "load_average_1min": round(os.getloadavg()[0], 2)}


def write_results(results: list[dict[str, Any]], cfg: LoadConfig, command: str, json_path: Path) -> Path:
    from rlhf.utils.io import atomic_write_json, atomic_write_text

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    atomic_write_json(json_path, {"date": when, "command": command, "machine": machine(), "config": asdict(cfg),
                                  "results": results, "pass": all(phase_ok(r) for r in results)})
    m = machine()
    md = (f"## Labeling app under load (`benchmarks/label_load.py`)\n\n"
          f"{when}, {m['cpu_cores']} CPU cores ({m['processor']}, shared with other work: 1-minute load average "
          f"{m['load_average_1min']} at the end), Python {m['python']}, "
          f"SQLite {m['sqlite']} (WAL, synchronous={cfg.synchronous})"
          + (f", PostgreSQL {m['postgresql']} (a local server on 127.0.0.1, fsync on)"
             if any(r.get("backend") == "postgresql" for r in results) else "")
          + "; server and load generator on the same machine.\n\n"
          f"```bash\n{command}\n```\n\n{markdown_table(table_rows(results))}\n\n"
          f"{cfg.items} items × {cfg.k} completions, {cfg.labels_per_item} labels per item; each labeler is one thread "
          "with its own HTTP connection doing `GET /api/next` then `POST /api/submit`, and an admin polls "
          f"`/api/admin/summary` every {cfg.admin_poll_s:g} s. Latency is per HTTP request as the client measures it. "
          f"The crash phase sends SIGKILL once {cfg.kill_at:.0%} of its submissions are acknowledged, exports the "
          "database while the server is down, restarts the server on the same database, lets the labelers' retries "
          "carry on, and at the end resends every submission acknowledged before the kill.\n")
    md_path = json_path.with_suffix(".md")
    atomic_write_text(md_path, md)
    return md_path


def _new_database(base_url: str) -> str:
    import psycopg

    name = f"label_load_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(f"{base_url}/postgres", autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    return f"{base_url}/{name}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = LoadConfig()
    for name, value in asdict(defaults).items():
        ap.add_argument("--" + name.replace("_", "-"), type=type(value), default=value, help=f"default: {value}")
    ap.add_argument("--workdir", default=None, help="keep databases, exports and server logs here (default: a "
                                                    "temporary folder, removed afterwards)")
    ap.add_argument("--results", default=str(RESULTS), help="JSON file to write (the .md goes beside it)")
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="sqlite",
                    help="database the server runs on (postgresql: a throwaway local server unless --postgres-url)")
    ap.add_argument("--postgres-url", default=None, help="an existing server's base URL, postgresql://user@host:port "
                                                         "(a fresh database is created on it for each phase)")
    args = ap.parse_args(argv)
    cfg = LoadConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    try:
        cfg.validate()
    except LoadTestError as exc:
        ap.error(str(exc))
    command = " ".join([".venv/bin/python", "benchmarks/label_load.py", *(argv if argv is not None else sys.argv[1:])])

    tmp = tempfile.mkdtemp(prefix="label-load-") if args.workdir is None else None
    work = Path(args.workdir or tmp)
    backends = ["sqlite", "postgresql"] if args.backend == "both" else [args.backend]
    results, pg = [], None
    try:
        for backend in backends:
            dbs: list[str | None] = [None, None]
            if backend == "postgresql":
                from rlhf.feedback.pg_local import start_local_postgres

                if args.postgres_url is None and pg is None:
                    pg = start_local_postgres(durable=True)
                base = args.postgres_url.rstrip("/") if args.postgres_url else pg.base_url
                dbs = [_new_database(base) for _ in range(2)]
            print(f"{backend} steady phase: {cfg.labelers} labelers, {cfg.submissions} submissions ...", flush=True)
            results.append(run_steady_phase(cfg, work / backend / "steady", dbs[0]))
            print(f"{backend} crash phase: {cfg.labelers} labelers, {cfg.crash_submissions} submissions, SIGKILL at "
                  f"{cfg.kill_at:.0%} ...", flush=True)
            results.append(run_crash_phase(cfg, work / backend / "crash", dbs[1]))
    except LoadTestError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    finally:
        if pg is not None:
            pg.stop()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    print(text_table(table_rows(results)))
    md = write_results(results, cfg, command, Path(args.results))
    print(f"wrote {args.results} and {md}")
    for r in results:
        if r["export"]["examples"]:
            print(f"{r.get('backend')} {r['phase']}: first problems: {r['export']['examples']}", file=sys.stderr)
    return 0 if all(phase_ok(r) for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
