"""The math of RLHF as pure tensor functions (torch only): reward-model and PPO losses.

Every function documents its tensor shapes and the paper it follows. Nothing here knows about
models, tokenizers or files, so each piece is tested by hand-computed cases, loop-vs-vectorised
comparisons and padding invariance (tests/test_algos*.py).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor, margin: torch.Tensor | float | None = None,
                       center_coef: float = 0.0) -> torch.Tensor:
    """Pairwise reward-model loss −log σ(r_c − r_r − m), averaged over the batch (Ouyang et al. 2022).

    r_chosen, r_rejected: [B] scalar rewards. margin: optional [B] or scalar m the chosen reply
    should win by (Touvron et al. 2023, Llama 2). center_coef: weight of E[(r_c + r_r)²], which
    keeps rewards centred on zero (Eisenstein et al. 2023) since the pairwise loss alone leaves
    the offset free. Returns a scalar. ``logsigmoid`` keeps large differences finite.
    """
    diff = r_chosen - r_rejected
    if margin is not None:
        diff = diff - margin
    loss = -F.logsigmoid(diff).mean()
    if center_coef:
        loss = loss + center_coef * ((r_chosen + r_rejected) ** 2).mean()
    return loss
