"""Pairwise reward-model training: −log σ(r_chosen − r_rejected) over human (or scripted) comparisons.

Follows Ouyang et al. 2022 (InstructGPT §3.5) with one difference for small CPUs: both replies of a
pair go through the model in one batch of 2B sequences rather than all K·(K−1)/2 pairs of a prompt
at once. Optional margin (Llama 2) and reward-centering (Eisenstein et al. 2023) come from
``rlhf.algos.bradley_terry_loss``, the one copy of the loss.

Exact resume: each epoch's order is a function of (seed, epoch); checkpoints hold the weights,
optimizer, scheduler, RNG and early-stopping state, so a killed run restarted with the same options
ends with the same weights as an uninterrupted one. The validation split groups pairs by prompt, so
pairs from one ranking never sit on both sides of it.

Under ``accelerate launch`` each process takes a contiguous share of every batch of pairs, and
gradients are averaged across processes (rlhf/engine/distributed.py); validation is split over
the processes too, and only the main process writes.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
from tqdm.auto import tqdm

from rlhf.algos import bradley_terry_loss, pairwise_accuracy
from rlhf.config import config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.distributed import Distributed
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError, DataError, TrainingError
from rlhf.models.packing import RewardForward, packing_problem
from rlhf.models.reward_model import (Encoded, RewardEncoder, load_weights_into, new_reward_model, pad_id_of,
                                      save_reward_model, score_encoded)
from rlhf.train.optim import adamw
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir
from rlhf.utils.metrics import MetricsLogger, peak_rss_mb
from rlhf.utils.seed import rng_state, seed_everything, set_rng_state


@dataclass
class RewardTrainConfig:
    """Train a reward model on preference pairs (pairs files, HH dialogues, or rankings files).

    The defaults are the recipe benchmarks/reward_hh.py measured best for the packaged MiniLM on
    real human pairs (hh-harmless: 64.3% held-out accuracy in 3.4 min and 2.6 GB on 2 cores):
    lr 1e-4 with a 3e-3 head, 128 tokens, the lowest 2 layers frozen, validation every 25 steps.
    """

    pairs: str = opt(help="Training comparisons: a pairs file (ours, TRL or Anthropic-HH layout) or a rankings file.")
    out: str = opt(help="Output folder: model/ (the reward model), checkpoints/, metrics.jsonl, summary.json.")
    base: str = opt("minilm", help="Backbone: 'minilm' (packaged all-MiniLM-L6-v2 encoder), 'bundled' (the tiny "
                                   "causal LM), or any local Hugging Face causal-LM or encoder folder.")
    val_pairs: str | None = opt(None, help="Validation comparisons; without it --val-fraction of the prompts is held out.")
    val_fraction: float = opt(0.1, help="Share of prompts held out for validation when --val-pairs is not given (0 = none).")
    epochs: float = opt(2.0, help="Passes over the training pairs (fractions allowed).")
    batch_size: int = opt(16, help="Pairs per optimizer step, over all processes (each pair is two sequences).")
    lr: float = opt(1e-4, help="Peak learning rate (AdamW), reached after warmup, then linear decay to 0.")
    head_lr: float = opt(3e-3, help="Peak learning rate of the reward head (0 = --lr). The head starts at zero, so at "
                                   "the backbone's small rate the rewards stay near 0 for many steps.")
    freeze_embeddings: bool = opt(False, help="Keep the token embeddings fixed (fewer trainable weights, faster steps).")
    freeze_layers: int = opt(2, help="Keep the lowest N transformer layers (and the embeddings) fixed: no backward "
                                     "through them, a third less memory. 2 suits the 6-layer MiniLM; use 0 for a "
                                     "backbone with few layers, where freezing all of them leaves only the head to train.")
    warmup_ratio: float = opt(0.1, help="Share of the optimizer steps spent warming the learning rate up.")
    weight_decay: float = opt(0.01, help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")
    max_length: int = opt(128, help="Tokens per (prompt, reply); longer inputs lose the left end of the prompt, never the reply.")
    margin: float = opt(0.0, help="Margin the chosen reward should beat the rejected one by (0 = plain Bradley-Terry).")
    center_coef: float = opt(0.0, help="Weight of the reward-centering term E[(r_c + r_r)^2] (0 = off).")
    backbone_kind: str = opt("auto", help="auto, causal (reward at the last token) or encoder (pooled states).")
    pooling: str = opt("auto", help="auto, last, mean, cls or pooler (auto: last for causal LMs, mean for encoders; "
                                    "pooler = the first token through the encoder's pooler layer, as BertForSequenceClassification).")
    lora: bool = opt(False, help="Train LoRA adapters (peft) and the head instead of all weights; merged at the end.")
    lora_r: int = opt(16, help="LoRA rank.")
    lora_alpha: int = opt(32, help="LoRA scaling numerator (alpha / r scales the update).")
    dropout: bool = opt(True, help="Keep the backbone's dropout during training (off: deterministic forward passes).")
    eval_every: int = opt(25, help="Validate (and checkpoint) every N optimizer steps, keeping the best; 0 = at the end of each epoch.")
    patience: int = opt(0, help="Stop after this many validations without a better accuracy (0 = never stop early).")
    eval_batch_size: int = opt(64, help="Sequences per forward pass when validating.")
    skip_bad_pairs: bool = opt(False, help="Skip and count malformed pairs (empty or one-sided, identical replies) "
                                           "instead of stopping at the first.")
    keep_checkpoints: int = opt(2, help="How many recent checkpoints to keep.")
    seed: int = opt(0, help="Random seed (split, data order, head initialisation, dropout).")
    resume: bool = opt(True, help="Continue from the last checkpoint in --out if there is one.")
    max_steps: int = opt(0, help="Stop after this many optimizer steps (0 = run all epochs); the schedule still spans all epochs.")
    # May change on resume (rlhf/utils/checkpoint.py): how far to go, and how (not what) to compute.
    resume_free: ClassVar[tuple[str, ...]] = ("max_steps", "eval_batch_size")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, packing, ...).")
    soft_targets: bool = opt(True, help="Train pairs that carry a 'probability' (AI feedback) toward it: Bradley-Terry "
                                        "against P(chosen preferred) instead of 1.")

    def validate(self) -> None:
        if self.batch_size < 1 or self.eval_batch_size < 1:
            raise ConfigError("--batch-size and --eval-batch-size must be at least 1")
        if self.epochs <= 0:
            raise ConfigError("--epochs must be positive")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 8:
            raise ConfigError("--max-length must be at least 8")
        if self.patience < 0 or self.eval_every < 0 or self.max_steps < 0 or self.freeze_layers < 0 or self.head_lr < 0:
            raise ConfigError("--patience, --eval-every, --max-steps, --freeze-layers and --head-lr must not be negative")
        if self.pooling not in ("auto", "last", "mean", "cls", "pooler"):
            raise ConfigError(f"--pooling must be auto, last, mean, cls or pooler, got {self.pooling!r}")
        if self.backbone_kind not in ("auto", "causal", "encoder"):
            raise ConfigError(f"--backbone-kind must be auto, causal or encoder, got {self.backbone_kind!r}")


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

def read_pairs(path: str, skip_bad: bool) -> tuple[list, list[str]]:
    """Pairs from any supported file; returns (pairs, messages of skipped records)."""
    from rlhf.data.pairs import load_pairs

    if not Path(path).exists():
        raise ConfigError(f"pairs file {path} not found")
    skipped: list[str] = []
    try:
        pairs = load_pairs(path, on_error="skip" if skip_bad else "raise", skipped=skipped)
    except DataError as exc:
        if exc.line is None:
            raise
        raise DataError(exc.path, exc.line, f"{str(exc).split(': ', 1)[-1]} (use --skip-bad-pairs to skip and count such records)") from None
    if not pairs:
        raise DataError(path, None, f"no usable pairs ({len(skipped)} skipped)" if skipped else "no pairs in the file")
    return pairs, skipped


def _target(pair) -> float:
    """A pair's soft label: its labeler's P(chosen preferred), or 1 for a hard (human) choice."""
    return 1.0 if pair.probability is None else pair.probability


def split_by_prompt(pairs: list, fraction: float, seed: int) -> tuple[list, list]:
    """Hold out about ``fraction`` of the prompts (all their pairs) for validation, chosen by a seeded hash."""
    if fraction <= 0:
        return pairs, []
    def bucket(prompt: str) -> float:
        h = hashlib.sha256(f"{seed}\0{prompt}".encode("utf-8")).digest()
        return int.from_bytes(h[:8], "big") / 2**64
    train = [p for p in pairs if bucket(p.prompt) >= fraction]
    val = [p for p in pairs if bucket(p.prompt) < fraction]
    if not train or not val:
        raise ConfigError(f"--val-fraction {fraction} leaves {len(train)} training and {len(val)} validation pairs; "
                          "give --val-pairs or more data")
    return train, val


@dataclass
class TruncationStats:
    sequences: int = 0
    prompts_cut: int = 0
    replies_cut: int = 0

    def add(self, e: Encoded) -> None:
        self.sequences += 1
        self.prompts_cut += int(e.prompt_cut)
        self.replies_cut += int(e.reply_cut)

    def warning(self, max_length: int, share: float = 0.05) -> str | None:
        """A warning when more than ``share`` of the sequences lost part of their prompt or reply.

        A model that never sees what was cut cannot learn a preference that depends on it, and nothing
        else says so: a SmolLM2 demo on hh-harmless requests at the demo's old 64 tokens silently cut
        the prompt of 1,143 of its 2,304 sequences."""
        if not self.sequences:
            return None
        parts = [f"{n:,} of {self.sequences:,} sequences ({n / self.sequences:.0%}) lost {what}"
                 for n, what in ((self.prompts_cut, "the start of their prompt"), (self.replies_cut, "the end of their reply"))
                 if n > share * self.sequences]
        if not parts:
            return None
        return (f"warning: at --max-length {max_length}, " + " and ".join(parts) + "; the reward model never reads "
                "what was cut, so preferences that depend on it cannot be learned. Raise --max-length (up to the "
                "backbone's positions) unless the cut is intended.")


def encode_pairs(encoder: RewardEncoder, pairs: list, stats: TruncationStats) -> list[tuple[Encoded, Encoded]]:
    out = []
    for p in pairs:
        c, r = encoder.encode(p.prompt, p.chosen), encoder.encode(p.prompt, p.rejected)
        stats.add(c)
        stats.add(r)
        out.append((c, r))
    return out


def epoch_batches(encoded: list[tuple[Encoded, Encoded]], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, a function of (seed, epoch) alone (which makes resume exact).

    Pairs are shuffled, then sorted by length inside windows of 16 batches, and the batches are
    shuffled again: similar lengths share a batch (less padding, much faster on a CPU) while the
    order stays random. A last partial batch is dropped.
    """
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(encoded), generator=g).tolist()
    window = batch_size * 16
    batches = []
    for w in range(0, len(order), window):
        chunk = sorted(order[w:w + window], key=lambda i: max(len(encoded[i][0].ids), len(encoded[i][1].ids)))
        batches += [chunk[s:s + batch_size] for s in range(0, len(chunk) - batch_size + 1, batch_size)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    return [batches[i] for i in perm]


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        return max(0.0, (total - step) / max(1, total - warmup))
    return f


# ---------------------------------------------------------------------------------------------
# Evaluation
# ---------------------------------------------------------------------------------------------

LENGTH_BUCKETS = ((0, 20), (20, 50), (50, 100), (100, None))


def pair_metrics(r_chosen: torch.Tensor, r_rejected: torch.Tensor, pairs: list) -> dict:
    """Pairwise accuracy (ties count half), mean margin, and accuracy by reply length in words.

    r_chosen, r_rejected: [N] rewards (higher = preferred). The length of a pair is the mean word
    count of its two replies.
    """
    diff = (r_chosen - r_rejected).double()
    lengths = [(len(p.chosen.split()) + len(p.rejected.split())) / 2 for p in pairs]
    by_len = {}
    for lo, hi in LENGTH_BUCKETS:
        idx = [i for i, n in enumerate(lengths) if n >= lo and (hi is None or n < hi)]
        if idx:
            name = f"{lo}-{hi}" if hi is not None else f"{lo}+"
            by_len[name] = {"pairs": len(idx), "accuracy": round(float(pairwise_accuracy(r_chosen[idx], r_rejected[idx])), 4)}
    shorter = [1.0 if len(p.chosen) < len(p.rejected) else 0.5 if len(p.chosen) == len(p.rejected) else 0.0 for p in pairs]
    return {
        "accuracy": round(float(pairwise_accuracy(r_chosen, r_rejected)), 4),
        "pairs": len(pairs),
        "mean_margin": round(float(diff.mean()), 4),
        "ties": int((diff == 0).sum()),
        "accuracy_by_length": by_len,
        "shorter_reply_baseline": round(sum(shorter) / len(shorter), 4),
    }


def evaluate_encoded(model, encoded: list[tuple[Encoded, Encoded]], pairs: list, pad_id: int, batch_size: int,
                     dist: Distributed | None = None) -> dict:
    """Pair metrics of ``model`` on ``encoded`` pairs; with several processes each scores its share."""
    flat = [e for pair in encoded for e in pair]
    if dist is None or dist.world_size == 1:
        scores = score_encoded(model, flat, pad_id, batch_size)
    else:
        per = -(-len(flat) // dist.world_size)  # ceil: the last process may get fewer
        mine = score_encoded(model, flat[dist.rank * per:(dist.rank + 1) * per], pad_id, batch_size) if flat else torch.empty(0)
        scores = torch.tensor([x for part in dist.gather_objects(mine.tolist()) for x in part])
    return pair_metrics(scores[0::2], scores[1::2], pairs)


# ---------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------

def _apply_lora(model, cfg: RewardTrainConfig) -> None:
    from peft import LoraConfig, get_peft_model

    # The head stays fully trainable; peft only wraps the backbone's linear layers.
    model.backbone = get_peft_model(model.backbone, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha,
                                                               target_modules="all-linear", lora_dropout=0.0))


def _layer_list(backbone) -> torch.nn.ModuleList:
    """The backbone's stack of transformer blocks: the ModuleList as long as config.num_hidden_layers."""
    n = getattr(backbone.config, "num_hidden_layers", None)
    for m in backbone.modules():
        if isinstance(m, torch.nn.ModuleList) and len(m) == n:
            return m
    raise ConfigError(f"cannot find the {n} transformer layers of {type(backbone).__name__} to freeze")


def freeze_lower(backbone, embeddings: bool, layers: int) -> int:
    """Stop gradients into the embeddings (everything registered before the first block) and the
    lowest ``layers`` blocks. Autograd then records nothing below the first trainable block, which
    saves its backward pass and activations. Returns the number of frozen weights."""
    if not embeddings and not layers:
        return 0
    blocks = _layer_list(backbone)
    if layers > len(blocks):
        raise ConfigError(f"--freeze-layers {layers} exceeds the backbone's {len(blocks)} layers")
    frozen = {id(p) for b in blocks[:layers] for p in b.parameters()}
    first_block = {id(p) for p in blocks[0].parameters()}
    # The embeddings sit below every block: freezing any block freezes them too (otherwise their
    # gradient would still need the backward pass through the frozen blocks).
    for p in backbone.parameters():
        if id(p) in first_block:
            break
        frozen.add(id(p))
    count = 0
    for p in backbone.parameters():
        if id(p) in frozen and p.requires_grad:
            p.requires_grad_(False)
            count += p.numel()
    return count


def train_reward_model(cfg: RewardTrainConfig) -> dict | None:
    """Run a whole training stage; returns the summary also written to ``out/summary.json`` (on the
    main process; the others return None)."""
    from rlhf.models.loading import disable_dropout

    rt = start(cfg.engine)
    dist, device = rt.dist, rt.device
    dist.local_rows(cfg.batch_size, "--batch-size")  # must split evenly over the processes
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    pairs, skipped = read_pairs(cfg.pairs, cfg.skip_bad_pairs)
    if cfg.val_pairs:
        val_pairs, val_skipped = read_pairs(cfg.val_pairs, cfg.skip_bad_pairs)
        skipped += val_skipped
        train_pairs = pairs
    else:
        train_pairs, val_pairs = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
    say = (lambda msg: print(msg, file=sys.stderr)) if dist.is_main else (lambda msg: None)
    for msg in skipped[:5]:
        say(f"skipped: {msg}")
    if len(train_pairs) < cfg.batch_size:
        raise ConfigError(f"{cfg.pairs}: {len(train_pairs)} training pairs, fewer than --batch-size {cfg.batch_size}")

    model, tok, spec = new_reward_model(cfg.base, kind=cfg.backbone_kind, pooling=cfg.pooling,
                                        max_length=cfg.max_length, seed=cfg.seed, device=device)
    if not cfg.dropout:
        disable_dropout(model)
    if cfg.lora:
        _apply_lora(model, cfg)
    frozen = freeze_lower(model.backbone, cfg.freeze_embeddings, cfg.freeze_layers)
    encoder, pad_id = RewardEncoder(tok, spec), pad_id_of(tok)
    trunc = TruncationStats()
    train_enc = encode_pairs(encoder, train_pairs, trunc)
    val_enc = encode_pairs(encoder, val_pairs, trunc)
    if (cut := trunc.warning(cfg.max_length)) is not None:
        say(cut)
    packing = cfg.engine.packing
    if packing:
        problem = packing_problem(model, [e for pair in train_enc[:4] for e in pair], pad_id)
        if problem:
            say(f"padding-free batches off for this backbone: {problem}")
            packing = False

    soft = cfg.soft_targets and any(p.probability is not None for p in train_pairs)
    steps_per_epoch = len(train_pairs) // cfg.batch_size
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    run_until = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    eval_every = cfg.eval_every or steps_per_epoch
    params = [p for p in model.parameters() if p.requires_grad]
    head = {id(p) for p in model.head.parameters()}
    groups = [{"params": [p for p in params if id(p) not in head], "lr": cfg.lr},
              {"params": [p for p in params if id(p) in head], "lr": cfg.head_lr or cfg.lr}]
    optim = adamw(groups, device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(int(cfg.warmup_ratio * total_steps), total_steps))
    forward, optim = dist.prepare(RewardForward(model, pad_id, packing), optim)
    if dist.world_size > 1:  # the same weights everywhere (DDP broadcast them); dropout differs by process
        seed_everything(cfg.seed + 1_000_003 * dist.rank)
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)
    best_dir = out / "best"

    step, best_acc, since_best, stopped_early = 0, -1.0, 0, False
    latest = ckpts.latest() if cfg.resume else None
    if latest is not None:
        state = ckpts.load_state(latest)
        check_resume_options(latest, cfg, state.get("config"))
        if state.get("total_steps") != total_steps or state.get("train_pairs") != len(train_pairs):
            raise ConfigError(f"{latest} was written by a run with other data or options "
                              f"({state.get('train_pairs')} pairs, {state.get('total_steps')} steps); "
                              "use another --out or --no-resume")
        load_weights_into(model, latest / "model")
        ts = ckpts.load_trainer_state(latest)
        optim.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        per_process = ts.get("rng_per_process") or [ts["rng"]]
        if len(per_process) != dist.world_size:
            say(f"{latest} was written by {len(per_process)} process(es), this run has {dist.world_size}: the data "
                "order and weights resume exactly, dropout's random streams start afresh")
        set_rng_state(per_process[dist.rank] if len(per_process) == dist.world_size else ts["rng"])
        step, best_acc, since_best = state["step"], state["best_accuracy"], state["evals_since_best"]
        stopped_early = state.get("stopped_early", False)
        say(f"resuming from {latest} (step {step} of {total_steps})")

    def checkpoint(at: int) -> None:
        rngs = dist.gather_objects(rng_state())  # every process's dropout stream, for an exact resume
        with dist.main_first() as main:
            if main:
                ckpts.save(at, lambda d: save_reward_model(model, tok, d / "model"),
                           {"total_steps": total_steps, "train_pairs": len(train_pairs), "best_accuracy": best_acc,
                            "evals_since_best": since_best, "stopped_early": stopped_early, "config": config_to_dict(cfg),
                            "processes": dist.world_size},
                           {"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "rng": rngs[0],
                            "rng_per_process": rngs})

    def publish(folder: Path) -> None:
        with dist.main_first() as main:
            if not main:
                return
            staged = staging_dir(folder)
            try:
                save_reward_model(model, tok, staged)
                publish_dir(staged, folder)
            except BaseException:
                shutil.rmtree(staged, ignore_errors=True)
                raise

    def validate() -> dict:
        return evaluate_encoded(model, val_enc, val_pairs, pad_id, cfg.eval_batch_size, dist)

    logger = MetricsLogger(out, resume_step=step if latest is not None else None) if dist.is_main else None
    bar = tqdm(total=run_until, initial=step, desc="reward", unit="step", disable=not dist.is_main)
    t0, pairs_seen, last_val = time.perf_counter(), 0, None
    if latest is None and val_enc:  # the starting point, so a run's log shows validation accuracy rise
        first = validate()
        if logger is not None:
            logger.log(0, {"val_accuracy": first["accuracy"], "val_margin": first["mean_margin"]})
    forward.train()
    while step < run_until and not stopped_early:
        epoch, within = divmod(step, steps_per_epoch)
        batch_ids = epoch_batches(train_enc, cfg.batch_size, cfg.seed, epoch)[within]
        mine = dist.shard(batch_ids, "--batch-size")  # this process's pairs of the batch
        rewards = forward([e for i in mine for e in train_enc[i]])  # chosen, rejected, chosen, ...
        r_c, r_r = rewards[0::2], rewards[1::2]
        target = torch.tensor([_target(train_pairs[i]) for i in mine], device=device) if soft else None
        loss = bradley_terry_loss(r_c, r_r, margin=cfg.margin or None, center_coef=cfg.center_coef, target=target)
        dist.backward(loss / dist.world_size)  # this process's share of the batch mean
        grad_norm = dist.clip_grad_norm_(forward, params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        with torch.no_grad():  # batch means over every process (equal shares)
            stats = dist.sum(torch.stack([loss.detach(), pairwise_accuracy(r_c, r_r).float(), (r_c - r_r).mean(),
                                          rewards.mean()]).float()) / dist.world_size
        if not torch.isfinite(stats[0]):
            raise TrainingError(f"non-finite loss ({float(stats[0])}) at step {step + 1}; the last good checkpoint "
                                f"is kept in {ckpts.root}. Try a lower --lr.")
        if not torch.isfinite(grad_norm):
            raise TrainingError(f"non-finite gradient norm at step {step + 1}; the last good checkpoint is kept in {ckpts.root}")
        optim.step()
        # Drop the gradients now rather than before the next backward: the next forward pass then
        # runs without them, which lowers peak memory by one copy of the trainable weights.
        optim.zero_grad(set_to_none=True)
        sched.step()
        step += 1
        pairs_seen += len(batch_ids)
        metrics = {"loss": float(stats[0]), "accuracy": float(stats[1]), "margin": float(stats[2]),
                   "reward_mean": float(stats[3]), "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                   "epoch": step / steps_per_epoch}
        bar.update(1)
        bar.set_postfix(loss=f"{metrics['loss']:.3f}")
        if (step % eval_every == 0 or step == run_until) and val_enc:
            last_val = validate()
            metrics.update({"val_accuracy": last_val["accuracy"], "val_margin": last_val["mean_margin"]})
            if last_val["accuracy"] > best_acc:
                best_acc, since_best = last_val["accuracy"], 0
                publish(best_dir)
            else:
                since_best += 1
                stopped_early = bool(cfg.patience) and since_best >= cfg.patience
            if logger is not None:
                logger.log(step, metrics)
            checkpoint(step)
        else:
            if logger is not None:
                logger.log(step, metrics)
            if step % eval_every == 0 or step == run_until:
                checkpoint(step)
    bar.close()
    if logger is not None:
        logger.close()
    elapsed = time.perf_counter() - t0

    # The final model is the best on validation (what early stopping is for), else the last one;
    # LoRA adapters are merged into it, so it loads without peft or the base folder.
    final = out / "model"
    if val_enc and best_dir.is_dir():
        load_weights_into(model, best_dir)
    if cfg.lora:
        model.backbone = model.backbone.merge_and_unload()
    publish(final)
    if not dist.is_main:
        return None
    summary = {
        "model": str(final), "backbone": spec.base, "backbone_kind": spec.backbone_kind, "pooling": spec.pooling,
        "steps": step, "total_steps": total_steps, "stopped_early": stopped_early,
        "train_pairs": len(train_pairs), "val_pairs": len(val_pairs), "skipped_pairs": len(skipped),
        "frozen_weights": frozen, "packing": packing, "processes": dist.world_size,
        "soft_target_pairs": sum(p.probability is not None for p in train_pairs) if soft else 0,
        "best_val_accuracy": best_acc if val_enc else None, "last_val": last_val,
        "truncation": {"sequences": trunc.sequences, "prompts_cut": trunc.prompts_cut, "replies_cut": trunc.replies_cut},
        "seconds": round(elapsed, 2), "pairs_per_second": round(pairs_seen / elapsed, 2) if elapsed > 0 and pairs_seen else None,
        "peak_rss_mb": round(peak_rss_mb()),
    }
    atomic_write_json(out / "summary.json", {**summary, "config": config_to_dict(cfg)})
    return summary
