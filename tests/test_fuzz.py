"""Property-based fuzzing (hypothesis) of every reader and every labeling API route (issue 15).

The property everywhere: whatever the input, the answer is a result or the project's own error
(DataError / ConfigError, 4xx over HTTP) with a bounded message; never a traceback, a 5xx, a hang,
or an answer that grows with the input. The labeling store's counters are also fuzzed by random
interleavings of every store operation, against a recount of its rows.

Bounded for CI: ``derandomize=True`` (each target's examples follow from the test's name, so every
run replays the same ones; no example database is written) and a fixed ``max_examples`` per
target (the ``EXAMPLES`` table below). ``RLHF_FUZZ_SCALE=10`` runs ten times as many, e.g. before a
release; a failure prints the shrunk example to reproduce (in CI, where ``CI`` is set, unshrunk).
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
from dataclasses import fields
from pathlib import Path
from urllib.parse import quote

import pytest
import torch
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from rlhf.config import load_config
from rlhf.data.io import read_records
from rlhf.data.pairs import load_pairs, rankings_to_pairs
from rlhf.data.records import RECORD_TYPES
from rlhf.errors import ConfigError, DataError, RLHFError

# Examples per target (before RLHF_FUZZ_SCALE). Cheap pure readers get many, folders with model
# loads and HTTP sequences fewer; the whole file stays around a minute on two idle cores.
EXAMPLES = {"bytes": 200, "json_lines": 150, "gzip": 60, "yaml": 200, "config_values": 150, "model_folder": 40,
            "checkpoint": 60, "metrics": 60, "api": 150, "store_machine": 40}
SCALE = max(1, int(os.environ.get("RLHF_FUZZ_SCALE", "1")))
MAX_MESSAGE = 2000


# In CI a failure is reported as found, unshrunk: shrinking can take minutes and CI time is bounded.
PHASES = [p for p in Phase if not (os.environ.get("CI") and p == Phase.shrink)]


def fuzz(target: str, **extra):
    return settings(max_examples=EXAMPLES[target] * SCALE, derandomize=True, database=None, deadline=None, phases=PHASES,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture,
                                           HealthCheck.data_too_large, HealthCheck.filter_too_much], **extra)


def bounded(exc: BaseException) -> None:
    assert len(str(exc)) < MAX_MESSAGE, f"message of {len(str(exc))} characters"


# -- JSON Lines readers ------------------------------------------------------------------------

KEYS = ["id", "prompt", "prompt_id", "completions", "ranking", "ties", "skipped", "skip_reason", "labeler",
        "criterion", "chosen", "rejected", "completion", "reply", "response", "gold", "role", "content"]
scalars = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.text(max_size=30) | st.sampled_from(["", " ", "a", "\u0000", "\ud7ff", "Assistant:", "\n\nAssistant: hi"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(
    st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=6), max_leaves=20)
# Records shaped like the contracts, so that the checks behind the first field are reached too.
records = st.fixed_dictionaries({}, optional={k: json_values for k in KEYS}) | st.fixed_dictionaries({
    "prompt": st.text(max_size=20), "completions": st.lists(st.text(max_size=10), max_size=6),
    "ranking": st.lists(st.integers(-3, 8), max_size=7), "ties": st.lists(st.lists(json_values, max_size=3), max_size=3),
    "skipped": json_values})


def check_reader(path: Path) -> None:
    for kind in RECORD_TYPES:
        try:
            out = read_records(path, kind)
        except DataError as exc:
            bounded(exc)
            assert str(path) in str(exc)
        else:
            assert out and all(type(r).kind == kind for r in out)
            if kind == "rankings":
                rankings_to_pairs(out)
    try:
        load_pairs(path)
    except DataError as exc:
        bounded(exc)


@fuzz("bytes")
@given(data=st.binary(max_size=400))
def test_readers_on_arbitrary_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("b") / "f.jsonl"
    path.write_bytes(data)
    check_reader(path)


@fuzz("json_lines")
@given(rows=st.lists(records | json_values, min_size=1, max_size=3), nest=st.sampled_from([0, 0, 0, 63, 65, 3000]))
def test_readers_on_json_lines(tmp_path_factory, rows, nest):
    path = tmp_path_factory.mktemp("j") / "f.jsonl"
    lines = [json.dumps(r, allow_nan=True) for r in rows]
    if nest:
        lines.append('{"prompt": ' + "[" * nest + "]" * nest + "}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    check_reader(path)


@fuzz("gzip")
@given(rows=st.lists(records, min_size=1, max_size=3), cut=st.integers(0, 400), garbage=st.binary(max_size=50))
def test_readers_on_gzip_whole_cut_or_fake(tmp_path_factory, rows, cut, garbage):
    folder = tmp_path_factory.mktemp("g")
    data = gzip.compress("".join(json.dumps(r) + "\n" for r in rows).encode())
    for name, content in (("whole", data), ("cut", data[:cut]), ("fake", garbage), ("tail", data + garbage)):
        path = folder / f"{name}.jsonl.gz"
        path.write_bytes(content)
        check_reader(path)


# -- configs -----------------------------------------------------------------------------------

def stage_configs():
    from rlhf.feedback.commands import ImportConfig, ServeConfig
    from rlhf.rollout.commands import GenerateConfig
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.reward import RewardTrainConfig
    from rlhf.train.sft import SFTConfig

    return [SFTConfig, RewardTrainConfig, PPOConfig, GenerateConfig, ServeConfig, ImportConfig]


def check_config(path: Path) -> None:
    for cls in stage_configs():
        try:
            load_config(cls, path)
        except ConfigError as exc:
            bounded(exc)


@fuzz("yaml")
@given(data=st.binary(max_size=300) | st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")))
def test_config_readers_on_arbitrary_yaml_bytes(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("y") / "c.yaml"
    path.write_bytes(data)
    check_config(path)


@fuzz("config_values")
@given(data=st.data())
def test_config_readers_on_real_option_names_with_any_values(tmp_path_factory, data):
    cls = data.draw(st.sampled_from(stage_configs()))
    names = [f.name for f in fields(cls)]
    mapping = data.draw(st.dictionaries(st.sampled_from(names), json_values, max_size=6))
    path = tmp_path_factory.mktemp("v") / "c.yaml"
    import yaml

    path.write_text(yaml.safe_dump(mapping, allow_unicode=True), encoding="utf-8")
    try:
        cfg = load_config(cls, path)
    except ConfigError as exc:
        bounded(exc)
    else:  # what was accepted is what the file said, typed
        for f in fields(cls):
            value = getattr(cfg, f.name)
            assert not (isinstance(value, float) and value != value), f"{f.name} is NaN"


# -- model folders -----------------------------------------------------------------------------

DAMAGE_KINDS = ["truncate", "overwrite", "delete", "replace"]


def damage(target: Path, data) -> None:
    """Cut, overwrite a few bytes of, delete, or replace one file, as hypothesis chooses."""
    raw = bytearray(target.read_bytes())
    kind = data.draw(st.sampled_from(DAMAGE_KINDS))
    if kind == "truncate":
        target.write_bytes(bytes(raw[: data.draw(st.integers(0, max(0, len(raw) - 1)))]))
    elif kind == "overwrite":
        at = data.draw(st.integers(0, max(0, len(raw) - 1)))
        patch = data.draw(st.binary(min_size=1, max_size=16))
        raw[at:at + len(patch)] = patch
        target.write_bytes(bytes(raw))
    elif kind == "delete":
        target.unlink()
    else:
        target.write_bytes(data.draw(st.binary(max_size=200) | json_values.map(lambda v: json.dumps(v).encode())))


@pytest.fixture(scope="module")
def model_template(tiny_model_dir):
    return tiny_model_dir


@fuzz("model_folder")
@given(data=st.data())
def test_damaged_model_folders_load_or_say_why(tmp_path_factory, model_template, data):
    from rlhf.models.loading import load_causal_lm, load_tokenizer

    folder = Path(shutil.copytree(model_template, tmp_path_factory.mktemp("m") / "model"))
    files = sorted(p.name for p in folder.iterdir() if p.is_file())
    damage(folder / data.draw(st.sampled_from(files)), data)
    for load in (load_tokenizer, load_causal_lm):
        try:
            load(folder)
        except RLHFError as exc:
            bounded(exc)


# -- checkpoints and metrics -------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of a small model, written by the real CheckpointManager."""
    from safetensors.torch import save_file

    from rlhf.utils.checkpoint import CheckpointManager

    out = tmp_path_factory.mktemp("ckpt-template")
    manager = CheckpointManager(out, keep=5)
    layer = torch.nn.Linear(16, 8)
    optim = torch.optim.AdamW(layer.parameters())
    layer(torch.randn(4, 16)).sum().backward()
    optim.step()
    for step in (2, 4):
        manager.save(step, lambda d: (d / "model").mkdir() or save_file(
            {k: v.detach().contiguous() for k, v in layer.state_dict().items()}, str(d / "model" / "model.safetensors")),
                     {"config": {"lr": 0.1}}, {"optimizer": optim.state_dict(), "rng": torch.get_rng_state()})
    return out


@fuzz("checkpoint")
@given(data=st.data())
def test_damaged_checkpoints_are_detected_and_skipped(tmp_path_factory, checkpoints, data, capsys):
    from rlhf.utils.checkpoint import CheckpointManager, verify_checkpoint

    out = Path(shutil.copytree(checkpoints, tmp_path_factory.mktemp("c") / "run"))
    newest = out / "checkpoints" / "step-00000004"
    files = sorted(p for p in newest.rglob("*") if p.is_file())
    target = data.draw(st.sampled_from(files))
    before = {p: p.read_bytes() for p in files}
    damage(target, data)
    changed = [p for p in files if not p.exists() or p.read_bytes() != before[p]]
    data_changed = any(p.name != "manifest.json" for p in changed)
    chosen = CheckpointManager(out).latest()
    if data_changed:  # any change to a file the manifest lists is caught, and the older one is used
        assert verify_checkpoint(newest) is not None and chosen == out / "checkpoints" / "step-00000002"
        assert "step-00000004 is damaged" in capsys.readouterr().err
    elif chosen == newest:  # only the manifest changed, harmlessly (e.g. whitespace): the data is intact
        assert all(p.read_bytes() == before[p] for p in files if p.name != "manifest.json")
    else:
        assert chosen == out / "checkpoints" / "step-00000002"


@fuzz("metrics")
@given(lines=st.lists(st.binary(max_size=40) | json_values.map(lambda v: json.dumps(v).encode()), max_size=4),
       torn=st.binary(max_size=30), resume=st.integers(0, 5))
def test_metrics_files_with_any_damage_are_read_and_resumed(tmp_path_factory, lines, torn, resume):
    from rlhf.utils.metrics import MetricsLogger, read_metrics

    out = tmp_path_factory.mktemp("m")
    good = [json.dumps({"step": s, "loss": 1.0 / s}).encode() for s in range(1, 4)]
    (out / "metrics.jsonl").write_bytes(b"\n".join(good + list(lines)) + b"\n" + torn)
    rows = read_metrics(out)
    assert rows[:3] == [json.loads(g) for g in good] and all(isinstance(r, dict) for r in rows)
    with MetricsLogger(out, tensorboard=False, resume_step=resume) as logger:
        logger.log(resume + 1, {"loss": 0.5})
    after = read_metrics(out)
    assert after[-1] == {"step": resume + 1, "loss": 0.5}

    def step(r):  # a row without a step counts as step 0; one with a step that is not a number is dropped
        s = r.get("step", 0)
        return s if isinstance(s, (int, float)) and not isinstance(s, bool) else float("inf")
    assert all(step(r) <= resume for r in after[:-1])


# -- the labeling API --------------------------------------------------------------------------

ROUTES = [("GET", "/"), ("GET", "/label"), ("GET", "/admin"), ("GET", "/static/{name}"), ("GET", "/favicon.ico"),
          ("GET", "/healthz"), ("GET", "/api/me"), ("GET", "/api/next"), ("POST", "/api/submit"),
          ("GET", "/api/admin/campaigns"), ("GET", "/api/admin/summary"), ("POST", "/api/admin/labelers"),
          ("POST", "/api/admin/labelers/{name}/revoke"), ("POST", "/api/admin/labelers/{name}/rotate"),
          ("GET", "/api/admin/export"), ("POST", "/api/next"), ("PUT", "/api/submit"), ("GET", "/{name}")]


@pytest.fixture(scope="module")
def api(tmp_path_factory):
    from rlhf.feedback.server import create_app
    from rlhf.feedback.store import open_store

    folder = tmp_path_factory.mktemp("api")
    store = open_store(folder / "labels.sqlite")
    items = [{"prompt_id": f"p{i}", "prompt": f"prompt {i}", "completions": [f"r{i}-{j}" for j in range(3)]}
             for i in range(30)]
    items.append({"prompt_id": "g", "prompt": "gold", "completions": ["a", "b"], "gold_ranking": [0, 1]})
    camp = store.create_campaign("camp", "helpfulness", "# rank", 2, items)
    _, admin = store.add_user("boss", "admin", None)
    tokens = {n: store.add_user(n, "labeler", camp.id)[1] for n in ("ann", "bob")}
    client = TestClient(create_app(store), raise_server_exceptions=False)
    yield store, client, {"admin": admin, **tokens}
    client.close()
    store.close()


submissions = st.fixed_dictionaries({"item": st.integers(-2, 40) | json_values,
                                     "submission_id": st.text(min_size=0, max_size=12) | st.just("sub-00000001"),
                                     "ranking": st.lists(st.integers(-1, 4), max_size=5) | json_values},
                                    optional={"ties": st.lists(st.lists(st.integers(-1, 4), max_size=3), max_size=3),
                                              "skipped": st.booleans() | json_values,
                                              "skip_reason": st.text(max_size=20) | json_values,
                                              "extra": json_values})


@fuzz("api")
@given(data=st.data())
def test_every_route_answers_any_request_with_a_short_4xx_or_a_result(api, data):
    store, client, tokens = api
    method, route = data.draw(st.sampled_from(ROUTES))
    name = data.draw(st.sampled_from(["ann", "bob", "app.js", "..", "%00"]) | st.text(
        alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=20))
    path = route.replace("{name}", quote(name, safe=""))  # any text, as a client would send it
    who = data.draw(st.sampled_from(["admin", "ann", "bob", "none", "garbage"]))
    headers = {} if who == "none" else {"Authorization": f"Bearer {tokens.get(who, 'x' * 40)}"}
    if data.draw(st.booleans()):
        headers["Content-Type"] = data.draw(st.sampled_from(["application/json", "text/plain", "multipart/form-data"]))
    params = data.draw(st.dictionaries(st.sampled_from(["campaign", "consensus", "x"]), st.text(max_size=10), max_size=2))
    kind = data.draw(st.sampled_from(["submission", "json", "bytes", "none"]))
    kwargs = {}
    if kind == "submission":
        kwargs["content"] = json.dumps(data.draw(submissions), allow_nan=True).encode()  # NaN and Infinity too
    elif kind == "json":
        kwargs["content"] = json.dumps(data.draw(json_values), allow_nan=True).encode()
    elif kind == "bytes":
        kwargs["content"] = data.draw(st.binary(max_size=200))
    r = client.request(method, path, headers=headers, params=params, **kwargs)
    assert r.status_code < 500, (method, path, r.status_code, r.text[:300])
    if r.status_code >= 400:
        assert len(r.content) < MAX_MESSAGE and "error" in r.json()
    # Keep the labelers usable for the next examples: give back any link a rotation replaced.
    if r.status_code == 200 and route.endswith(("/rotate", "/revoke")) and name in tokens:
        user = store.find_labeler(name, store.find_campaign("camp").id)
        tokens[user.name] = store.rotate_token(user)
    assert store.counter_drift() == []


class StoreMachine(RuleBasedStateMachine):
    """Random interleavings of every store operation; after each, the counters that next-item and
    progress rely on must equal a recount of the rows, and N must hold for fresh claims."""

    def __init__(self):
        super().__init__()
        import tempfile

        from rlhf.feedback.store import open_store

        self.folder = tempfile.mkdtemp(prefix="store-machine-")
        self.store = open_store(Path(self.folder) / "labels.sqlite")
        items = [{"prompt_id": f"p{i}", "prompt": f"p{i}", "completions": ["a", "b", "c"]} for i in range(5)]
        items.append({"prompt_id": "g", "prompt": "g", "completions": ["a", "b"], "gold_ranking": [1, 0]})
        self.camp = self.store.create_campaign("m", "helpfulness", "rank", 2, items)
        self.users = [self.store.add_user(f"u{i}", "labeler", self.camp.id)[0] for i in range(4)]
        self.open: dict[int, object] = {}

    def teardown(self):
        self.store.close()
        shutil.rmtree(self.folder, ignore_errors=True)

    @rule(i=st.integers(0, 3))
    def claim(self, i):
        user = self.users[i]
        a = self.store.next_assignment(user)
        if a is not None:
            self.open[user.id] = a

    @rule(i=st.integers(0, 3), skip=st.booleans(), again=st.booleans())
    def submit(self, i, skip, again):
        user = self.users[i]
        a = self.open.get(user.id)
        if a is None:
            return
        ranking = [] if skip else list(range(len(a.completions)))
        self.store.submit(user, a.id, f"s-{a.id}", ranking, [], skip, "unsure" if skip else None)
        if again:
            assert self.store.submit(user, a.id, f"s-{a.id}", ranking, [], skip, "unsure" if skip else None) is False
        del self.open[user.id]

    @rule(i=st.integers(0, 3))
    def revoke(self, i):
        user = self.users[i]
        self.store.revoke(user)
        self.open.pop(user.id, None)
        self.store.rotate_token(user)  # and back in, with a new link

    @rule()
    def expire_claims(self):
        timeout = self.store.claim_timeout_s
        self.store.claim_timeout_s = -1.0  # every open claim is past its time at the next claim
        try:
            user = self.users[0]
            a = self.store.next_assignment(user)
            if a is not None:
                self.open[user.id] = a
        finally:
            self.store.claim_timeout_s = timeout

    @invariant()
    def counters_match_a_recount(self):
        assert self.store.counter_drift() == []
        for user in self.users:
            p = self.store.progress(user)
            assert 0 <= p["skipped"] <= p["done"] <= p["total"]


TestStoreMachine = StoreMachine.TestCase
TestStoreMachine.settings = fuzz("store_machine", stateful_step_count=25)
