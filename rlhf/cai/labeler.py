"""The AI labeler: which of two replies is better under a constitution, as a probability.

For each comparison the labeler draws principles at random (Bai et al. 2022 draw one per label;
drawing several and averaging is their ensembling), asks the feedback model under each, and reads
the answer from the option labels' normalised probabilities (rlhf/cai/preference.py). The ways of
asking (``METHODS``):

* ``choice``    — the multiple-choice question, both orders of the replies;
* ``fewshot``   — the same after the constitution's worked comparisons;
* ``reasoning`` — the model first writes a short explanation, then the label is read;
* ``pointwise`` — a yes/no question about each reply alone; the reply with the likelier Yes wins;
* ``likelihood`` — no question at all: how much more likely each reply becomes, per token, when the
  conversation runs under a system prompt written from the principles' personas than without it
  (pointwise mutual information with the constitution; Askell et al. 2021's HHH prompt used as a
  judge). The gain difference is scaled by its spread over the replies being labeled.

Position bias (``DEBIAS``): ``none`` asks one order only; ``average`` averages the probabilities of
both orders (the paper); ``logit`` averages their log-odds, which removes an additive bias exactly.

Principles may name evaluators (scorer specs) with weights; their verdict is the score difference
in units of the scorer's spread over the replies being labeled. The final label pools the feedback
model's verdict and the evaluators' in log-odds with their weights, and records each source and
which sources agreed with the outcome.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from rlhf.cai import prompts as P
from rlhf.cai.constitution import Constitution, Principle
from rlhf.cai.preference import (averaged_preference, combine_log_odds, debiased_preference, option_preference,
                                 pointwise_preference, scores_to_log_odds)
from rlhf.errors import ConfigError

METHODS = ("choice", "fewshot", "reasoning", "pointwise", "likelihood")
SINGLE_READING = ("pointwise", "likelihood")  # methods without an order of options to debias
PERSONA_KEY = "personas"  # the likelihood method asks all drawn principles at once
DEBIAS = ("none", "average", "logit")


@dataclass(frozen=True)
class Comparison:
    prompt: str
    first: str
    second: str


@dataclass
class LabelerSettings:
    method: str = "likelihood"  # the best measured on human pairs (benchmarks/RESULTS.md, Constitutional AI)
    debias: str = "logit"
    principles_per_pair: int = 0     # 0 = every principle
    feedback_weight: float = 1.0     # weight of the feedback model's pooled verdict against the evaluators'
    use_evaluators: bool = True
    fewshot_examples: int = 2
    reasoning_tokens: int = 48
    seed: int = 0

    def validate(self) -> None:
        if self.method not in METHODS:
            raise ConfigError(f"unknown method {self.method!r}; choose from {', '.join(METHODS)}")
        if self.debias not in DEBIAS:
            raise ConfigError(f"unknown debiasing {self.debias!r}; choose from {', '.join(DEBIAS)}")
        if self.principles_per_pair < 0 or self.feedback_weight < 0:
            raise ConfigError("principles per pair and the feedback weight must not be negative")


@dataclass
class Verdict:
    probability: float                       # P(first reply is better)
    principles: list[str]
    sources: list[dict] = field(default_factory=list)
    decided_by: list[str] = field(default_factory=list)


def draw_principles(constitution: Constitution, n_items: int, per_item: int, seed: int) -> list[list[Principle]]:
    """Principles asked for each comparison: ``per_item`` drawn without replacement (0 = all), seeded per item."""
    every = constitution.principles
    if per_item <= 0 or per_item >= len(every):
        return [list(every) for _ in range(n_items)]
    return [random.Random(f"{seed}:{i}").sample(every, per_item) for i in range(n_items)]


# ---------------------------------------------------------------------------------------------
# Asking the feedback model. Raw answers per comparison and principle: for the multiple-choice
# methods (ℓ₁, ℓ₂) = log-odds of "A" with the first reply shown as A, then shown as B; for the
# pointwise method (ℓ_first, ℓ_second) = log-odds of "Yes" for each reply.
# ---------------------------------------------------------------------------------------------

def ask_feedback(model, constitution: Constitution, items: list[Comparison], principles: list[list[Principle]],
                 method: str, *, both_orders: bool = True, fewshot_examples: int = 2, reasoning_tokens: int = 48,
                 seed: int = 0, progress: bool = True, chunk: int = 8) -> list[dict[str, tuple[float, float]]]:
    """Raw answers {principle id: (ℓ₁, ℓ₂)} for every comparison; ℓ₂ is NaN when only one order was asked."""
    examples = P.examples_for(constitution, "comparison", fewshot_examples) if method == "fewshot" else []
    out: list[dict[str, tuple[float, float]]] = []
    bar = tqdm(total=len(items), desc=f"feedback ({method})", unit="pair", disable=not progress)
    for start in range(0, len(items), chunk):
        batch = list(range(start, min(start + chunk, len(items))))
        if method == "likelihood":
            groups = []
            for i in batch:
                persona = model.format(P.persona_messages(items[i].prompt, principles[i]))
                plain = model.format(P.dialogue_messages(items[i].prompt))
                groups.append([(ctx, reply) for reply in (items[i].first, items[i].second) for ctx in (persona, plain)])
            for scored in model.continuation_logprobs(groups):
                (s1, n1), (s0, _), (s3, n2), (s2, _) = scored  # persona/plain for the first reply, then the second
                out.append({PERSONA_KEY: ((s1 - s0) / n1, (s3 - s2) / n2)})
            bar.update(len(batch))
            continue
        if method == "pointwise":
            groups = [[model.format(P.pointwise_messages(items[i].prompt, reply, p)) for p in principles[i]]
                      for i in batch for reply in (items[i].first, items[i].second)]
            answers = model.option_logprobs(groups, list(P.YES_NO))
        else:
            orders = (False, True) if both_orders else (False,)
            groups = []
            for i in batch:
                for swapped in orders:
                    a, b = (items[i].second, items[i].first) if swapped else (items[i].first, items[i].second)
                    msgs = [P.comparison_messages(items[i].prompt, a, b, p, examples, reasoning=method == "reasoning")
                            for p in principles[i]]
                    groups.append([model.format(m, P.REASONING_PREFIX if method == "reasoning" else P.ANSWER_PREFIX)
                                   for m in msgs])
            if method == "reasoning":
                flat = [t for g in groups for t in g]
                thoughts = model.generate(flat, reasoning_tokens, temperature=0.0, seed=seed)
                it = iter(_cut_reasoning(t) for t in thoughts)
                groups = [[t + " " + next(it) + P.AFTER_REASONING for t in g] for g in groups]
            answers = model.option_logprobs(groups, list(P.OPTION_LABELS))
        k = 0
        for i in batch:
            per = 2 if (method == "pointwise" or both_orders) else 1
            odds = [_log_odds(answers[k + j]) for j in range(per)]
            k += per
            out.append({p.id: (float(odds[0][n]), float(odds[1][n]) if per == 2 else math.nan)
                        for n, p in enumerate(principles[i])})
        bar.update(len(batch))
    bar.close()
    return out


def _log_odds(option_logprobs: torch.Tensor) -> torch.Tensor:
    return option_logprobs[:, 0] - option_logprobs[:, 1]


def _cut_reasoning(text: str) -> str:
    """The explanation without any answer the model already wrote (that is read from probabilities)."""
    for marker in ("The answer is", "So the answer", "Answer:", "(A)", "(B)"):
        cut = text.find(marker)
        if cut > 0:
            text = text[:cut]
    return " ".join(text.split())


def principle_preference(method: str, debias: str, l1: torch.Tensor, l2: torch.Tensor) -> torch.Tensor:
    """P(first reply is better) under one principle from the raw answers [N] (see ``ask_feedback``).

    For ``likelihood`` the answers are per-token likelihood gains, whose difference is put in units of
    their spread over all N comparisons (as an evaluator's scores are).
    """
    if method == "likelihood":
        both = torch.cat([l1, l2])
        scale = both.std() if both.numel() > 1 else torch.tensor(1.0, dtype=both.dtype)
        return torch.sigmoid(scores_to_log_odds(l1, l2, scale))
    if method == "pointwise":
        return pointwise_preference(torch.stack([l1, torch.zeros_like(l1)], -1), torch.stack([l2, torch.zeros_like(l2)], -1))
    first = torch.stack([l1, torch.zeros_like(l1)], -1)   # log-odds as [logit, 0] label log-probs
    if debias == "none":
        return option_preference(first)
    second = torch.stack([l2, torch.zeros_like(l2)], -1)
    return averaged_preference(first, second) if debias == "average" else debiased_preference(first, second)


def to_log_odds(p: torch.Tensor) -> torch.Tensor:
    p = p.double().clamp(1e-9, 1 - 1e-9)
    return torch.log(p) - torch.log1p(-p)


# ---------------------------------------------------------------------------------------------
# Evaluators
# ---------------------------------------------------------------------------------------------

def evaluator_log_odds(constitution: Constitution, items: list[Comparison], device: str = "cpu") -> dict[str, torch.Tensor]:
    """Log-odds [N] that the first reply is better, per evaluator (keyed "evaluator:<principle>:<spec>")."""
    from rlhf.judges.base import load_scorer, score_checked

    out, scored = {}, {}
    prompts = [c.prompt for c in items]
    for principle, ev in constitution.evaluators:
        if ev.scorer not in scored:
            scorer = load_scorer(ev.scorer, device)
            both = score_checked(scorer, prompts + prompts, [c.first for c in items] + [c.second for c in items]).double()
            if not scorer.higher_is_better:
                both = -both
            scored[ev.scorer] = both
        both = scored[ev.scorer]
        n = len(items)
        scale = both.std() if both.numel() > 1 else torch.tensor(1.0, dtype=torch.float64)
        out[f"evaluator:{principle.id}:{ev.scorer}"] = scores_to_log_odds(both[:n], both[n:], scale)
    return out


# ---------------------------------------------------------------------------------------------
# The labeler
# ---------------------------------------------------------------------------------------------

class AILabeler:
    """Labels comparisons with a feedback model (or None) and the constitution's evaluators."""

    def __init__(self, constitution: Constitution, feedback, settings: LabelerSettings, device: str = "cpu",
                 progress: bool = True):
        settings.validate()
        if feedback is None and not (settings.use_evaluators and constitution.evaluators):
            raise ConfigError("no feedback model and no evaluators: nothing could decide a label. Give --feedback-model "
                              "or --feedback-endpoint, or a constitution whose principles name evaluators")
        self.constitution, self.feedback, self.settings = constitution, feedback, settings
        self.device, self.progress = device, progress

    @property
    def name(self) -> str:
        return f"ai:{self.feedback.name}" if self.feedback is not None else "ai:evaluators"

    def _pool(self, raw: list[dict], drawn: list[list[Principle]]) -> tuple[torch.Tensor, list[dict[str, float]]]:
        """The feedback model's log-odds per comparison [N], its principles pooled; and each principle's probability."""
        s = self.settings
        if s.method == "likelihood":  # one reading per comparison, scaled over the whole batch
            l1, l2 = (torch.tensor([r[PERSONA_KEY][k] for r in raw], dtype=torch.float64) for k in (0, 1))
            pooled = to_log_odds(principle_preference(s.method, s.debias, l1, l2))
            return pooled, [{PERSONA_KEY: round(float(torch.sigmoid(o)), 4)} for o in pooled]
        pooled = torch.zeros(len(raw), dtype=torch.float64)
        per_principle = []
        for i, (answers, principles) in enumerate(zip(raw, drawn)):
            l1 = torch.tensor([answers[p.id][0] for p in principles], dtype=torch.float64)
            l2 = torch.tensor([answers[p.id][1] for p in principles], dtype=torch.float64)
            odds = to_log_odds(principle_preference(s.method, s.debias, l1, l2))
            weights = torch.tensor([p.weight for p in principles], dtype=torch.float64)
            pooled[i] = combine_log_odds(odds[None], weights[None])[0]
            per_principle.append({p.id: round(float(torch.sigmoid(o)), 4) for p, o in zip(principles, odds)})
        return pooled, per_principle

    def judge(self, items: list[Comparison]) -> list[Verdict]:
        s = self.settings
        drawn = draw_principles(self.constitution, len(items), s.principles_per_pair, s.seed)
        sources: list[tuple[str, torch.Tensor, float]] = []   # (name, log-odds [N], weight)
        per_principle: list[dict[str, float]] = [{} for _ in items]
        if self.feedback is not None and s.feedback_weight > 0:
            raw = ask_feedback(self.feedback, self.constitution, items, drawn, s.method,
                               both_orders=s.debias != "none" or s.method in SINGLE_READING,
                               fewshot_examples=s.fewshot_examples, reasoning_tokens=s.reasoning_tokens, seed=s.seed,
                               progress=self.progress)
            pooled, per_principle = self._pool(raw, drawn)
            sources.append(("feedback", pooled, s.feedback_weight))
        if s.use_evaluators and self.constitution.evaluators:
            weight_of = {f"evaluator:{p.id}:{e.scorer}": e.weight for p, e in self.constitution.evaluators}
            for name, odds in evaluator_log_odds(self.constitution, items, self.device).items():
                sources.append((name, odds, weight_of[name]))
        odds = torch.stack([o for _, o, _ in sources], dim=1)
        weights = torch.tensor([w for _, _, w in sources], dtype=torch.float64).expand_as(odds)
        final = combine_log_odds(odds, weights)
        verdicts = []
        for i in range(len(items)):
            entries = []
            for (name, o, w) in sources:
                entry = {"source": name, "probability": round(float(torch.sigmoid(o[i])), 4), "weight": w}
                if name == "feedback":
                    entry.update(model=self.feedback.name, method=s.method, debias=s.debias, principles=per_principle[i])
                entries.append(entry)
            direction = float(final[i])
            agreeing = sorted((e for e, (_, o, w) in zip(entries, sources) if w > 0 and float(o[i]) * direction > 0),
                              key=lambda e: -abs(e["weight"] * (e["probability"] - 0.5)))
            verdicts.append(Verdict(probability=float(torch.sigmoid(final[i])), principles=[p.id for p in drawn[i]],
                                    sources=entries, decided_by=[e["source"] for e in agreeing]))
        return verdicts
