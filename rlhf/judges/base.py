"""One scorer interface for everything that turns (prompt, completion) into a number.

PPO optimises a scorer, evaluation judges with several, and the scripted labelers rank with one.
A scorer is any object with

    name: str
    higher_is_better: bool
    score(prompts: list[str], completions: list[str]) -> torch.Tensor   # float32 [N], no grad

Scorers are named by a spec string (``load_scorer``): ``length``, ``repetition``, and the kinds that
the other judge modules register in ``SCORER_KINDS`` (learned reward models, classifiers, ...).
"""

from __future__ import annotations

import math
import zlib
from typing import Callable, Protocol, runtime_checkable

import torch

from rlhf.errors import ConfigError, TrainingError


@runtime_checkable
class Scorer(Protocol):
    name: str
    higher_is_better: bool

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor: ...


def check_scores(scorer: Scorer, scores: torch.Tensor, n: int) -> torch.Tensor:
    """A scorer's output must be a finite float vector of length N: anything else is an error, never a broadcast."""
    if not isinstance(scores, torch.Tensor):
        raise TrainingError(f"scorer {scorer.name!r} returned {type(scores).__name__}, expected a tensor of shape [{n}]")
    if scores.shape != (n,):
        raise TrainingError(f"scorer {scorer.name!r} returned shape {tuple(scores.shape)}, expected [{n}]")
    if not torch.isfinite(scores).all():
        bad = (~torch.isfinite(scores)).nonzero().flatten()[:5].tolist()
        raise TrainingError(f"scorer {scorer.name!r} returned non-finite scores (first at rows {bad})")
    return scores.float()


def score_checked(scorer: Scorer, prompts: list[str], completions: list[str]) -> torch.Tensor:
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    with torch.no_grad():
        return check_scores(scorer, scorer.score(prompts, completions), len(completions))


class LengthScorer:
    """Reply length in whitespace-separated words. Higher is longer, not better: a drift signal."""

    name = "length"
    higher_is_better = True
    drift_signal = True  # reports show its change as drift, never as "better" (rlhf/eval/verdict.py)

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([float(len(c.split())) for c in completions])


class RepetitionScorer:
    """How repetitive a reply is: 1 − (compressed size / raw size), 0 for short or varied text.

    Degenerate RL policies repeat phrases; zlib finds repeats of any length without a tokenizer.
    Lower is better.
    """

    name = "repetition"
    higher_is_better = False

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        out = []
        for c in completions:
            raw = c.encode("utf-8")
            if len(raw) < 16:
                out.append(0.0)
                continue
            # Compressed size includes a fixed header; subtracting it keeps varied text near 0.
            packed = len(zlib.compress(raw, 9)) - 8
            out.append(max(0.0, 1.0 - packed / len(raw)))
        return torch.tensor(out)


class WeightedScorer:
    """A weighted sum of other scorers' "goodness": ``weighted:2*relevance+non-toxicity+0.5*sentiment``.

    Each part is negated first when lower is better for it, so every weight reads "how much this
    quality counts". Useful as a stand-in for what labelers weigh when several qualities matter.
    A part that is a plain number is a constant added to every score (``weighted:0.5*rm:DIR+-1.2``:
    a reward centred and scaled, as ``rlhf personal adapter`` writes it).
    """

    higher_is_better = True

    def __init__(self, parts: list[tuple[float, Scorer]], spec: str, offset: float = 0.0):
        self.parts, self.name, self.offset = parts, spec, offset

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        total = torch.full((len(completions),), float(self.offset))
        for weight, scorer in self.parts:
            s = score_checked(scorer, prompts, completions)
            total += weight * (s if scorer.higher_is_better else -s)
        return total


def signals_of(scorer: Scorer) -> set[str]:
    """What a scorer reads, by name: its ``signal`` (scorers that share one underlying model name it
    alike, e.g. toxicity and non-toxicity both read alt-profanity-check) or its name, and for a
    weighted scorer every part's. A judge that reads a signal of the training reward, or of what the
    labelers ranked by, is not independent of the training (rlhf.eval.commands)."""
    if isinstance(scorer, WeightedScorer):
        return set().union(*(signals_of(part) for _, part in scorer.parts))
    return {getattr(scorer, "signal", None) or scorer.name}


def weighted_terms(arg: str) -> tuple[list[tuple[float, str]], float]:
    """A weighted scorer's argument (``2*relevance+non-toxicity+-1.2``) read into (weight, scorer spec)
    parts and the sum of its constant parts, without loading any scorer."""
    parts, offset = [], 0.0
    for term in (t.strip() for t in arg.split("+")):
        try:
            constant = float(term)
        except ValueError:
            pass  # not a number: a WEIGHT*SPEC or SPEC part
        else:  # a constant part
            if not math.isfinite(constant):
                raise ConfigError(f"weighted scorer: the constant {term!r} is not a finite number")
            offset += constant
            continue
        weight, star, spec = term.partition("*")
        if not star:
            weight, spec = "1", term
        try:
            w = float(weight)
        except ValueError:
            raise ConfigError(f"weighted scorer: {term!r} should be WEIGHT*SPEC or SPEC (e.g. 2*relevance)") from None
        if not spec or spec.startswith("weighted"):
            raise ConfigError(f"weighted scorer: {term!r} names no scorer (or nests another weighted one)")
        parts.append((w, spec))
    if not parts:
        raise ConfigError("weighted scorer needs at least one scorer among its parts: weighted:2*relevance+non-toxicity")
    return parts, offset


def _weighted(arg: str, device: str) -> WeightedScorer:
    parts, offset = weighted_terms(arg)
    return WeightedScorer([(w, load_scorer(spec, device)) for w, spec in parts], f"weighted:{arg}", offset)


def no_argument(kind: str, make: Callable[[], Scorer]) -> Callable[[str, str], Scorer]:
    """A SCORER_KINDS factory for a scorer that takes no ``kind:argument`` (a given one is an error)."""
    def factory(arg: str, device: str) -> Scorer:
        if arg:
            raise ConfigError(f"scorer {kind!r} takes no argument, got {kind}:{arg}")
        return make()
    return factory


# kind -> factory(argument string after "kind:", device) -> Scorer.
# Judge modules add their kinds here (learned reward models, classifiers, lexicons).
SCORER_KINDS: dict[str, Callable[[str, str], Scorer]] = {
    "length": no_argument("length", LengthScorer),
    "repetition": no_argument("repetition", RepetitionScorer),
    "weighted": _weighted,
}


def load_scorer(spec: str, device: str = "cpu") -> Scorer:
    """``kind`` or ``kind:argument``; a bare folder path is a learned reward model."""
    _register_builtin_kinds()
    kind, _, arg = spec.partition(":")
    if kind in SCORER_KINDS:
        return SCORER_KINDS[kind](arg, device)
    if "path" in SCORER_KINDS:  # a bare folder: let the reward-model loader decide
        from pathlib import Path

        if Path(spec).is_dir():
            return SCORER_KINDS["path"](spec, device)
    raise ConfigError(f"unknown scorer {spec!r}; known kinds: {', '.join(sorted(k for k in SCORER_KINDS if k != 'path'))}, "
                      "or a reward-model folder")


def _register_builtin_kinds() -> None:
    """Import the judge modules that register further kinds (kept lazy: they load heavy libraries)."""
    import importlib
    import importlib.util

    for module in ("rlhf.judges.learned", "rlhf.judges.classifiers", "rlhf.judges.relevance", "rlhf.judges.lexicons",
                   "rlhf.personal.scorer"):  # personal:DIR:USER, caution
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module)
