"""``rlhf cai revise | label | calibrate``: thin command-line entry points over rlhf/cai."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.cai.recipe import CAIOptions, print_summary, run_cai_demo
from rlhf.config import config_command, config_to_dict, opt
from rlhf.demo import DemoConfig
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError


@click.group(name="cai")
def cai() -> None:
    """Constitutional AI: critique and revise under a constitution; AI feedback in place of human labels."""


@dataclass(kw_only=True)
class ModelAccess:
    """How a model is reached and run (shared by the three verbs)."""

    constitution: str = opt("default", help="Constitution YAML file, or 'default' for the shipped one.")
    api_key: str = opt("", help="Bearer key for an endpoint.")
    timeout: float = opt(60.0, help="Seconds to wait for one endpoint answer.")
    retries: int = opt(3, help="Retries of a failed endpoint request (exponential backoff).")
    rate_limit: float = opt(0.0, help="Most endpoint requests per second (0 = no limit).")
    cache: str = opt("", help="Answer cache (SQLite file) so a rerun pays for nothing twice; default in the output "
                              "folder (feedback-cache.sqlite); 'off' = none.")
    batch_size: int = opt(8, help="Sequences per forward pass (or generation batch) of a local model.")
    seed: int = opt(0, help="Seed: principles drawn, sampling, which reply is shown first.")
    engine: EngineConfig = opt(factory=EngineConfig, help="How a local model and the evaluators run (device, dtype, "
                                                          "threads; a local model samples with transformers' generate).")

    def open_model(self, model: str, endpoint: str, tokenizer: str, out_dir: Path, rt, required: bool = False):
        """The model to ask, run on ``rt`` (the Runtime ``start(self.engine)`` returned)."""
        from rlhf.cai.feedback import load_feedback_model

        if required and (not model or model == "none") and not endpoint:
            raise ConfigError("this command needs a model: a local folder or named model, or an endpoint URL")
        cache = None if self.cache == "off" else (self.cache or str(out_dir / "feedback-cache.sqlite"))
        return load_feedback_model(model or None, endpoint or None, device=rt.device, dtype=rt.dtype,
                                   tokenizer=tokenizer or None,
                                   cache=cache, timeout=self.timeout, retries=self.retries, rate_limit=self.rate_limit,
                                   api_key=self.api_key, batch_size=self.batch_size)


@dataclass(kw_only=True)
class FeedbackOptions(ModelAccess):
    feedback_model: str = opt("", help="Feedback model: a local Hugging Face causal-LM folder or named model; with "
                                       "--feedback-endpoint the model name on that server; 'none' = evaluators only.")
    feedback_endpoint: str = opt("", help="Base URL of an OpenAI-compatible server (rlhf serve, vLLM, llama.cpp) whose "
                                          "completions API (with logprobs) serves the feedback model.")
    feedback_tokenizer: str = opt("", help="With --feedback-endpoint: a local tokenizer whose chat template formats the "
                                           "prompts (default: plain Human:/Assistant: text).")

    def open_feedback(self, out_dir: Path, rt):
        return self.open_model(self.feedback_model, self.feedback_endpoint, self.feedback_tokenizer, out_dir, rt)


@dataclass(kw_only=True)
class JudgeOptions(FeedbackOptions):
    method: str = opt("likelihood", help="How the feedback model is asked: likelihood (no question: PMI of each reply "
                                         "with the principles' personas; the best measured against human choices), "
                                         "choice, fewshot, reasoning or pointwise.")
    debias: str = opt("logit", help="Position bias: none (one order), average (both orders' probabilities), "
                                    "logit (both orders' log-odds).")
    principles_per_pair: int = opt(0, help="Principles drawn at random per comparison (0 = all of them).")
    feedback_weight: float = opt(1.0, help="Weight of the feedback model's verdict against the evaluators' weights.")
    evaluators: bool = opt(True, help="Ask the evaluators the constitution's principles name.")
    fewshot_examples: int = opt(2, help="Worked comparisons shown first (method fewshot).")
    reasoning_tokens: int = opt(48, help="Length of the explanation written before the answer (method reasoning).")

    def settings(self):
        from rlhf.cai.labeler import LabelerSettings

        s = LabelerSettings(method=self.method, debias=self.debias, principles_per_pair=self.principles_per_pair,
                            feedback_weight=self.feedback_weight, use_evaluators=self.evaluators,
                            fewshot_examples=self.fewshot_examples, reasoning_tokens=self.reasoning_tokens, seed=self.seed)
        s.validate()
        return s


# ---------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class ReviseConfig(ModelAccess):
    """Critique-revision chains under a constitution; the final revisions form an SFT file (SL-CAI)."""

    model: str = opt(help="The model that answers, critiques and revises itself: a local folder or named model "
                          "(or the served model's name with --endpoint).")
    endpoint: str = opt("", help="Base URL of an OpenAI-compatible server serving --model (instead of running it here).")
    tokenizer: str = opt("", help="With --endpoint: a local tokenizer whose chat template formats the prompts.")
    prompts: str = opt(help="Prompts file (JSON Lines with id and prompt).")
    out: str = opt(help="Output folder: chains.jsonl (every step), sft.jsonl (prompt, final revision), summary.json.")
    rounds: int = opt(1, help="Critique-revision rounds per prompt, each under a principle drawn at random.")
    examples: int = opt(2, help="Worked critique/revision examples from the constitution shown first.")
    max_new_tokens: int = opt(96, help="Longest reply, critique or revision in tokens.")
    temperature: float = opt(0.7, help="Sampling temperature (0 = greedy).")
    limit: int = opt(0, help="Use only the first N prompts (0 = all).")

    def validate(self) -> None:
        if self.rounds < 1 or self.max_new_tokens < 1 or self.examples < 0 or self.limit < 0:
            raise ConfigError("--rounds and --max-new-tokens must be at least 1, --examples and --limit not negative")


@config_command(ReviseConfig, name="revise")
def revise(cfg: ReviseConfig) -> None:
    """Sample a reply, critique it under a principle drawn at random, revise it; N rounds per prompt."""
    from rlhf.cai.constitution import load_constitution
    from rlhf.cai.revise import run_revise
    from rlhf.engine.runtime import start
    from rlhf.data.io import read_records, write_records
    from rlhf.data.records import PromptRecord

    rt = start(cfg.engine)
    out = Path(cfg.out)
    constitution = load_constitution(cfg.constitution)
    model = cfg.open_model(cfg.model, cfg.endpoint, cfg.tokenizer, out, rt, required=True)
    prompts = cfg.prompts
    if cfg.limit:
        prompts = str(out / "prompts.jsonl")
        write_records(prompts, read_records(cfg.prompts, PromptRecord)[: cfg.limit])
    summary = run_revise(model, constitution, prompts, out, rounds=cfg.rounds, examples=cfg.examples,
                         max_new_tokens=cfg.max_new_tokens, temperature=cfg.temperature, seed=cfg.seed,
                         batch=cfg.batch_size)
    click.echo(json.dumps(summary))


# ---------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class LabelConfig(JudgeOptions):
    """AI feedback: rank every prompt's completions under a constitution (rankings contract, soft probabilities)."""

    completions: str = opt(help="Completions file ({prompt_id, prompt, completions: [...]} per line).")
    out: str = opt(help="Rankings file to write (JSON Lines), atomically; a summary goes next to it (.summary.json).")
    calibration: str = opt("", help="calibration.json from `rlhf cai calibrate` for this judge: the command warns loudly "
                                    "when it says the judge is near chance.")


def run_label(cfg: LabelConfig) -> dict:
    """Label the completions file; returns the summary also written next to the rankings."""
    from rlhf.cai.calibrate import chance_warning, print_banner
    from rlhf.cai.constitution import load_constitution
    from rlhf.cai.label import label_completions
    from rlhf.cai.labeler import AILabeler
    from rlhf.engine.runtime import start
    from rlhf.data.io import read_records, write_records
    from rlhf.data.records import CompletionsRecord
    from rlhf.utils.io import atomic_write_json

    rt = start(cfg.engine)
    out = Path(cfg.out)
    constitution = load_constitution(cfg.constitution)
    settings = cfg.settings()
    records = read_records(cfg.completions, CompletionsRecord)
    feedback = cfg.open_feedback(out.parent, rt)
    warning = None
    if feedback is not None:
        with_evaluators = settings.use_evaluators and bool(constitution.evaluators)
        warning = chance_warning(cfg.calibration, settings, with_evaluators) if cfg.calibration else (
            "this judge is UNCALIBRATED: nothing says how often it agrees with people. Run `rlhf cai calibrate` on "
            "human preference pairs and pass --calibration; a small feedback model is often near chance.")
    if warning:
        print_banner(warning)
    labeler = AILabeler(constitution, feedback, settings, device=str(rt.device))
    rankings, summary = label_completions(labeler, records)
    write_records(out, rankings)
    summary.update(constitution=constitution.name, warning=warning, out=str(out), config=config_to_dict(cfg))
    summary["config"].pop("api_key", None)
    atomic_write_json(out.with_name(out.name + ".summary.json"), summary)
    if warning:
        print_banner(warning)  # again at the end, where it is seen
    return summary


@config_command(LabelConfig, name="label")
def label(cfg: LabelConfig) -> None:
    """Compare every pair of completions under principles drawn at random; write rankings with soft preferences."""
    summary = run_label(cfg)
    click.echo(json.dumps({k: summary[k] for k in ("records", "comparisons", "first_decider", "labeler", "out")}))


# ---------------------------------------------------------------------------------------------

@dataclass(kw_only=True)
class CalibrateConfig(JudgeOptions):
    """Agreement of the AI labeler with human choices, per method, principle and debiasing, with CIs."""

    pairs: str = opt(help="Human preference pairs (any pairs layout, e.g. Anthropic-HH dialogues; .jsonl.gz works).")
    out: str = opt(help="Output folder: calibration.json, table.txt, the answer cache.")
    methods: list[str] = opt(help="Methods to measure (repeat): likelihood, choice, fewshot, reasoning, pointwise.",
                             factory=lambda: ["likelihood", "choice", "fewshot", "pointwise"])
    principles: list[str] = opt(help="Principle ids to ask (repeat; default all).", factory=list)
    draw: int = opt(4, help="Also score the labeler that draws this many principles per pair (0 = skip).")
    reference: list[str] = opt(help="Scorers to compare against on the same pairs (repeat), e.g. rm:DIR of a reward "
                                    "model trained on human pairs.", factory=list)
    limit: int = opt(0, help="Use only the first N pairs (0 = all).")


@config_command(CalibrateConfig, name="calibrate")
def calibrate(cfg: CalibrateConfig) -> None:
    """Agreement with human choices for each method, principle and way of handling position bias."""
    from rlhf.cai.calibrate import calibrate as run, format_table, labeler_row, near_chance_message, print_banner
    from rlhf.cai.constitution import load_constitution
    from rlhf.train.reward import read_pairs
    from rlhf.engine.runtime import start
    from rlhf.utils.io import atomic_write_json, atomic_write_text

    rt = start(cfg.engine)
    out = Path(cfg.out)
    constitution = load_constitution(cfg.constitution)
    settings = cfg.settings()
    pairs, skipped = read_pairs(cfg.pairs, skip_bad=True)
    if cfg.limit:
        pairs = pairs[: cfg.limit]
    feedback = cfg.open_feedback(out, rt)
    result = run(constitution, feedback, pairs, list(cfg.methods), list(cfg.principles), cfg.draw, list(cfg.reference),
                 settings, device=str(rt.device))
    result.update(source=cfg.pairs, skipped_pairs=len(skipped), constitution=constitution.name,
                  feedback_model=getattr(feedback, "name", None), config=config_to_dict(cfg))
    result["config"].pop("api_key", None)
    atomic_write_json(out / "calibration.json", result)
    table = format_table(result)
    atomic_write_text(out / "table.txt", table + "\n")
    click.echo(table)
    # Warn about the labeler `rlhf cai label` runs with these settings: with the evaluators when it uses them.
    row = labeler_row(result, settings, settings.use_evaluators and bool(constitution.evaluators))
    if row is not None and row["near_chance"]:
        print_banner(near_chance_message(row, str(out / "calibration.json")))
    sys.stdout.flush()


@dataclass
class CAIDemoConfig(CAIOptions, DemoConfig):
    """The whole loop with AI feedback under a constitution (the demo's options plus the recipe's)."""


@config_command(CAIDemoConfig, name="demo")
def demo(cfg: CAIDemoConfig) -> None:
    """Base → SL-CAI (critique, revise, SFT) → AI labels → reward model → PPO = RL-CAI → evaluation."""
    summary = run_cai_demo(cfg, cfg)
    print_summary(summary)
    click.echo(json.dumps({"summary": str(Path(cfg.out) / "summary.json"), "report": summary["eval_report"]}))


cai.add_command(revise)
cai.add_command(label)
cai.add_command(calibrate)
cai.add_command(demo)
