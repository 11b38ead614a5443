"""Next-item and progress latency on a large campaign with most of it done, on SQLite and PostgreSQL.

    .venv/bin/python benchmarks/label_next_item.py                       # 50,000 items, 90% done, both backends
    .venv/bin/python benchmarks/label_next_item.py --items 5000 --rounds 200 --backend sqlite

For each backend: a campaign of ``--items`` items (K=4, N=3) and ``--labelers`` labelers; the first
``--done`` share of the items is filled with N labels each (bulk SQL, then the store's own counter
statements, the ones its schema migration runs; then ANALYZE, and on PostgreSQL VACUUM, as the
database's own maintenance would have run while a real campaign filled up); then ``--rounds`` times a labeler asks for their
next item, reads their progress and submits, first through the store in this process, then over
HTTP against ``rlhf label serve`` (``GET /api/next`` does the claim and the progress count,
``POST /api/submit`` stores). Target: next-item p99 ≤ 50 ms on both backends.

``--baseline-rev REV`` also times the store of that git revision (before the counters, when a
claim scanned the campaign) on the same SQLite data, for comparison.

Writes benchmarks/results/label_next_item.json and .md (the table, date, machine, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import types
import uuid
from datetime import datetime, timezone
from pathlib import Path


REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RESULTS = REPO / "benchmarks" / "results" / "label_next_item.json"
K, N = 4, 3


def percentile(xs: list[float], p: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, -(-len(s) * p // 100) - 1))] if s else float("nan")


def stats_ms(xs: list[float]) -> dict:
    return {"n": len(xs), "p50": round(1000 * percentile(xs, 50), 2), "p99": round(1000 * percentile(xs, 99), 2),
            "max": round(1000 * max(xs), 2) if xs else None}


def items(n: int) -> list[dict]:
    return [{"prompt_id": f"q{i}", "prompt": f"Question {i}: how do I cook rice?",
             "completions": [f"Reply {j} to question {i}: rinse, then simmer." for j in range(K)]} for i in range(n)]


def fill(store, campaign_id: int, users: list, share: float, v1: bool = False) -> int:
    """N labels on each of the first ``share`` of the items (labelers in rotation), by bulk SQL, then
    the counters recomputed by the store's own statements. Returns the number of labels."""
    conn = store._conn()
    sql = "SELECT id FROM items WHERE campaign_id = ? ORDER BY position, id"
    found = conn.execute(sql, (campaign_id,)) if v1 else store._q(conn, sql, (campaign_id,))
    item_ids = [r[0] for r in found.fetchall()]
    full = item_ids[: int(len(item_ids) * share)]
    now = time.time()
    assignments, labels = [], []
    next_id = 1
    for k, item in enumerate(full):
        for j in range(N):
            user = users[(k + j) % len(users)]
            assignments.append((next_id, item, user.id, "[0, 1, 2, 3]", now - 60))
            labels.append((next_id, f"fill-{next_id}", "[0, 1, 2, 3]", "[]", 0, None, now - 30))
            next_id += 1
    from rlhf.feedback.schema import MIGRATE_V2

    with store._write() as tx:
        insert_a = "INSERT INTO assignments (id, item_id, user_id, shown_order, served_at) VALUES (?, ?, ?, ?, ?)"
        insert_l = ("INSERT INTO labels (assignment_id, submission_id, ranking, ties, skipped, skip_reason, submitted_at) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)")
        if v1:
            tx.executemany(insert_a, assignments)
            tx.executemany(insert_l, labels)
        else:
            store._q_many(tx, insert_a, assignments)
            store._q_many(tx, insert_l, labels)
            for stmt in store._statements(MIGRATE_V2):
                if stmt.startswith("UPDATE"):
                    store._q(tx, stmt, {"fresh": now - store.claim_timeout_s} if ":fresh" in stmt else ())
            if store.backend == "postgresql":  # explicit ids above: move the identity past them
                tx.execute("SELECT setval(pg_get_serial_sequence('assignments', 'id'), (SELECT max(id) FROM assignments))")
    # What the database's own maintenance would have done while a real campaign filled up over hours
    # (autovacuum; SQLite has no dead rows): fresh planner statistics, and no dead index entries
    # left by the one bulk UPDATE above.
    conn.execute("VACUUM ANALYZE" if getattr(store, "backend", "sqlite") == "postgresql" else "ANALYZE")
    return len(labels)


def time_store(store, users: list, rounds: int, seed: int) -> dict:
    rng = random.Random(seed)
    lat: dict[str, list[float]] = {"next": [], "progress": [], "submit": []}
    for r in range(rounds):
        user = users[rng.randrange(len(users))]
        t0 = time.perf_counter()
        a = store.next_assignment(user)
        t1 = time.perf_counter()
        store.progress(user)
        t2 = time.perf_counter()
        lat["next"].append(t1 - t0)
        lat["progress"].append(t2 - t1)
        if a is not None:
            store.submit(user, a.id, f"bench-{uuid.uuid4().hex[:12]}", list(range(len(a.completions))), [], False, None)
            lat["submit"].append(time.perf_counter() - t2)
    return {k: stats_ms(v) for k, v in lat.items() if v}


def time_http(db: str, tokens: list[str], rounds: int, seed: int, workdir: Path) -> dict:
    sys.path.insert(0, str(REPO / "benchmarks"))
    import label_load as L

    server = L.ServerProcess(db, L.free_port(), workdir / "server.log")
    server.start()
    rng = random.Random(seed)
    lat: dict[str, list[float]] = {"GET /api/next": [], "POST /api/submit": []}
    try:
        clients = {t: L.http_client(server.url, t) for t in tokens}
        for _ in range(rounds):
            client = clients[tokens[rng.randrange(len(tokens))]]
            t0 = time.perf_counter()
            r = client.get("/api/next")
            lat["GET /api/next"].append(time.perf_counter() - t0)
            item = r.json()["item"]
            if item is not None:
                t0 = time.perf_counter()
                client.post("/api/submit", json={"item": item["id"], "submission_id": f"http-{uuid.uuid4().hex[:12]}",
                                                 "ranking": list(range(len(item["completions"])))})
                lat["POST /api/submit"].append(time.perf_counter() - t0)
        for c in clients.values():
            c.close()
    finally:
        server.stop()
    return {k: stats_ms(v) for k, v in lat.items() if v}


def load_store_module(rev: str) -> types.ModuleType:
    """rlhf/feedback/store.py as it was at git revision ``rev`` (it imports only rlhf.errors)."""
    source = subprocess.run(["git", "-C", str(REPO), "show", f"{rev}:rlhf/feedback/store.py"], capture_output=True,
                            text=True, check=True).stdout
    module = types.ModuleType(f"store_{rev}")
    sys.modules[module.__name__] = module  # dataclasses look their module up by name
    exec(compile(source, f"{rev}:rlhf/feedback/store.py", "exec"), module.__dict__)
    return module


def run_backend(backend: str, db: str, args, workdir: Path, store_cls=None) -> dict:
    from rlhf.feedback.store import open_store

    t0 = time.perf_counter()
    store = store_cls(db) if store_cls is not None else open_store(db)
    camp = store.create_campaign("bench", "helpfulness", "rank", N, items(args.items))
    t_import = time.perf_counter() - t0
    users, tokens = [], []
    for i in range(args.labelers):
        u, tok = store.add_user(f"labeler-{i:03d}", "labeler", camp.id)
        users.append(u)
        tokens.append(tok)
    t0 = time.perf_counter()
    n_labels = fill(store, camp.id, users, args.done, v1=store_cls is not None)
    t_fill = time.perf_counter() - t0
    out = {"backend": backend, "store": "baseline " + args.baseline_rev if store_cls is not None else "this build",
           "items": args.items, "done_share": args.done, "labels_filled": n_labels, "labelers": args.labelers,
           "import_s": round(t_import, 2), "fill_s": round(t_fill, 2),
           "store_ms": time_store(store, users, args.rounds if store_cls is None else args.baseline_rounds, args.seed)}
    store.close()
    if store_cls is None and not args.no_http:
        out["http_ms"] = time_http(db, tokens, args.rounds, args.seed + 1, workdir)
    out["load_average_1min"] = round(os.getloadavg()[0], 2)
    return out


def markdown(results: list[dict], command: str, when: str) -> str:
    rows = ["| backend | store | store next p50 / p99 | store progress p50 / p99 | store submit p50 / p99 | "
            "HTTP GET /api/next p50 / p99 | HTTP submit p50 / p99 | load avg |", "|" + " --- |" * 8]
    for r in results:
        s, hp = r["store_ms"], r.get("http_ms", {})

        def pair(d, k):
            return f"{d[k]['p50']} / {d[k]['p99']}" if k in d else "–"
        rows.append(f"| {r['backend']} | {r['store']} | {pair(s, 'next')} | {pair(s, 'progress')} | {pair(s, 'submit')} | "
                    f"{pair(hp, 'GET /api/next')} | {pair(hp, 'POST /api/submit')} | {r['load_average_1min']} |")
    first = results[0]
    return (f"## Next item on a large campaign (`benchmarks/label_next_item.py`, issue 15)\n\n{when}; "
            f"{os.cpu_count()} CPU cores ({platform.processor() or platform.machine()}), shared with other work "
            "(1-minute load average in the table).\n\n"
            f"```bash\n{command}\n```\n\n"
            f"{first['items']:,} items (K={K}, N={N}), {first['labelers']} labelers, the first {first['done_share']:.0%} "
            f"of the items filled with N labels ({first['labels_filled']:,} labels). Milliseconds per call; "
            "`GET /api/next` claims the item and counts the labeler's progress.\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=50_000)
    ap.add_argument("--done", type=float, default=0.9, help="share of the items already ranked N times")
    ap.add_argument("--labelers", type=int, default=50)
    ap.add_argument("--rounds", type=int, default=1000, help="next + progress + submit cycles timed per backend")
    ap.add_argument("--backend", choices=("sqlite", "postgresql", "both"), default="both")
    ap.add_argument("--baseline-rev", default=None, help="also time this git revision's store (SQLite)")
    ap.add_argument("--baseline-rounds", type=int, default=30)
    ap.add_argument("--no-http", action="store_true", help="time the store only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default=str(RESULTS))
    args = ap.parse_args(argv)
    command = " ".join([".venv/bin/python", "benchmarks/label_next_item.py", *(argv if argv is not None else sys.argv[1:])])
    work = Path(tempfile.mkdtemp(prefix="next-item-"))
    results, pg = [], None
    try:
        if args.baseline_rev:
            old = load_store_module(args.baseline_rev)
            print(f"baseline {args.baseline_rev} on sqlite ...", flush=True)
            results.append(run_backend("sqlite", str(work / "baseline.sqlite"), args, work, store_cls=old.Store))
            print(json.dumps(results[-1]), flush=True)
        for backend in (["sqlite", "postgresql"] if args.backend == "both" else [args.backend]):
            if backend == "sqlite":
                db = str(work / "labels.sqlite")
            else:
                from rlhf.feedback.pg_local import start_local_postgres

                pg = pg or start_local_postgres(durable=True)
                db = pg.create_database()
            print(f"{backend} ...", flush=True)
            results.append(run_backend(backend, db, args, work))
            print(json.dumps(results[-1]), flush=True)
    finally:
        if pg is not None:
            pg.stop()
        shutil.rmtree(work, ignore_errors=True)
    from rlhf.utils.io import atomic_write_json, atomic_write_text

    when = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    target_met = all(r["store_ms"]["next"]["p99"] <= 50 and r.get("http_ms", {}).get("GET /api/next", {"p99": 0})["p99"] <= 50
                     for r in results if r["store"] == "this build")
    atomic_write_json(Path(args.results), {"date": when, "command": command, "target_next_p99_ms": 50,
                                           "target_met": target_met, "results": results})
    md = markdown(results, command, when)
    atomic_write_text(Path(args.results).with_suffix(".md"), md)
    print(md)
    return 0 if target_met else 1


if __name__ == "__main__":
    sys.exit(main())
