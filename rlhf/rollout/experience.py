"""One record for a batch of episodes, from sampling to the update.

The sampler fills the rollout fields; a trainer fills the rest in order (scores, then reference
log-probabilities, KL, rewards, values, advantages and returns) on the same object. PPO reads it
through every stage; a critic-free trainer (GRPO, RLOO) leaves ``values`` and ``hidden`` empty and
fills ``advantages`` its own way; evaluation uses the rollout fields alone.

``response_mask`` is the one place that says which reply tokens count: loss, KL and advantages
are all masked by it (an episode with tool observations marks those tokens 0 here).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields

import torch


@dataclass
class Experience:
    """B = episodes, P = prompt length (left-padded), R = reply length (right-padded), H = hidden size."""

    # rollout: written by the sampler
    query_ids: torch.Tensor       # [B, P] prompt tokens, left-padded
    query_mask: torch.Tensor      # [B, P] 1 on real prompt tokens
    response_ids: torch.Tensor    # [B, R] sampled tokens; pad after the first EOS
    response_mask: torch.Tensor   # [B, R] 1 on tokens that count: up to and including the first EOS
    ended_with_eos: torch.Tensor  # [B] bool: False when the reply hit max_new_tokens unfinished
    prompts: list[str] = field(default_factory=list)  # [B] raw user texts
    texts: list[str] = field(default_factory=list)    # [B] decoded replies (no EOS, no padding)
    # Recorded while sampling where the backend can (the fast loop; vLLM gives logprobs only);
    # else None and computed by a forward pass. 0 / junk where response_mask is 0.
    logprobs: torch.Tensor | None = None  # [B, R] log π_old(y_t) at the sampling temperature, before top-k/top-p
    hidden: torch.Tensor | None = None    # [B, R, H] final hidden state that predicted y_t (for the values)
    # scoring
    raw_scores: torch.Tensor | None = None  # [B] the scorer's output
    scores: torch.Tensor | None = None      # [B] after the missing-EOS penalty and clipping
    # experience
    ref_logprobs: torch.Tensor | None = None  # [B, R] log π_ref(y_t)
    values: torch.Tensor | None = None        # [B, R] V_old(s_t)
    kl: torch.Tensor | None = None            # [B, R] per-token KL estimate used in the rewards
    rewards: torch.Tensor | None = None       # [B, R] −β·KL_t, plus the score on the last token
    advantages: torch.Tensor | None = None    # [B, R] (whitened if configured)
    returns: torch.Tensor | None = None       # [B, R] advantages + values, before whitening

    def __len__(self) -> int:
        return self.query_ids.shape[0]

    def select(self, idx: torch.Tensor) -> "Experience":
        """Rows ``idx`` of every field that is set (a minibatch)."""
        rows = idx.tolist()
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[idx.to(value.device)]
            elif isinstance(value, list):
                out[f.name] = [value[i] for i in rows] if value else []
            else:
                out[f.name] = value
        return Experience(**out)
