"""Supervised fine-tuning of any local causal LM on prompt/completion records.

The loss covers reply tokens only (prompt tokens get label −100), prompts are formatted with the
model's chat template (``format_prompt``), and a run resumes exactly: the data order of every
epoch is a function of (seed, epoch), and checkpoints hold the optimizer, scheduler and RNG
states, so a killed and restarted run ends with the same weights as an uninterrupted one.

The same loop pre-trains the bundled model (``chat_template=False``, loss on every token).

Under ``accelerate launch`` each process takes a contiguous share of every global batch; the loss
is normalised by the global batch's label count and gradients are averaged across processes, so
N processes take the same steps as one (rlhf/engine/distributed.py).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import click
import torch
from tqdm.auto import tqdm

from rlhf.agents.episode import encode_episode_file, is_episode_file
from rlhf.config import config_command, config_to_dict, opt
from rlhf.data.context import clip_chars, context_length
from rlhf.engine.config import EngineConfig
from rlhf.engine.distributed import Distributed
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError, TrainingError
from rlhf.models.loading import load_model_weights
from rlhf.train.optim import adamw
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir
from rlhf.utils.metrics import MetricsLogger, peak_rss_mb
from rlhf.utils.seed import epoch_order, rng_state, seed_everything, set_rng_state


@dataclass
class SFTConfig:
    """Fine-tune a causal LM on prompt/completion pairs; the loss covers completion tokens only."""

    data: str = opt(help="Training data: JSON Lines with prompt and completion (or reply/response).")
    out: str = opt(help="Output folder: checkpoints/, metrics.jsonl, and the final model in model/.")
    model: str = opt("bundled", help="Local Hugging Face causal-LM folder to start from, or 'bundled'.")
    epochs: float = opt(1.0, help="Passes over the data (fractions allowed).")
    batch_size: int = opt(16, help="Examples per optimizer step, over all processes.")
    grad_accum: int = opt(1, help="Micro-batches each process accumulates per optimizer step.")
    lr: float = opt(3e-4, help="Peak learning rate (AdamW), reached after warmup, then cosine decay.")
    warmup_steps: int = opt(20, help="Linear warmup steps.")
    weight_decay: float = opt(0.0, help="AdamW weight decay.")
    max_grad_norm: float = opt(1.0, help="Gradient clipping norm (0 = off).")
    max_length: int = opt(256, help="Longest example in tokens; longer prompts are cut from the left, replies never.")
    chat_template: bool = opt(True, help="Wrap prompts with the tokenizer's chat template (off: raw text; loss on all tokens).")
    lora: bool = opt(False, help="Train a LoRA adapter (peft) instead of all weights; merged into model/ at the end.")
    lora_r: int = opt(16, help="LoRA rank.")
    lora_alpha: int = opt(32, help="LoRA scaling numerator (alpha / r scales the update).")
    save_every: int = opt(200, help="Checkpoint every N optimizer steps (0 = only at the end).")
    keep_checkpoints: int = opt(2, help="How many recent checkpoints to keep.")
    seed: int = opt(0, help="Random seed (data order, initialisation of LoRA weights).")
    resume: bool = opt(True, help="Continue from the last checkpoint in --out if there is one.")
    max_steps: int = opt(0, help="Stop after this many optimizer steps (0 = run all epochs); for tests and budgets.")
    resume_free: ClassVar[tuple[str, ...]] = ("save_every",)  # may change on resume (rlhf/utils/checkpoint.py)
    engine: EngineConfig = opt(factory=EngineConfig, help="How the run executes (device, threads, ...).")

    def validate(self) -> None:
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ConfigError("--batch-size and --grad-accum must be at least 1")
        if self.epochs <= 0:
            raise ConfigError("--epochs must be positive")
        if self.max_length < 8:
            raise ConfigError("--max-length must be at least 8")


def encode_example(tok, prompt: str, completion: str, max_length: int, chat_template: bool = True,
                   cuts: Counter | None = None) -> tuple[list[int], list[int]] | None:
    """Token ids and labels (−100 on prompt tokens). Over-long prompts lose their left end; a reply
    that alone exceeds ``max_length`` is cut at the right. Returns None if no reply token fits.
    ``cuts`` counts ``prompts_cut`` and ``replies_cut``."""
    from rlhf.models.loading import format_prompt

    if chat_template:
        # Bounded work whatever the input: only characters that could reach the limit are tokenized.
        prompt, completion = clip_chars(tok, prompt, max_length), clip_chars(tok, completion, max_length, keep="start")
        prompt_ids = tok(format_prompt(tok, prompt), add_special_tokens=False)["input_ids"]
        reply_ids = tok(completion, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        full_prompt, full_reply = len(prompt_ids), len(reply_ids)
        reply_ids = reply_ids[:max_length]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) - (max_length - len(reply_ids))):]
        if cuts is not None:
            cuts["prompts_cut"] += len(prompt_ids) < full_prompt
            cuts["replies_cut"] += len(reply_ids) < full_reply
        ids = prompt_ids + reply_ids
        labels = [-100] * len(prompt_ids) + reply_ids
    else:
        ids = tok(prompt + completion, add_special_tokens=False)["input_ids"][: max_length - 1] + [tok.eos_token_id]
        labels = list(ids)
    return (ids, labels) if any(lab != -100 for lab in labels) else None


def collate(batch: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a micro-batch: input_ids, attention_mask and labels (−100 on padding) [B, T]."""
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, (ids, labs) in enumerate(batch):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        labels[i, : len(labs)] = torch.tensor(labs)
        mask[i, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def _lr_lambda(warmup: int, total: int):
    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(1, warmup)
        progress = (step - warmup) / max(1, total - warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return f


def train_causal_lm(model, tok, encoded: list[tuple[list[int], list[int]]], cfg: SFTConfig, out_dir: str | Path,
                    desc: str = "sft", dist: Distributed | None = None) -> dict:
    """The training loop shared by ``rlhf sft`` and the bundled model's build. Returns a summary.

    ``dist``: the process group (default: this process alone); each process trains on its share of
    every batch, and only the main one writes checkpoints and metrics."""
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    dist = dist or Distributed(device.type)
    dist.local_rows(cfg.batch_size, "--batch-size")  # must split evenly over the processes
    micro = max(1, cfg.batch_size // dist.world_size // cfg.grad_accum)
    steps_per_epoch = max(1, len(encoded) // cfg.batch_size)
    total_steps = max(1, int(steps_per_epoch * cfg.epochs))
    if cfg.max_steps:
        total_steps = min(total_steps, cfg.max_steps)
    params = [p for p in model.parameters() if p.requires_grad]
    optim = adamw(params, device, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(optim, _lr_lambda(cfg.warmup_steps, total_steps))
    train_model, optim = dist.prepare(model, optim)
    ckpts = CheckpointManager(out_dir, keep=cfg.keep_checkpoints)

    step = 0
    latest = ckpts.latest() if cfg.resume else None
    if latest is not None:
        check_resume_options(latest, cfg, ckpts.load_state(latest).get("config"))
        load_model_weights(model, latest / "model")
        ts = ckpts.load_trainer_state(latest)
        optim.load_state_dict(ts["optimizer"])
        sched.load_state_dict(ts["scheduler"])
        set_rng_state(ts["rng"])
        step = ckpts.load_state(latest)["step"]
        if dist.is_main:
            click.echo(f"resuming from {latest} (step {step} of {total_steps})", err=True)

    def save(at: int) -> None:
        with dist.main_first() as main:
            if main:
                ckpts.save(at, lambda d: _save_model_folder(model, tok, d / "model"),
                           {"total_steps": total_steps, "config": config_to_dict(cfg), "processes": dist.world_size},
                           {"optimizer": optim.state_dict(), "scheduler": sched.state_dict(), "rng": rng_state()})

    logger = MetricsLogger(out_dir, resume_step=step if latest is not None else None) if dist.is_main else None
    train_model.train()
    bar = tqdm(total=total_steps, initial=step, desc=desc, unit="step", disable=not dist.is_main)
    t0, tokens = time.perf_counter(), 0
    last_loss = float("nan")
    while step < total_steps:
        epoch, within = divmod(step, steps_per_epoch)
        order = epoch_order(len(encoded), cfg.seed, epoch)
        batch_ids = order[within * cfg.batch_size:(within + 1) * cfg.batch_size]
        optim.zero_grad(set_to_none=True)
        # Token-level mean over the whole optimizer batch (every process's share), so accumulation
        # and the number of processes give the same gradient.
        n_label = sum(sum(1 for lab in encoded[i][1][1:] if lab != -100) for i in batch_ids)
        mine = dist.shard(batch_ids, "--batch-size")
        loss_sum = torch.zeros((), device=device)
        for m in range(0, len(mine), micro):
            b = collate([encoded[i] for i in mine[m:m + micro]], tok.pad_token_id)
            b = {k: v.to(device) for k, v in b.items()}
            with dist.no_sync(train_model, skip=m + micro < len(mine)):
                logits = train_model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), b["labels"][:, 1:].flatten(),
                                                         ignore_index=-100, reduction="sum") / max(1, n_label)
                dist.backward(loss)  # a non-finite loss shows in the (global) gradient norm below
            loss_sum += loss.detach()
            tokens += int(b["attention_mask"].sum())
        grad_norm = dist.clip_grad_norm_(train_model, params, cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf"))
        loss_sum = float(dist.sum(loss_sum))
        if not (math.isfinite(loss_sum) and torch.isfinite(grad_norm)):
            raise TrainingError(f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient norm'} at step {step}; "
                                f"the last good checkpoint is kept in {ckpts.root}")
        optim.step()
        sched.step()
        step += 1
        last_loss = loss_sum
        if logger is not None:
            logger.log(step, {"loss": loss_sum, "grad_norm": float(grad_norm), "lr": sched.get_last_lr()[0],
                              "epoch": step / steps_per_epoch})
        bar.update(1)
        bar.set_postfix(loss=f"{loss_sum:.3f}")
        if cfg.save_every and step % cfg.save_every == 0 and step < total_steps:
            save(step)
    bar.close()
    save(step)
    if logger is not None:
        logger.close()
    elapsed = time.perf_counter() - t0
    tokens = int(dist.sum(torch.tensor(tokens, device=device)))
    return {"steps": step, "final_loss": last_loss, "seconds": round(elapsed, 2),
            "tokens_per_second": round(tokens / elapsed, 1) if elapsed > 0 else None}


def _save_model_folder(model, tok, folder: Path) -> None:
    """The model with its tokenizer: the final model/, and each checkpoint's, so an intermediate step
    can be evaluated as it is (``rlhf agent eval --model OUT/checkpoints/step-N/model``)."""
    model.save_pretrained(str(folder), safe_serialization=True)
    tok.save_pretrained(str(folder))


def load_sft_data(path: str, tok, cfg: SFTConfig) -> list[tuple[list[int], list[int]]]:
    from rlhf.data.io import read_records
    from rlhf.data.records import SFTRecord

    if cfg.chat_template and Path(path).is_file() and is_episode_file(path):
        # Multi-turn agent episodes (rlhf/agents/episode.py): loss on the tokens the model wrote only.
        encoded, too_long = encode_episode_file(path, tok, cfg.max_length)
        if too_long:
            click.echo(f"{path}: {too_long} episodes longer than --max-length {cfg.max_length} left out", err=True)
        if len(encoded) < cfg.batch_size:
            raise ConfigError(f"{path}: {len(encoded)} usable episodes, fewer than --batch-size {cfg.batch_size}")
        return encoded
    encoded, cuts = [], Counter()
    for r in read_records(path, SFTRecord):
        e = encode_example(tok, r.prompt, r.completion, cfg.max_length, cfg.chat_template, cuts)
        if e is not None:
            encoded.append(e)
        cuts["examples"] += 1
    if cuts["prompts_cut"] or cuts["replies_cut"] or len(encoded) < cuts["examples"]:
        print(f"sft: to fit --max-length {cfg.max_length}, {cuts['prompts_cut']} of {cuts['examples']} examples lost the "
              f"start of their prompt and {cuts['replies_cut']} the end of their reply; {cuts['examples'] - len(encoded)} "
              "were dropped (no reply token fit)", file=sys.stderr)
    if len(encoded) < cfg.batch_size:
        raise ConfigError(f"{path}: {len(encoded)} usable examples, fewer than --batch-size {cfg.batch_size}")
    return encoded


def run_sft(cfg: SFTConfig) -> dict | None:
    """Run ``rlhf sft``; returns the summary (on the main process; the others return None)."""
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer

    rt = start(cfg.engine)
    seed_everything(cfg.seed)
    tok = load_tokenizer(cfg.model, padding_side="right")
    model = load_causal_lm(cfg.model, device=rt.device, dtype=rt.dtype, train=True)
    if (ctx := context_length(model, tok)) is not None and cfg.max_length > ctx:
        raise ConfigError(f"--max-length {cfg.max_length} exceeds the {ctx} positions {cfg.model} reads")
    disable_dropout(model)  # exact resume needs deterministic forward passes
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                                 task_type="CAUSAL_LM"))
    encoded = load_sft_data(cfg.data, tok, cfg)
    summary = train_causal_lm(model, tok, encoded, cfg, cfg.out, dist=rt.dist)
    with rt.dist.main_first() as main:
        if not main:
            return None
        if cfg.lora:
            model = model.merge_and_unload()
        final = Path(cfg.out) / "model"
        staged = staging_dir(final)
        tok.padding_side = "left"
        _save_model_folder(model, tok, staged)
        publish_dir(staged, final)
        summary.update(examples=len(encoded), model=str(final), peak_rss_mb=round(peak_rss_mb()), processes=rt.dist.world_size)
        atomic_write_json(Path(cfg.out) / "summary.json", {**summary, "config": config_to_dict(cfg)})
    return summary


@config_command(SFTConfig, name="sft")
def sft_command(cfg: SFTConfig) -> None:
    """Fine-tune on prompt/completion data; loss on completion tokens; exact resume; optional LoRA."""
    summary = run_sft(cfg)
    if summary is not None:  # the main process of a multi-process run prints for all
        click.echo(json.dumps(summary))
