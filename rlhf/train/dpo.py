"""Direct preference optimisation: a policy trained straight from preference pairs, no reward model.

For each pair the policy's log-likelihood of both replies is compared with the reference's:
h = [log π(y_c|x) − log π_ref(y_c|x)] − [log π(y_r|x) − log π_ref(y_r|x)], and the loss is DPO's
−log σ(β·h) (Rafailov et al. 2023, with optional label smoothing) or IPO's (h − 1/(2β))² (Azar et
al. 2023). Both losses live in ``rlhf.algos``; β·(log π − log π_ref) is each reply's implicit reward.

    ref_c, ref_r = reference_logprobs(pairs)        # once, before training, cached on disk
    for each step: loss(policy_logprobs(batch) − ref)  # forward/backward of the policy alone

Departures and why: the reference is read once (its log-probabilities never change), so a step is
one forward and backward of the policy, and no second copy of the model is held — the starting
policy scores the pairs before its first update (with ``--lora``, the same weights with the
adapter switched off). IPO scores replies by their mean token log-probability by default (the
length-normalised form used in practice, since the sum makes its fixed target margin depend on
reply length); DPO by the sum. Only reply positions reach the LM head.

Pairs come in every layout ``rlhf reward train`` reads (ours, TRL's, Anthropic HH, rankings
files), with the same errors and ``--skip-bad-pairs``. Exact resume: each epoch's batches are a
function of (seed, epoch) and checkpoints hold the weights (or adapter), optimizer, scheduler and
RNG, so a killed run restarted with the same command ends with the same weights.

Under ``accelerate launch`` each process takes a contiguous share of every batch of pairs and DDP
averages the gradients (rlhf/engine/distributed.py); the reference and validation scoring are
split over the processes too, and only the main process writes.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import ClassVar, Literal

import click
import torch
from torch import nn
from tqdm.auto import tqdm

from rlhf.algos import dpo_loss, ipo_loss, sequence_logprobs
from rlhf.config import config_command, config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.distributed import Distributed
from rlhf.engine.runtime import Runtime, start
from rlhf.errors import ConfigError, TrainingError
from rlhf.models.loading import (disable_dropout, format_prompt, load_causal_lm, load_model_weights, load_tokenizer,
                                 resolve_model_path)
from rlhf.models.policy import CPU_CHUNK_OVERHEAD_POSITIONS, length_chunks, policy_forward
from rlhf.train.branch_packing import (Segment, pack_branches, packed_logits, packing_problem, per_sequence_sums,
                                       token_logprobs)
from rlhf.train.optim import adamw
from rlhf.train.ppo_loop import _publish_policy
from rlhf.train.reward import epoch_batches, read_pairs, split_by_prompt
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.io import atomic_write_bytes, atomic_write_json
from rlhf.utils.metrics import MetricsLogger, peak_rss_mb
from rlhf.utils.seed import rng_state, seed_everything, set_rng_state

REFERENCE_CACHE, REFERENCE_CACHE_VAL = "reference_logprobs.safetensors", "reference_logprobs_val.safetensors"


@dataclass
class DPOConfig:
    """Train a policy directly on preference pairs with DPO's sigmoid loss or IPO's squared loss."""

    pairs: str = opt(help="Training comparisons: a pairs file (ours, TRL or Anthropic-HH layout) or a rankings file.")
    out: str = opt(help="Output folder: model/ (the tuned policy), checkpoints/, metrics.jsonl, tensorboard/, summary.json.")
    policy: str = opt("bundled", help="Starting policy: a local Hugging Face causal-LM folder, or 'bundled'.")
    reference: str = opt("", help="Reference model folder; empty = the starting policy (with --lora: the adapter switched off).")
    loss: Literal["sigmoid", "ipo"] = opt("sigmoid", help="sigmoid = DPO's −log σ(β·h); ipo = IPO's (h − 1/(2β))².")
    beta: float = opt(0.1, help="β: the implicit reward's scale (DPO) or the inverse target margin (IPO); larger = closer "
                                "to the reference.")
    label_smoothing: float = opt(0.0, help="Probability that a label is flipped (conservative DPO); sigmoid loss only.")
    aggregation: Literal["auto", "sum", "mean"] = opt("auto", help="How a reply's token log-probabilities combine: sum "
                                                                   "(its log-likelihood) or mean (per token); auto = sum "
                                                                   "for sigmoid, mean for ipo.")
    val_pairs: str | None = opt(None, help="Validation comparisons; without it --val-fraction of the prompts is held out.")
    val_fraction: float = opt(0.1, help="Share of prompts held out for validation when --val-pairs is not given (0 = none).")
    epochs: float = opt(1.0, help="Passes over the training pairs (fractions allowed).")
    batch_size: int = opt(16, help="Pairs per optimizer step, over all processes.")
    micro_batch_size: int = opt(0, help="Pairs per forward/backward in each process; gradients accumulate up to "
                                        "--batch-size (0 = the process's whole share of the batch).")
    lr: float = opt(5e-5, help="Peak learning rate (AdamW), reached after warmup, then linear decay to 0.")
    warmup_ratio: float = opt(0.1, help="Share of the optimizer steps spent warming the learning rate up.")
    weight_decay: float = opt(0.0, help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")
    max_length: int = opt(256, help="Tokens per prompt + reply; longer prompts lose their left end, replies are cut last.")
    lora: bool = opt(False, help="Train a LoRA adapter (peft); the reference is the same weights with the adapter off.")
    lora_r: int = opt(16, help="LoRA rank.")
    lora_alpha: int = opt(32, help="LoRA scaling numerator (alpha / r scales the update).")
    eval_every: int = opt(0, help="Validate every N optimizer steps; 0 = at the end of each epoch.")
    eval_batch_size: int = opt(64, help="Pairs per forward pass when validating or scoring with the reference.")
    skip_bad_pairs: bool = opt(False, help="Skip and count malformed pairs (empty or one-sided, identical replies) "
                                           "instead of stopping at the first.")
    save_every: int = opt(50, help="Checkpoint every N optimizer steps (and at the end).")
    keep_checkpoints: int = opt(2, help="How many recent checkpoints to keep.")
    seed: int = opt(0, help="Random seed (split, data order, LoRA initialisation).")
    resume: bool = opt(True, help="Continue from the last checkpoint in --out if there is one.")
    max_steps: int = opt(0, help="Stop after this many optimizer steps (0 = run all epochs); the schedule still spans all epochs.")
    progress: bool = opt(True, help="Show a progress bar.")
    # May change on resume (rlhf/utils/checkpoint.py): how far to go and how often to save.
    resume_free: ClassVar[tuple[str, ...]] = ("max_steps", "save_every")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, packing: padding-free "
                                                          "batches that read each pair's prompt once, ...).")

    def validate(self) -> None:
        if self.batch_size < 1 or self.micro_batch_size < 0 or self.eval_batch_size < 1:
            raise ConfigError("--batch-size and --eval-batch-size must be at least 1, --micro-batch-size not negative")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size {self.micro_batch_size}")
        if self.epochs <= 0 or self.lr <= 0 or self.beta <= 0:
            raise ConfigError("--epochs, --lr and --beta must be positive")
        if not 0 <= self.label_smoothing < 0.5:
            raise ConfigError(f"--label-smoothing must be in [0, 0.5), got {self.label_smoothing}")
        if self.label_smoothing and self.loss != "sigmoid":
            raise ConfigError("--label-smoothing applies to the sigmoid loss only")
        if not 0 <= self.val_fraction < 1:
            raise ConfigError(f"--val-fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_length < 8:
            raise ConfigError("--max-length must be at least 8")
        if self.eval_every < 0 or self.max_steps < 0 or self.save_every < 1:
            raise ConfigError("--eval-every and --max-steps must not be negative, --save-every at least 1")

    @property
    def average_logprobs(self) -> bool:
        return self.aggregation == "mean" or (self.aggregation == "auto" and self.loss == "ipo")


# ---------------------------------------------------------------------------------------------
# Data: one prompt and two replies per pair, as token ids
# ---------------------------------------------------------------------------------------------

@dataclass
class EncodedPair:
    prompt_ids: list[int]    # the chat-formatted prompt, shared by both replies
    chosen_ids: list[int]    # reply + EOS
    rejected_ids: list[int]
    prompt_cut: bool = False
    reply_cut: bool = False


def encode_pair(tok, prompt: str, chosen: str, rejected: str, max_length: int) -> EncodedPair:
    """Token ids of a pair. Replies keep up to ``max_length − 1`` tokens (EOS included); the prompt
    loses its left end so that prompt + the longer reply fit, and keeps at least its last token
    (something must predict the reply's first token)."""
    prompt_ids = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
    replies = [tok(r, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for r in (chosen, rejected)]
    reply_cut = any(len(r) > max_length - 1 for r in replies)
    replies = [r[:max_length - 1] for r in replies]
    keep = max(1, max_length - max(len(r) for r in replies))
    return EncodedPair(prompt_ids[-keep:], replies[0], replies[1], len(prompt_ids) > keep, reply_cut)


def collate_pairs(pairs: list[EncodedPair], pad_id: int) -> tuple[torch.Tensor, ...]:
    """A batch of B pairs as 2B rows, chosen replies first: (query_ids, query_mask) [2B, P] left-padded,
    (response_ids, response_mask) [2B, R] right-padded."""
    queries = [p.prompt_ids for p in pairs] * 2
    replies = [p.chosen_ids for p in pairs] + [p.rejected_ids for p in pairs]
    width_q, width_r = max(map(len, queries)), max(map(len, replies))
    q = torch.full((len(queries), width_q), pad_id, dtype=torch.long)
    qm = torch.zeros_like(q)
    r = torch.full((len(replies), width_r), pad_id, dtype=torch.long)
    rm = torch.zeros_like(r)
    for i, (a, b) in enumerate(zip(queries, replies)):
        q[i, width_q - len(a):], qm[i, width_q - len(a):] = torch.tensor(a), 1
        r[i, :len(b)], rm[i, :len(b)] = torch.tensor(b), 1
    return q, qm, r, rm


def step_batches(encoded: list[EncodedPair], batch_size: int, seed: int, epoch: int) -> list[list[int]]:
    """The batches of one epoch, a function of (seed, epoch) alone: reward training's length-grouped
    shuffle (``rlhf.train.reward.epoch_batches``), sorting on prompt + reply lengths."""
    lengths = [(SimpleNamespace(ids=range(len(p.prompt_ids) + len(p.chosen_ids))),
                SimpleNamespace(ids=range(len(p.prompt_ids) + len(p.rejected_ids)))) for p in encoded]
    return epoch_batches(lengths, batch_size, seed, epoch)


# ---------------------------------------------------------------------------------------------
# Log-probabilities of both replies
# ---------------------------------------------------------------------------------------------

def pair_logprobs(model, pairs: list[EncodedPair], pad_id: int, average: bool, device: torch.device,
                  max_rows: int, packing: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y_c|x), log π(y_r|x) of each pair under ``model``: ([B], [B]), differentiable unless
    called under no_grad. With ``packing``, one pass over tree-masked rows that hold each prompt once
    (rlhf/train/branch_packing.py); else 2B padded rows in length-grouped chunks of at most ``max_rows``
    (each padded only to its own longest prompt and reply). Only reply positions reach the LM head."""
    if packing:
        packed = pack_branches(segments(pairs), pad_id).to(device)
        sums = per_sequence_sums(token_logprobs(packed_logits(model, packed), packed), packed, average)
        return sums[:len(pairs)], sums[len(pairs):]
    q, qm, r, rm = (t.to(device) for t in collate_pairs(pairs, pad_id))
    overhead = CPU_CHUNK_OVERHEAD_POSITIONS if device.type == "cpu" else None
    parts, order = [], []
    for rows in length_chunks(qm, rm, max_rows, overhead):  # policy_forward trims each chunk's own padding
        parts.append(sequence_logprobs(policy_forward(model, q[rows], qm[rows], r[rows], rm[rows]).logprobs, rm[rows], average))
        order.append(rows)
    logps = torch.cat(parts)[torch.argsort(torch.cat(order))]
    return logps[:len(pairs)], logps[len(pairs):]


def segments(pairs: list[EncodedPair]) -> list[Segment]:
    """Each pair as a prompt with two branches; pair i's chosen reply is sequence i, its rejected one B + i."""
    return [Segment(p.prompt_ids, [(i, p.chosen_ids), (len(pairs) + i, p.rejected_ids)]) for i, p in enumerate(pairs)]


def padded_token_logprobs(model, pairs: list[EncodedPair], pad_id: int, device: torch.device) -> torch.Tensor:
    """Per-token log-probabilities [2B, R] of both replies from plain padded rows (chosen rows first):
    what the packed layout must reproduce."""
    q, qm, r, rm = (t.to(device) for t in collate_pairs(pairs, pad_id))
    return policy_forward(model, q, qm, r, rm).logprobs


class PairLogprobs(nn.Module):
    """``pair_logprobs`` as a module: what a training step calls, and what several processes wrap
    (DDP averages the gradients of a module's own forward; the packed path reaches the backbone
    directly, so the policy is called inside this one)."""

    def __init__(self, policy: nn.Module, pad_id: int, average: bool, device: torch.device, packing: bool):
        super().__init__()
        self.policy, self.pad_id, self.average, self.device, self.packing = policy, pad_id, average, device, packing

    def forward(self, pairs: list[EncodedPair]) -> tuple[torch.Tensor, torch.Tensor]:
        return pair_logprobs(self.policy, pairs, self.pad_id, self.average, self.device, 2 * len(pairs), self.packing)


@torch.no_grad()
def score_pairs(model, pairs: list[EncodedPair], pad_id: int, average: bool, device: torch.device,
                batch_size: int, packing: bool = False, dist: Distributed | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``pair_logprobs`` over many pairs without gradients, ``batch_size`` pairs at a time, in length
    order (less padding); returns ([N], [N]) in the pairs' own order, on the CPU. With several
    processes each scores every N-th batch and all of them receive every score."""
    rank, world = (dist.rank, dist.world_size) if dist is not None else (0, 1)
    order = sorted(range(len(pairs)), key=lambda i: len(pairs[i].prompt_ids) + max(len(pairs[i].chosen_ids), len(pairs[i].rejected_ids)))
    batches = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
    mine = []
    for idx in batches[rank::world]:
        c, r = pair_logprobs(model, [pairs[i] for i in idx], pad_id, average, device, 2 * batch_size, packing)
        mine.append((idx, c.float().cpu(), r.float().cpu()))
    chosen, rejected = torch.zeros(len(pairs)), torch.zeros(len(pairs))
    for part in dist.gather_objects(mine) if world > 1 else [mine]:
        for idx, c, r in part:
            chosen[idx], rejected[idx] = c, r
    return chosen, rejected


def _fingerprint(cfg: DPOConfig, reference: str, encoded: list[EncodedPair], packing: bool) -> str:
    """What the cached reference log-probabilities depend on: the reference's files, the aggregation,
    the batch layout (packed or padded rows round differently) and every token id of every pair."""
    h = hashlib.sha256()
    folder = resolve_model_path(reference)
    for f in sorted(folder.glob("*.safetensors")):
        st = f.stat()
        h.update(f"{f.resolve()}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    h.update(f"average={cfg.average_logprobs} packing={packing} batch={cfg.eval_batch_size}\n".encode())
    for p in encoded:
        h.update(json.dumps([p.prompt_ids, p.chosen_ids, p.rejected_ids]).encode())
    return h.hexdigest()


def reference_logprobs(cfg: DPOConfig, policy, encoded: list[EncodedPair], pad_id: int, rt: Runtime,
                       path: Path, packing: bool) -> tuple[torch.Tensor, torch.Tensor, float, float]:
    """The reference's log-probabilities of every pair's replies, computed once and cached in
    ``path`` (a safetensors file, reused when its fingerprint matches). The reference is
    --reference, else ``policy`` as it starts (adapter off with LoRA) — so call this before training,
    or with the cache in place. Returns ([N], [N], wall and CPU seconds spent computing)."""
    from safetensors.torch import load_file, save

    dist, device = rt.dist, rt.device
    reference = cfg.reference or cfg.policy
    key = _fingerprint(cfg, reference, encoded, packing)
    cached = load_file(str(path)) if path.is_file() else {}
    fresh = "fingerprint" in cached and bytes(cached["fingerprint"].tolist()).decode() == key
    if all(dist.gather_objects(fresh)):  # every process reads it, or every process takes part in scoring
        return cached["chosen"], cached["rejected"], 0.0, 0.0
    t0, c0 = time.perf_counter(), time.process_time()
    score = lambda model: score_pairs(model, encoded, pad_id, cfg.average_logprobs, device, cfg.eval_batch_size, packing, dist)
    if cfg.reference:
        model = load_causal_lm(cfg.reference, device=device, dtype=rt.dtype)
        chosen, rejected = score(model)
        del model
    elif cfg.lora:
        with policy.disable_adapter():  # the adapter off: the base weights, whatever training did
            chosen, rejected = score(policy)
    else:
        chosen, rejected = score(policy)
    seconds = time.perf_counter() - t0
    cpu_seconds = time.process_time() - c0
    with dist.main_first() as main:
        if main:
            atomic_write_bytes(path, save({"chosen": chosen, "rejected": rejected,
                                           "fingerprint": torch.tensor(list(key.encode()), dtype=torch.uint8)}))
    return chosen, rejected, seconds, cpu_seconds


def preference_loss(cfg: DPOConfig, chosen_logratios: torch.Tensor, rejected_logratios: torch.Tensor):
    if cfg.loss == "ipo":
        return ipo_loss(chosen_logratios, rejected_logratios, cfg.beta)
    return dpo_loss(chosen_logratios, rejected_logratios, cfg.beta, cfg.label_smoothing)


@torch.no_grad()
def evaluate(cfg: DPOConfig, policy, encoded: list[EncodedPair], ref: tuple[torch.Tensor, torch.Tensor], pad_id: int,
             device: torch.device, packing: bool, dist: Distributed | None = None) -> dict[str, float]:
    """Loss, implicit rewards, margin and accuracy of the current policy on held-out pairs."""
    was_training = policy.training
    policy.eval()
    chosen, rejected = score_pairs(policy, encoded, pad_id, cfg.average_logprobs, device, cfg.eval_batch_size, packing, dist)
    policy.train(was_training)
    loss, stats = preference_loss(cfg, chosen - ref[0], rejected - ref[1])
    return {"val_loss": float(loss), **{f"val_{k}": float(v) for k, v in stats.items()}}


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def _load_policy(cfg: DPOConfig, rt: Runtime):
    tok = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy, device=rt.device, dtype=rt.dtype, train=True)
    disable_dropout(policy)  # deterministic forwards: the reference's and the policy's log-probabilities agree at step 0
    if cfg.reference and len(load_tokenizer(cfg.reference)) != len(tok):
        raise ConfigError(f"--reference {cfg.reference} has another vocabulary than --policy {cfg.policy}")
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
    return policy, tok


def run_dpo(cfg: DPOConfig) -> dict | None:
    """Train to the end of the epochs (or --max-steps); returns the summary also written to
    ``out/summary.json`` (on the main process; the others return None)."""
    from transformers import get_linear_schedule_with_warmup

    rt = start(cfg.engine)
    dist, device = rt.dist, rt.device
    dist.local_rows(cfg.batch_size, "--batch-size")  # must split evenly over the processes
    out = Path(cfg.out)
    say = (lambda msg: print(msg, file=sys.stderr)) if dist.is_main else (lambda msg: None)
    seed_everything(cfg.seed)
    pairs, skipped = read_pairs(cfg.pairs, cfg.skip_bad_pairs)
    if cfg.val_pairs:
        val_pairs, val_skipped = read_pairs(cfg.val_pairs, cfg.skip_bad_pairs)
        skipped += val_skipped
        train_pairs = pairs
    else:
        train_pairs, val_pairs = split_by_prompt(pairs, cfg.val_fraction, cfg.seed)
    for msg in skipped[:5]:
        say(f"skipped: {msg}")
    if len(train_pairs) < cfg.batch_size:
        raise ConfigError(f"{cfg.pairs}: {len(train_pairs)} training pairs, fewer than --batch-size {cfg.batch_size}")

    policy, tok = _load_policy(cfg, rt)
    pad_id = tok.pad_token_id
    train_enc = [encode_pair(tok, p.prompt, p.chosen, p.rejected, cfg.max_length) for p in train_pairs]
    val_enc = [encode_pair(tok, p.prompt, p.chosen, p.rejected, cfg.max_length) for p in val_pairs]
    steps_per_epoch = len(train_enc) // cfg.batch_size
    total_steps = max(1, math.ceil(steps_per_epoch * cfg.epochs))
    run_until = min(total_steps, cfg.max_steps) if cfg.max_steps else total_steps
    eval_every = cfg.eval_every or steps_per_epoch
    params = [p for p in policy.parameters() if p.requires_grad]
    optim = adamw(params, device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = get_linear_schedule_with_warmup(optim, int(cfg.warmup_ratio * total_steps), total_steps)
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)

    step, latest = 0, ckpts.latest() if cfg.resume else None
    if latest is not None:
        state = ckpts.load_state(latest)
        check_resume_options(latest, cfg, state.get("config"))
    # The reference scores every pair before the policy's weights move (or comes from the cache).
    # Validation pairs are scored on their own, batched exactly as ``evaluate`` batches them, so the
    # starting policy's implicit rewards there are exactly 0 (accuracy 0.5), not float noise.
    packing = cfg.engine.packing
    if packing:
        probe = train_enc[:4]
        problem = packing_problem(policy, segments(probe), pad_id, lambda m: padded_token_logprobs(m, probe, pad_id, device))
        if problem:
            say(f"packed pairs off for this model: {problem}")
            packing = False
    ref_c, ref_r, ref_seconds, ref_cpu = reference_logprobs(cfg, policy, train_enc, pad_id, rt, out / REFERENCE_CACHE,
                                                            packing)
    ref_val = reference_logprobs(cfg, policy, val_enc, pad_id, rt, out / REFERENCE_CACHE_VAL, packing) if val_enc else None
    forward, optim = dist.prepare(PairLogprobs(policy, pad_id, cfg.average_logprobs, device, packing), optim)
    if latest is not None:
        load_model_weights(policy, latest / "model")
        ts = ckpts.load_trainer_state(latest)
        optim.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        set_rng_state(ts["rng"])
        step = state["step"]
        say(f"resuming from {latest} (step {step} of {total_steps})")

    def checkpoint() -> None:
        with dist.main_first() as main:  # one writer; the others wait until the checkpoint is in place
            if main:
                ckpts.save(step, lambda d: policy.save_pretrained(str(d / "model"), safe_serialization=True),
                           {"total_steps": total_steps, "train_pairs": len(train_enc), "config": config_to_dict(cfg),
                            "processes": dist.world_size},
                           {"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state()})

    logger = MetricsLogger(out, resume_step=step if latest is not None else None) if dist.is_main else None
    first_val = None
    if latest is None and val_enc:  # the starting point: accuracy 0.5, loss log 2 (sigmoid) — every reward is 0
        first_val = evaluate(cfg, policy, val_enc, ref_val, pad_id, device, packing, dist)
        if logger is not None:
            logger.log(0, first_val)
    bar = tqdm(total=run_until, initial=step, desc=f"dpo ({cfg.loss})", unit="step",
               disable=not (cfg.progress and dist.is_main))
    micro = cfg.micro_batch_size or cfg.batch_size // dist.world_size
    max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
    t0, c0, pairs_seen, last_val = time.perf_counter(), time.process_time(), 0, None
    forward.train()
    epochs: dict[int, list[list[int]]] = {}
    try:
        while step < run_until:
            epoch, within = divmod(step, steps_per_epoch)
            if epoch not in epochs:
                epochs = {epoch: step_batches(train_enc, cfg.batch_size, cfg.seed, epoch)}
            batch_ids = epochs[epoch][within]
            mine = dist.shard(batch_ids, "--batch-size")  # this process's pairs of the batch
            sums: dict[str, torch.Tensor] = {}
            for m in range(0, len(mine), micro):
                ids = mine[m:m + micro]
                with dist.no_sync(forward, skip=m + micro < len(mine)):  # gradients averaged once, at the last
                    chosen, rejected = forward([train_enc[i] for i in ids])
                    loss, stats = preference_loss(cfg, chosen - ref_c[ids].to(device), rejected - ref_r[ids].to(device))
                    share = len(ids) / len(batch_ids)  # micro-batch losses are pair means: weight by share of pairs
                    dist.backward(loss * share)  # this process's part of the batch mean (a global sum over processes)
                stats.update(loss=loss.detach(), logps_chosen=chosen.detach().mean(), logps_rejected=rejected.detach().mean())
                for k, v in stats.items():
                    sums[k] = sums.get(k, 0.0) + share * v
            grad_norm = dist.clip_grad_norm_(forward, params, max_norm)
            names = sorted(sums)
            totals = dist.sum(torch.stack([torch.as_tensor(sums[k], device=device).float() for k in names]))
            metrics = {k: float(v) for k, v in zip(names, totals)}  # batch means over every process
            if not (math.isfinite(metrics["loss"]) and torch.isfinite(grad_norm)):
                raise TrainingError(f"non-finite DPO loss or gradient at step {step + 1} (loss {metrics['loss']}); "
                                    f"the last good checkpoint is kept in {ckpts.root}. Try a lower --lr.")
            optim.step()
            optim.zero_grad(set_to_none=True)  # before the next forward: lower peak memory
            sched.step()
            step += 1
            pairs_seen += len(batch_ids)
            metrics.update(grad_norm=float(grad_norm), lr=sched.get_last_lr()[0], epoch=step / steps_per_epoch)
            if val_enc and (step % eval_every == 0 or step == run_until):
                last_val = evaluate(cfg, policy, val_enc, ref_val, pad_id, device, packing, dist)
                metrics.update(last_val)
            if logger is not None:
                logger.log(step, metrics)
            bar.update(1)
            bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['accuracy']:.2f}")
            if step % cfg.save_every == 0 or step == run_until:
                checkpoint()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    elapsed, cpu = time.perf_counter() - t0, time.process_time() - c0

    # A LoRA policy is published merged into its base weights (plain HF folder), its adapter in model/adapter.
    summary = None
    with dist.main_first() as main:
        if main:
            _publish_policy(policy, tok, out / "model")
            summary = _summary(cfg, out, step, total_steps, train_enc, val_enc, skipped, first_val, last_val, pairs_seen,
                               elapsed, cpu, ref_seconds, ref_cpu, packing)
            summary["processes"] = dist.world_size
            atomic_write_json(out / "summary.json", {**summary, "config": config_to_dict(cfg)})
    return summary


def _summary(cfg, out, step, total_steps, train_enc, val_enc, skipped, first_val, last_val, pairs_seen, elapsed, cpu,
             ref_seconds, ref_cpu, packing) -> dict:
    from rlhf.utils.metrics import read_metrics

    rows = [r for r in read_metrics(out) if "loss" in r]
    if first_val is None:  # resumed: the starting evaluation is the step-0 row of the log
        first_val = next((r for r in read_metrics(out) if r["step"] == 0), None)
    summary = {
        "model": str(out / "model"), "loss_type": cfg.loss, "beta": cfg.beta, "steps": step, "total_steps": total_steps,
        "stop_reason": "max_steps" if step < total_steps else "epochs",
        "train_pairs": len(train_enc), "val_pairs": len(val_enc), "skipped_pairs": len(skipped),
        "truncation": {"pairs": len(train_enc) + len(val_enc),
                       "prompts_cut": sum(p.prompt_cut for p in train_enc + val_enc),
                       "replies_cut": sum(p.reply_cut for p in train_enc + val_enc)},
        "train_accuracy_first": rows[0]["accuracy"] if rows else None, "train_accuracy_last": rows[-1]["accuracy"] if rows else None,
        "val_accuracy_first": first_val and first_val.get("val_accuracy"), "val_accuracy_last": last_val and last_val["val_accuracy"],
        "val_margin_last": last_val and last_val["val_margin"],
        # Wall and CPU seconds of the training loop (validation and checkpoints included) and of scoring
        # the training pairs with the reference (0 when read from the cache).
        "packing": packing, "seconds": round(elapsed, 2), "cpu_seconds": round(cpu, 2),
        "reference_seconds": round(ref_seconds, 2), "reference_cpu_seconds": round(ref_cpu, 2),
        "pairs_per_second": round(pairs_seen / elapsed, 2) if elapsed > 0 and pairs_seen else None,
        "peak_rss_mb": round(peak_rss_mb()),
    }
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingError(f"non-finite summary values {bad}")
    return summary


@config_command(DPOConfig, name="dpo")
def dpo_command(cfg: DPOConfig) -> None:
    """Train a policy straight from preference pairs (DPO or IPO); prints a JSON summary (also in OUT/summary.json)."""
    summary = run_dpo(cfg)
    if summary is None:  # not the main process: it printed nothing and wrote nothing
        return
    click.echo(f"{cfg.loss} loss, {summary['steps']} steps: validation accuracy {summary['val_accuracy_first']} → "
               f"{summary['val_accuracy_last']}", err=True)
    click.echo(json.dumps(summary))
