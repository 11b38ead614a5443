"""Joint training of the personal reward model: backbone, generic head and user part on everyone's feedback.

Two user parts (rlhf/personal/model.py). ``lowrank``: each pair is scored with its user's reward
r_u = r₀ + e_uᵀBφ, except a share ``generic_rate`` of the pairs (drawn afresh each step), which are
scored with r₀ alone: that keeps r₀ a reward for everyone (what a new user gets) rather than a
leftover, as P-RLHF does by sometimes hiding who the user is. The loss is
``rlhf.algos.personal_preference_loss``: Bradley-Terry under the user's reward plus a Gaussian prior
on each e_u, the same objective ``rlhf personal update`` later minimises for one user with everything
else fixed. ``linear`` (the default; frozen backbone only): no gradient steps. On the cached features,
r₀'s head is the exact MAP logistic regression on everyone's pairs (the pooled reward: what a new
user gets) and every user's row is the per-user objective above solved exactly on top of it (margins
cross-fitted so that the head has not seen the pairs it scores), with B = diag(group scales); both
prior precisions are chosen by cross-validation on the training comparisons (``--prior 0``), and a
later ``update`` fits a user the same way (fit_linear).

Every user's most recent ``val_fraction`` of feedback records is held out (by record, so the pairs
of one choice never sit on both sides), and the summary gives each user's held-out accuracy under
their own reward and under the generic one.

Exact resume as in ``rlhf reward train``: each epoch's order and each step's generic draws are
functions of (seed, epoch, step); checkpoints hold weights, user part, optimizer, scheduler and RNG.

Several processes (``accelerate launch --num_processes N -m rlhf personal train``) as in reward
training (rlhf/engine/distributed.py): the generic draws are made for the whole batch, each process
scores its share, DDP averages the gradients, and only the main process writes checkpoints, the
feature cache (first; the others then read it), metrics and the published model.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf.algos import personal_preference_loss, personal_rewards
from rlhf.config import config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError, TrainingError
from rlhf.models.loading import disable_dropout
from rlhf.models.reward_model import (RewardEncoder, collate, load_weights_into, new_reward_model, pad_id_of,
                                      save_reward_model)
from rlhf.personal.model import (USER_FEATURES, FeatureCache, FeatureExtractor, ModelDir, PersonalConfig,
                                 PersonalRewardModel, UserTable, cache_fingerprint, feature_groups, feature_width,
                                 generic_reward)
from rlhf.personal.update import choose_prior, cross_fitted_margins, fit_row, group_scales
from rlhf.personal.records import FeedbackRecord, read_feedback
from rlhf.train.optim import adamw
from rlhf.train.reward import TruncationStats, _lr_lambda, encode_pairs, epoch_batches, freeze_lower, pair_metrics
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir
from rlhf.utils.metrics import MetricsLogger, peak_rss_mb
from rlhf.utils.seed import rng_state, seed_everything, set_rng_state

USER_PART_FILE = "user_part.safetensors"


@dataclass
class PersonalTrainConfig:
    """Train a personal reward model (shared backbone + generic head + per-user part) on everyone's feedback."""

    # Options a resumed run may change: --max-steps only stops earlier or later (the schedule spans
    # all epochs), --save-every only adds checkpoints. Everything else must match the checkpoint's.
    resume_free: ClassVar[tuple[str, ...]] = ("max_steps", "save_every")
    feedback: str = opt(help="Personal feedback: a labeling database (.sqlite) holding chat choices, or a JSON Lines "
                             "file of feedback records (`rlhf personal export`).")
    out: str = opt(help="Output folder: backbone/, versions/, current.json, features.sqlite, checkpoints/, metrics.jsonl, summary.json.")
    base: str = opt("minilm", help="Backbone: 'minilm' (packaged all-MiniLM-L6-v2), 'bundled', or a local HF folder.")
    user_part: str = opt("linear", help="'linear': each user a linear reward on the features, fitted exactly (MAP) on top of "
                                         "the generic reward; 'lowrank': a D-dimensional row on a basis learned jointly.")
    user_features: str = opt("pair+reply", help="What the user part reads: 'pair' (the generic head's pooled (prompt, reply) "
                                                "state) or 'pair+reply' (also the reply and prompt encoded on their own: "
                                                "the reply's embedding, its similarity to the prompt, its length).")
    dim: int = opt(8, help="Dimension D of a 'lowrank' user part: users are points in a D-dimensional space of reward "
                           "directions ('linear': D is the feature width).")
    prior: float = opt(0.0, help="Prior precision λ on each user's row (higher: users stay nearer the generic reward); 0 = "
                                 "choose it by cross-validation on the training comparisons ('linear' only).")
    generic_rate: float = opt(0.25, help="(lowrank) Share of pairs scored with the generic reward alone in each step, so that it stays "
                                         "everyone's reward (what a new user starts from). 1 = a pooled reward model: "
                                         "no pair is scored with a user part, which then never trains.")
    epochs: float = opt(3.0, help="(lowrank) Passes over the training pairs; a linear part takes no steps.")
    batch_size: int = opt(16, help="Pairs per optimizer step (fewer when there are fewer training pairs).")
    lr: float = opt(3e-5, help="Peak learning rate of the backbone (AdamW), warmup then linear decay.")
    head_lr: float = opt(3e-3, help="Peak learning rate of the generic head, the basis B and the user embeddings.")
    freeze_backbone: bool = opt(True, help="Keep the pretrained backbone fixed and train the generic head and the user part on "
                                           "its cached features (seconds). Off: fine-tune the backbone jointly, which needs far "
                                           "more comparisons than users give (benchmarks/RESULTS.md).")
    freeze_layers: int = opt(0, help="Keep the lowest N transformer layers fixed (and the embeddings).")
    weight_decay: float = opt(0.01, help="AdamW weight decay of the backbone and generic head (the prior regularises users).")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")
    max_length: int = opt(128, help="Tokens per (prompt, reply); longer inputs lose the left end of the prompt.")
    val_fraction: float = opt(0.2, help="Each user's most recent share of feedback records held out for validation (0 = none).")
    warmup_ratio: float = opt(0.1, help="Share of the steps spent warming the learning rate up.")
    dropout: bool = opt(False, help="Keep the backbone's dropout in training.")
    keep_checkpoints: int = opt(2, help="How many recent checkpoints to keep.")
    save_every: int = opt(0, help="Checkpoint every N steps (0 = once per epoch).")
    seed: int = opt(0, help="Random seed (order, generic draws, basis initialisation).")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, ...).")
    resume: bool = opt(True, help="Continue from the last checkpoint in --out if there is one.")
    max_steps: int = opt(0, help="Stop after this many steps (0 = all epochs); the schedule still spans all epochs.")

    def validate(self) -> None:
        if self.dim < 1 or self.batch_size < 1 or self.epochs <= 0:
            raise ConfigError("--dim and --batch-size must be at least 1 and --epochs positive")
        if self.user_part not in ("linear", "lowrank"):
            raise ConfigError(f"--user-part must be 'linear' or 'lowrank', got {self.user_part!r}")
        if self.user_features not in USER_FEATURES:
            raise ConfigError(f"--user-features must be one of {', '.join(USER_FEATURES)}, got {self.user_features!r}")
        if self.prior < 0 or (self.prior == 0 and self.user_part == "lowrank"):
            raise ConfigError("--prior must be positive (0, choose by cross-validation, needs --user-part linear)")
        if self.user_part == "linear" and not self.freeze_backbone:
            raise ConfigError("a 'linear' user part is an exact fit on frozen features: use --freeze-backbone, or "
                              "--user-part lowrank (learned jointly with the backbone) with a positive --prior")
        if self.user_part == "lowrank" and self.user_features != "pair" and not self.freeze_backbone:
            raise ConfigError("a 'lowrank' user part trained with the backbone reads the pair state only: "
                              "use --user-features pair, or --freeze-backbone")
        if not 0 <= self.generic_rate <= 1 or not 0 <= self.val_fraction < 1:
            raise ConfigError("--generic-rate must be in [0, 1] and --val-fraction in [0, 1)")
        if self.max_steps < 0 or self.save_every < 0 or self.freeze_layers < 0:
            raise ConfigError("--max-steps, --save-every and --freeze-layers must not be negative")


def split_recent(records: list[FeedbackRecord], fraction: float) -> tuple[list[FeedbackRecord], list[FeedbackRecord]]:
    """Per user, the oldest records for training and the most recent ``fraction`` (at least one, when
    the user has two or more) held out: validation looks at what the user wants now."""
    by_user: dict[str, list[FeedbackRecord]] = {}
    for r in sorted(records, key=lambda r: r.time):
        by_user.setdefault(r.user, []).append(r)
    train, val = [], []
    for recs in by_user.values():
        k = min(len(recs) - 1, math.ceil(fraction * len(recs))) if fraction > 0 else 0
        train += recs[:len(recs) - k]
        val += recs[len(recs) - k:]
    return train, val


def _pairs_with_users(records: list[FeedbackRecord]) -> list:
    return [p for r in records for p in r.pairs()]


def user_accuracies(scores_c: torch.Tensor, scores_r: torch.Tensor, pairs: list) -> dict[str, dict]:
    """Per user: accuracy (ties half) and pair count, from rewards of chosen and rejected replies [N]."""
    out = {}
    for user in sorted({p.extra["user"] for p in pairs}):
        idx = [i for i, p in enumerate(pairs) if p.extra["user"] == user]
        m = pair_metrics(scores_c[idx], scores_r[idx], [pairs[i] for i in idx])
        out[user] = {"accuracy": m["accuracy"], "pairs": m["pairs"]}
    return out


class PersonalForward(nn.Module):
    """The call DDP wraps (its gradient hooks are armed by a forward through the wrapper): rewards and
    embeddings from cached backbone features [B, H] or from a token batch, for user rows [B]."""

    def __init__(self, model: PersonalRewardModel):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor | dict[str, torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(inputs, torch.Tensor):
            return self.model.from_features(inputs, rows)
        return self.model(inputs, rows)


def train_personal(cfg: PersonalTrainConfig) -> dict | None:
    """Run joint training; returns the summary also written to ``out/summary.json`` (on the main
    process; the others return None)."""
    rt = start(cfg.engine)
    dist = rt.dist
    out, mdir = Path(cfg.out), ModelDir(cfg.out)
    seed_everything(cfg.seed)
    records = read_feedback(cfg.feedback)
    train_recs, val_recs = split_recent(records, cfg.val_fraction)
    train_pairs, val_pairs = _pairs_with_users(train_recs), _pairs_with_users(val_recs)
    if not train_pairs:
        raise ConfigError(f"{cfg.feedback}: no comparisons to train on ({len(records)} feedback records; "
                          "'both bad' without an edit gives none)")
    names = sorted({p.extra["user"] for p in train_pairs})
    row_of = {n: i for i, n in enumerate(names)}
    counts = torch.tensor([sum(p.extra["user"] == n for p in train_pairs) for n in names], dtype=torch.float32)
    train_rows = torch.tensor([row_of[p.extra["user"]] for p in train_pairs])

    device = rt.device
    rm, tok, spec = new_reward_model(cfg.base, max_length=cfg.max_length, seed=cfg.seed, device=device)
    if not cfg.dropout:
        disable_dropout(rm)
    width = feature_width(rm, cfg.user_features) if cfg.freeze_backbone else rm.head.in_features
    model = PersonalRewardModel(rm, len(names), cfg.dim, cfg.seed, width).to(device)
    if cfg.freeze_backbone:
        for p in rm.backbone.parameters():
            p.requires_grad_(False)
    frozen = freeze_lower(rm.backbone, cfg.freeze_layers > 0, cfg.freeze_layers) if not cfg.freeze_backbone else 0
    pad_id, trunc = pad_id_of(tok), TruncationStats()
    train_enc = encode_pairs(RewardEncoder(tok, spec), train_pairs, trunc)
    cached = None
    if cfg.freeze_backbone:  # the backbone never changes: its features once (cached in --out), then head-only steps
        def features() -> tuple[torch.Tensor, torch.Tensor]:
            extract = FeatureExtractor(rm, tok, FeatureCache(out / "features.sqlite", cache_fingerprint(rm, cfg.user_features)),
                                       kind=cfg.user_features)
            prompts = [p.prompt for p in train_pairs]
            return extract(prompts, [p.chosen for p in train_pairs]), extract(prompts, [p.rejected for p in train_pairs])

        with dist.main_first() as main:  # one writer of the cache; the other processes then read it
            if main:
                cached = features()
        if cached is None:
            cached = features()
    if cfg.user_part == "linear":  # exact fits on the cached features: seconds, no steps to checkpoint or resume
        if not dist.is_main:
            return None
        t0 = time.perf_counter()
        table, fitted = fit_linear(rm, cached[0].double(), cached[1].double(), train_pairs, names, cfg.prior,
                                   feature_groups(rm, cfg.user_features))
        return _publish(cfg, mdir, table, rm, tok, names, counts, train_pairs, val_pairs, len(records), 0,
                        time.perf_counter() - t0, frozen, trunc, dist.world_size, fitted)

    batch_size = min(cfg.batch_size, len(train_pairs))
    dist.local_rows(batch_size, "--batch-size")  # must split evenly over the processes
    steps_per_epoch = len(train_pairs) // batch_size
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    run_until = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    save_every = cfg.save_every or steps_per_epoch
    backbone_params = [p for p in rm.backbone.parameters() if p.requires_grad]
    groups = [{"params": list(rm.head.parameters()), "lr": cfg.head_lr, "weight_decay": cfg.weight_decay},
              {"params": [model.basis, model.embeddings], "lr": cfg.head_lr, "weight_decay": 0.0}]
    if backbone_params:
        groups.insert(0, {"params": backbone_params, "lr": cfg.lr, "weight_decay": cfg.weight_decay})
    optim = adamw(groups, device, lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(int(cfg.warmup_ratio * total_steps), total_steps))
    forward, optim = dist.prepare(PersonalForward(model), optim)
    if dist.world_size > 1:  # the same weights everywhere (DDP broadcast them); dropout differs by process
        seed_everything(cfg.seed + 1_000_003 * dist.rank)
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)
    say = (lambda msg: print(msg, file=sys.stderr)) if dist.is_main else (lambda msg: None)

    step = 0
    latest = ckpts.latest() if cfg.resume else None
    if latest is not None:
        state = ckpts.load_state(latest)
        check_resume_options(latest, cfg, state.get("config"))
        if (state.get("total_steps"), state.get("train_pairs"), state.get("users")) != (total_steps, len(train_pairs), names):
            raise ConfigError(f"{latest} was written by a run with other feedback "
                              f"({state.get('train_pairs')} pairs, {state.get('total_steps')} steps); use another --out or --no-resume")
        load_weights_into(rm, latest / "model")
        _load_user_part(model, latest / USER_PART_FILE)
        ts = ckpts.load_trainer_state(latest)
        optim.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        per_process = ts.get("rng_per_process") or [ts["rng"]]
        if len(per_process) != dist.world_size:
            say(f"{latest} was written by {len(per_process)} process(es), this run has {dist.world_size}: the data "
                "order, generic draws and weights resume exactly, dropout's random streams start afresh")
        set_rng_state(per_process[dist.rank] if len(per_process) == dist.world_size else ts["rng"])
        step = state["step"]
        say(f"resuming from {latest} (step {step} of {total_steps})")

    def checkpoint(at: int) -> None:
        def write(folder: Path) -> None:
            save_reward_model(rm, tok, folder / "model")
            _save_user_part(model, folder / USER_PART_FILE)

        rngs = dist.gather_objects(rng_state())  # every process's dropout stream, for an exact resume
        with dist.main_first() as main:
            if main:
                ckpts.save(at, write, {"total_steps": total_steps, "train_pairs": len(train_pairs), "users": names,
                                       "config": config_to_dict(cfg), "processes": dist.world_size},
                           {"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "rng": rngs[0],
                            "rng_per_process": rngs})

    logger = MetricsLogger(out, resume_step=step if latest is not None else None) if dist.is_main else None
    bar = tqdm(total=run_until, initial=step, desc="personal reward", unit="step", disable=not dist.is_main)
    params = [p for g in groups for p in g["params"]]
    t0 = time.perf_counter()
    forward.train()
    while step < run_until:
        epoch, within = divmod(step, steps_per_epoch)
        batch_ids = epoch_batches(train_enc, batch_size, cfg.seed, epoch)[within]
        rows = train_rows[batch_ids].clone()
        draw = torch.rand(len(batch_ids), generator=torch.Generator().manual_seed(cfg.seed * 7919 + step))
        rows[draw < cfg.generic_rate] = -1  # scored generically this step (drawn for the whole batch)
        share = dist.local_rows(len(batch_ids), "--batch-size")  # this process's pairs of the batch
        ids, rows = batch_ids[share], rows[share]
        rows2 = torch.cat([rows, rows]).to(device)
        if cached is not None:
            rewards, emb = forward(torch.cat([cached[0][ids], cached[1][ids]]).to(device), rows2)
        else:
            items = [train_enc[i][0] for i in ids] + [train_enc[i][1] for i in ids]  # chosen..., rejected...
            rewards, emb = forward({k: v.to(device) for k, v in collate(items, pad_id).items()}, rows2)
        n = len(ids)
        user_pairs = counts[train_rows[ids]].to(device)
        loss = personal_preference_loss(rewards[:n], rewards[n:], emb[:n], user_pairs, cfg.prior)
        dist.backward(loss / dist.world_size)  # this process's share of the batch mean
        grad_norm = dist.clip_grad_norm_(forward, params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        with torch.no_grad():  # batch means over every process (equal shares)
            stats = dist.sum(torch.stack([loss.detach(), (rewards[:n] > rewards[n:]).float().mean()])) / dist.world_size
        if not torch.isfinite(stats[0]):
            raise TrainingError(f"non-finite loss at step {step + 1}; the last good checkpoint is kept in {ckpts.root}. "
                                "Try a lower --lr or --head-lr.")
        optim.step()
        optim.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        if logger is not None:
            logger.log(step, {"loss": float(stats[0]), "accuracy": float(stats[1]), "grad_norm": float(grad_norm),
                              "lr": sched.get_last_lr()[0], "user_norm": float(model.embeddings.detach().norm(dim=1).mean()),
                              "epoch": step / steps_per_epoch})
        bar.update(1)
        bar.set_postfix(loss=f"{float(stats[0]):.3f}")
        if step % save_every == 0 or step == run_until:
            checkpoint(step)
    bar.close()
    if logger is not None:
        logger.close()
    elapsed = time.perf_counter() - t0
    if not dist.is_main:
        return None
    if step < total_steps:  # stopped early on purpose (--max-steps): checkpointed, nothing published
        return {"steps": step, "total_steps": total_steps, "finished": False}
    return _publish(cfg, mdir, model.table(names, [int(c) for c in counts]), rm, tok, names, counts, train_pairs, val_pairs,
                    len(records), step, elapsed, frozen, trunc, dist.world_size)


def _publish(cfg, mdir: ModelDir, table: UserTable, rm, tok, names, counts, train_pairs, val_pairs, n_records: int,
             step: int, elapsed: float, frozen: int, trunc: TruncationStats, processes: int = 1,
             fitted: dict | None = None) -> dict:
    """Write backbone, config, features of every text seen, the first user-table version (deployed), summary."""
    staged = staging_dir(mdir.backbone)
    try:
        save_reward_model(rm, tok, staged)
        publish_dir(staged, mdir.backbone)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    extract = FeatureExtractor(rm, tok, FeatureCache(mdir.root / "features.sqlite", cache_fingerprint(rm, cfg.user_features)),
                               kind=cfg.user_features)
    fitted = fitted or {"prior": cfg.prior}
    mdir.write_config(PersonalConfig(dim=table.dim, prior_precision=fitted["prior"], user_part=cfg.user_part,
                                     user_features=cfg.user_features))
    val = {}
    if val_pairs:
        prompts = [p.prompt for p in val_pairs]
        fc, fr = extract(prompts, [p.chosen for p in val_pairs]), extract(prompts, [p.rejected for p in val_pairs])
        with torch.no_grad():
            g_c, g_r = generic_reward(rm, fc).cpu(), generic_reward(rm, fr).cpu()
            emb = torch.stack([table.embedding(p.extra["user"]) for p in val_pairs])
            p_c, p_r = personal_rewards(g_c, fc, table.basis, emb), personal_rewards(g_r, fr, table.basis, emb)
        mine, generic = user_accuracies(p_c, p_r, val_pairs), user_accuracies(g_c, g_r, val_pairs)
        val = {u: {"personal": mine[u]["accuracy"], "generic": generic[u]["accuracy"], "pairs": mine[u]["pairs"]} for u in mine}
    prompts = [p.prompt for p in train_pairs]
    extract(prompts, [p.chosen for p in train_pairs])
    extract(prompts, [p.rejected for p in train_pairs])
    version = mdir.write_version(table, {"parent": None, "source": "train", "steps": step})
    mdir.deploy(version)
    mdir.log({"version": version, "source": "train", "deployed": True, "time": time.time(), "users": names,
              "val_accuracy": val})
    summary = {"model": str(mdir.root), "version": version, "users": names, "user_pairs": dict(zip(names, map(int, counts))),
               "records": n_records, "train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "val": val,
               "steps": step, "seconds": round(elapsed, 2), "frozen_weights": frozen, "freeze_backbone": cfg.freeze_backbone,
               "user_part": cfg.user_part, "user_features": cfg.user_features, "prior": fitted["prior"],
               "generic_prior": fitted.get("generic_prior"),
               "prior_cv_loglik": {str(k): round(v, 5) for k, v in fitted.get("cv", {}).items()},
               "generic_prior_cv_loglik": {str(k): round(v, 5) for k, v in fitted.get("generic_cv", {}).items()},
               "truncation": {"sequences": trunc.sequences, "prompts_cut": trunc.prompts_cut, "replies_cut": trunc.replies_cut},
               "processes": processes, "peak_rss_mb": round(peak_rss_mb())}
    atomic_write_json(mdir.root / "summary.json", {**summary, "config": config_to_dict(cfg)})
    return summary


def fit_linear(rm, fc: torch.Tensor, fr: torch.Tensor, train_pairs: list, names: list[str], prior: float,
               groups: list[slice]) -> tuple[UserTable, dict]:
    """The 'linear' model by exact MAP fits on frozen features φ of the chosen [N, F] and rejected [N, F] replies.

    The generic head: a logistic regression on the scaled pair state (its bias cancels in every
    comparison and is set to 0), its prior λ₀ chosen by cross-validation over everyone's pairs. Each
    user's row: the same on all of φ, on top of the generic margins cross-fitted by record folds
    (:func:`~rlhf.personal.update.cross_fitted_margins`), with B = diag(group scales) and one λ for all
    users, ``prior`` or chosen by cross-validation (0). Writes the head into ``rm``; returns the table
    and {"generic_prior", "prior", "generic_cv", "cv"} (cross-validated mean log-likelihood per λ)."""
    width = rm.head.in_features
    d = (fc - fr).double()
    scales = group_scales(d, groups)
    z = (d * scales).float()  # = (φ_c − φ_r) Bᵀ with B = diag(scales)
    ids = [p.extra.get("feedback_id") for p in train_pairs]
    everyone = [(torch.zeros(len(d), dtype=torch.float64), z[:, :width], ids)]
    generic_prior, generic_cv = choose_prior(everyone)
    w = fit_row(torch.zeros(len(d)), z[:, :width], generic_prior)
    with torch.no_grad():
        rm.head.weight.copy_((w * scales[:width]).to(rm.head.weight)[None])
        if rm.head.bias is not None:
            rm.head.bias.zero_()
    g = cross_fitted_margins(z[:, :width], ids, generic_prior)
    per_user = []
    for name in names:
        idx = [i for i, p in enumerate(train_pairs) if p.extra["user"] == name]
        per_user.append((g[idx], z[idx], [ids[i] for i in idx]))
    cv = {}
    if prior == 0:
        prior, cv = choose_prior(per_user)
    rows = torch.stack([fit_row(gu, zu, prior) for gu, zu, _ in per_user])
    table = UserTable(torch.diag(scales.float()), list(names), rows, [len(u[2]) for u in per_user])
    return table, {"generic_prior": generic_prior, "prior": prior, "generic_cv": generic_cv, "cv": cv}


def _save_user_part(model: PersonalRewardModel, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({"basis": model.basis.detach().cpu().contiguous(), "embeddings": model.embeddings.detach().cpu().contiguous()},
              str(path))


def _load_user_part(model: PersonalRewardModel, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError(f"checkpoint {path.parent} has no {USER_PART_FILE}")
    state = load_file(str(path))
    with torch.no_grad():
        model.basis.copy_(state["basis"])
        model.embeddings.copy_(state["embeddings"])
