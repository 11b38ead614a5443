"""The labeling server's API: isolation between labelers, admin-only routes, validation, idempotency,
mapping the shuffled order back on export, and the CLI around it."""

import json
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from rlhf.cli import app as cli_app
from rlhf.data.io import read_records
from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.export import campaign_summary, label_records
from rlhf.feedback.pages import ASSETS, asset, markdown_blocks
from rlhf.feedback.server import create_app
from rlhf.feedback.store import open_store

ITEMS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}",
          "completions": [f"item {i} reply {j} " + "word " * j for j in range(4)]} for i in range(3)]
GOLD = {"prompt": "gold prompt", "completions": ["best", "middle", "worst"], "ranking": [0, 1, 2], "prompt_id": "g1"}


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@pytest.fixture()
def env(tmp_path, store_url):
    """A campaign with 3 items and a gold item, an admin and 3 labelers, on SQLite and on PostgreSQL."""
    store = open_store(store_url)
    comp = write_jsonl(tmp_path / "c.jsonl", ITEMS)
    gold = write_jsonl(tmp_path / "gold.jsonl", [GOLD])
    (tmp_path / "instr.md").write_text("# Be kind\nRank <b>carefully</b>.\n", encoding="utf-8")
    camp = import_campaign(store, comp, "helpfulness", 2, tmp_path / "instr.md", gold, name="camp")
    _, admin = store.add_user("boss", "admin", None)
    tokens = {n: store.add_user(n, "labeler", camp.id)[1] for n in ("ann", "bob", "cid")}
    client = TestClient(create_app(store), raise_server_exceptions=False)
    yield store, camp, client, admin, tokens
    client.close()
    store.close()


def h(token):
    return {"Authorization": f"Bearer {token}"}


def rank_longest_first(item):
    """Shown positions, best first, by length: a rule whose answer we can check on export."""
    return sorted(range(len(item["completions"])), key=lambda s: -len(item["completions"][s]))


def test_labeler_flow_and_export_undo_the_shuffle(env):
    store, camp, client, admin, tokens = env
    me = client.get("/api/me", headers=h(tokens["ann"])).json()
    assert me["campaign"]["criterion"] == "helpfulness" and me["progress"] == {"done": 0, "skipped": 0, "total": 4}
    shown_orders = []
    while True:
        r = client.get("/api/next", headers=h(tokens["ann"])).json()
        if r["item"] is None:
            break
        item = r["item"]
        shown_orders.append(item["completions"])
        ranking = rank_longest_first(item)
        ack = client.post("/api/submit", headers=h(tokens["ann"]),
                          json={"item": item["id"], "submission_id": f"sub-{item['id']:04d}", "ranking": ranking})
        assert ack.status_code == 200 and ack.json()["stored"] is True
    assert len(shown_orders) == 4  # 3 items and the gold item
    # the per-labeler shuffle is real: some item is not shown in file order
    assert any(s != sorted(s, key=len) for s in shown_orders)
    assert client.get("/api/me", headers=h(tokens["ann"])).json()["progress"] == {"done": 4, "skipped": 0, "total": 4}
    records = label_records(store, camp)
    assert len(records) == 4
    for rec in records:
        texts = [rec["completions"][i] for i in rec["ranking"]]
        assert texts == sorted(rec["completions"], key=len, reverse=True)
        assert rec["labeler"] == "ann" and rec["criterion"] == "helpfulness"
    original = {it["prompt_id"]: it["completions"] for it in ITEMS}
    assert all(rec["completions"] == original[rec["prompt_id"]] for rec in records if rec["prompt_id"] in original)


def test_same_order_on_reload_and_open_item_is_kept(env):
    _, _, client, _, tokens = env
    first = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    again = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    assert first == again


def test_resubmission_is_idempotent_and_a_different_label_conflicts(env):
    store, camp, client, _, tokens = env
    item = client.get("/api/next", headers=h(tokens["bob"])).json()["item"]
    body = {"item": item["id"], "submission_id": "retry-0001", "ranking": [3, 2, 1, 0], "ties": [[1, 0]]}
    first = client.post("/api/submit", headers=h(tokens["bob"]), json=body)
    second = client.post("/api/submit", headers=h(tokens["bob"]), json=body)
    assert first.json()["stored"] is True and second.status_code == 200 and second.json()["stored"] is False
    # a double click that made a new id but sent the same answer is also a duplicate
    same = client.post("/api/submit", headers=h(tokens["bob"]), json={**body, "submission_id": "retry-0002"})
    assert same.status_code == 200 and same.json()["stored"] is False
    other = client.post("/api/submit", headers=h(tokens["bob"]),
                        json={**body, "submission_id": "retry-0003", "ranking": [0, 1, 2, 3], "ties": []})
    assert other.status_code == 409 and "already has your label" in other.json()["error"]
    recs = label_records(store, camp)
    assert len(recs) == 1 and len(recs[0]["ties"]) == 1


@pytest.mark.parametrize("body, message", [
    ({"ranking": [0, 1, 2]}, "missing indices [3]"),
    ({"ranking": [0, 1, 1, 2]}, "appears twice"),
    ({"ranking": [0, 1, 2, 9]}, "out of range"),
    ({"ranking": [0, 1, 2, 3], "ties": [[0, 2]]}, "not contiguous"),
    ({"ranking": [0, 1, 2, 3], "ties": [[0]]}, "two or more"),
    ({"ranking": ["0", 1, 2, 3]}, "valid integer"),
    ({"ranking": [True, 1, 2, 3]}, "valid integer"),
    ({"skipped": True}, "say why you skip"),
    ({"skipped": True, "skip_reason": "x", "ranking": [0, 1, 2, 3]}, "takes no ranking"),
    ({"ranking": [0, 1, 2, 3], "color": "red"}, "Extra inputs"),
    ({"ranking": [0, 1, 2, 3], "submission_id": "<bad id>"}, "submission_id"),
])
def test_bad_submissions_get_a_clear_4xx(env, body, message):
    store, camp, client, _, tokens = env
    item = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    r = client.post("/api/submit", headers=h(tokens["ann"]), json={"item": item["id"], "submission_id": "abcdefgh", **body})
    assert 400 <= r.status_code < 500, r.text
    assert message in r.json()["error"]
    assert label_records(store, camp) == []


def test_malformed_requests_are_4xx_never_500(env):
    _, _, client, admin, tokens = env
    cases = [
        client.post("/api/submit", headers={**h(tokens["ann"]), "Content-Type": "application/json"}, content=b"{not json"),
        client.post("/api/submit", headers=h(tokens["ann"]), json=[1, 2]),
        client.post("/api/submit", headers=h(tokens["ann"]), json={"item": 10 ** 30, "submission_id": "abcdefgh"}),
        client.post("/api/submit", headers=h(tokens["ann"]), json={"item": 999, "submission_id": "abcdefgh", "ranking": [0]}),
        client.get("/api/admin/summary?campaign=nope", headers=h(admin)),
        client.post("/api/admin/labelers", headers=h(admin), json={"name": ""}),
        client.post("/api/admin/labelers", headers=h(admin), json={"name": "ann"}),
        client.get("/static/../store.py"),
        client.get("/static/label.html"),
        client.get("/no/such/page"),
        client.get("/api/next", headers={"Authorization": "Basic abc"}),
    ]
    for r in cases:
        assert 400 <= r.status_code < 500, (r.request.url, r.status_code, r.text)
        assert r.json()["error"]


def test_a_labeler_cannot_reach_others_work_admin_or_export(env):
    store, camp, client, admin, tokens = env
    ann_item = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    # bob cannot answer for ann's item, and learns nothing about it (same 404 as a missing item)
    r = client.post("/api/submit", headers=h(tokens["bob"]),
                    json={"item": ann_item["id"], "submission_id": "steal-0001", "ranking": [0, 1, 2, 3]})
    assert r.status_code == 404 and "no item" in r.json()["error"]
    bob_item = client.get("/api/next", headers=h(tokens["bob"])).json()["item"]
    assert bob_item["id"] != ann_item["id"]
    for method, path in [("GET", "/api/admin/summary"), ("GET", "/api/admin/export"), ("GET", "/api/admin/campaigns"),
                         ("GET", "/api/admin/export?consensus=true"), ("POST", "/api/admin/labelers")]:
        r = client.request(method, path, headers=h(tokens["ann"]), json={"name": "mallory"} if method == "POST" else None)
        assert r.status_code == 403 and "admin only" in r.json()["error"], path
        assert client.request(method, path).status_code == 401
        assert client.request(method, path, headers=h("not-a-token")).status_code == 401
    # the admin page itself is an empty shell: no names, items or figures in it
    page = client.get("/admin").text
    assert "ann" not in page and "prompt 0" not in page
    assert label_records(store, camp) == []
    assert client.get("/api/next", headers=h(admin)).status_code == 403


def test_labels_per_item_caps_regular_items_but_gold_goes_to_everyone(env):
    store, camp, client, admin, tokens = env
    for name in ("ann", "bob", "cid"):
        while (item := client.get("/api/next", headers=h(tokens[name])).json()["item"]) is not None:
            client.post("/api/submit", headers=h(tokens[name]),
                        json={"item": item["id"], "submission_id": f"{name}-{item['id']:05d}", "ranking": rank_longest_first(item)})
    recs = label_records(store, camp)
    per_prompt = {}
    for r in recs:
        per_prompt.setdefault(r["prompt_id"], []).append(r["labeler"])
    assert {p: len(v) for p, v in per_prompt.items()} == {"p0": 2, "p1": 2, "p2": 2, "g1": 3}
    assert all(len(set(v)) == len(v) for v in per_prompt.values())
    summary = client.get("/api/admin/summary", headers=h(admin)).json()
    assert summary["campaign"]["items_complete"] == 3 and summary["campaign"]["pairwise_agreement"] == 1.0
    assert summary["campaign"]["kendalls_w"] == 1.0
    # gold order is best > middle > worst; ranking longest first gives middle > worst > best: 1 of 3 pairs agrees
    assert [(lab["gold_items"], lab["gold_agreement"]) for lab in summary["labelers"]] == [(1, pytest.approx(1 / 3, abs=1e-4))] * 3
    export = client.get("/api/admin/export", headers=h(admin))
    assert export.status_code == 200 and len(export.text.splitlines()) == len(recs)


def test_skip_is_exported_as_skipped_with_its_reason(env):
    store, camp, client, _, tokens = env
    item = client.get("/api/next", headers=h(tokens["cid"])).json()["item"]
    r = client.post("/api/submit", headers=h(tokens["cid"]),
                    json={"item": item["id"], "submission_id": "skip-0001", "skipped": True, "skip_reason": "cannot judge"})
    assert r.status_code == 200 and r.json()["progress"]["skipped"] == 1
    (rec,) = label_records(store, camp)
    assert rec["skipped"] is True and rec["ranking"] == [] and rec["skip_reason"] == "cannot judge"
    # a skipped item does not count toward N: it stays available to others
    assert campaign_summary(store, camp)["campaign"]["items_complete"] == 0


def test_pages_send_security_headers_and_scripts_never_use_inner_html(env):
    _, _, client, _, _ = env
    r = client.get("/label")
    assert r.status_code == 200 and "script-src 'self'" in r.headers["content-security-policy"]
    assert r.headers["x-content-type-options"] == "nosniff" and r.headers["referrer-policy"] == "no-referrer"
    for name in ASSETS:
        text = asset(name).decode("utf-8")
        assert "innerHTML" not in text and "insertAdjacentHTML" not in text and "document.write" not in text, name
        if name.endswith(".html"):
            assert "<script>" not in text and " on" + "click=" not in text, name  # CSP forbids inline script


def test_markdown_instructions_keep_html_as_text():
    blocks = markdown_blocks("# Title\nRank <b>carefully</b> and **well**.\n\n- one\n- `two`\n")
    assert blocks[0] == {"t": "h", "level": 1, "spans": [{"t": "text", "s": "Title"}]}
    assert blocks[1]["spans"][0] == {"t": "text", "s": "Rank <b>carefully</b> and "}
    assert blocks[1]["spans"][1] == {"t": "b", "s": "well"}
    assert blocks[2] == {"t": "ul", "items": [[{"t": "text", "s": "one"}], [{"t": "code", "s": "two"}]]}


def test_cli_import_add_labeler_export(tmp_path):
    comp = write_jsonl(tmp_path / "c.jsonl", ITEMS)
    db = str(tmp_path / "l.sqlite")
    run = CliRunner().invoke
    r = run(cli_app, ["label", "import", "--db", db, "--completions", str(comp), "--criterion", "harmlessness",
                      "--labels-per-item", "1"], standalone_mode=False)
    assert r.exit_code == 0, r.output
    assert json.loads(r.output)["items"] == 3
    r = run(cli_app, ["label", "add-labeler", "ann", "--db", db, "--url", "http://h:1"], standalone_mode=False)
    assert r.exit_code == 0 and "http://h:1/label#token=" in r.output
    token = r.output.strip().splitlines()[-1].split("token=")[1]
    store = open_store(db)
    user = store.user_by_token(token)
    a = store.next_assignment(user)
    store.submit(user, a.id, "cli-00001", [2, 0, 1, 3], [], False, None)
    out = tmp_path / "r.jsonl"
    r = run(cli_app, ["label", "export", "--db", db, "--out", str(out)], standalone_mode=False)
    assert r.exit_code == 0, r.output
    (rec,) = read_records(out, "rankings")
    assert rec.ranking == [2, 0, 1, 3] and rec.criterion == "harmlessness" and rec.labeler == "ann"


def test_cli_import_rejects_bad_input_clearly(tmp_path):
    one = write_jsonl(tmp_path / "one.jsonl", [{"prompt_id": "a", "prompt": "p", "completions": ["only"]}])
    badgold = write_jsonl(tmp_path / "g.jsonl", [{**ITEMS[0], "gold_ranking": [0, 0, 1, 2]}])
    db = str(tmp_path / "l.sqlite")
    store = open_store(db)
    from rlhf.errors import ConfigError, DataError
    with pytest.raises(DataError, match="one.jsonl:1: field 'completions': an item needs at least 2"):
        import_campaign(store, one, "helpfulness", 1)
    with pytest.raises(DataError, match="g.jsonl:1: field 'ranking': index 0 appears twice"):
        import_campaign(store, badgold, "helpfulness", 1)
    with pytest.raises(ConfigError, match="instructions file not found"):
        import_campaign(store, badgold, "helpfulness", 1, tmp_path / "missing.md")
    with pytest.raises(ConfigError, match="not supported"):
        open_store("mysql://db/labels")
    with pytest.raises(ConfigError, match="cannot connect to postgresql://db/labels"):
        open_store("postgresql://db/labels", connect_timeout_s=2)


def test_a_busy_database_is_a_503_to_retry_and_nothing_is_stored(env, tmp_path):
    import sqlite3

    if env[0].backend != "sqlite":
        pytest.skip("SQLite's single write lock held by another process (PostgreSQL: test_feedback_postgres.py)")
    _, camp, _, _, _ = env
    store = open_store(tmp_path / "labels.sqlite", busy_timeout_s=0.2)
    _, token = store.add_user("dan", "labeler", camp.id)
    client = TestClient(create_app(store), raise_server_exceptions=False)
    item = client.get("/api/next", headers=h(token)).json()["item"]
    body = {"item": item["id"], "submission_id": "busy-0001", "ranking": rank_longest_first(item)}
    other = sqlite3.connect(tmp_path / "labels.sqlite", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")  # another process holding the write lock past the busy timeout
    try:
        r = client.post("/api/submit", headers=h(token), json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "nothing was saved" in r.json()["error"]
    finally:
        other.execute("ROLLBACK")
        other.close()
    assert label_records(store, camp) == []
    # the same request again, once the lock is gone: stored once, and this thread's connection is usable
    r = client.post("/api/submit", headers=h(token), json=body)
    assert r.status_code == 200 and r.json()["stored"] is True
    assert len(label_records(store, camp)) == 1
    client.close()


def test_a_failed_commit_is_rolled_back_so_the_connection_stays_usable(tmp_path):
    import sqlite3

    store = open_store(tmp_path / "labels.sqlite")
    real = store._conn()

    class FailingCommit:
        """The thread's connection, except that the first COMMIT fails as a full disk would."""

        failed = False

        def __getattr__(self, name):
            return getattr(real, name)

        def execute(self, sql, *args):
            if sql == "COMMIT" and not self.failed:
                self.failed = True
                raise sqlite3.OperationalError("database or disk is full")
            return real.execute(sql, *args)

    store._local.conn = FailingCommit()
    with pytest.raises(sqlite3.OperationalError, match="disk is full"):
        store.add_user("boss", "admin", None)
    assert not real.in_transaction
    store.add_user("boss", "admin", None)  # the same write again: no "transaction within a transaction"
    assert store.user_by_token("nope") is None and len(real.execute("SELECT * FROM users").fetchall()) == 1
