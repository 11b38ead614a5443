"""``rlhf demo --recipe cai`` (and ``rlhf cai demo``): the loop with AI feedback under a constitution.

    policy ─▶ [critique and revise → SFT = SL-CAI] ─▶ K completions ─▶ AI labels under the
    constitution (soft probabilities) ─▶ pairs ─▶ reward model (soft Bradley-Terry) ─▶ PPO from
    SL-CAI = RL-CAI ─▶ base vs SL-CAI vs RL-CAI on held-out prompts ─▶ summary and report

The supervised stage needs a model that can follow a critique request; with a policy below
``SMALL_PARAMETERS`` it is skipped and the run says so. The feedback model is ``auto`` by default:
SmolLM2 where it is installed, else none, in which case the constitution's evaluators decide alone
(and the run says that too). Stages reuse the human-feedback demo's (rlhf/demo.py) and skip
themselves on a rerun once their outputs are complete.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from rlhf.config import config_to_dict, opt
from rlhf.errors import ConfigError


@dataclass
class CAIOptions:
    """What the constitutional-AI recipe adds to the demo's options."""

    constitution: str = opt("default", help="Constitution YAML file, or 'default'.")
    feedback_model: str = opt("auto", help="Feedback model: auto (smollm2 where installed, else none), a local folder or "
                                           "named model, or none (the constitution's evaluators decide alone).")
    method: str = opt("likelihood", help="How the feedback model is asked (see rlhf cai label --help).")
    principles_per_pair: int = opt(4, help="Principles drawn at random per comparison (0 = all).")
    sl_stage: str = opt("auto", help="Critique-and-revise + SFT before RL: on, off, or auto (on for models of at least "
                                     "50M parameters; smaller ones cannot follow a critique request).")
    reviser: str = opt("", help="The model that writes the critique-revision chains (default: the policy revises itself). "
                               "Bai et al. fine-tune a pretrained model on the revisions of another, helpful model; "
                               "a policy too small to follow a critique request gets its SL-CAI stage this way.")
    revise_rounds: int = opt(1, help="Critique-revision rounds per prompt.")
    revise_tokens: int = opt(64, help="Longest reply, critique or revision in tokens.")
    revise_limit: int = opt(0, help="Critique and revise only the first N prompts (0 = all).")
    sft_epochs: float = opt(2.0, help="SFT epochs on the revisions.")
    sft_lr: float = opt(2e-4, help="SFT learning rate (LoRA).")
    calibration: str = opt("", help="calibration.json of this judge from `rlhf cai calibrate` (else it is called uncalibrated).")
    temperature: float = opt(0.7, help="Sampling temperature of every stage (completions, PPO, evaluation); at 1.0 over "
                                       "the whole vocabulary small real models write word salad.")
    reply_tokens: int = opt(48, help="Longest reply in tokens (completions, PPO rollouts, evaluation).")
    lora: bool = opt(True, help="PPO trains a LoRA adapter (the reference is the adapter switched off).")
    ppo_epochs: int = opt(2, help="PPO passes over each batch of experience.")
    extra_judges: list[str] = opt(help="More evaluation judges (scorer specs, repeat), e.g. rm:DIR of a harmlessness "
                                       "reward model trained on human pairs.", factory=list)


def parameter_count(model: str) -> int:
    """Parameters of a causal LM folder from its safetensors headers (nothing is loaded)."""
    from safetensors import safe_open

    from rlhf.models.loading import resolve_model_path

    total = 0
    for f in resolve_model_path(model).glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for key in st.keys():
                n = 1
                for d in st.get_slice(key).get_shape():
                    n *= d
                total += n
    return total


def resolve_feedback(name: str) -> str:
    if name != "auto":
        return name
    from rlhf.models.loading import resolve_model_path

    try:
        resolve_model_path("smollm2")
        return "smollm2"
    except ConfigError:
        return "none"


def run_cai_demo(cfg, opts: CAIOptions) -> dict:
    """``cfg`` is the demo's DemoConfig (policy, prompts, reward and PPO settings); returns the summary.
    Every stage runs on ``cfg.engine`` (the stages it hands to other modules get the same section)."""
    from rlhf import demo as D
    from rlhf.cai.constitution import load_constitution
    from rlhf.cai.local import SMALL_PARAMETERS
    from rlhf.engine.runtime import start
    from rlhf.models.loading import shipped_prompts
    from rlhf.models.named import with_model_defaults
    from rlhf.utils.io import atomic_write_json

    # The demo's options left unset (PPO steps, batch, learning rate, evaluation samples) take what
    # suits the model, as in run_demo; the recipe's own reply length, temperature, LoRA and PPO
    # epochs are CAIOptions' (set, so never overridden here).
    cfg = with_model_defaults(cfg)
    rt = start(cfg.engine)  # each stage applies the same section again; the first says what it chose
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    prompts = cfg.prompts or str(shipped_prompts("train"))
    eval_prompts = cfg.eval_prompts or str(shipped_prompts("eval"))
    feedback = resolve_feedback(opts.feedback_model)
    reviser = opts.reviser or cfg.policy
    sl = opts.sl_stage == "on" or (opts.sl_stage == "auto" and parameter_count(reviser) >= SMALL_PARAMETERS)
    notes = []
    if feedback == "none":
        notes.append("no feedback model (SmolLM2 is not installed): the constitution's evaluators alone decided the labels")
    if not sl:
        notes.append(f"the supervised stage was skipped: {reviser} is too small to follow a critique request")
    elif reviser != cfg.policy:
        notes.append(f"the critique-revision chains were written by {reviser}; {cfg.policy} was fine-tuned on them")
    for n in notes:
        D._say(f"  note: {n}")
    # Seconds per stage, kept across runs: a rerun that skips finished stages still reports them all.
    stages_file = out / "stages.json"
    stages: dict[str, float] = json.loads(stages_file.read_text()) if cfg.resume and stages_file.is_file() else {}

    def stage(name: str, done: Path, fn) -> None:
        if cfg.resume and done.exists():
            D._say(f"[{name}] already done ({done}); skipping")
            return
        D._say(f"[{name}] ...")
        t = time.perf_counter()
        fn()
        stages[name] = round(time.perf_counter() - t, 1)
        atomic_write_json(stages_file, stages)
        D._say(f"[{name}] done in {stages[name]} s")

    start = cfg.policy
    if sl:
        revise_dir, sl_dir = out / "revise", out / "sl"
        stage("revise", revise_dir / "summary.json", lambda: _revise(cfg, opts, prompts, revise_dir, rt))
        stage("sft", sl_dir / "summary.json", lambda: _sft(cfg, opts, revise_dir / "sft.jsonl", sl_dir))
        start = str(sl_dir / "model")
    run = dataclasses.replace(cfg, policy=start)
    completions = out / "completions.jsonl"
    stage("generate", completions, lambda: _generate(run, opts, prompts, completions))
    rankings = out / "rankings.jsonl"
    stage("label", rankings, lambda: _label(cfg, opts, feedback, completions, rankings))
    pairs = out / "pairs.jsonl"
    stage("pairs", pairs, lambda: D._pairs(rankings, pairs))
    reward_dir = out / "reward"
    stage("reward", reward_dir / "summary.json", lambda: D._reward(cfg, pairs, reward_dir))
    ppo_dir = out / "ppo"
    stage("ppo", ppo_dir / "summary.json", lambda: _ppo(run, opts, prompts, reward_dir / "model", completions, ppo_dir))
    models = [cfg.policy] + ([start] if sl else []) + [str(ppo_dir / "model")]
    eval_dir = out / "eval"
    judges = [*D.JUDGES, cfg.labeler_scorer, f"rm:{reward_dir / 'model'}", *opts.extra_judges]
    optimised = optimised_judges(load_constitution(opts.constitution), judges, reward_dir / "model")
    stage("eval", eval_dir / "eval.json", lambda: _eval(cfg, opts, eval_prompts, models, judges, optimised, eval_dir))

    ev = json.loads((eval_dir / "eval.json").read_text())
    names = {m: label for m, label in zip(models, ["base"] + (["SL-CAI"] if sl else []) + ["RL-CAI"])}
    table = {}
    for row in ev["table"]:
        name = names.get(row["model"].split("#")[0], row["model"])
        table.setdefault(row["judge"], {})[name] = {"mean": row["mean"], "ci95": [row["ci_low"], row["ci_high"]]}
    label_summary = json.loads((out / "rankings.jsonl.summary.json").read_text())
    summary = {"recipe": "cai", "feedback_model": feedback, "supervised_stage": sl, "notes": notes,
               "optimised_judges": optimised,
               "labeling": {k: label_summary[k] for k in ("comparisons", "first_decider", "confident_share", "warning")},
               "judges": table, "stage_seconds": stages, "eval_report": str(eval_dir / "report.html"),
               "config": {"demo": config_to_dict(cfg), "cai": config_to_dict(opts)}}
    atomic_write_json(out / "summary.json", summary)
    return summary


# Scorer specs that read the same classifier: optimising one optimises the others.
SAME_CLASSIFIER = {"toxicity": "profanity-check", "non-toxicity": "profanity-check", "profanity": "profanity-check"}


def optimised_judges(constitution, judges: list[str], reward_model: Path) -> list[str]:
    """Judges that are not independent of the training signal: the reward model itself, and any the
    constitution used as an evaluator (or that read the same classifier). Report them as optimised."""
    used = {SAME_CLASSIFIER.get(e.scorer, e.scorer) for _, e in constitution.evaluators}
    return [j for j in judges if j == f"rm:{reward_model}" or SAME_CLASSIFIER.get(j, j) in used]


def _revise(cfg, opts: CAIOptions, prompts: str, out: Path, rt) -> None:
    from rlhf.cai.constitution import load_constitution
    from rlhf.cai.local import LocalFeedbackModel
    from rlhf.cai.revise import run_revise

    if opts.revise_limit:
        from rlhf.data.io import read_records, write_records
        from rlhf.data.records import PromptRecord

        limited = out / "prompts.jsonl"
        write_records(limited, read_records(prompts, PromptRecord)[: opts.revise_limit])
        prompts = str(limited)
    model = LocalFeedbackModel(opts.reviser or cfg.policy, device=rt.device, dtype=rt.dtype, cache=out / "cache.sqlite")
    run_revise(model, load_constitution(opts.constitution), prompts, out, rounds=opts.revise_rounds,
               max_new_tokens=opts.revise_tokens, seed=cfg.seed)


def _sft(cfg, opts: CAIOptions, data: Path, sl_dir: Path) -> None:
    from rlhf.train.sft import SFTConfig, run_sft

    examples = sum(1 for line in data.read_text(encoding="utf-8").splitlines() if line.strip())
    scfg = SFTConfig(data=str(data), out=str(sl_dir), model=cfg.policy, epochs=opts.sft_epochs,
                     lr=opts.sft_lr, lora=True, batch_size=min(8, examples), warmup_steps=2, seed=cfg.seed,
                     engine=cfg.engine)
    scfg.validate()
    run_sft(scfg)


def _label(cfg, opts: CAIOptions, feedback: str, completions: Path, rankings: Path) -> None:
    from rlhf.cai.commands import LabelConfig, run_label

    lcfg = LabelConfig(constitution=opts.constitution, feedback_model=feedback, completions=str(completions),
                       out=str(rankings), method=opts.method, principles_per_pair=opts.principles_per_pair,
                       calibration=opts.calibration, seed=cfg.seed, engine=cfg.engine)
    run_label(lcfg)


def _generate(cfg, opts: CAIOptions, prompts: str, out: Path) -> None:
    from rlhf.rollout.commands import GenerateConfig, generate_file

    generate_file(GenerateConfig(prompts=prompts, out=str(out), model=cfg.policy, num_completions=cfg.num_completions,
                                 max_new_tokens=opts.reply_tokens, temperature=opts.temperature, batch_size=32,
                                 seed=cfg.seed, engine=cfg.engine))


def _ppo(cfg, opts: CAIOptions, prompts: str, reward_model: Path, completions: Path, out: Path) -> None:
    from rlhf import demo as D
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo

    scale = D.reward_scale(reward_model, completions)
    D._say(f"  reward = {scale:.4f} × reward model (unit spread on the labeled completions)")
    batch = cfg.ppo_batch_size
    pcfg = PPOConfig(out=str(out), policy=cfg.policy, reward=f"weighted:{scale:.6g}*rm:{reward_model}", prompts=prompts,
                     max_steps=cfg.ppo_steps, batch_size=batch, mini_batch_size=min(16, batch),
                     micro_batch_size=min(8, batch), ppo_epochs=opts.ppo_epochs, lr=cfg.ppo_lr,
                     init_kl_coef=cfg.init_kl_coef, target_kl=cfg.target_kl, kl_ceiling=cfg.kl_ceiling,
                     max_new_tokens=opts.reply_tokens, temperature=opts.temperature, lora=opts.lora,
                     gold=cfg.labeler_scorer, watch_every=cfg.watch_every, seed=cfg.seed, engine=cfg.engine)
    pcfg.validate()
    run_ppo(pcfg)


def _eval(cfg, opts: CAIOptions, prompts: str, models: list[str], judges: list[str], optimised: list[str], out: Path) -> None:
    from rlhf import demo as D
    from rlhf.eval.commands import EvalConfig, run_eval

    ecfg = EvalConfig(out=str(out), model=models, prompts=prompts, judge=judges, optimised=optimised, reference=cfg.policy,
                      samples_per_prompt=cfg.eval_samples, max_new_tokens=opts.reply_tokens,
                      temperature=opts.temperature, seed=cfg.seed + 1, engine=cfg.engine)
    ecfg.validate()
    _, text = run_eval(ecfg)
    D._say(text)


def print_summary(summary: dict) -> None:
    for judge, by_model in summary["judges"].items():
        cells = "  ".join(f"{m} {v['mean']:8.3f}" for m, v in by_model.items())
        print(f"  {judge:<44} {cells}", file=sys.stderr)
    for n in summary["notes"]:
        print(f"note: {n}", file=sys.stderr)
