"""What only PostgreSQL does: a campaign lock held past the busy timeout is a 503 to retry with
nothing stored; a connection the database dropped is a 503, and the next request reconnects;
two stores (two server processes) never hand one item to more than N labelers."""

import json
import threading

import pytest
from fastapi.testclient import TestClient

from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.export import label_records
from rlhf.feedback.server import create_app
from rlhf.feedback.store import open_store

ITEMS = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "completions": ["a", "b", "c"]} for i in range(6)]


@pytest.fixture()
def pg(postgres_server, tmp_path):
    url = postgres_server.create_database()
    store = open_store(url, busy_timeout_s=0.3)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ITEMS))
    camp = import_campaign(store, tmp_path / "c.jsonl", "helpfulness", 2, name="camp")
    yield store, camp, url
    store.close()
    postgres_server.drop_database(url)


def h(token):
    return {"Authorization": f"Bearer {token}"}


def test_a_held_campaign_lock_is_a_503_and_nothing_is_stored(pg):
    import psycopg

    store, camp, url = pg
    _, token = store.add_user("ann", "labeler", camp.id)
    client = TestClient(create_app(store), raise_server_exceptions=False)
    item = client.get("/api/next", headers=h(token)).json()["item"]
    body = {"item": item["id"], "submission_id": "busy-0001", "ranking": [0, 1, 2]}
    with psycopg.connect(url) as other:  # another server process in the middle of a long write
        other.execute("SELECT 1 FROM campaigns WHERE id = %s FOR UPDATE", (camp.id,))
        r = client.post("/api/submit", headers=h(token), json=body)
        assert r.status_code == 503 and r.headers["retry-after"] == "1" and "nothing was saved" in r.json()["error"]
        other.rollback()
    assert label_records(store, camp) == []
    r = client.post("/api/submit", headers=h(token), json=body)
    assert r.status_code == 200 and r.json()["stored"] is True
    client.close()


def test_a_dropped_connection_is_a_503_then_the_store_reconnects(pg):
    import psycopg

    store, camp, url = pg
    _, token = store.add_user("ann", "labeler", camp.id)
    client = TestClient(create_app(store), raise_server_exceptions=False)
    assert client.get("/api/me", headers=h(token)).status_code == 200
    with psycopg.connect(url, autocommit=True) as admin:  # what a database restart does to open connections
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = current_database() "
                      "AND pid <> pg_backend_pid()")
    statuses = [client.get("/api/me", headers=h(token)).status_code for _ in range(3)]
    assert statuses[0] in (200, 503) and statuses[-1] == 200, statuses
    client.close()


def test_two_stores_never_give_an_item_to_more_than_n_labelers(pg):
    """Two store objects stand for two server processes on one database: claims race, N holds."""
    store, camp, url = pg
    other = open_store(url)
    users = [(store if i % 2 else other).add_user(f"l{i}", "labeler", camp.id)[0] for i in range(8)]
    errors = []

    def work(i: int) -> None:
        s = store if i % 2 else other
        try:
            while (a := s.next_assignment(users[i])) is not None:
                s.submit(users[i], a.id, f"sub-{i}-{a.id}", [0, 1, 2], [], False, None)
        except Exception as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    rows = store.label_rows(camp.id)
    per_item = {}
    for r in rows:
        per_item[r.item_id] = per_item.get(r.item_id, 0) + 1
    assert len(rows) == len(ITEMS) * 2 and set(per_item.values()) == {2}
    assert all(store.progress(u)["total"] == store.progress(u)["done"] for u in users)
    assert store.counter_drift() == []
    other.close()
