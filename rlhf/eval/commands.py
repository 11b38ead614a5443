"""``rlhf eval``: judge one or more models with independent scorers on held-out prompts."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import click

from rlhf.config import config_command, config_to_dict, opt
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError


@dataclass
class EvalConfig:
    """Generate with each model on the same prompts and seeds, score with every judge, write a table and a report."""

    out: str = opt(help="Output folder: eval.json, table.txt, samples.jsonl, report.html.")
    model: list[str] = opt(help="Model folder(s) to judge, first = baseline (repeat --model).", factory=lambda: ["bundled"])
    prompts: str = opt("", help="Prompts file (JSON Lines); empty = the shipped held-out prompts.")
    judge: list[str] = opt(help="Scorer spec(s) (repeat --judge): toxicity, sentiment, length, repetition, rm:DIR, ...",
                           factory=lambda: ["toxicity", "sentiment", "length", "repetition"])
    optimised: list[str] = opt(help="Judge(s) among --judge that the tuned model was trained to maximise (its reward); "
                                    "the report groups them apart from the independent judges.", factory=list)
    gold: list[str] = opt(help="Judge(s) among --judge held out from the policy but used by the labelers (the watch's "
                               "gold judge); grouped apart from the independent judges. With --optimised, the table "
                               "also says how often the reward orders two replies to a prompt as the gold judge does.",
                          factory=list)
    reference: str = opt("bundled", help="Reference model for KL and perplexity ('' = skip both).")
    samples_per_prompt: int = opt(4, help="Completions sampled per prompt and model.")
    max_new_tokens: int = opt(48, help="Longest reply in tokens.")
    temperature: float = opt(1.0, help="Sampling temperature.")
    top_p: float = opt(1.0, help="Nucleus sampling mass.")
    batch_size: int = opt(64, help="Sequences decoded together.")
    bootstrap: int = opt(2000, help="Bootstrap resamples for the confidence intervals.")
    seed: int = opt(0, help="Sampling seed (the same for every model).")
    engine: EngineConfig = opt(factory=EngineConfig, help="How sampling and scoring run (device, rollout backend, ...).")

    def validate(self) -> None:
        if not self.model:
            raise ConfigError("give at least one --model")
        if not self.judge:
            raise ConfigError("give at least one --judge")
        for flag, specs in (("--optimised", self.optimised), ("--gold", self.gold)):
            missing = [j for j in specs if j not in self.judge]
            if missing:
                raise ConfigError(f"{flag} {', '.join(missing)}: not among the --judge specs ({', '.join(self.judge)})")


def run_eval(cfg: EvalConfig):
    from rlhf.data.context import fit_prompts, prompt_budget
    from rlhf.data.io import read_records, write_records
    from rlhf.data.records import PromptRecord
    from rlhf.eval.judging import evaluate, format_table, training_roles
    from rlhf.eval.report import ReportInput, write_report
    from rlhf.judges import load_scorer
    from rlhf.engine.runtime import start
    from rlhf.models.loading import load_causal_lm, load_tokenizer, shipped_prompts
    from rlhf.rollout.backends import make_backend
    from rlhf.rollout.generate import SamplingParams
    from rlhf.utils.io import atomic_write_json, atomic_write_text

    rt = start(cfg.engine)
    if rt.engine.rollout == "vllm":
        raise ConfigError("rlhf eval samples with --rollout fast or hf (vLLM rollouts serve PPO's policy)")
    device = rt.device
    prompts = [p.prompt for p in read_records(cfg.prompts or shipped_prompts("eval"), PromptRecord)]
    judges = [load_scorer(spec) for spec in cfg.judge]
    optimised = [j for spec, j in zip(cfg.judge, judges) if spec in cfg.optimised]
    gold = [j for spec, j in zip(cfg.judge, judges) if spec in cfg.gold and spec not in cfg.optimised]
    # Roles also reach judges that share a signal with these; the reward's agreement is measured
    # against the named gold judges only (a toxicity judge is not what the labelers ranked by).
    roles = training_roles(judges, optimised, gold)
    models = {}
    for i, m in enumerate(cfg.model):
        name = m if m not in models else f"{m}#{i}"
        models[name] = (load_causal_lm(m, device=device), load_tokenizer(m))
    # The reference is often one of the evaluated models (the base policy): the same loaded object
    # then, and evaluate() scores its replies once instead of twice (its KL is 0 by definition).
    if not cfg.reference:
        reference = None
    elif cfg.reference in models:  # the first model given as cfg.reference is keyed by that name
        reference = models[cfg.reference]
    else:
        reference = (load_causal_lm(cfg.reference, device=device), load_tokenizer(cfg.reference))
    for model, tok in [*models.values(), *([reference] if reference else [])]:  # fit every model's context
        prompts, cuts = fit_prompts(tok, prompts, prompt_budget(model, tok, cfg.max_new_tokens), source=cfg.prompts)
        cuts.report("eval")
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    result = evaluate(models, reference, prompts, judges, params, cfg.samples_per_prompt, cfg.batch_size, cfg.seed,
                      cfg.bootstrap, roles, backend=make_backend(rt.engine),
                      reward_pairs=[(o.name, g.name) for o in optimised for g in gold])
    out = Path(cfg.out)
    payload = {**result.to_json(), "config": config_to_dict(cfg)}
    atomic_write_json(out / "eval.json", payload)
    text = format_table(result)
    atomic_write_text(out / "table.txt", text + "\n")
    flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    rows = sample_rows(result, flat)
    write_records(out / "samples.jsonl", rows)
    write_report(out, ReportInput(title="rlhf eval", eval_json=payload, samples=rows[:: cfg.samples_per_prompt][:12],
                                  lineage={"config": config_to_dict(cfg)}))
    return result, text


def sample_rows(result, flat_prompts: list[str]) -> list[dict]:
    """One row per sampled prompt: each model's reply, and under "scores" each judge's score of it."""
    return [{"prompt": p, **{m.name: m.completions[i] for m in result.models},
             "scores": {m.name: {j: round(m.scores[j][i], 4) for j in result.judges} for m in result.models}}
            for i, p in enumerate(flat_prompts)]


@config_command(EvalConfig, name="eval")
def eval_command(cfg: EvalConfig) -> None:
    """Before/after tables: mean ± std per judge per model, bootstrap CIs, the change with its interval and
    better / worse / no clear change by each judge's direction, KL and perplexity, and a report that opens with that."""
    _, text = run_eval(cfg)
    click.echo(text)
    click.echo(json.dumps({"out": cfg.out, "report": str(Path(cfg.out) / "report.html")}))
