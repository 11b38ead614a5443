"""Going back to the last answer, the admin's per-item view, answers submitted in the shuffled order
untouched, and timing figures for labelers who use the API (issue 16), through the HTTP API."""

import json
import re
import shlex
from pathlib import Path

import pytest
from click.testing import CliRunner
from fastapi.testclient import TestClient

from rlhf.cli import app

from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.export import campaign_summary, item_summaries, label_records
from rlhf.feedback.server import create_app
from rlhf.feedback.store import open_store

ITEMS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}",
          "completions": [f"item {i} reply {j} " + "word " * j for j in range(4)]} for i in range(3)]


@pytest.fixture()
def env(tmp_path):
    store = open_store(tmp_path / "labels.sqlite")
    comp = tmp_path / "c.jsonl"
    comp.write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    camp = import_campaign(store, comp, "helpfulness", 2, name="camp")
    _, admin = store.add_user("boss", "admin", None)
    tokens = {n: store.add_user(n, "labeler", camp.id)[1] for n in ("ann", "bob", "cid")}
    client = TestClient(create_app(store), raise_server_exceptions=False)
    yield store, camp, client, admin, tokens
    client.close()


def h(token):
    return {"Authorization": f"Bearer {token}"}


def answer(client, token, sub, ranking=None, **extra):
    """Take the labeler's next item and answer it; ranking None = reversed shown order."""
    item = client.get("/api/next", headers=h(token)).json()["item"]
    body = {"item": item["id"], "submission_id": sub, **extra}
    if not extra.get("skipped"):
        body["ranking"] = list(reversed(range(len(item["completions"])))) if ranking is None else ranking
    r = client.post("/api/submit", headers=h(token), json=body)
    assert r.status_code == 200, r.text
    return item


def exported(store, camp, labeler, prompt_id):
    return next(r for r in label_records(store, camp) if r["labeler"] == labeler and r["prompt_id"] == prompt_id)


def test_the_last_answer_can_be_changed_until_its_item_is_complete(env):
    store, camp, client, admin, tokens = env
    first = answer(client, tokens["ann"], "ann-first-0001")
    nxt = client.get("/api/next", headers=h(tokens["ann"])).json()
    assert nxt["previous"] == {"id": first["id"], "prompt": first["prompt"]} and nxt["item"]["id"] != first["id"]
    prev = client.get("/api/previous", headers=h(tokens["ann"])).json()["item"]
    assert prev["id"] == first["id"] and prev["completions"] == first["completions"]  # shown order, as on the page
    assert prev["ranking"] == [3, 2, 1, 0] and prev["ties"] == [] and prev["skipped"] is False

    # change it: shown positions 1 and 2 tied at the top
    body = {"item": first["id"], "submission_id": "ann-revise-0001", "ranking": [1, 2, 0, 3], "ties": [[1, 2]], "revise": True}
    r = client.post("/api/submit", headers=h(tokens["ann"]), json=body)
    assert r.status_code == 200 and r.json()["stored"] is True
    assert client.post("/api/submit", headers=h(tokens["ann"]), json=body).json()["stored"] is False  # a retry
    rec = exported(store, camp, "ann", first["prompt"].replace("prompt ", "p"))
    assert [rec["completions"][i] for i in rec["ranking"]] == [first["completions"][s] for s in (1, 2, 0, 3)]
    assert [[rec["completions"][i] for i in g] for g in rec["ties"]] == [[first["completions"][1], first["completions"][2]]]
    assert client.get("/api/previous", headers=h(tokens["ann"])).json()["item"]["ranking"] == [1, 2, 0, 3]

    # once a second labeler ranks that item it is complete (2 per item), and the answer is final
    answer(client, tokens["bob"], "bob-first-0001")
    assert client.get("/api/previous", headers=h(tokens["ann"])).json()["item"] is None
    assert client.get("/api/next", headers=h(tokens["ann"])).json()["previous"] is None
    late = client.post("/api/submit", headers=h(tokens["ann"]), json={**body, "submission_id": "ann-revise-0002",
                                                                      "ranking": [0, 1, 2, 3], "ties": []})
    assert late.status_code == 409 and "can no longer be changed" in late.json()["error"]
    assert exported(store, camp, "ann", "p0")["ranking"] == rec["ranking"]  # unchanged


def test_only_the_last_answer_can_be_changed_and_only_an_answered_item(env):
    store, camp, client, admin, tokens = env
    a = answer(client, tokens["ann"], "ann-a-000001")
    open_item = client.get("/api/next", headers=h(tokens["ann"])).json()["item"]
    not_answered = client.post("/api/submit", headers=h(tokens["ann"]),
                               json={"item": open_item["id"], "submission_id": "ann-x-000001", "ranking": [0, 1, 2, 3],
                                     "revise": True})
    assert not_answered.status_code == 409 and "submit it instead" in not_answered.json()["error"]
    answer(client, tokens["ann"], "ann-b-000001")
    old = client.post("/api/submit", headers=h(tokens["ann"]),
                      json={"item": a["id"], "submission_id": "ann-a-000002", "ranking": [0, 1, 2, 3], "revise": True})
    assert old.status_code == 409 and "only your last answer" in old.json()["error"]
    # someone else's item is not found, exactly as for submissions
    other = client.post("/api/submit", headers=h(tokens["bob"]),
                        json={"item": a["id"], "submission_id": "bob-a-000001", "ranking": [0, 1, 2, 3], "revise": True})
    assert other.status_code == 404


def test_a_skip_can_be_turned_into_a_ranking(env):
    store, camp, client, admin, tokens = env
    item = answer(client, tokens["ann"], "ann-skip-0001", skipped=True, skip_reason="cannot judge")
    prev = client.get("/api/previous", headers=h(tokens["ann"])).json()["item"]
    assert prev["skipped"] is True and prev["skip_reason"] == "cannot judge" and prev["ranking"] == []
    r = client.post("/api/submit", headers=h(tokens["ann"]),
                    json={"item": item["id"], "submission_id": "ann-skip-0002", "ranking": [0, 1, 2, 3], "revise": True})
    assert r.status_code == 200
    rec = exported(store, camp, "ann", "p0")
    assert not rec.get("skipped") and [rec["completions"][i] for i in rec["ranking"]] == item["completions"]


def test_admin_item_view_shows_disagreements_skips_and_answers_left_as_shown(env):
    store, camp, client, admin, tokens = env
    a = answer(client, tokens["ann"], "ann-000000001", ranking=[0, 1, 2, 3])  # the shuffled order, untouched
    b_item = client.get("/api/next", headers=h(tokens["bob"])).json()["item"]
    assert b_item["prompt"] == a["prompt"]
    # bob ranks the same item in exactly the opposite order of ann
    ann_texts = a["completions"]
    ranking = [b_item["completions"].index(t) for t in reversed(ann_texts)]
    client.post("/api/submit", headers=h(tokens["bob"]), json={"item": b_item["id"], "submission_id": "bob-000000001",
                                                               "ranking": ranking})
    answer(client, tokens["cid"], "cid-000000001", skipped=True, skip_reason="unreadable: all four are the same")

    r = client.get("/api/admin/items", headers=h(admin))
    assert r.status_code == 200
    items = {it["prompt_id"]: it for it in r.json()["items"]}
    assert set(items) == {"p0", "p1", "p2"}
    p0 = items["p0"]
    assert p0["rankings"] == 2 and p0["complete"] and p0["kendalls_w"] == 0.0 and p0["pairwise_agreement"] == 0.0
    assert p0["as_shown"] == 1 and {(l["labeler"], l["as_shown"]) for l in p0["labels"]} == {("ann", True), ("bob", False)}
    p1 = items["p1"]  # cid got the next item with fewer than 2 rankings
    assert p1["skips"] == 1 and p1["labels"][0]["skip_reason"] == "unreadable: all four are the same"
    assert items["p2"]["rankings"] == 0 and items["p2"]["labels"] == []
    # the same figures the page shows per labeler
    per = {l["labeler"]: l for l in campaign_summary(store, camp)["labelers"]}
    assert per["ann"]["as_shown"] == 1 and per["bob"]["as_shown"] == 0
    assert per["ann"]["as_shown_by_chance"] == pytest.approx(1 / 24, abs=0.01)
    assert item_summaries(store, camp)[0]["consensus"]["ties"]  # opposite rankings: a Borda tie
    assert client.get("/api/admin/items", headers=h(tokens["ann"])).status_code == 403


def test_median_seconds_is_not_rounded_to_zero_for_api_labelers(env):
    store, camp, client, admin, tokens = env
    for i in range(3):
        answer(client, tokens["ann"], f"ann-fast-{i:04d}")  # answers within milliseconds, as a script does
    entry = next(l for l in campaign_summary(store, camp)["labelers"] if l["labeler"] == "ann")
    assert 0 < entry["median_seconds"] < 5  # the browser test checks the admin page shows it as such


def test_the_labeling_docs_commands_run_as_printed(tmp_path, monkeypatch):
    """The import, link, export and pairs commands of docs/labeling.md run as printed (serve and
    simulate need a running server, the demo test runs those; PostgreSQL examples need a
    PostgreSQL server), and gold labels are left out of the
    pairs, as the docs say."""
    docs = (Path(__file__).resolve().parent.parent / "docs" / "labeling.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", docs, re.S):
        for cmd in block.replace("\\\n", " ").splitlines():
            args = shlex.split(cmd, comments=True)
            # PostgreSQL examples need a server (test_feedback_postgres.py runs the store there)
            on_postgres = any(a.startswith("postgresql://") for a in args)
            if args[:1] == ["rlhf"] and args[1:3] not in (["label", "serve"], ["label", "simulate"]) and not on_postgres:
                commands.append(args[1:])
    assert [c[:2] for c in commands] == [["label", "import"], ["label", "add-admin"], ["label", "add-labeler"],
                                         ["label", "export"], ["label", "export"], ["data", "pairs"]]
    (tmp_path / "completions.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS), encoding="utf-8")
    (tmp_path / "instructions.md").write_text("# Rank by helpfulness\n\nThe most helpful first.\n", encoding="utf-8")
    (tmp_path / "gold.jsonl").write_text(json.dumps({"prompt": "say hi", "completions": ["Hello!", "hi", "go away"],
                                                     "ranking": [0, 1, 2], "prompt_id": "g1"}) + "\n", encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    for args in commands:
        if args[:2] == ["label", "export"] and not (tmp_path / "rankings.jsonl").exists():
            store = open_store("labels.sqlite")  # ann, just added, ranks everything, the gold item included
            ann = store.labelers(store.campaigns()[0].id)[0]
            while (a := store.next_assignment(ann)) is not None:
                store.submit(ann, a.id, f"sub-{a.id:06d}", list(range(len(a.completions))), [], False, None)
        res = runner.invoke(app, args)
        assert res.exit_code == 0, (args, res.output)
    pairs = json.loads(res.stdout.strip().splitlines()[-1])
    assert pairs["gold_items_dropped"] == 1 and pairs["pairs"] == 3 * 6  # three items of K = 4, no gold pairs
