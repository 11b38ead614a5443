"""A trained reward model as a scorer: ``rm:<folder>`` or just the folder's path.

The folder is one written by ``rlhf reward train`` (its ``model/``, ``best/`` or a checkpoint's
``model/``); its ``rlhf_reward.json`` says how prompts and replies are joined and pooled, so PPO,
evaluation and the scripted labelers score exactly as training did.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.judges.base import SCORER_KINDS
from rlhf.models.reward_model import RewardEncoder, load_reward_model, pad_id_of, score_encoded


class RewardModelScorer:
    """Rewards from a learned reward model: float32 [N], higher = more preferred."""

    higher_is_better = True

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 32):
        self.folder = Path(folder)
        self.name = f"rm:{self.folder}"
        self.model, self.tok, self.spec = load_reward_model(self.folder, device)
        self.encoder = RewardEncoder(self.tok, self.spec)
        self.batch_size = batch_size
        self.prompts_cut = 0  # running counts: how often scoring had to drop the start of a prompt
        self.replies_cut = 0

    @torch.no_grad()
    def score(self, prompts: list[str], completions: list[str]) -> torch.Tensor:
        if len(prompts) != len(completions):
            raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
        items = [self.encoder.encode(p, c) for p, c in zip(prompts, completions)]
        self.prompts_cut += sum(e.prompt_cut for e in items)
        self.replies_cut += sum(e.reply_cut for e in items)
        if not items:
            return torch.zeros(0, dtype=torch.float32)
        return score_encoded(self.model, items, pad_id_of(self.tok), self.batch_size)


def _resolve_device(device: str) -> str:
    from rlhf.models.loading import pick_device

    return str(pick_device(device))


SCORER_KINDS["rm"] = lambda arg, device: RewardModelScorer(arg, _resolve_device(device))
SCORER_KINDS["path"] = lambda arg, device: RewardModelScorer(arg, _resolve_device(device))
