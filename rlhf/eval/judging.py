"""Judging models: sample with each model on the same prompts and seeds, score with every judge,
and measure how far each model moved from the reference (KL) and how fluent it stays (the
reference model's perplexity of its completions)."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from rlhf.eval.stats import Summary, relative_change, summarise
from rlhf.judges.base import Scorer, score_checked
from rlhf.rollout.generate import SamplingParams, SampledBatch, decode_responses, sample_tokens
from rlhf.rollout.logprobs import response_logprobs


@dataclass
class ModelResult:
    name: str
    completions: list[str]
    scores: dict[str, list[float]]
    summaries: dict[str, Summary]
    kl: Summary | None = None                 # Σ_t log π/π_ref per sequence (k1), sampled from π
    ref_perplexity: Summary | None = None     # exp(mean −log π_ref) per sequence
    seconds: float = 0.0


@dataclass
class EvalResult:
    prompts: list[str]
    judges: dict[str, bool]                   # name -> higher_is_better
    models: list[ModelResult] = field(default_factory=list)

    def table(self) -> list[dict]:
        """One row per (judge, model): mean, std, CI, and change relative to the first model."""
        rows = []
        base = self.models[0]
        for judge, higher in self.judges.items():
            for m in self.models:
                s = m.summaries[judge]
                b = base.summaries[judge]
                rows.append({"judge": judge, "model": m.name, "mean": s.mean, "std": s.std, "ci_low": s.ci_low,
                             "ci_high": s.ci_high, "n": s.n, "higher_is_better": higher,
                             "improvement_pct": None if m is base else relative_change(b.mean, s.mean, higher),
                             "ci_separated_from_first": None if m is base else not s.overlaps(b)})
        return rows

    def to_json(self) -> dict:
        return {"judges": self.judges, "table": self.table(),
                "models": [{"name": m.name, "kl": asdict(m.kl) if m.kl else None,
                            "ref_perplexity": asdict(m.ref_perplexity) if m.ref_perplexity else None,
                            "seconds": round(m.seconds, 2)} for m in self.models]}


def sample_all(model, tok, prompts: list[str], params: SamplingParams, samples_per_prompt: int, batch_size: int,
               seed: int, backend=None) -> list[SampledBatch]:
    """Every model sees the same prompts in the same order with the same seed."""
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    return [sample_tokens(model, tok, flat[i:i + batch_size], params, backend=backend) for i in range(0, len(flat), batch_size)]


@torch.no_grad()
def kl_and_perplexity(model, reference, batches: list[SampledBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence KL(π‖π_ref) estimate Σ_t (log π − log π_ref) and reference perplexity [N]."""
    kls, ppls = [], []
    for b in batches:
        lp = response_logprobs(model, b)
        ref = response_logprobs(reference, b)
        n = b.response_mask.sum(dim=1).clamp(min=1)
        kls.append((lp - ref).sum(dim=1))
        ppls.append(torch.exp(-ref.sum(dim=1) / n))
    return torch.cat(kls), torch.cat(ppls)


def evaluate(models: dict[str, tuple], reference: tuple | None, prompts: list[str], judges: list[Scorer],
             params: SamplingParams, samples_per_prompt: int = 4, batch_size: int = 32, seed: int = 0,
             n_boot: int = 2000, backend=None) -> EvalResult:
    """``models``: name -> (model, tokenizer); ``reference``: (model, tokenizer) or None."""
    result = EvalResult(prompts=prompts, judges={j.name: j.higher_is_better for j in judges})
    for name, (model, tok) in tqdm(models.items(), desc="evaluating", unit="model"):
        t0 = time.perf_counter()
        batches = sample_all(model, tok, prompts, params, samples_per_prompt, batch_size, seed, backend)
        texts = [t for b in batches for t in decode_responses(tok, b)]
        flat_prompts = [p for p in prompts for _ in range(samples_per_prompt)]
        scores = {j.name: score_checked(j, flat_prompts, texts) for j in judges}
        mr = ModelResult(name, texts, {k: v.tolist() for k, v in scores.items()},
                         {k: summarise(v, n_boot=n_boot, seed=seed) for k, v in scores.items()})
        if reference is not None:
            kl, ppl = kl_and_perplexity(model, reference[0], batches)
            mr.kl, mr.ref_perplexity = summarise(kl, n_boot=n_boot, seed=seed), summarise(ppl, n_boot=n_boot, seed=seed)
        mr.seconds = time.perf_counter() - t0
        result.models.append(mr)
    return result


def format_table(result: EvalResult) -> str:
    """A plain-text table: judge, model, mean ± std, 95% CI, change vs the first model."""
    lines = [f"{'judge':<12} {'model':<24} {'mean ± std':>20} {'95% CI':>22} {'change':>9}"]
    for r in result.table():
        change = "" if r["improvement_pct"] is None else f"{r['improvement_pct']:+.1f}%"
        lines.append(f"{r['judge']:<12} {r['model'][-24:]:<24} {r['mean']:>10.3f} ± {r['std']:<7.3f} "
                     f"[{r['ci_low']:>8.3f}, {r['ci_high']:>8.3f}] {change:>9}")
    for m in result.models:
        if m.kl is not None:
            lines.append(f"{'KL(ref)':<12} {m.name[-24:]:<24} {m.kl.mean:>10.3f} ± {m.kl.std:<7.3f}   "
                         f"ref perplexity {m.ref_perplexity.mean:.2f}")
    return "\n".join(lines)
