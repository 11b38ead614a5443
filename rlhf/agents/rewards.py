"""Rewards for episodes: answer correctness, and optional format and tool-error terms.

* ``exact_match`` — 1 when the normalised final answer equals a normalised gold answer (SQuAD's
  normalisation: lower case, no punctuation, no articles, single spaces; Rajpurkar et al. 2016);
* ``f1`` — token-overlap F1 between final and gold answers, the best over the gold answers;
* ``judge:<spec>`` — any scorer of rlhf.judges (a reward model ``rm:DIR``, a classifier, ...) on
  (question, final answer), for tasks without a gold answer.

An episode without a final answer scores 0 on exact match and F1 (and the judge's score of an
empty reply). Optional shaping terms: ``format_bonus`` for an episode that ends with an answer, and
``tool_error_penalty`` per invalid call (an error observation).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from dataclasses import dataclass

import torch

from rlhf.agents.episode import Episode
from rlhf.config import opt
from rlhf.errors import ConfigError

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize_answer(text: str) -> str:
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str | None, golds: list[str]) -> float:
    if prediction is None:
        return 0.0
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(g) for g in golds))


def f1_score(prediction: str | None, golds: list[str]) -> float:
    if prediction is None:
        return 0.0
    pred = normalize_answer(prediction).split()
    best = 0.0
    for g in golds:
        gold = normalize_answer(g).split()
        common = sum((Counter(pred) & Counter(gold)).values())
        if common:
            precision, recall = common / len(pred), common / len(gold)
            best = max(best, 2 * precision * recall / (precision + recall))
        elif not pred and not gold:
            best = max(best, 1.0)
    return best


def gold_answers(ep: Episode) -> list[str]:
    answers = ep.meta.get("answers") or ([ep.answer] if ep.answer else [])
    return [a for a in answers if a]


@dataclass
class RewardConfig:
    """What an episode is worth."""

    reward: str = opt("exact_match", help="exact_match, f1, or judge:<scorer spec> (e.g. judge:rm:DIR) for tasks without answers.")
    format_bonus: float = opt(0.0, help="Added when the episode ends with a final answer.")
    tool_error_penalty: float = opt(0.0, help="Subtracted per invalid tool call (malformed action, unknown tool, tool error).")


class EpisodeReward:
    def __init__(self, cfg: RewardConfig, device: str = "cpu"):
        self.cfg = cfg
        self.judge = None
        if cfg.reward.startswith("judge:"):
            from rlhf.judges import load_scorer

            self.judge = load_scorer(cfg.reward[len("judge:"):], device)
        elif cfg.reward not in ("exact_match", "f1"):
            raise ConfigError(f"--reward {cfg.reward!r}: expected exact_match, f1 or judge:<scorer spec>")

    def __call__(self, episodes: list[Episode]) -> torch.Tensor:
        """Rewards [N] (also stored on each episode's ``reward``)."""
        if self.judge is not None:
            from rlhf.judges import score_checked

            base = score_checked(self.judge, [e.question for e in episodes], [e.final_answer or "" for e in episodes])
            if not self.judge.higher_is_better:
                base = -base
        else:
            metric = exact_match if self.cfg.reward == "exact_match" else f1_score
            for e in episodes:
                if not gold_answers(e):
                    raise ConfigError(f"episode {e.id} has no gold answer; --reward {self.cfg.reward} needs one (use judge:...)")
            base = torch.tensor([metric(e.final_answer, gold_answers(e)) for e in episodes], dtype=torch.float32)
        shaped = base + self.cfg.format_bonus * torch.tensor([float(e.final_answer is not None) for e in episodes])
        shaped = shaped - self.cfg.tool_error_penalty * torch.tensor([float(e.invalid_calls) for e in episodes])
        for e, r in zip(episodes, shaped.tolist()):
            e.reward = r
        return shaped
