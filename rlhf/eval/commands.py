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


def run_eval(cfg: EvalConfig):
    from rlhf.data.context import fit_prompts, prompt_budget
    from rlhf.data.io import read_records, write_records
    from rlhf.data.records import PromptRecord
    from rlhf.eval.judging import evaluate, format_table
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
    models = {}
    for i, m in enumerate(cfg.model):
        name = m if m not in models else f"{m}#{i}"
        models[name] = (load_causal_lm(m, device=device), load_tokenizer(m))
    reference = (load_causal_lm(cfg.reference, device=device), load_tokenizer(cfg.reference)) if cfg.reference else None
    for model, tok in [*models.values(), *([reference] if reference else [])]:  # fit every model's context
        prompts, cuts = fit_prompts(tok, prompts, prompt_budget(model, tok, cfg.max_new_tokens), source=cfg.prompts)
        cuts.report("eval")
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p)
    result = evaluate(models, reference, prompts, judges, params, cfg.samples_per_prompt, cfg.batch_size, cfg.seed,
                      cfg.bootstrap, backend=make_backend(rt.engine))
    out = Path(cfg.out)
    payload = {**result.to_json(), "config": config_to_dict(cfg)}
    atomic_write_json(out / "eval.json", payload)
    text = format_table(result)
    atomic_write_text(out / "table.txt", text + "\n")
    flat = [p for p in prompts for _ in range(cfg.samples_per_prompt)]
    write_records(out / "samples.jsonl", [{"prompt": p, **{m.name: m.completions[i] for m in result.models}}
                                          for i, p in enumerate(flat)])
    samples = [{"prompt": p, **{m.name: m.completions[i] for m in result.models}}
               for i, p in enumerate(flat) if i % cfg.samples_per_prompt == 0][:12]
    write_report(out, ReportInput(title="rlhf eval", eval_json=payload, samples=samples, lineage={"config": config_to_dict(cfg)}))
    return result, text


@config_command(EvalConfig, name="eval")
def eval_command(cfg: EvalConfig) -> None:
    """Before/after tables: mean ± std per judge per model, bootstrap CIs, % change, KL and perplexity."""
    _, text = run_eval(cfg)
    click.echo(text)
    click.echo(json.dumps({"out": cfg.out, "report": str(Path(cfg.out) / "report.html")}))
