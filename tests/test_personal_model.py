"""The personal reward model: the feedback contract, joint training (generic + user part), cold start,
isolation between users, versions and the gate, exact resume, the scorer spec, the feature cache."""

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from conftest import personal_feedback_records, safetensors_weights

from rlhf.algos import personal_rewards
from rlhf.cli import app
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError, DataError
from rlhf.judges.base import load_scorer
from rlhf.personal import model as pmodel
from rlhf.personal.model import ModelDir, PersonalReward
from rlhf.personal.records import FeedbackRecord, feedback_pairs, read_feedback
from rlhf.personal.train import PersonalTrainConfig, split_recent, train_personal
from rlhf.personal.update import PRIOR_GRID, margins, refit_user, split_heldout


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def accuracy(reward: PersonalReward, user: str, pairs) -> float:
    prompts = [p.prompt for p in pairs]
    c = reward.score(user, prompts, [p.chosen for p in pairs])
    r = reward.score(user, prompts, [p.rejected for p in pairs])
    return float(((c > r).float() + 0.5 * (c == r).float()).mean())


# -- the contract ----------------------------------------------------------------------------------

def test_feedback_pairs_choice_edit_and_both_bad():
    base = {"user": "ann", "prompt": "p", "replies": ["A", "B"], "model_version": "m", "time": 1.0}
    assert [(p.chosen, p.rejected) for p in FeedbackRecord.from_json({**base, "choice": 1}).pairs()] == [("B", "A")]
    edited = FeedbackRecord.from_json({**base, "choice": 0, "edit": "A, better"}).pairs()
    assert [(p.chosen, p.rejected) for p in edited] == [("A", "B"), ("A, better", "A"), ("A, better", "B")]
    assert FeedbackRecord.from_json({**base, "choice": None}).pairs() == []  # both bad, no edit: nothing to learn
    assert [(p.chosen, p.rejected) for p in FeedbackRecord.from_json({**base, "choice": None, "edit": "C"}).pairs()] == \
        [("C", "A"), ("C", "B")]
    same = FeedbackRecord.from_json({**base, "replies": ["A", "A"], "choice": 0}).pairs()
    assert same == []  # two equal samples say nothing
    assert all(p.extra["user"] == "ann" for p in edited)


@pytest.mark.parametrize("change, message", [
    ({"replies": ["only one"]}, "field 'replies': expected exactly 2 replies"),
    ({"choice": 2}, "field 'choice': expected 0, 1 or null"),
    ({"choice": True}, "field 'choice'"),
    ({"time": "yesterday"}, "field 'time'"),
    ({"user": ""}, "field 'user': is empty"),
])
def test_bad_feedback_records_name_file_line_and_field(tmp_path, change, message):
    good = {"user": "ann", "prompt": "p", "replies": ["A", "B"], "choice": 0, "model_version": "m", "time": 1.0}
    path = write_jsonl(tmp_path / "f.jsonl", [good, {**good, **change}])
    with pytest.raises(DataError, match=rf"f.jsonl:2: {message}"):
        read_feedback(path)


def test_recent_records_are_held_out_per_user():
    recs = [FeedbackRecord.from_json(r) for r in personal_feedback_records({"ann": "kind", "bob": "mean"}, 10)]
    train, val = split_recent(recs, 0.2)
    for user in ("ann", "bob"):
        t = [r.time for r in train if r.user == user]
        v = [r.time for r in val if r.user == user]
        assert len(v) == 2 and len(t) == 8 and max(t) < min(v)


# -- joint training --------------------------------------------------------------------------------

def test_joint_training_learns_opposite_tastes_the_generic_reward_cannot(personal_model_dir, tmp_path):
    summary = json.loads((personal_model_dir / "summary.json").read_text())
    assert summary["users"] == ["ann", "bob"] and summary["version"] == "v0001"
    for user in ("ann", "bob"):  # held-out choices: each user's own reward gets them right
        assert summary["val"][user]["personal"] == 1.0, summary["val"]
    reward = PersonalReward(personal_model_dir)
    fresh = [FeedbackRecord.from_json(r) for r in personal_feedback_records({"ann": "kind"}, 8, seed=9)]
    pairs = feedback_pairs(fresh)["ann"]
    flipped = [type(p)(p.prompt, p.rejected, p.chosen, p.extra) for p in pairs]  # bob's choices on the same replies
    assert accuracy(reward, "ann", pairs) == 1.0 and accuracy(reward, "bob", flipped) == 1.0
    # one reward for both (the generic one) gets exactly one of each pair of opposite choices right
    assert accuracy(reward, None, pairs) + accuracy(reward, None, flipped) == pytest.approx(1.0)
    # the layout a scorer and the server read
    mdir = ModelDir(personal_model_dir)
    cfg = mdir.config()  # the default user part: linear on pair+reply features (2H + 2 wide), λ by cross-validation
    assert mdir.current() == "v0001" and (cfg.user_part, cfg.user_features) == ("linear", "pair+reply")
    assert cfg.dim == 2 * reward.rm.head.in_features + 2 and cfg.prior_precision in PRIOR_GRID
    assert summary["prior"] == cfg.prior_precision and len(summary["prior_cv_loglik"]) == len(PRIOR_GRID)
    assert (personal_model_dir / "backbone" / "rlhf_reward.json").is_file()
    assert mdir.read_log()[0]["source"] == "train"


def test_score_is_generic_head_plus_user_part(personal_model_dir):
    """Wiring: the served score equals the math module applied to the backbone's features."""
    reward = PersonalReward(personal_model_dir)
    prompts, replies = ["how do I cook rice"] * 2, ["Sure, rinse it.", "Whatever."]
    feats = reward.features(prompts, replies)  # φ = [h, v, cos, log length]: the generic head reads h
    generic = reward.rm.reward_from(feats[:, :reward.rm.head.in_features])
    table = reward.table
    for user in ("ann", "bob"):
        want = personal_rewards(generic, feats, table.basis, table.embedding(user).expand(2, -1))
        assert torch.allclose(reward.score(user, prompts, replies), want, atol=1e-6)
    assert torch.equal(reward.score("stranger", prompts, replies), reward.score(None, prompts, replies))
    # the generic reward is the backbone folder's own reward model: rm:DIR/backbone scores the same
    rm = load_scorer(f"rm:{personal_model_dir / 'backbone'}")
    assert torch.allclose(rm.score(prompts, replies), reward.score(None, prompts, replies), atol=1e-5)


def test_personal_scorer_spec(personal_model_dir):
    s = load_scorer(f"personal:{personal_model_dir}:ann")
    assert s.name.endswith(":ann@v0001") and s.higher_is_better
    reward = PersonalReward(personal_model_dir)
    prompts, replies = ["p", "p"], [personal_feedback_records({"x": "kind"}, 1)[0]["replies"][0], "Whatever."]
    assert torch.allclose(s.score(prompts, replies), reward.score("ann", prompts, replies))
    pinned = load_scorer(f"personal:{personal_model_dir}:bob@v0001")
    assert torch.allclose(pinned.score(prompts, replies), reward.score("bob", prompts, replies))


def test_cold_start_update_fits_a_new_user_and_leaves_everyone_else_unchanged(personal_model_dir, tmp_path):
    model = tmp_path / "prm"
    shutil.copytree(personal_model_dir, model)
    reward = PersonalReward(model)
    new = [FeedbackRecord.from_json(r) for r in personal_feedback_records({"cy": "kind"}, 6, seed=3)]
    probe = feedback_pairs([FeedbackRecord.from_json(r) for r in personal_feedback_records({"cy": "kind"}, 12, seed=4)])["cy"]
    prompts = [p.prompt for p in probe]
    texts = [p.chosen for p in probe] + [p.rejected for p in probe]
    before = {u: reward.score(u, prompts + prompts, texts) for u in ("ann", "bob")}
    assert torch.equal(reward.score("cy", prompts + prompts, texts), reward.score(None, prompts + prompts, texts))

    result = refit_user(reward, "cy", feedback_pairs(new)["cy"], holdout=0.2)
    assert result.deployed and result.version == "v0002" and result.train_pairs == 4 and result.heldout_pairs == 2
    assert result.accuracy_candidate == 1.0 and result.fit_seconds < 5
    assert accuracy(reward, "cy", probe) == 1.0  # six comparisons were enough
    for u in ("ann", "bob"):  # bit for bit: an update touches its own row only
        assert torch.equal(reward.score(u, prompts + prompts, texts), before[u])
    assert ModelDir(model).current() == "v0002" and reward.version == "v0002"
    log = ModelDir(model).read_log()
    assert log[-1]["user"] == "cy" and log[-1]["deployed"] and log[-1]["accuracy_candidate"] == 1.0


def test_a_worse_candidate_is_written_and_logged_but_not_deployed(personal_model_dir, tmp_path):
    model = tmp_path / "prm"
    shutil.copytree(personal_model_dir, model)
    reward = PersonalReward(model)
    # A candidate fitted on older "mean" choices, judged on ann's two most recent choices, which are
    # "kind" as her deployed row expects: the candidate is worse there.
    old = personal_feedback_records({"ann": "mean"}, 8, seed=5, start_time=2e9)
    recent = [{**r, "id": "recent-" + r["id"]} for r in personal_feedback_records({"ann": "kind"}, 2, seed=6, start_time=3e9)]
    pairs = feedback_pairs([FeedbackRecord.from_json(r) for r in old + recent])["ann"]
    train, held = split_heldout(pairs, 0.2)
    assert len(held) == 2 and all(p.extra["feedback_id"].startswith("recent-") for p in held)
    result = refit_user(reward, "ann", pairs, holdout=0.2)
    assert not result.deployed and result.accuracy_candidate < result.accuracy_deployed
    assert reward.version == "v0001" and ModelDir(model).current() == "v0001"
    assert (model / "versions" / result.version).is_dir()  # on record, not deployed
    assert ModelDir(model).read_log()[-1]["deployed"] is False
    forced = refit_user(reward, "ann", pairs, holdout=0.2, gate=False)
    assert forced.deployed and reward.version == forced.version


def test_update_reads_cached_features_not_the_backbone(personal_model_dir, tmp_path, monkeypatch):
    model = tmp_path / "prm"
    shutil.copytree(personal_model_dir, model)
    reward = PersonalReward(model)
    pairs = feedback_pairs([FeedbackRecord.from_json(r) for r in personal_feedback_records({"ann": "kind"}, 6)])["ann"]
    margins(reward, pairs, reward.table.basis)  # the training texts are cached already; these are the same texts
    calls = []
    real = pmodel.pooled_features
    monkeypatch.setattr(pmodel, "pooled_features", lambda *a: calls.append(1) or real(*a))
    margins(reward, pairs, reward.table.basis)
    assert calls == []
    margins(reward, [type(pairs[0])("a prompt never seen", "a new reply", "another new reply", {"user": "ann"})],
            reward.table.basis)
    # per new (prompt, reply): one backbone pass for the pair, one for the prompt alone, one for the reply alone
    assert len(calls) == 2 * 3


def _train_cfg(feedback: Path, out: Path, base: Path, **kw) -> PersonalTrainConfig:
    cfg = PersonalTrainConfig(feedback=str(feedback), out=str(out), base=str(base), dim=4, epochs=2, batch_size=8,
                              lr=1e-3, head_lr=1e-2, max_length=48, engine=EngineConfig(device="cpu", threads=1), seed=1, save_every=2, keep_checkpoints=20,
                              freeze_backbone=False, **{"user_part": "lowrank", "user_features": "pair", "prior": 1.0, **kw})
    cfg.validate()
    return cfg


def test_exact_resume(tiny_model_dir, tmp_path):
    feedback = write_jsonl(tmp_path / "f.jsonl", personal_feedback_records({"ann": "kind", "bob": "mean"}, 12))
    full = train_personal(_train_cfg(feedback, tmp_path / "full", tiny_model_dir))
    steps = sorted((tmp_path / "full" / "checkpoints").iterdir())
    assert len(steps) >= 2 and full["steps"] == int(steps[-1].name.split("-")[1])
    part = train_personal(_train_cfg(feedback, tmp_path / "resumed", tiny_model_dir, max_steps=2))
    assert part == {"steps": 2, "total_steps": full["steps"], "finished": False}
    assert not (tmp_path / "resumed" / "backbone").exists()  # nothing published by an interrupted run
    train_personal(_train_cfg(feedback, tmp_path / "resumed", tiny_model_dir))
    a, b = safetensors_weights(steps[-1] / "model"), safetensors_weights(tmp_path / "resumed" / "checkpoints" / steps[-1].name / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ua = safetensors_weights(tmp_path / "full" / "versions" / "v0001")
    ub = safetensors_weights(tmp_path / "resumed" / "versions" / "v0001")
    assert all(torch.equal(ua[k], ub[k]) for k in ua)
    # the one resume check of every trainer (rlhf.utils.checkpoint.check_resume_options): another option refuses,
    with pytest.raises(ConfigError, match=r"other options: --prior 1\.0 → 2\.0"):
        train_personal(_train_cfg(feedback, tmp_path / "resumed", tiny_model_dir, prior=2.0))
    # and so does more feedback in the same source (a database that grew)
    write_jsonl(feedback, personal_feedback_records({"ann": "kind", "bob": "mean"}, 14))
    with pytest.raises(ConfigError, match="other feedback"):
        train_personal(_train_cfg(feedback, tmp_path / "resumed", tiny_model_dir))


def test_frozen_backbone_training_and_cli_train_update(tiny_model_dir, tmp_path):
    feedback = write_jsonl(tmp_path / "f.jsonl", personal_feedback_records({"ann": "kind", "bob": "mean"}, 16))
    out = tmp_path / "prm"
    runner = CliRunner()
    res = runner.invoke(app, ["personal", "train", "--feedback", str(feedback), "--out", str(out), "--base", str(tiny_model_dir),
                              "--epochs", "20", "--batch-size", "8", "--head-lr", "3e-2", "--dim", "4",
                              "--max-length", "48", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    assert summary["freeze_backbone"] and summary["val"]["ann"]["personal"] == 1.0 and summary["val"]["bob"]["personal"] == 1.0
    before = safetensors_weights(tmp_path / "prm" / "backbone")
    newcomer = write_jsonl(tmp_path / "new.jsonl", personal_feedback_records({"dee": "mean"}, 5, seed=7))
    res = runner.invoke(app, ["personal", "update", "--model", str(out), "--feedback", str(newcomer)])
    assert res.exit_code == 0, res.output
    line = json.loads(res.stdout.strip().splitlines()[-1])
    assert line["user"] == "dee" and line["deployed"] and line["accuracy_candidate"] == 1.0
    after = safetensors_weights(tmp_path / "prm" / "backbone")
    assert all(torch.equal(before[k], after[k]) for k in before)  # the backbone is never retrained by an update
    res = runner.invoke(app, ["personal", "update", "--model", str(out), "--feedback", str(newcomer), "--user", "zed"])
    assert isinstance(res.exception, ConfigError) and "no feedback from user 'zed'" in str(res.exception)


def test_feature_cache_empties_itself_for_another_backbone(tmp_path):
    from rlhf.personal.model import FeatureCache

    cache = FeatureCache(tmp_path / "f.sqlite", "backbone-a")
    cache.put({"k": torch.tensor([1.0, 2.0])})
    assert torch.equal(FeatureCache(tmp_path / "f.sqlite", "backbone-a").get(["k"])["k"], torch.tensor([1.0, 2.0]))
    assert FeatureCache(tmp_path / "f.sqlite", "backbone-b").get(["k"]) == {}  # features of other weights are never served


@pytest.mark.slow
@pytest.mark.parametrize("freeze_backbone", [True, False], ids=["cached-features", "fine-tune"])
def test_personal_training_on_two_processes_equals_one(tiny_model_dir, tmp_path, freeze_backbone):
    """`accelerate launch --num_processes 2 -m rlhf personal train` takes the same steps as one process
    with the same global batch (tolerance and why: tests/test_distributed.py's docstring), with the
    generic draws made for the whole batch; one writer of metrics, checkpoints and the model."""
    from test_distributed import assert_same_metrics, close, launch, written_once

    from rlhf.utils.metrics import read_metrics

    feedback = write_jsonl(tmp_path / "f.jsonl", personal_feedback_records({"ann": "kind", "bob": "mean"}, 16))
    args = dict(feedback=str(feedback), base=str(tiny_model_dir), dim=4, epochs=2, batch_size=8, lr=1e-3, head_lr=1e-2,
                max_length=48, seed=1, save_every=2, generic_rate=0.5, user_part="lowrank", user_features="pair", prior=1.0)
    one = train_personal(PersonalTrainConfig(out=str(tmp_path / "one"), freeze_backbone=freeze_backbone, **args,
                                             engine=EngineConfig(device="cpu", threads=1)))
    flags = [x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]
    res = launch(["personal", "train", "--out", str(tmp_path / "two"), "--device", "cpu",
                  "--freeze-backbone" if freeze_backbone else "--no-freeze-backbone", *flags])
    written_once(tmp_path / "two", res.stdout)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert one["processes"] == 1 and two["steps"] == one["steps"] > 2
    assert two["user_pairs"] == one["user_pairs"] and two["val"].keys() == one["val"].keys()
    assert float(safetensors_weights(tmp_path / "one" / "versions" / "v0001")["user_table.safetensors/embeddings"].abs().max()) > 1e-3  # users trained
    for name in ("backbone", "versions/v0001"):  # shared weights and generic head; the user part (basis, embeddings)
        assert close(safetensors_weights(tmp_path / "one" / name), safetensors_weights(tmp_path / "two" / name)) < 1e-5
    assert_same_metrics(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), ("loss", "accuracy", "grad_norm", "user_norm"))
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts == sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir())


def test_pair_and_reply_features_are_what_they_say(personal_model_dir):
    """φ = [h, v, cos(u, v), log(1 + reply tokens)]: h the pair state, u and v each text encoded alone."""
    import torch.nn.functional as F

    from rlhf.personal.model import FeatureExtractor, pooled_features

    reward = PersonalReward(personal_model_dir)
    rm, tok = reward.rm, reward.tok
    width = rm.head.in_features
    prompt, reply = "how do I cook rice", "Rinse it, then simmer it covered."
    phi = FeatureExtractor(rm, tok, kind="pair+reply")([prompt], [reply])[0]
    pair = FeatureExtractor(rm, tok, kind="pair")([prompt], [reply])[0]

    def alone(text):
        enc = tok(text, truncation=True, max_length=rm.spec.max_length, return_tensors="pt")
        with torch.no_grad():
            return F.normalize(pooled_features(rm, dict(enc))[0], dim=0), enc["input_ids"].shape[1]

    u, _ = alone(prompt)
    v, n = alone(reply)
    assert phi.shape == (2 * width + 2,) and torch.allclose(phi[:width], pair, atol=1e-5)
    assert torch.allclose(phi[width:2 * width], v, atol=1e-5)
    assert abs(float(phi[2 * width]) - float(u @ v)) < 1e-5 and abs(float(phi[-1]) - math.log1p(n)) < 1e-6


def test_linear_rows_are_the_exact_map_fit_on_the_training_features(personal_model_dir):
    """Wiring: the generic head is fit_user_embedding on everyone's scaled pair-state differences (λ₀ recorded),
    each deployed row is fit_user_embedding on (cross-fitted generic margins, scaled feature differences) of
    that user's training pairs with the recorded λ, and B is the diagonal of the group scales."""
    from rlhf.algos import fit_user_embedding
    from rlhf.personal.model import feature_groups
    from rlhf.personal.train import split_recent
    from rlhf.personal.update import group_scales

    reward = PersonalReward(personal_model_dir)
    summary = json.loads((personal_model_dir / "summary.json").read_text())
    records = read_feedback(summary["config"]["feedback"])
    train, _ = split_recent(records, summary["config"]["val_fraction"])
    pairs = [p for r in train for p in r.pairs()]
    prompts = [p.prompt for p in pairs]
    fc, fr = reward.features(prompts, [p.chosen for p in pairs]), reward.features(prompts, [p.rejected for p in pairs])
    scales = group_scales(fc - fr, feature_groups(reward.rm, "pair+reply"))
    assert torch.allclose(reward.table.basis, torch.diag(scales))
    width, z = reward.rm.head.in_features, (fc - fr) * scales
    head = fit_user_embedding(torch.zeros(len(pairs)), z[:, :width], summary["generic_prior"])
    assert torch.allclose(reward.rm.head.weight[0], head * scales[:width], atol=1e-4)
    # each pair's generic margin comes from a head fitted without its record's fold (record k → fold k mod 5)
    ids = [p.extra["feedback_id"] for p in pairs]
    fold_of = {rid: k % 5 for k, rid in enumerate(dict.fromkeys(ids))}
    g = torch.zeros(len(pairs))
    for k in range(5):
        held = torch.tensor([fold_of[r] == k for r in ids])
        g[held] = z[held, :width] @ fit_user_embedding(torch.zeros(int((~held).sum())), z[~held, :width], summary["generic_prior"])
    for user in ("ann", "bob"):
        idx = [i for i, p in enumerate(pairs) if p.extra["user"] == user]
        want = fit_user_embedding(g[idx], z[idx], reward.config.prior_precision)
        assert torch.allclose(reward.table.embedding(user), want, atol=1e-4)
        assert reward.table.n_pairs(user) == len(idx)


def test_train_options_are_checked():
    with pytest.raises(ConfigError, match="--prior must be positive"):
        PersonalTrainConfig(feedback="f", out="o", user_part="lowrank", prior=0.0).validate()
    with pytest.raises(ConfigError, match="reads the pair state only"):
        PersonalTrainConfig(feedback="f", out="o", user_part="lowrank", prior=1.0, freeze_backbone=False).validate()
    with pytest.raises(ConfigError, match="--user-features must be one of pair, pair\\+reply"):
        PersonalTrainConfig(feedback="f", out="o", user_features="reply").validate()
    with pytest.raises(ConfigError, match="--user-part must be"):
        PersonalTrainConfig(feedback="f", out="o", user_part="mlp").validate()


def test_fit_row_in_the_span_of_few_pairs_is_the_full_fit():
    """Fewer pairs than dimensions: the SVD-reduced fit gives the full MAP row, warm start or not."""
    from rlhf.algos import fit_user_embedding
    from rlhf.personal.update import fit_row

    torch.manual_seed(4)
    g, z = 0.5 * torch.randn(6), torch.randn(6, 20)
    full = fit_user_embedding(g, z, 0.7)
    assert torch.allclose(fit_row(g, z, 0.7), full, atol=1e-5)
    assert torch.allclose(fit_row(g, z, 0.7, init=torch.randn(20)), full, atol=1e-5)
    g2, z2 = torch.randn(30), torch.randn(30, 20)  # more pairs than dimensions: the plain fit itself
    assert torch.equal(fit_row(g2, z2, 0.7), fit_user_embedding(g2, z2, 0.7))


def test_lowrank_part_on_frozen_pair_and_reply_features(tiny_model_dir, tmp_path):
    """--user-part lowrank reads the wider features too when the backbone is frozen: B is [D, 2H + 2]."""
    feedback = write_jsonl(tmp_path / "f.jsonl", personal_feedback_records({"ann": "kind", "bob": "mean"}, 16))
    cfg = PersonalTrainConfig(feedback=str(feedback), out=str(tmp_path / "prm"), base=str(tiny_model_dir), dim=4, prior=1.0,
                              user_part="lowrank", user_features="pair+reply", epochs=20, batch_size=8, head_lr=3e-2,
                              max_length=48, seed=0, engine=EngineConfig(device="cpu", threads=1))
    cfg.validate()
    summary = train_personal(cfg)
    reward = PersonalReward(tmp_path / "prm")
    assert reward.table.basis.shape == (4, 2 * reward.rm.head.in_features + 2) and summary["steps"] > 0
    assert reward.config.user_part == "lowrank" and reward.config.prior_precision == 1.0
    val = summary["val"]  # each user's held-out choices: their own reward gets them; one reward for both cannot
    assert all(val[u]["personal"] >= 0.75 for u in ("ann", "bob")), val
    assert sum(val[u]["personal"] for u in val) > sum(val[u]["generic"] for u in val), val
