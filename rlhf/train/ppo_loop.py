"""A whole PPO run: load models, loop ``ppo_step`` until a stop criterion fires, checkpoint, resume.

Stop criteria, checked on each step's rollouts before its update (whichever fires first):
``reward_threshold`` (mean score ≥ --score-threshold), ``kl_ceiling`` (mean KL > --kl-ceiling),
``reward_hacking`` (the over-optimisation watch flagged, with --stop-on-hacking), ``max_steps``.

Exact resume: a checkpoint holds the policy (or its LoRA adapter), the value head, the optimizer,
the KL controller, the watch, the RNG state and the step (the data position is a function of the
step). Killed at any point and started again with the same command, a run continues from its last
checkpoint and ends with the same weights and metrics as an uninterrupted one.

Under ``accelerate launch`` every process runs this loop on its share of each step's episodes;
the stop criteria and the watch see global statistics, so all processes stop at the same step,
and only the main process writes checkpoints, metrics and models.
"""

from __future__ import annotations

import math
import shutil
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from rlhf.config import config_to_dict
from rlhf.engine.distributed import Distributed
from rlhf.engine.runtime import Runtime, start
from rlhf.errors import ConfigError, TrainingError
from rlhf.rollout.backends import make_backend
from rlhf.rollout.experience import Experience
from rlhf.train.ppo import PPOTrainer
from rlhf.train.ppo_config import PPOConfig
from rlhf.utils.checkpoint import CheckpointManager, check_resume_options
from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir
from rlhf.utils.metrics import MetricsLogger, peak_rss_mb
from rlhf.utils.seed import epoch_order, rng_state, seed_everything, set_rng_state

VALUE_HEAD_FILE = "value_head.safetensors"


def step_prompts(prompts: list[str], step: int, batch_size: int, seed: int) -> list[str]:
    """The prompts of step ``step`` (0-based): consecutive slices of per-epoch shuffles, a function of
    (seed, step) alone, so a resumed run picks up exactly where it stopped."""
    n = len(prompts)
    orders: dict[int, list[int]] = {}  # a step spans at most a few epochs; shuffle each once
    out = []
    for i in range(step * batch_size, (step + 1) * batch_size):
        epoch, within = divmod(i, n)
        if epoch not in orders:
            orders[epoch] = epoch_order(n, seed, epoch)
        out.append(prompts[orders[epoch][within]])
    return out


def _load_models(cfg: PPOConfig, rt: Runtime):
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer

    device = rt.device
    tok = load_tokenizer(cfg.policy)
    policy = load_causal_lm(cfg.policy, device=device, dtype=rt.dtype)
    disable_dropout(policy)  # PPO's ratio needs the same function at sampling and update time
    reference = None
    if cfg.lora:
        from peft import LoraConfig, get_peft_model

        policy = get_peft_model(policy, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, target_modules="all-linear",
                                                   lora_dropout=0.0, task_type="CAUSAL_LM"))
    if not cfg.lora or cfg.reference:
        reference = load_causal_lm(cfg.reference or cfg.policy, device=device, dtype=rt.dtype)
        disable_dropout(reference)
        if cfg.reference and len(load_tokenizer(cfg.reference)) != len(tok):
            raise ConfigError(f"--reference {cfg.reference} has another vocabulary than --policy {cfg.policy}")
    return policy, tok, reference


class _Watcher:
    """Runs the over-optimisation watch on a step's rollouts (every ``watch_every`` steps)."""

    def __init__(self, cfg: PPOConfig, device):
        from rlhf.eval.watch import OveroptimisationWatch
        from rlhf.judges import RepetitionScorer, load_scorer

        self.cfg = cfg
        self.gold = load_scorer(cfg.gold, str(device))
        self.repetition = RepetitionScorer()
        self.watch = OveroptimisationWatch(patience=cfg.watch_patience, max_length_ratio=cfg.max_length_ratio,
                                           max_repetition_increase=cfg.max_repetition_increase)

    def due(self, step: int) -> bool:
        return step % self.cfg.watch_every == 0

    def observe(self, step: int, exp: Experience, stats: dict, dist: Distributed) -> tuple[str | None, bool]:
        """Score with the gold judge; returns (flag or None, whether this is the best gold so far).
        Means are over the global batch, so every process's watch takes the same decisions."""
        from rlhf.eval.watch import WatchPoint
        from rlhf.judges import score_checked

        local = torch.stack([score_checked(self.gold, exp.prompts, exp.texts),
                             score_checked(self.repetition, exp.prompts, exp.texts)], dim=1)
        gold, rep = dist.gather(local.to(exp.scores.device)).unbind(dim=1)
        sign = 1.0 if self.gold.higher_is_better else -1.0  # the watch treats higher gold as better
        best_before = self.watch.best_gold
        point = WatchPoint(step=step, kl=stats["kl"], proxy=stats["score_mean"], gold=sign * float(gold.mean()),
                           length=stats["response_length"], repetition=float(rep.mean()))
        flag = self.watch.update(point)
        stats.update(gold_mean=float(gold.mean()), repetition=float(rep.mean()))
        return flag, point.gold > best_before


def run_ppo(cfg: PPOConfig) -> dict | None:
    """Run PPO to a stop criterion; returns the summary also written to ``out/summary.json`` (on the
    main process; the others return None)."""
    from rlhf.data.context import fit_prompts, prompt_budget
    from rlhf.data.io import read_records
    from rlhf.data.records import PromptRecord
    from rlhf.judges import load_scorer
    from rlhf.models.loading import load_model_weights, shipped_prompts

    rt = start(cfg.engine)
    dist, device = rt.dist, rt.device
    for name in ("batch_size", "mini_batch_size"):
        dist.local_rows(getattr(cfg, name), f"--{name.replace('_', '-')}")  # each must split evenly over processes
    out = Path(cfg.out)
    seed_everything(cfg.seed)
    prompts = [p.prompt for p in read_records(cfg.prompts or shipped_prompts("train"), PromptRecord)]
    if not prompts:
        raise ConfigError(f"{cfg.prompts or shipped_prompts('train')}: no prompts")
    policy, tok, reference = _load_models(cfg, rt)
    prompts, cuts = fit_prompts(tok, prompts, prompt_budget(policy, tok, cfg.max_new_tokens), cfg.long_prompts,
                                source=cfg.prompts or str(shipped_prompts("train")))
    cuts.report("ppo")
    trainer = PPOTrainer(cfg, policy, tok, load_scorer(cfg.reward, str(device)), reference, device, dist=dist,
                         backend=make_backend(rt.engine, policy, tok))
    watcher = _Watcher(cfg, device) if cfg.gold else None
    ckpts = CheckpointManager(out, keep=cfg.keep_checkpoints)

    latest = ckpts.latest() if cfg.resume else None
    stop_reason, wall_before = None, 0.0
    if latest is not None:
        state = ckpts.load_state(latest)
        check_resume_options(latest, cfg, state.get("config"))
        load_model_weights(policy, latest / "model")
        _load_value_head(trainer, latest / VALUE_HEAD_FILE)
        ts = ckpts.load_trainer_state(latest)
        trainer.optimizer.load_state_dict(ts["optimizer"])
        trainer.kl_ctl.load_state_dict(ts["kl_controller"])
        set_rng_state(ts["rng"])
        trainer.step, stop_reason, wall_before = state["step"], state.get("stop_reason"), state.get("wall_seconds", 0.0)
        if watcher is not None and state.get("watch"):
            watcher.watch.load_state_dict(state["watch"])
        if dist.is_main:
            print(f"resuming from {latest} (step {trainer.step})", file=sys.stderr)
        stop_reason = _resume_note(out, trainer.step, stop_reason, cfg.max_steps, say=dist.is_main)

    t_start = time.perf_counter() - wall_before

    def checkpoint() -> None:
        def write(folder: Path) -> None:
            policy.save_pretrained(str(folder / "model"), safe_serialization=True)
            _save_value_head(trainer, folder / VALUE_HEAD_FILE)

        with dist.main_first() as main:  # one writer; the others wait until the checkpoint is in place
            if main:
                ckpts.save(trainer.step, write,
                           {"stop_reason": stop_reason, "wall_seconds": time.perf_counter() - t_start,
                            "config": config_to_dict(cfg), "processes": dist.world_size,
                            "watch": watcher.watch.state_dict() if watcher else None},
                           {"optimizer": trainer.optimizer.state_dict(), "kl_controller": trainer.kl_ctl.state_dict(),
                            "rng": rng_state()})

    best_gold_dir = out / "best-gold"

    def before_update(exp: Experience, stats: dict) -> bool:
        """Stop criteria and the watch, on this step's rollouts; False vetoes the update. Every input
        is a global statistic, so every process decides the same."""
        nonlocal stop_reason
        watch_now = watcher is not None and (watcher.due(trainer.step) or stop_reason is None
                                             and trainer.step + 1 >= cfg.max_steps)
        stop_reason = check_stops(cfg, watcher if watch_now else None, trainer.step + 1, exp, stats, dist,
                                  lambda: _publish_policy(policy, tok, best_gold_dir))
        return stop_reason is None

    logger = MetricsLogger(out, resume_step=trainer.step if latest is not None else None) if dist.is_main else None
    bar = tqdm(total=cfg.max_steps, initial=trainer.step, desc="ppo", unit="step", disable=not (cfg.progress and dist.is_main))
    try:
        while stop_reason is None and trainer.step < cfg.max_steps:
            batch = step_prompts(prompts, trainer.step, cfg.batch_size, cfg.seed)
            stats, _ = trainer.ppo_step(batch, before_update)
            if logger is not None:
                logger.log(trainer.step, {**stats, "stop_reason": stop_reason} if stop_reason else stats)
            bar.update(1)
            bar.set_postfix(score=f"{stats['score_mean']:.3f}", kl=f"{stats['kl']:.2f}", beta=f"{stats['beta']:.3f}")
            if stop_reason is None and trainer.step >= cfg.max_steps:
                stop_reason = "max_steps"
            if stop_reason is not None or trainer.step % cfg.save_every == 0:
                checkpoint()
    finally:
        bar.close()
        if logger is not None:
            logger.close()
    if stop_reason is None:  # resumed a run that had already finished its steps
        stop_reason = "max_steps"

    return finish_run(cfg, out, policy, tok, dist, stop_reason, best_gold_dir, watcher,
                      lambda: _summary(cfg, out, trainer, stop_reason, time.perf_counter() - t_start, watcher),
                      lambda: _save_value_head(trainer, out / VALUE_HEAD_FILE))


def finish_run(cfg, out: Path, policy, tok, dist: Distributed, stop_reason: str, best_gold_dir: Path,
               watcher: "_Watcher | None", make_summary, save_extra=None) -> dict | None:
    """The end of a PPO or GRPO run, on the main process (the others return None): publish the final
    policy (the best-gold one when the watch stopped the run, else the last), ``save_extra()`` beside
    it, and write summary.json (``make_summary()`` plus the process count and config) and watch.json."""
    from rlhf.models.loading import load_model_weights

    summary = None
    with dist.main_first() as main:
        if main:
            if stop_reason == "reward_hacking" and best_gold_dir.is_dir():
                load_model_weights(policy, best_gold_dir / "adapter" if cfg.lora else best_gold_dir)
            _publish_policy(policy, tok, out / "model")
            if save_extra is not None:
                save_extra()
            summary = make_summary()
            summary["processes"] = dist.world_size
            atomic_write_json(out / "summary.json", {**summary, "config": config_to_dict(cfg)})
            if watcher is not None:
                atomic_write_json(out / "watch.json", watcher.watch.summary())
    return summary


def _summary(cfg: PPOConfig, out: Path, trainer: PPOTrainer, stop_reason: str, wall: float, watcher) -> dict:
    from rlhf.utils.metrics import read_metrics

    rows = read_metrics(out)
    first, last = (rows[0], rows[-1]) if rows else ({}, {})
    stages = ("time_generate", "time_score", "time_forward", "time_update", "time_watch")
    totals = {k.removeprefix("time_"): round(sum(r.get(k, 0.0) for r in rows), 2) for k in stages}
    step_time = sum(r.get("time_step", 0.0) for r in rows)
    episodes = len(rows) * cfg.batch_size
    summary = {
        "model": str(out / "model"), "steps": trainer.step, "stop_reason": stop_reason,
        "score_first": first.get("score_mean"), "score_last": last.get("score_mean"),
        "score_best": max((r["score_mean"] for r in rows), default=None),
        "kl_last": last.get("kl"), "kl_max": max((r["kl"] for r in rows), default=None), "beta_last": trainer.kl_ctl.beta,
        "response_length_first": first.get("response_length"), "response_length_last": last.get("response_length"),
        "episodes": episodes, "episodes_per_second": round(episodes / step_time, 3) if step_time else None,
        "stage_seconds": totals, "stage_share": {k: round(v / step_time, 3) for k, v in totals.items()} if step_time else {},
        "wall_seconds": round(wall, 2), "peak_rss_mb": round(peak_rss_mb()),
    }
    if watcher is not None:
        w = watcher.watch.summary()
        summary["watch"] = {"flags": w["flags"], "best_gold_step": w["best_gold_step"], "best_gold": w["best_gold"],
                            "gao_fit": w.get("gao_fit")}
    bad = [k for k, v in summary.items() if isinstance(v, float) and not math.isfinite(v)]
    if bad:
        raise TrainingError(f"non-finite summary values {bad}")
    return summary



def check_stops(cfg, watcher: "_Watcher | None", step: int, exp: Experience, stats: dict, dist: Distributed,
                publish_best) -> str | None:
    """The stop criteria shared by PPO and GRPO, on one step's rollouts: the over-optimisation watch
    (when ``watcher`` is given: it is due), the KL ceiling and the score threshold. Returns the stop
    reason, or None to go on. ``publish_best()`` keeps the current weights as the best-gold policy
    (main process only) when the watch's gold score is its best yet; a flag goes into ``stats``."""
    if watcher is not None:
        flag, best = watcher.observe(step, exp, stats, dist)
        if best:  # these rollouts came from the current weights: keep them as the best-gold policy
            with dist.main_first() as main:
                if main:
                    publish_best()
        if flag:
            stats["hacking_flag"] = flag
            if dist.is_main:
                print(f"over-optimisation watch: {flag}", file=sys.stderr)
            if cfg.stop_on_hacking:
                return "reward_hacking"
    if cfg.kl_ceiling is not None and stats["kl"] > cfg.kl_ceiling:
        return "kl_ceiling"
    if cfg.score_threshold is not None and stats["score_mean"] >= cfg.score_threshold:
        return "reward_threshold"
    return None

def _resume_note(out: Path, step: int, stop_reason: str | None, max_steps: int, say: bool = True) -> str | None:
    """Say what resuming a finished run does: a higher --max-steps extends it, anything else is a no-op.

    A run stopped by its step limit continues where it stopped when asked for more steps (nothing in
    a step depends on --max-steps, so the policy follows the same path as a longer run). One stopped
    by another criterion, or asked for no more steps, stays as it is, and the message says how to
    train further. Returns the stop reason that still holds (None when the run goes on).
    """
    if stop_reason is None:
        return None
    if stop_reason == "max_steps" and max_steps > step:
        if say:
            print(f"{out} holds a run that finished its {step} steps; extending it to --max-steps {max_steps}",
                  file=sys.stderr)
        return None
    how = (f"raise --max-steps above {step} to extend it, or " if stop_reason == "max_steps" else "")
    if say:
        print(f"{out} already holds a finished run (stopped: {stop_reason} after {step} steps), so there is nothing to "
              f"train; {how}use another --out (or --no-resume) to start a new run", file=sys.stderr)
    return stop_reason


def _save_value_head(trainer: PPOTrainer, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in trainer.value_head.state_dict().items()}, str(path))


def _load_value_head(trainer: PPOTrainer, path: Path) -> None:
    from safetensors.torch import load_file

    if not path.is_file():
        raise TrainingError(f"checkpoint {path.parent} has no {VALUE_HEAD_FILE}")
    trainer.value_head.load_state_dict(load_file(str(path)))


def _publish_policy(policy, tok, folder: Path) -> None:
    """Write the policy to ``folder`` atomically in HF format with its tokenizer, loadable by the
    plain Auto classes. A LoRA policy is written merged into a copy of its base weights, plus its
    adapter in ``adapter/`` so the live model can take the weights back (best-gold restore)."""
    import copy

    staged = staging_dir(folder)
    try:
        if hasattr(policy, "peft_config"):
            policy.save_pretrained(str(staged / "adapter"), safe_serialization=True)
            copy.deepcopy(policy).merge_and_unload().save_pretrained(str(staged), safe_serialization=True)
        else:
            policy.save_pretrained(str(staged), safe_serialization=True)
        tok.save_pretrained(str(staged))
        publish_dir(staged, folder)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
