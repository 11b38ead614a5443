"""How often the AI labeler agrees with people: ``rlhf cai calibrate`` on human preference pairs.

For every method asked for, the feedback model answers under every chosen principle in both orders
(one set of forward passes); each way of reading those answers is then scored against the human
choice: one order only (which reply is shown first is a seeded coin flip per pair, so a position
bias cannot pass for skill), both orders averaged, both orders debiased in log-odds; per principle,
all principles pooled, and ``--draw`` principles drawn at random per pair as the labeler does. The
constitution's evaluators (each alone, and pooled without the feedback model, which shows what the
model adds), the shorter-reply baseline and any ``--reference`` scorers (such as a reward model
trained on human pairs, reported as such) are scored on the same pairs. Agreement counts a tie as
half and comes with a 95% bootstrap interval over pairs.
"""

from __future__ import annotations

import json
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.cai.constitution import Constitution
from rlhf.cai.labeler import (DEBIAS, METHODS, PERSONA_KEY, SINGLE_READING, Comparison, LabelerSettings, ask_feedback,
                              draw_principles, evaluator_log_odds, principle_preference, to_log_odds)
from rlhf.cai.preference import combine_log_odds
from rlhf.errors import ConfigError
from rlhf.eval.stats import bootstrap_ci

CHANCE_MARGIN = 0.55  # below this agreement (or with a CI reaching 0.5) a judge is "near chance"


@dataclass
class Agreement:
    name: str
    accuracy: float
    ci_low: float
    ci_high: float
    n: int
    kind: str                       # feedback, evaluator, combined, baseline, reference
    first_choice_rate: float | None = None   # one-order rows: how often the judge picked option A

    @property
    def near_chance(self) -> bool:
        return self.accuracy < CHANCE_MARGIN or self.ci_low <= 0.5

    def to_json(self) -> dict:
        out = {"name": self.name, "kind": self.kind, "accuracy": round(self.accuracy, 4),
               "ci95": [round(self.ci_low, 4), round(self.ci_high, 4)], "n": self.n, "near_chance": self.near_chance}
        if self.first_choice_rate is not None:
            out["first_choice_rate"] = round(self.first_choice_rate, 4)
        return out


def agreement(name: str, log_odds: torch.Tensor, first_is_human: torch.Tensor, kind: str, seed: int = 0,
              first_choice_rate: float | None = None) -> Agreement:
    """Share of pairs where the sign of ``log_odds`` (first reply better) matches the human choice; 0 counts half."""
    signed = torch.where(first_is_human, log_odds, -log_odds)
    hits = (signed > 0).double() + 0.5 * (signed == 0).double()
    lo, hi = bootstrap_ci(hits, seed=seed)
    return Agreement(name, float(hits.mean()), lo, hi, int(hits.numel()), kind, first_choice_rate)


def placements(n: int, seed: int) -> torch.Tensor:
    """[n] bool: True where the human-preferred reply is shown first (a seeded coin per pair)."""
    return torch.tensor([random.Random(f"place:{seed}:{i}").random() < 0.5 for i in range(n)])


def reading_name(settings: LabelerSettings) -> str:
    """How the calibration rows name the labeler's reading: its method, and its debiasing for two-option methods."""
    return settings.method if settings.method in SINGLE_READING else f"{settings.method}/{settings.debias}"


def calibrate(constitution: Constitution, feedback, pairs: list, methods: list[str], principle_ids: list[str],
              draw: int, reference: list[str], settings: LabelerSettings, device: str = "cpu",
              progress: bool = True) -> dict:
    """Every agreement row, plus the raw answers per pair (for the record)."""
    for m in methods:
        if m not in METHODS:
            raise ConfigError(f"unknown method {m!r}; choose from {', '.join(METHODS)}")
    principles = [constitution.principle(pid) for pid in principle_ids] if principle_ids else list(constitution.principles)
    first_human = placements(len(pairs), settings.seed)
    items = [Comparison(p.prompt, p.chosen, p.rejected) if f else Comparison(p.prompt, p.rejected, p.chosen)
             for p, f in zip(pairs, first_human.tolist())]
    rows: list[Agreement] = []
    raw_by_method: dict[str, list[dict]] = {}
    pooled: dict[str, torch.Tensor] = {}   # "method/debias" -> log-odds of all chosen principles pooled

    if feedback is not None:
        for method in methods:
            raw = ask_feedback(feedback, constitution, items, [principles] * len(items), method,
                               fewshot_examples=settings.fewshot_examples, reasoning_tokens=settings.reasoning_tokens,
                               seed=settings.seed, progress=progress)
            raw_by_method[method] = raw
            if method == "likelihood":  # one reading: every chosen principle's persona in one system prompt
                l1, l2 = (torch.tensor([r[PERSONA_KEY][k] for r in raw], dtype=torch.float64) for k in (0, 1))
                pooled[method] = to_log_odds(principle_preference(method, "", l1, l2))
                rows.append(agreement(f"likelihood | all {len(principles)} personas", pooled[method], first_human,
                                      "feedback", settings.seed))
                continue
            l1 = {p.id: torch.tensor([r[p.id][0] for r in raw], dtype=torch.float64) for p in principles}
            l2 = {p.id: torch.tensor([r[p.id][1] for r in raw], dtype=torch.float64) for p in principles}
            variants = ("pointwise",) if method == "pointwise" else DEBIAS
            for debias in variants:
                label = method if method == "pointwise" else f"{method}/{debias}"
                odds = {pid: to_log_odds(principle_preference(method, debias, l1[pid], l2[pid])) for pid in l1}
                stacked = torch.stack([odds[p.id] for p in principles], dim=1)
                weights = torch.tensor([p.weight for p in principles], dtype=torch.float64).expand_as(stacked)
                pooled[label] = combine_log_odds(stacked, weights)
                for p in principles:
                    rate = float((l1[p.id] > 0).double().mean()) if debias == "none" else None
                    rows.append(agreement(f"{label} | {p.id}", odds[p.id], first_human, "feedback", settings.seed, rate))
                rows.append(agreement(f"{label} | all {len(principles)} pooled", pooled[label], first_human, "feedback",
                                      settings.seed))
                if 0 < draw < len(principles):
                    chosen = draw_principles(Constitution("drawn", principles), len(items), draw, settings.seed)
                    index = {p.id: k for k, p in enumerate(principles)}
                    mask = torch.zeros_like(stacked)
                    for i, ps in enumerate(chosen):
                        for p in ps:
                            mask[i, index[p.id]] = p.weight
                    rows.append(agreement(f"{label} | {draw} drawn per pair", combine_log_odds(stacked, mask),
                                          first_human, "feedback", settings.seed))

    evaluators = evaluator_log_odds(constitution, items, device) if constitution.evaluators else {}
    for name, odds in evaluators.items():
        rows.append(agreement(name, odds, first_human, "evaluator", settings.seed))
    if evaluators:
        weight_of = {f"evaluator:{p.id}:{e.scorer}": e.weight for p, e in constitution.evaluators}
        ev_stack = torch.stack(list(evaluators.values()), dim=1)
        ev_weights = torch.tensor([weight_of[k] for k in evaluators], dtype=torch.float64)
        if len(evaluators) > 1:  # what the evaluators decide without the feedback model: what the model adds
            rows.append(agreement("evaluators pooled", combine_log_odds(ev_stack, ev_weights.expand_as(ev_stack)),
                                  first_human, "evaluator", settings.seed))
        for label, odds in pooled.items():
            stacked = torch.cat([odds[:, None], ev_stack], dim=1)
            weights = torch.cat([torch.tensor([settings.feedback_weight], dtype=torch.float64), ev_weights]).expand_as(stacked)
            rows.append(agreement(f"{label} + evaluators", combine_log_odds(stacked, weights), first_human, "combined",
                                  settings.seed))
    shorter = torch.tensor([float(len(c.second) - len(c.first)) for c in items], dtype=torch.float64)
    rows.append(agreement("shorter reply", shorter.sign(), first_human, "baseline", settings.seed))
    for spec in reference:
        rows.append(agreement(f"reference {spec}", _scorer_log_odds(spec, items, device), first_human, "reference",
                              settings.seed))

    default = reading_name(settings)
    default_rows = [r for r in rows if r.name.startswith(default + " | all") or r.name == f"{default} + evaluators"]
    return {"pairs": len(pairs), "principles": [p.id for p in principles], "methods": methods,
            "human_first_share": round(float(first_human.double().mean()), 4),
            "rows": [r.to_json() for r in rows],
            "default": [r.to_json() for r in default_rows],
            "raw": [{"first_is_human_choice": bool(f), **{m: raw_by_method[m][i] for m in raw_by_method}}
                    for i, f in enumerate(first_human.tolist())]}


def _scorer_log_odds(spec: str, items: list[Comparison], device: str) -> torch.Tensor:
    from rlhf.judges.base import load_scorer, score_checked

    scorer = load_scorer(spec, device)
    prompts = [c.prompt for c in items]
    both = score_checked(scorer, prompts + prompts, [c.first for c in items] + [c.second for c in items]).double()
    n = len(items)
    diff = both[:n] - both[n:]
    return diff if scorer.higher_is_better else -diff


def format_table(result: dict) -> str:
    lines = [f"agreement with human choices on {result['pairs']} pairs (95% bootstrap CI; ties count half)",
             f"{'judge':<58} {'agree':>6}  {'95% CI':>15}  {'picks A':>7}"]
    for r in result["rows"]:
        rate = f"{r['first_choice_rate']:.2f}" if "first_choice_rate" in r else ""
        flag = "  near chance" if r["near_chance"] and r["kind"] in ("feedback", "combined") else ""
        lines.append(f"{r['name'][:58]:<58} {r['accuracy']:6.3f}  [{r['ci95'][0]:.3f}, {r['ci95'][1]:.3f}]  {rate:>7}{flag}")
    return "\n".join(lines)


def labeler_row(result: dict, settings: LabelerSettings, with_evaluators: bool) -> dict | None:
    """The calibration row that measured the labeler ``settings`` describe, or None if none did.

    That is the row of its method and debiasing, with the evaluators when it uses them, else its
    principles pooled (drawn per pair when it draws, else all of them).
    """
    want = reading_name(settings)
    rows = {r["name"]: r for r in result.get("rows", [])}
    if with_evaluators:
        names = [f"{want} + evaluators"]
    elif settings.principles_per_pair:
        names = [f"{want} | {settings.principles_per_pair} drawn per pair"]
    else:
        names = []
    names += [n for n in rows if n.startswith(f"{want} | all ")]
    return next((rows[n] for n in names if n in rows), None)


def near_chance_message(row: dict, where: str) -> str:
    return (f"this judge is NEAR CHANCE: in {where}, {row['name']!r} agreed with people on {row['accuracy']:.1%} of "
            f"{row['n']} pairs (95% CI {row['ci95'][0]:.1%}-{row['ci95'][1]:.1%}). Its labels are barely better "
            "than coin flips; a reward model trained on them learns little. Use a stronger feedback model, "
            "evaluators that measure better, or human labels.")


def chance_warning(calibration_file: str | Path, settings: LabelerSettings, with_evaluators: bool) -> str | None:
    """A loud message when ``calibration_file`` says this labeler is near chance (or never measured it), else None."""
    path = Path(calibration_file)
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"calibration file {path}: cannot read it ({exc})") from None
    row = labeler_row(result, settings, with_evaluators)
    if row is None:
        return (f"the calibration in {path} did not measure {reading_name(settings)!r}; this judge's agreement with "
                "people is unknown")
    return near_chance_message(row, str(path)) if row["near_chance"] else None


def banner(message: str) -> str:
    line = "!" * 100
    return f"{line}\n!! WARNING: {message}\n{line}"


def print_banner(message: str) -> None:
    print(banner(message), file=sys.stderr)
