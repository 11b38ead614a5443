"""The chat API and page: the flow, idempotency, isolation between users, validation, reranking and
adapters, the loop swapping versions under a live server, scripted users, and the CLI around it."""

import json
import random
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from click.testing import CliRunner
from fastapi.testclient import TestClient

from conftest import personal_feedback_records

from rlhf.cli import app as cli_app
from rlhf.feedback.campaign import import_campaign
from rlhf.feedback.server import start_in_thread
from rlhf.feedback.store import open_store
from rlhf.personal.api import PAGES, _RedactChatTokens, create_chat_app, page_asset
from rlhf.personal.loop import LoopConfig, LoopState, loop_tick
from rlhf.personal.model import ModelDir, PersonalReward
from rlhf.personal.policy import ADAPTER_META, ChatPolicy, ChatPolicyConfig, best_of_halves
from rlhf.personal.records import FeedbackRecord
from rlhf.personal.store import PersonalStore
from rlhf.personal.users import ScriptedUser, simulate_users


def h(token):
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture()
def env(tmp_path, tiny_model_dir):
    store = open_store(tmp_path / "labels.sqlite")
    comp = tmp_path / "c.jsonl"
    comp.write_text(json.dumps({"prompt_id": "p1", "prompt": "hi", "completions": ["a", "b"]}) + "\n", encoding="utf-8")
    camp = import_campaign(store, comp, "helpfulness", 1, name="camp")
    _, admin = store.add_user("boss", "admin", None)
    _, labeler = store.add_user("lab", "labeler", camp.id)
    chat = ChatPolicy(ChatPolicyConfig(policy=str(tiny_model_dir), max_new_tokens=8), device="cpu")
    client = TestClient(create_chat_app(store, chat), raise_server_exceptions=False)
    tokens = {n: client.post("/api/admin/chat/users", json={"name": n}, headers=h(admin)).json()["token"] for n in ("ann", "bob")}
    yield store, chat, client, admin, labeler, tokens
    client.close()


def ask(client, token, prompt="my house is too hot", ask_id=None):
    return client.post("/api/chat/ask", json={"prompt": prompt, "ask_id": ask_id or f"ask{random.getrandbits(48):x}"},
                       headers=h(token))


def test_ask_choose_edit_history_delete_and_export(env, monkeypatch):
    store, chat, client, admin, labeler, tokens = env
    me = client.get("/api/chat/me", headers=h(tokens["ann"])).json()
    assert me == {"user": "ann", "turns": 0, "answered": 0, "mode": "sample", "policy": chat.policy_name}
    calls = []
    real = chat.replies
    monkeypatch.setattr(chat, "replies", lambda *a: calls.append(a) or real(*a))
    r = ask(client, tokens["ann"], ask_id="question-1")
    assert r.status_code == 200, r.text
    turn = r.json()["turn"]
    assert len(turn["replies"]) == 2 and turn["model_version"] == chat.policy_name and not turn["answered"]
    again = ask(client, tokens["ann"], ask_id="question-1").json()["turn"]  # a retried ask: same turn, no new sampling
    assert again == turn and len(calls) == 1
    r = ask(client, tokens["ann"], prompt="something else", ask_id="question-1")
    assert r.status_code == 409 and "already used" in r.json()["error"]

    choose = {"turn": turn["id"], "submission_id": "sub-00001", "choice": 1, "edit": None}
    r = client.post("/api/chat/choose", json=choose, headers=h(tokens["ann"]))
    assert r.json() == {"ok": True, "stored": True, "turns": 1, "answered": 1}
    assert client.post("/api/chat/choose", json=choose, headers=h(tokens["ann"])).json()["stored"] is False
    same_answer_new_id = {**choose, "submission_id": "sub-00002"}
    assert client.post("/api/chat/choose", json=same_answer_new_id, headers=h(tokens["ann"])).json()["stored"] is False
    r = client.post("/api/chat/choose", json={**choose, "submission_id": "sub-00003", "choice": 0}, headers=h(tokens["ann"]))
    assert r.status_code == 409 and "cannot be changed" in r.json()["error"]

    t2 = ask(client, tokens["ann"], "how do I cook rice").json()["turn"]
    client.post("/api/chat/choose", json={"turn": t2["id"], "submission_id": "sub-00004", "choice": 0,
                                          "edit": "Rinse it, then simmer twenty minutes."}, headers=h(tokens["ann"]))
    t3 = ask(client, tokens["ann"], "what should I read next").json()["turn"]
    client.post("/api/chat/choose", json={"turn": t3["id"], "submission_id": "sub-00005", "choice": None},
                headers=h(tokens["ann"]))
    hist = client.get("/api/chat/history", headers=h(tokens["ann"])).json()["turns"]
    assert [t["id"] for t in hist] == [t3["id"], t2["id"], turn["id"]]
    assert [(t["choice"], t["edit"]) for t in hist] == [(None, None), (0, "Rinse it, then simmer twenty minutes."), (1, None)]

    export = client.get("/api/admin/chat/export", headers=h(admin))
    assert export.status_code == 200 and export.headers["content-type"].startswith("application/x-ndjson")
    records = [FeedbackRecord.from_json(json.loads(ln)) for ln in export.text.splitlines()]
    assert [(r.user, r.choice, r.edit) for r in records] == [("ann", 1, None), ("ann", 0, "Rinse it, then simmer twenty minutes."),
                                                             ("ann", None, None)]
    assert records[0].replies == turn["replies"] and records[0].model_version == chat.policy_name and records[0].time > 0
    assert len(records[1].pairs()) == 3 and records[2].pairs() == []

    r = client.delete(f"/api/chat/history/{t2['id']}", headers=h(tokens["ann"]))
    assert r.json() == {"deleted": 1, "turns": 2, "answered": 2}
    assert [t["id"] for t in client.get("/api/chat/history", headers=h(tokens["ann"])).json()["turns"]] == [t3["id"], turn["id"]]
    assert len(PersonalStore(store).feedback("ann")) == 2  # gone from the database, not hidden
    assert client.delete("/api/chat/history", headers=h(tokens["ann"])).json()["deleted"] == 2
    assert client.get("/api/chat/history", headers=h(tokens["ann"])).json()["turns"] == []
    r = client.post("/api/chat/choose", json={**choose, "submission_id": "sub-00009"}, headers=h(tokens["ann"]))
    assert r.status_code == 404  # a retry after deletion does not bring the turn back


def test_one_users_token_never_reaches_anothers_data(env):
    store, chat, client, admin, labeler, tokens = env
    turn = ask(client, tokens["ann"]).json()["turn"]
    bob = h(tokens["bob"])
    choose = {"turn": turn["id"], "submission_id": "sub-bob-1", "choice": 0}
    r = client.post("/api/chat/choose", json=choose, headers=bob)
    assert r.status_code == 404 and r.json()["error"] == f"no turn {turn['id']} in your history"  # as if it did not exist
    assert client.delete(f"/api/chat/history/{turn['id']}", headers=bob).status_code == 404
    assert client.get("/api/chat/history", headers=bob).json()["turns"] == []
    assert client.delete("/api/chat/history", headers=bob).json()["deleted"] == 0
    assert len(client.get("/api/chat/history", headers=h(tokens["ann"])).json()["turns"]) == 1  # ann's turn survived bob
    assert client.post("/api/chat/choose", json={**choose, "turn": 10 ** 9}, headers=bob).status_code == 404
    # tokens are separate namespaces: labeling tokens open no chat, chat tokens no labeling or admin routes
    assert client.get("/api/chat/me", headers=h(labeler)).status_code == 401
    assert client.get("/api/chat/me", headers=h(admin)).status_code == 401
    assert client.get("/api/chat/me").status_code == 401
    assert client.get("/api/me", headers=bob).status_code == 401
    # a chat token is unknown to the labeling users that admin routes check: 401, as for any unknown token
    assert client.get("/api/admin/chat/export", headers=bob).status_code == 401
    assert client.get("/api/admin/chat/export", headers=h(labeler)).status_code == 403
    assert client.post("/api/admin/chat/users", json={"name": "eve"}, headers=bob).status_code == 401
    assert client.post("/api/admin/chat/users", json={"name": "ann"}, headers=h(admin)).status_code == 409
    # The labeling app's Guard checks chat tokens too, before the body: without a valid one, 401 whatever it holds
    huge = json.dumps({**choose, "edit": "x" * (2 << 20)}).encode()
    for headers in ({}, h("forged-token"), h(labeler)):
        for body in (b"{not json", huge):
            r = client.post("/api/chat/choose", headers=headers, content=body)
            assert r.status_code == 401 and len(r.content) < 300, (headers, r.status_code)
    assert client.post("/api/chat/choose", headers=bob, content=huge).status_code == 413  # a valid token: then the size


@pytest.mark.parametrize("body, message", [
    ({"turn": 1, "submission_id": "sub-00001", "choice": 2}, "choice"),
    ({"turn": 1, "submission_id": "sub-00001"}, "choice: Field required"),
    ({"turn": 1, "submission_id": "x", "choice": 0}, "submission_id"),
    ({"turn": 0, "submission_id": "sub-00001", "choice": 0}, "turn"),
    ({"turn": 1, "submission_id": "sub-00001", "choice": 0, "extra": 1}, "extra"),
    ({"turn": "1", "submission_id": "sub-00001", "choice": 0}, "turn"),
])
def test_bad_choices_get_a_clear_4xx(env, body, message):
    _, _, client, _, _, tokens = env
    r = client.post("/api/chat/choose", json=body, headers=h(tokens["ann"]))
    assert r.status_code == 422 and message in r.json()["error"], r.text


def test_bad_questions_get_a_clear_4xx(env):
    _, _, client, _, _, tokens = env
    for body, code in [({"prompt": "   ", "ask_id": "ask-000001"}, 422), ({"prompt": "x" * 2001, "ask_id": "ask-000002"}, 422),
                       ({"prompt": "hi", "ask_id": "bad id!"}, 422), ({"prompt": "hi"}, 422)]:
        r = client.post("/api/chat/ask", json=body, headers=h(tokens["ann"]))
        assert r.status_code == code and "error" in r.json(), (body, r.text)
    r = client.post("/api/chat/ask", content=b"{not json", headers={**h(tokens["ann"]), "Content-Type": "application/json"})
    assert r.status_code == 422


def test_page_is_the_same_shell_for_any_token_with_security_headers(env):
    _, _, client, _, _, tokens = env
    a, b = client.get(f"/chat/{tokens['ann']}"), client.get("/chat/not-a-token")
    assert a.status_code == b.status_code == 200 and a.content == b.content == client.get("/chat").content
    assert "default-src 'self'" in a.headers["content-security-policy"] and a.headers["referrer-policy"] == "no-referrer"
    assert client.get("/personal/static/chat.js").headers["content-type"].startswith("text/javascript")
    assert client.get("/personal/static/chat.html").status_code == 404
    assert client.get("/personal/static/../../etc/passwd").status_code == 404
    for name in PAGES:  # model output only ever becomes text
        text = page_asset(name).decode("utf-8")
        for setter in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write"):
            assert setter not in text, (name, setter)


def test_access_log_never_shows_a_chat_token():
    import logging

    rec = logging.LogRecord("uvicorn.access", logging.INFO, "", 0, '%s - "%s %s HTTP/%s" %d',
                            ("127.0.0.1:5", "GET", "/chat/s3cret-t0ken?x=1", "1.1", 200), None)
    _RedactChatTokens().filter(rec)
    assert "s3cret" not in rec.getMessage() and "/chat/<token>?x=1" in rec.getMessage()


def test_best_of_halves():
    assert best_of_halves(["a", "b", "c", "d"], torch.tensor([0.0, 2.0, 5.0, 1.0])) == ["b", "c"]
    assert best_of_halves(["a", "b", "b", "d"], torch.tensor([0.0, 2.0, 5.0, 1.0])) == ["b", "d"]  # no repeat


def _save_adapter(tiny_model_dir, folder: Path, seed: int, version: str) -> None:
    from peft import LoraConfig, get_peft_model

    from rlhf.models.loading import load_causal_lm

    torch.manual_seed(seed)
    model = get_peft_model(load_causal_lm(tiny_model_dir), LoraConfig(r=4, lora_alpha=32, target_modules="all-linear",
                                                                      init_lora_weights=False))
    staged = folder.with_name(folder.name + ".tmp")
    model.save_pretrained(str(staged))
    (staged / ADAPTER_META).write_text(json.dumps({"version": version}), encoding="utf-8")
    if folder.exists():
        shutil.rmtree(folder)
    staged.rename(folder)


def test_rerank_by_the_users_reward_then_their_adapter_when_one_exists(tiny_model_dir, personal_model_dir, tmp_path):
    model_dir = tmp_path / "prm"
    shutil.copytree(personal_model_dir, model_dir)
    chat = ChatPolicy(ChatPolicyConfig(policy=str(tiny_model_dir), reward=str(model_dir), candidates=6, max_new_tokens=8), device="cpu")
    assert chat.mode("ann") == "rerank"
    replies, version = chat.replies("ann", "my house is too hot", 7)
    assert version.endswith("+rerank6:v0001")
    torch.manual_seed(7)  # the same six candidates, and the best of each half under ann's reward
    candidates = chat._sample("my house is too hot", 6, 7, None)
    scores = PersonalReward(model_dir).score("ann", ["my house is too hot"] * 6, candidates)
    assert replies == best_of_halves(candidates, scores)

    _save_adapter(tiny_model_dir, model_dir / "adapters" / "ann", seed=1, version="v0001-ppo3")
    assert chat.mode("ann") == "adapter" and chat.mode("bob") == "rerank"
    replies, version = chat.replies("ann", "my house is too hot", 7)
    assert version.endswith("+adapter:ann@v0001-ppo3") and len(replies) == 2
    key = chat._loaded["ann"]
    with_adapter = chat._sample("hello there", 4, 3, key)
    assert with_adapter != chat._sample("hello there", 4, 3, None)  # the adapter changes what is sampled
    assert chat.replies("bob", "my house is too hot", 7)[1].endswith("+rerank6:v0001")  # bob: base weights, reranked
    _save_adapter(tiny_model_dir, model_dir / "adapters" / "ann", seed=2, version="v0002-ppo3")  # a newer adapter
    assert chat.replies("ann", "my house is too hot", 7)[1].endswith("@v0002-ppo3")
    assert chat._loaded["ann"] != key and key not in chat.model.peft_config  # the old one was unloaded


def test_loop_refits_a_new_user_and_the_live_server_swaps_without_dropping_requests(tiny_model_dir, personal_model_dir,
                                                                                     tmp_path):
    model_dir = tmp_path / "prm"
    shutil.copytree(personal_model_dir, model_dir)
    store = open_store(tmp_path / "labels.sqlite")
    pstore = PersonalStore(store)
    _, cy = pstore.add_user("cy")
    chat = ChatPolicy(ChatPolicyConfig(policy=str(tiny_model_dir), reward=str(model_dir), candidates=4, max_new_tokens=6), device="cpu")
    reward = PersonalReward(model_dir)
    cfg = LoopConfig(model=str(model_dir), feedback=str(tmp_path / "labels.sqlite"), every=5, holdout=0.2)
    state = LoopState()
    versions, failures, stop = [], [], threading.Event()

    with start_in_thread(store, app=create_chat_app(store, chat)) as srv:
        def keep_asking():
            with httpx.Client(base_url=srv.url, headers=h(cy), timeout=60, trust_env=False) as c:
                while not stop.is_set():
                    r = c.post("/api/chat/ask", json={"prompt": "my house is too hot", "ask_id": f"bg{random.getrandbits(48):x}"})
                    (versions if r.status_code == 200 else failures).append(
                        r.json()["turn"]["model_version"] if r.status_code == 200 else r.status_code)

        asker = threading.Thread(target=keep_asking)
        asker.start()
        try:
            _feed_and_refit(reward, cfg, state, srv.url, cy, model_dir, versions)
        finally:
            stop.set()
            asker.join()
    assert failures == [] and versions[0].endswith(":v0001") and versions[-1].endswith(":" + ModelDir(model_dir).current())
    assert loop_tick(reward, cfg.feedback, state, cfg) == []  # nothing new since: nobody is due
    assert json.loads((model_dir / "loop_state.json").read_text())["counts"]["cy"] == 6
    # cy deletes her history: the next tick puts her back on the generic reward
    pstore.delete(pstore.users()[0])
    loop_tick(reward, cfg.feedback, state, cfg)
    assert torch.equal(reward.table.embedding("cy"), torch.zeros(reward.table.dim)) and reward.table.n_pairs("cy") == 0


def _feed_and_refit(reward, cfg, state, url, cy, model_dir, versions):
    """No feedback yet: nobody is due. Then cy answers six turns through the API and the loop refits her."""
    assert loop_tick(reward, cfg.feedback, state, cfg) == []  # no feedback from anyone yet
    with httpx.Client(base_url=url, headers=h(cy), timeout=60, trust_env=False) as c:
        for rec in personal_feedback_records({"cy": "kind"}, 6, seed=11):
            r = c.post("/api/chat/ask", json={"prompt": rec["prompt"], "ask_id": "question-" + rec["id"]})
            assert r.status_code == 200, r.text
            turn = r.json()["turn"]
            scores = reward.score("ann", [rec["prompt"]] * 2, turn["replies"])  # cy picks as ann would
            r = c.post("/api/chat/choose", json={"turn": turn["id"], "submission_id": "choice-" + rec["id"],
                                                 "choice": int(scores.argmax()), "edit": None})
            assert r.status_code == 200, r.text
    results = loop_tick(reward, cfg.feedback, state, cfg)
    assert [(r.user, r.version, r.deployed) for r in results] == [("cy", "v0002", True)], results
    assert results[0].accuracy_candidate >= results[0].accuracy_deployed
    deadline = time.monotonic() + 60
    while not any(v.endswith(":v0002") for v in versions) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_scripted_users_follow_their_taste_through_the_api(env):
    store, chat, client, admin, labeler, tokens = env
    concise, detailed = ScriptedUser("c", "concise", noise=0.0), ScriptedUser("d", "detailed", noise=0.0)
    replies = ["Short.", "A much longer reply with many more words in it."]
    rng = random.Random(0)
    assert concise.choose("q", replies, rng) == (0, None) and detailed.choose("q", replies, rng) == (1, None)
    assert ScriptedUser("x", "concise", both_bad_below=10.0).choose("q", replies, rng) == (None, None)
    editor = ScriptedUser("e", "concise", noise=0.0, edit_rate=1.0)
    assert editor.choose("q", ["One. Two three four.", "Five six seven eight nine ten."], rng) == (0, "One.")
    with pytest.raises(Exception, match="unknown taste"):
        ScriptedUser("z", "grumpy")
    with start_in_thread(store, app=create_chat_app(store, chat)) as srv:
        runs = simulate_users(srv.url, admin, ["concise", "detailed"], ["my house is too hot", "how do I cook rice"], 3,
                              noise=0.0, seed=1, name_prefix="sim-")
    assert [(r.name, r.turns) for r in runs] == [("sim-concise", 3), ("sim-detailed", 3)]
    recs = PersonalStore(store).feedback()
    assert len(recs) == 6
    for r in recs:  # with no noise each chose the reply their taste prefers (ties aside)
        lengths = [len(x.split()) for x in r.replies]
        if lengths[0] != lengths[1]:
            want = lengths.index(min(lengths)) if r.user == "sim-concise" else lengths.index(max(lengths))
            assert r.choice == want


def test_cli_add_user_and_export(tmp_path):
    db = tmp_path / "labels.sqlite"
    runner = CliRunner()
    res = runner.invoke(cli_app, ["personal", "add-user", "ann", "--db", str(db), "--url", "http://example.org:8000"])
    assert res.exit_code == 0, res.output
    link = res.stdout.strip().splitlines()[-1]
    assert link.startswith("http://example.org:8000/chat/")
    store = open_store(db)
    pstore = PersonalStore(store)
    user = pstore.user_by_token(link.rsplit("/", 1)[1])
    assert user.name == "ann"
    turn, _ = pstore.add_turn(user, "ask-1", "p", ["A", "B"], "m")
    pstore.choose(user, turn.id, "sub-1", 0, "A!")
    out = tmp_path / "f.jsonl"
    res = runner.invoke(cli_app, ["personal", "export", "--db", str(db), "--out", str(out)])
    assert res.exit_code == 0 and json.loads(res.stdout)["records"] == 1
    assert FeedbackRecord.from_json(json.loads(out.read_text())).edit == "A!"
    res = runner.invoke(cli_app, ["personal", "export", "--db", str(db), "--out", str(tmp_path / "p.jsonl"), "--pairs"])
    pairs = [json.loads(ln) for ln in (tmp_path / "p.jsonl").read_text().splitlines()]
    assert [(p["chosen"], p["rejected"], p["user"]) for p in pairs] == [("A", "B", "ann"), ("A!", "A", "ann"), ("A!", "B", "ann")]
    res = runner.invoke(cli_app, ["personal", "add-user", "ann", "--db", str(db)])
    assert res.exit_code != 0 and "already exists" in str(res.exception)


def test_adapter_reward_is_standardised_on_base_policy_replies(tiny_model_dir, personal_model_dir):
    """--reward-scale 0 --center-reward: PPO sees the user's reward minus its mean, divided by its spread,
    over the base policy's own replies (a weighted spec with a constant part)."""
    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord
    from rlhf.judges.base import load_scorer
    from rlhf.models.loading import load_causal_lm, load_tokenizer, shipped_prompts
    from rlhf.errors import ConfigError
    from rlhf.personal.adapter import AdapterConfig, reward_stats
    from rlhf.rollout.generate import SamplingParams, generate_completions

    cfg = AdapterConfig(model=str(personal_model_dir), user="ann", policy=str(tiny_model_dir), max_new_tokens=8,
                        calibration_prompts=6)
    spec = f"personal:{personal_model_dir}:ann@v0001"
    mean, std = reward_stats(cfg, spec)
    prompts = [p.prompt for p in read_records(shipped_prompts("train"), PromptRecord)][:6]
    replies = [g[0] for g in generate_completions(load_causal_lm(str(tiny_model_dir)).eval(), load_tokenizer(str(tiny_model_dir)),
                                                  prompts, 1, SamplingParams(max_new_tokens=8), batch_size=32, seed=0,
                                                  progress=False)]
    raw = load_scorer(spec).score(prompts, replies)
    # the same replies: the mean and spread of the raw reward
    assert std > 0 and abs(float(raw.std()) - std) < 1e-5 and abs(float(raw.mean()) - mean) < 1e-5
    scaled = load_scorer(f"weighted:{1 / std:.6g}*{spec}+{-mean / std:.6g}").score(prompts, replies)
    assert abs(float(scaled.std()) - 1.0) < 1e-4 and abs(float(scaled.mean())) < 1e-4
    assert torch.allclose(scaled, (raw - mean) / std, atol=1e-4)
    with pytest.raises(ConfigError, match="--reward-scale must not be negative"):
        AdapterConfig(model="m", user="ann", reward_scale=-1.0).validate()
