"""Judging models: sample with each model on the same prompts and seeds, score with every judge,
and measure how far each model moved from the reference (KL) and how fluent it stays (the
reference model's perplexity of its completions)."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
from tqdm.auto import tqdm

from rlhf.eval.stats import (Summary, bootstrap_ci, pairwise_agreement, relative_change, summarise,
                              within_prompt_differences)
from rlhf.eval.verdict import ROLES, arrow, change_word, magnitude_interval, number
from rlhf.judges.base import Scorer, score_checked, signals_of
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
    roles: dict[str, str] = field(default_factory=dict)  # name -> optimised | gold | independent | drift
    n_boot: int = 2000
    seed: int = 0
    samples_per_prompt: int = 1
    # (optimised, gold) judge names whose agreement reward_agreement() measures; empty = every
    # optimised judge against every gold one
    reward_pairs: list[tuple[str, str]] = field(default_factory=list)

    def table(self) -> list[dict]:
        """One row per (judge, model): mean, std, CI, and the change from the first model.

        The change's interval is a bootstrap of the paired differences (sample i of both models
        answered the same prompt with the same seed), which is narrower and more honest than
        asking whether the two models' own intervals overlap.
        """
        rows = []
        base = self.models[0]
        for judge, higher in self.judges.items():
            role = self.roles.get(judge, "independent")
            for m in self.models:
                s = m.summaries[judge]
                b = base.summaries[judge]
                row = {"judge": judge, "model": m.name, "role": role, "mean": s.mean, "std": s.std, "ci_low": s.ci_low,
                       "ci_high": s.ci_high, "n": s.n, "higher_is_better": higher,
                       "improvement_pct": None if m is base else relative_change(b.mean, s.mean, higher),
                       "ci_separated_from_first": None if m is base else not s.overlaps(b)}
                if m is not base:
                    diff = torch.tensor(m.scores[judge], dtype=torch.float64) - torch.tensor(base.scores[judge], dtype=torch.float64)
                    lo, hi = bootstrap_ci(diff, n_boot=self.n_boot, seed=self.seed)
                    change = s.mean - b.mean
                    row.update(change=change, change_ci_low=lo, change_ci_high=hi,
                               verdict=change_word(change, lo, hi, higher, role))
                rows.append(row)
        return rows

    def reward_agreement(self) -> list[dict]:
        """For each (optimised, gold) pair of judges and each model: how often the reward orders two of
        the model's replies to one prompt as the gold judge does (:func:`agreement_rows`). Needs two or
        more samples per prompt."""
        if self.samples_per_prompt < 2:
            return []
        pairs = self.reward_pairs or [(o, g) for o, ro in self.roles.items() if ro == "optimised"
                                      for g, rg in self.roles.items() if rg == "gold"]
        return agreement_rows({m.name: m.scores for m in self.models}, self.judges, pairs, self.samples_per_prompt,
                              self.n_boot, self.seed)

    def to_json(self) -> dict:
        return {"judges": self.judges, "roles": {j: self.roles.get(j, "independent") for j in self.judges},
                "table": self.table(), "reward_agreement": self.reward_agreement(),
                "models": [{"name": m.name, "kl": asdict(m.kl) if m.kl else None,
                            "ref_perplexity": asdict(m.ref_perplexity) if m.ref_perplexity else None,
                            "seconds": round(m.seconds, 2)} for m in self.models]}


def agreement_rows(scores: dict[str, dict[str, list[float]]], judges: dict[str, bool], pairs: list[tuple[str, str]],
                   samples_per_prompt: int, n_boot: int = 2000, seed: int = 0) -> list[dict]:
    """``scores``: model name -> judge name -> one score per sample (prompt-major, ``samples_per_prompt``
    per prompt), the first model the baseline; ``judges``: name -> higher is better. One row per
    (optimised, gold) pair and model (:func:`rlhf.eval.stats.pairwise_agreement`).

    The reward model's validation accuracy is measured on the base model's replies; this measures it
    again on the tuned model's. Every pair the gold judge does not tie gives ``rate``. Because a
    policy's replies often grow alike, and close pairs are hard to order for any score, the ``clear_``
    fields count only pairs the gold judge separates by more than the median gap of the baseline's
    pairs (``clear_min_gap``), the same threshold for every model. A fall there too means the policy
    moved to replies the reward overrates.
    """
    finite = lambda x: None if math.isnan(x) else x  # noqa: E731  NaN where the gold judge tied every pair
    rows = []
    for optimised, gold in pairs:
        oriented = {m: [torch.tensor(s[name], dtype=torch.float64).view(-1, samples_per_prompt) * (1 if judges[name] else -1)
                        for name in (optimised, gold)] for m, s in scores.items()}
        gaps = within_prompt_differences(next(iter(oriented.values()))[1]).abs().flatten()  # the baseline's gold gaps
        gaps = gaps[gaps > 0]
        min_gap = float(gaps.median()) if gaps.numel() else float("inf")
        for model, (reward, reference) in oriented.items():
            a = pairwise_agreement(reward, reference, n_boot=n_boot, seed=seed)
            c = pairwise_agreement(reward, reference, n_boot=n_boot, seed=seed, min_gap=min_gap)
            rows.append({"optimised": optimised, "gold": gold, "model": model, "rate": finite(a.rate),
                         "ci_low": finite(a.ci_low), "ci_high": finite(a.ci_high), "pairs": a.pairs, "prompts": a.prompts,
                         "mean_gap": finite(a.mean_gap), "clear_min_gap": finite(min_gap) if gaps.numel() else None,
                         "clear_rate": finite(c.rate), "clear_ci_low": finite(c.ci_low), "clear_ci_high": finite(c.ci_high),
                         "clear_pairs": c.pairs})
    return rows


def sample_all(model, tok, prompts: list[str], params: SamplingParams, samples_per_prompt: int, batch_size: int,
               seed: int, backend=None) -> list[SampledBatch]:
    """Every model sees the same prompts in the same order with the same seed."""
    torch.manual_seed(seed)
    flat = [p for p in prompts for _ in range(samples_per_prompt)]
    return [sample_tokens(model, tok, flat[i:i + batch_size], params, backend=backend) for i in range(0, len(flat), batch_size)]


@torch.no_grad()
def kl_and_perplexity(model, reference, batches: list[SampledBatch]) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sequence KL(π‖π_ref) estimate Σ_t (log π − log π_ref) and reference perplexity [N]. A model
    that is its own reference (the same object) is scored once: its KL is exactly 0."""
    kls, ppls = [], []
    for b in batches:
        lp = response_logprobs(model, b)
        ref = lp if reference is model else response_logprobs(reference, b)
        n = b.response_mask.sum(dim=1).clamp(min=1)
        kls.append((lp - ref).sum(dim=1))
        ppls.append(torch.exp(-ref.sum(dim=1) / n))
    return torch.cat(kls), torch.cat(ppls)


def training_roles(judges: list[Scorer], optimised: list[Scorer], gold: list[Scorer]) -> dict[str, str]:
    """Roles by name for the judges the training saw: ``optimised`` and ``gold`` themselves, and any
    other judge that reads a signal of theirs (:func:`rlhf.judges.base.signals_of`): with labelers who
    ranked by ``weighted:4*relevance+2*toxicity+sentiment``, the toxicity, relevance and sentiment
    judges measure what the labelers asked for (gold), not an independent quality, and a toxicity
    judge after training on non-toxicity measures the reward itself (optimised). Drift signals stay
    drift. The rest are left out: independent (or drift) by :func:`judge_roles`."""
    roles = {j.name: "gold" for j in gold}
    roles.update({j.name: "optimised" for j in optimised})
    seen = {role: set().union(*(signals_of(j) for j in group)) for role, group in (("optimised", optimised), ("gold", gold))}
    for j in judges:
        if j.name in roles or getattr(j, "drift_signal", False):
            continue
        for role in ("optimised", "gold"):
            if signals_of(j) & seen[role]:
                roles[j.name] = role
                break
    return roles


def judge_roles(judges: list[Scorer], roles: dict[str, str] | None = None) -> dict[str, str]:
    """Each judge's group: as given in ``roles`` (by name), else drift for drift signals, else independent."""
    roles = roles or {}
    bad = {r for r in roles.values() if r not in ROLES}
    if bad:
        raise ValueError(f"unknown judge roles {sorted(bad)}; known: {', '.join(ROLES)}")
    return {j.name: roles.get(j.name) or ("drift" if getattr(j, "drift_signal", False) else "independent") for j in judges}


def evaluate(models: dict[str, tuple], reference: tuple | None, prompts: list[str], judges: list[Scorer],
             params: SamplingParams, samples_per_prompt: int = 4, batch_size: int = 32, seed: int = 0,
             n_boot: int = 2000, roles: dict[str, str] | None = None,
             backend=None, reward_pairs: list[tuple[str, str]] | None = None) -> EvalResult:
    """``models``: name -> (model, tokenizer); ``reference``: (model, tokenizer) or None;
    ``roles``: judge name -> optimised / gold / independent / drift (see rlhf/eval/verdict.py);
    ``reward_pairs``: (optimised, gold) judge names for :meth:`EvalResult.reward_agreement`."""
    unknown = {name for pair in reward_pairs or [] for name in pair} - {j.name for j in judges}
    if unknown:
        raise ValueError(f"reward_pairs name {sorted(unknown)}, which are not among the judges")
    result = EvalResult(prompts=prompts, judges={j.name: j.higher_is_better for j in judges},
                        roles=judge_roles(judges, roles), n_boot=n_boot, seed=seed,
                        samples_per_prompt=samples_per_prompt, reward_pairs=list(reward_pairs or []))
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
    """A plain-text table that never cuts a name: models are numbered with a legend above, and each
    judge's full name heads its own rows, so long specs and paths cost no alignment.

    A later model's row shows the raw change from model [1] with an arrow, its 95% interval in the
    arrow's direction, and better / worse / no clear change by the judge's direction (rose / fell
    for drift signals such as length).
    """
    models = result.models
    index = {m.name: i + 1 for i, m in enumerate(models)}
    lines = ["models: " + "\n        ".join(f"[{i + 1}] {m.name}" + (" (baseline)" if i == 0 else "")
                                           for i, m in enumerate(models)),
             f"{'':<6}{'mean ± std':>21}  {'95% CI':^20}  change from [1]"]
    for r in result.table():
        if index[r["model"]] == 1:
            how = "higher is better" if r["higher_is_better"] else "lower is better"
            lines.append(f"{r['judge']} (" + ("a drift signal" if r["role"] == "drift" else f"{r['role']}; {how}") + ")")
        change = ""
        if "change" in r:
            lo, hi = magnitude_interval(r["change"], r["change_ci_low"], r["change_ci_high"])
            change = f"{arrow(r['change'])} {number(abs(r['change']))} [{number(lo)}, {number(hi)}] {r['verdict']}"
        lines.append(f"  {'[' + str(index[r['model']]) + ']':<4}{number(r['mean']):>11} ± {number(r['std']):<7}  "
                     f"[{number(r['ci_low']):>8}, {number(r['ci_high']):>8}]  {change}".rstrip())
    kl_rows = [m for m in models if m.kl is not None]
    if kl_rows:
        lines.append("KL from reference (nats per reply)")
        for m in kl_rows:
            lines.append(f"  {'[' + str(index[m.name]) + ']':<4}{number(m.kl.mean):>11} ± {number(m.kl.std):<7}  "
                         f"reference perplexity {number(m.ref_perplexity.mean)}")
    agreement = result.reward_agreement()
    if agreement:
        lines.append("the reward orders two replies to one prompt as the gold judge does (pairs the gold judge ties left out; "
                     "clear pairs: a gold gap above the baseline's median)")
        rate = lambda r, k="": "—" if r[k + "rate"] is None else (  # noqa: E731
            f"{r[k + 'rate']:.1%} [{r[k + 'ci_low']:.1%}, {r[k + 'ci_high']:.1%}] of {r[k + 'pairs']}")
        for pair in dict.fromkeys((r["optimised"], r["gold"]) for r in agreement):
            rows = [r for r in agreement if (r["optimised"], r["gold"]) == pair]
            lines.append(f"{pair[0]} against {pair[1]}" + (f" (clear: gap > {number(rows[0]['clear_min_gap'])})"
                                                           if rows[0]["clear_min_gap"] is not None else ""))
            for r in rows:
                lines.append(f"  {'[' + str(index[r['model']]) + ']':<4}{rate(r):>30} pairs, mean gap "
                             f"{number(r['mean_gap'])}; clear pairs {rate(r, 'clear_')}")
    return "\n".join(lines)
