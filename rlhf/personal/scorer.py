"""Scorers for personalization: a user's personal reward, and a lexicon of caution.

* ``personal:DIR:USER`` — USER's reward from the personal reward model in DIR, with the version
  deployed when the scorer is made (``personal:DIR:USER@v0003`` pins one). A user the model does
  not know gets the generic reward, which is what personalization falls back to; the scorer says
  so on stderr. The version stays fixed for the scorer's life, so a PPO run optimises one reward.
* ``caution`` — how hedged and safety-minded a reply is: the share of its sentences with a hedge
  or a warning (may, might, usually, be careful, avoid, see a doctor, ...). Higher is more cautious;
  ``weighted:-1*caution`` is a taste for direct answers.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import torch

from rlhf.errors import ConfigError
from rlhf.judges.base import SCORER_KINDS, no_argument
from rlhf.personal.model import PersonalReward


class PersonalScorer:
    """Rewards [N] for one user from a personal reward model folder, at one version."""

    higher_is_better = True

    def __init__(self, folder: str | Path, user: str, version: str | None = None, device: str = "cpu"):
        self.reward = PersonalReward(folder, device)
        self.user = user
        self.version, self.table, _ = self.reward.dir.load(version)
        self.name = f"personal:{folder}:{user}@{self.version}"
        if user not in self.table.names:
            print(f"note: {folder} version {self.version} has no row for user {user!r}; scoring with the generic reward",
                  file=sys.stderr)

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return self.reward.score(self.user, prompts, completions, table=self.table)


def _personal(arg: str, device: str) -> PersonalScorer:
    folder, sep, user = arg.rpartition(":")
    if not sep or not folder or not user:
        raise ConfigError(f"personal scorer: expected personal:DIR:USER (or personal:DIR:USER@vNNNN), got personal:{arg}")
    user, _, version = user.partition("@")
    from rlhf.judges.learned import _resolve_device

    return PersonalScorer(folder, user, version or None, _resolve_device(device))


_CAUTION = re.compile(r"\b(may|might|maybe|perhaps|possibly|usually|often|generally|probably|careful|carefully|gently|"
                      r"safe|safely|safety|avoid|check|make sure|be sure|if|unless|doctor|professional|warning|risk|"
                      r"slowly|a little|at first|rest)\b", re.IGNORECASE)
_SENTENCE = re.compile(r"(?<=[.!?;])\s+")


class CautionScorer:
    """The share of a reply's sentences that hedge or warn, in [0, 1] (0 for an empty reply)."""

    name = "caution"
    higher_is_better = True

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        out = []
        for text in completions:
            sentences = [s for s in _SENTENCE.split(text.strip()) if s.strip()]
            out.append(sum(bool(_CAUTION.search(s)) for s in sentences) / len(sentences) if sentences else 0.0)
        return torch.tensor(out, dtype=torch.float32)


SCORER_KINDS["personal"] = _personal
SCORER_KINDS["caution"] = no_argument("caution", CautionScorer)
