"""A safer labeling server (issue 15, item 5), each case on SQLite and on PostgreSQL: body-size limit
with the token checked before the body is read, short error bodies, RFC 6266 file names, control
characters refused in names, one K limit at import, 409 for a changed resend, a Host allow-list on
loopback, revoking and rotating links; and a version-1 database upgraded in place."""

import json
import socket
import sqlite3
import time

import httpx
import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from rlhf.cli import app as cli_app
from rlhf.errors import DataError
from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.export import label_records
from rlhf.feedback.server import create_app, start_in_thread
from rlhf.feedback.store import Invalid, open_store

ITEMS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "completions": [f"item {i} reply {j}" for j in range(3)]}
         for i in range(4)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def camp(tmp_path, store_url):
    """(store, campaign, admin token, {labeler: token}, db url) with 4 items, 2 labels per item."""
    store = open_store(store_url)
    camp = import_campaign(store, write_jsonl(tmp_path / "c.jsonl", ITEMS), "helpfulness", 2, name="camp")
    _, admin = store.add_user("boss", "admin", None)
    tokens = {n: store.add_user(n, "labeler", camp.id)[1] for n in ("ann", "bob", "cid")}
    yield store, camp, admin, tokens, store_url
    store.close()


def h(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def client(camp):
    with TestClient(create_app(camp[0]), raise_server_exceptions=False) as c:
        yield c


def test_body_over_the_limit_is_413_and_the_token_comes_first(camp, client):
    store, _, _, tokens, _ = camp
    item = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    huge = {"item": item["id"], "submission_id": "big-00001", "ranking": [0, 1, 2], "skip_reason": "x" * (2 << 20)}
    r = client.post("/api/submit", headers=h(tokens["ann"]), json=huge)
    assert r.status_code == 413 and "over 1,048,576 bytes" in r.json()["error"] and len(r.content) < 300
    # Without a valid token the body is never looked at: 401, whatever it holds (even broken JSON).
    for headers in ({}, h("forged-token")):
        for body in (b"{not json", json.dumps(huge).encode()):
            r = client.post("/api/submit", headers=headers, content=body)
            assert r.status_code == 401 and len(r.content) < 300, (headers, r.status_code)
    assert label_records(store, camp[1]) == []


def test_a_real_server_refuses_a_huge_body_before_reading_it(camp):
    """Content-Length of 100 MB: answered 413 at once, with the body never sent; a chunked upload
    is cut off once it passes the limit."""
    store, _, _, tokens, _ = camp
    with start_in_thread(store) as server:
        host, port = server.url.removeprefix("http://").split(":")
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((f"POST /api/submit HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {tokens['ann']}\r\n"
                       "Content-Type: application/json\r\nContent-Length: 100000000\r\n\r\n{").encode())
            answer = s.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 413"), answer[:200]
        with socket.create_connection((host, int(port)), timeout=30) as s:
            s.sendall((f"POST /api/submit HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {tokens['ann']}\r\n"
                       "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n").encode())
            chunk = b"a" * 65536
            try:
                for _ in range(64):  # 4 MiB, four times the limit
                    s.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
            except OSError:
                pass  # the server answered and closed while we were still sending
            answer = s.recv(4096).decode(errors="replace")
        assert answer.startswith("HTTP/1.1 413"), answer[:200]


def test_error_bodies_stay_short_whatever_the_request(camp, client):
    _, _, admin, tokens, _ = camp
    item = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    long_key = "k" * 500_000  # pydantic names an unknown field by its key: main echoed all of it
    bodies = [{"item": item["id"], "submission_id": "s-000001", "ranking": [0, 1, 2], long_key: 1},
              {"item": item["id"], "submission_id": "s" * 90_000, "ranking": [0, 1, 2]},
              {"item": item["id"], "submission_id": "s-000001", "ranking": [[[[[0]]]]] * 60},
              [1] * 100_000, "x" * 900_000]
    for body in bodies:
        r = client.post("/api/submit", headers=h(tokens["ann"]), json=body)
        assert r.status_code == 422 and len(r.content) < 1200, (r.status_code, len(r.content))
    r = client.get("/api/admin/summary", headers=h(admin), params={"campaign": "c" * 20_000})
    assert r.status_code in (400, 404) and len(r.content) < 1200
    r = client.get("/static/" + "n" * 20_000)
    assert r.status_code == 404 and len(r.content) < 1200


def test_export_file_name_is_encoded_for_any_campaign_name(tmp_path, store_url):
    store = open_store(store_url)
    camp = store.create_campaign("Кампания “ünïcode”", "helpfulness", "rank", 1, ITEMS[:1])
    _, admin = store.add_user("boss", "admin", None)
    with TestClient(create_app(store), raise_server_exceptions=False) as client:
        r = client.get("/api/admin/export", headers=h(admin), params={"campaign": camp.name})
    assert r.status_code == 200
    cd = r.headers["content-disposition"]
    assert cd.startswith('attachment; filename="') and "filename*=UTF-8''%D0%9A%D0%B0" in cd
    assert cd.encode("latin-1")  # a header any client can read
    store.close()


@pytest.mark.parametrize("name", ["bad\r\nSet-Cookie: x=1", "nul\0byte", "tab\there", "bidi\u202eevil", "bell\a"])
def test_control_characters_are_refused_in_names_at_creation(camp, client, tmp_path, name):
    store, c, admin, _, _ = camp
    with pytest.raises(Invalid, match="control characters"):
        store.create_campaign(name, "helpfulness", "rank", 1, ITEMS[:1])
    with pytest.raises(Invalid, match="control characters"):
        import_campaign(store, write_jsonl(tmp_path / "x.jsonl", ITEMS), "helpfulness", 1, name=name)
    with pytest.raises(Invalid, match="control characters"):
        store.add_user(name, "labeler", c.id)
    r = client.post("/api/admin/labelers", headers=h(admin), json={"name": name})
    assert r.status_code == 422 and "control characters" in r.json()["error"]


def test_items_with_more_completions_than_can_be_ranked_are_refused_at_import(camp, tmp_path):
    store = camp[0]
    wide = {"prompt_id": "w", "prompt": "p", "completions": [f"reply {j}" for j in range(65)]}
    with pytest.raises(DataError, match=r"x\.jsonl:2: field 'completions': 65 completions; an item holds at most 64"):
        import_campaign(store, write_jsonl(tmp_path / "x.jsonl", [ITEMS[0], wide]), "helpfulness", 1, name="wide")
    gold = {"prompt": "p", "completions": [f"reply {j}" for j in range(70)], "ranking": list(range(70))}
    with pytest.raises(DataError, match=r"g\.jsonl:1: field 'completions': 70 completions"):
        import_campaign(store, write_jsonl(tmp_path / "x.jsonl", ITEMS), "helpfulness", 1, name="w2",
                        gold=write_jsonl(tmp_path / "g.jsonl", [gold]))
    with pytest.raises(Invalid, match="at most 64"):
        store.create_campaign("direct", "helpfulness", "rank", 1, [wide])
    ok = {"prompt_id": "k", "prompt": "p", "completions": [f"reply {j}" for j in range(64)]}
    import_campaign(store, write_jsonl(tmp_path / "ok.jsonl", [ok]), "helpfulness", 1, name="sixty-four")


def test_resend_with_the_same_submission_id_but_another_ranking_is_409(camp, client):
    store, c, _, tokens, _ = camp
    item = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    body = {"item": item["id"], "submission_id": "same-0001", "ranking": [0, 1, 2]}
    assert client.post("/api/submit", headers=h(tokens["ann"]), json=body).json()["stored"] is True
    r = client.post("/api/submit", headers=h(tokens["ann"]), json={**body, "ranking": [2, 1, 0]})
    assert r.status_code == 409 and "under this submission id, with another answer" in r.json()["error"]
    r = client.post("/api/submit", headers=h(tokens["ann"]), json={**body, "ranking": [], "skipped": True,
                                                                   "skip_reason": "unsure"})
    assert r.status_code == 409
    assert client.post("/api/submit", headers=h(tokens["ann"]), json=body).json()["stored"] is False  # a true retry
    (rec,) = label_records(store, c)
    assert [rec["completions"][i] for i in rec["ranking"]] == item["completions"]  # the first answer, unchanged


def test_a_loopback_server_answers_only_to_loopback_host_names(camp):
    store, _, _, tokens, _ = camp
    with start_in_thread(store) as server:
        port = server.url.rsplit(":", 1)[1]
        with httpx.Client(base_url=server.url, trust_env=False, timeout=30) as c:
            assert c.get("/healthz").status_code == 200
            for host in (f"localhost:{port}", f"[::1]:{port}", f"127.0.0.1:{port}"):
                assert c.get("/api/me", headers={**h(tokens["ann"]), "Host": host}).status_code == 200, host
            for host in (f"evil.example:{port}", "attacker.test", f"127.0.0.1.nip.io:{port}", ""):
                r = c.get("/api/me", headers={**h(tokens["ann"]), "Host": host})
                assert r.status_code == 421 and "host name" in r.json()["error"], host
                assert r.headers["x-frame-options"] == "DENY"
            assert c.get("/label", headers={"Host": "evil.example"}).status_code == 421


def test_revoke_and_rotate_take_effect_at_once(camp, client):
    store, c, admin, tokens, url = camp
    first = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    assert client.post("/api/submit", headers=h(tokens["ann"]), json={
        "item": first["id"], "submission_id": "ann-00001", "ranking": [0, 1, 2]}).status_code == 200
    held = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]  # an open claim
    r = client.post("/api/admin/labelers/ann/revoke", headers=h(admin))
    assert r.status_code == 200 and r.json()["items_released"] == 1
    r = client.get("/api/next", headers=h(tokens["ann"]))
    assert r.status_code == 401 and "revoked" in r.json()["error"]
    assert client.post("/api/submit", headers=h(tokens["ann"]), json={
        "item": held["id"], "submission_id": "ann-00002", "ranking": [0, 1, 2]}).status_code == 401
    assert len(label_records(store, c)) == 1  # the label ann gave is kept
    # Her open item went back to the pool: its slot counts for nobody now.
    assert store.counts(c.id)["open_assignments"] == 0
    r = client.post("/api/admin/labelers/ann/rotate", headers=h(admin))
    assert r.status_code == 200 and r.json()["link"].endswith("#token=" + r.json()["token"])
    new = r.json()["token"]
    assert client.get("/api/me", headers=h(new)).json()["progress"]["done"] == 1
    assert client.get("/api/me", headers=h(tokens["ann"])).status_code == 401
    # Rotating bob's link: his old token stops at once, the new one works, his work stays his.
    old_bob = tokens["bob"]
    r = client.post("/api/admin/labelers/bob/rotate", headers=h(admin)).json()
    assert client.get("/api/me", headers=h(old_bob)).status_code == 401
    assert client.get("/api/me", headers=h(r["token"])).status_code == 200
    assert store.counter_drift() == []
    assert client.post("/api/admin/labelers/nobody/revoke", headers=h(admin)).status_code == 404
    assert client.post("/api/admin/labelers/bob/revoke", headers=h(r["token"])).status_code == 403


def test_revoke_and_rotate_from_the_command_line(camp, client):
    store, _, _, tokens, url = camp
    runner = CliRunner()
    res = runner.invoke(cli_app, ["label", "revoke", "cid", "--db", url])
    assert res.exit_code == 0, res.output
    assert json.loads(res.stdout)["revoked"] is True
    assert client.get("/api/me", headers=h(tokens["cid"])).status_code == 401
    res = runner.invoke(cli_app, ["label", "rotate", "cid", "--db", url, "--url", "http://127.0.0.1:9000"])
    assert res.exit_code == 0, res.output
    link = res.stdout.strip().splitlines()[-1]
    assert link.startswith("http://127.0.0.1:9000/label#token=")
    assert client.get("/api/me", headers=h(link.split("#token=")[1])).status_code == 200
    res = runner.invoke(cli_app, ["label", "revoke", "nobody", "--db", url])
    assert res.exit_code != 0 and "no labeler named 'nobody'" in str(res.exception or res.output)


V1_SCHEMA = """
CREATE TABLE campaigns (id INTEGER PRIMARY KEY, name TEXT NOT NULL UNIQUE, criterion TEXT NOT NULL,
    instructions TEXT NOT NULL, labels_per_item INTEGER NOT NULL, created_at REAL NOT NULL);
CREATE TABLE items (id INTEGER PRIMARY KEY, campaign_id INTEGER NOT NULL REFERENCES campaigns(id), position REAL NOT NULL,
    prompt_id TEXT NOT NULL, prompt TEXT NOT NULL, completions TEXT NOT NULL, gold_ranking TEXT, gold_ties TEXT,
    UNIQUE (campaign_id, prompt_id));
CREATE TABLE users (id INTEGER PRIMARY KEY, campaign_id INTEGER REFERENCES campaigns(id), name TEXT NOT NULL,
    role TEXT NOT NULL CHECK (role IN ('labeler', 'admin')), token_hash TEXT NOT NULL UNIQUE, created_at REAL NOT NULL);
CREATE UNIQUE INDEX users_unique_name ON users (role, coalesce(campaign_id, 0), name);
CREATE TABLE assignments (id INTEGER PRIMARY KEY, item_id INTEGER NOT NULL REFERENCES items(id),
    user_id INTEGER NOT NULL REFERENCES users(id), shown_order TEXT NOT NULL, served_at REAL NOT NULL, UNIQUE (user_id, item_id));
CREATE INDEX assignments_item ON assignments (item_id);
CREATE TABLE labels (assignment_id INTEGER PRIMARY KEY REFERENCES assignments(id), submission_id TEXT NOT NULL,
    ranking TEXT NOT NULL, ties TEXT NOT NULL, skipped INTEGER NOT NULL, skip_reason TEXT, submitted_at REAL NOT NULL);
PRAGMA user_version = 1;
"""


def test_a_version_1_database_is_upgraded_with_its_labels_and_counts(tmp_path):
    from rlhf.feedback.store import hash_token

    db = tmp_path / "v1.sqlite"
    conn = sqlite3.connect(db)
    conn.executescript(V1_SCHEMA)
    now = time.time()
    conn.execute("INSERT INTO campaigns VALUES (1, 'old', 'helpfulness', 'rank', 1, ?)", (now,))
    for i in range(3):
        conn.execute("INSERT INTO items VALUES (?, 1, ?, ?, ?, ?, NULL, NULL)",
                     (i + 1, float(i), f"p{i}", f"prompt {i}", json.dumps(["a", "b"])))
    conn.execute("INSERT INTO users VALUES (1, 1, 'ann', 'labeler', ?, ?)", (hash_token("ann-token"), now))
    conn.execute("INSERT INTO users VALUES (2, 1, 'bob', 'labeler', ?, ?)", (hash_token("bob-token"), now))
    conn.execute("INSERT INTO assignments VALUES (1, 1, 1, '[1, 0]', ?)", (now - 5,))  # ann ranked item 1
    conn.execute("INSERT INTO labels VALUES (1, 'sub-0001', '[1, 0]', '[]', 0, NULL, ?)", (now - 2,))
    conn.execute("INSERT INTO assignments VALUES (2, 2, 1, '[0, 1]', ?)", (now - 1,))  # ann holds item 2 open
    conn.commit()
    conn.close()
    store = open_store(db)
    assert sqlite3.connect(db).execute("PRAGMA user_version").fetchone()[0] == 2
    ann, bob = store.user_by_token("ann-token"), store.user_by_token("bob-token")
    assert store.progress(ann) == {"done": 1, "skipped": 0, "total": 3}
    assert store.next_assignment(ann).item_id == 2  # her open item, still hers
    assert store.next_assignment(bob).item_id == 3  # N=1: items 1 (ranked) and 2 (claimed) are taken
    assert len(store.label_rows(1)) == 1 and store.counter_drift() == []
    store.close()
