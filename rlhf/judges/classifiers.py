"""Classifiers as rewards: a local Hugging Face sequence classifier's positive-class logit, and
the ready-made classifiers that ship inside PyPI packages (no download).

Spec strings (``load_scorer``):

* ``classifier:<model dir>:<positive label>`` — the logit of that label (a name from the model's
  ``id2label``, or an index); add ``:prob`` for its softmax probability instead;
* ``non-toxicity`` (alias ``profanity``) — alt-profanity-check's linear SVM, trained on human
  toxicity labels: log(p_clean / p_offensive), a logit that is higher for inoffensive replies;
* ``toxicity`` — the same model's probability that a reply is offensive (lower is better);
* ``sentiment`` — VADER's compound sentiment score in [-1, 1] (higher = more positive).

Classifiers judge the completion alone: "is this reply offensive" does not depend on the prompt,
and a red-teaming prompt would otherwise colour the score of a harmless refusal.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch

from rlhf.errors import ConfigError
from rlhf.judges.base import SCORER_KINDS, no_argument


class HFClassifierScorer:
    """The positive label's logit (or probability) from an AutoModelForSequenceClassification folder."""

    higher_is_better = True

    def __init__(self, folder: str | Path, label: str, prob: bool = False, device: str = "cpu",
                 batch_size: int = 32, max_length: int = 512):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise ConfigError(f"classifier folder {folder} not found or has no config.json")
        self.model = AutoModelForSequenceClassification.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
        self.tok = AutoTokenizer.from_pretrained(str(folder))
        if self.tok.pad_token is None:
            self.tok.pad_token = self.tok.eos_token
            self.model.config.pad_token_id = self.tok.eos_token_id
        self.tok.padding_side = "right"
        self.index = self._label_index(label, folder)
        self.prob = prob
        self.batch_size = batch_size
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length) or max_length)
        self.name = f"classifier:{folder}:{label}" + (":prob" if prob else "")

    def _label_index(self, label: str, folder: Path) -> int:
        id2label = {int(k): str(v) for k, v in (self.model.config.id2label or {}).items()}
        by_name = {v.lower(): k for k, v in id2label.items()}
        if label.lower() in by_name:
            return by_name[label.lower()]
        if label.isdigit() and int(label) < self.model.config.num_labels:
            return int(label)
        known = ", ".join(f"{k}={v}" for k, v in sorted(id2label.items()))
        raise ConfigError(f"classifier {folder} has no label {label!r}; its labels are: {known}")

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        out = torch.empty(len(completions), dtype=torch.float32)
        # Length-sorted batches waste little padding; the attention mask keeps scores independent of it.
        order = sorted(range(len(completions)), key=lambda i: len(completions[i]))
        device = next(self.model.parameters()).device
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            enc = self.tok([completions[i] for i in idx], padding=True, truncation=True,
                           max_length=self.max_length, return_tensors="pt").to(device)
            logits = self.model(**enc).logits.float()
            col = logits.softmax(-1)[:, self.index] if self.prob else logits[:, self.index]
            out[torch.tensor(idx)] = col.cpu()
        return out


def _classifier(arg: str, device: str) -> HFClassifierScorer:
    prob = False
    head, _, last = arg.rpartition(":")
    if head and last in ("prob", "logit"):
        prob, arg = last == "prob", head
    folder, _, label = arg.rpartition(":")
    if not folder or not label:
        raise ConfigError(f"classifier spec needs a folder and a label: classifier:<model dir>:<positive label>[:prob], got {arg!r}")
    from rlhf.models.loading import pick_device

    return HFClassifierScorer(folder, label, prob=prob, device=str(pick_device(device)))


def _offensive_prob(texts: list[str]) -> list[float]:
    with warnings.catch_warnings():
        # The package pickles its scikit-learn model with an older scikit-learn; the linear model loads fine.
        warnings.simplefilter("ignore")
        from profanity_check import predict_prob
    if not texts:
        return []
    return [float(p) for p in predict_prob(list(texts))]


class NonToxicityScorer:
    """log(p_clean / p_offensive) from alt-profanity-check: a logit, higher for inoffensive replies."""

    higher_is_better = True
    signal = "alt-profanity-check"  # the toxicity judge reads the same classifier (rlhf.judges.base.signals_of)

    def __init__(self, name: str = "non-toxicity"):
        self.name = name

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        eps = 1e-6  # keeps the logit finite for a classifier that is certain
        return torch.tensor([math.log((1 - p + eps) / (p + eps)) for p in _offensive_prob(completions)], dtype=torch.float32)


class ToxicityScorer:
    """alt-profanity-check's probability that a reply is offensive, in [0, 1]; lower is better."""

    name = "toxicity"
    higher_is_better = False
    signal = "alt-profanity-check"

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor(_offensive_prob(completions), dtype=torch.float32)


class SentimentScorer:
    """VADER compound sentiment of the reply, in [-1, 1]; higher is more positive."""

    name = "sentiment"
    higher_is_better = True

    def __init__(self):
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        return torch.tensor([self.analyzer.polarity_scores(c)["compound"] for c in completions], dtype=torch.float32)


SCORER_KINDS["classifier"] = _classifier
SCORER_KINDS["non-toxicity"] = no_argument("non-toxicity", lambda: NonToxicityScorer("non-toxicity"))
SCORER_KINDS["profanity"] = no_argument("profanity", lambda: NonToxicityScorer("profanity"))
SCORER_KINDS["toxicity"] = no_argument("toxicity", ToxicityScorer)
SCORER_KINDS["sentiment"] = no_argument("sentiment", SentimentScorer)
