"""Generation that follows the user: their LoRA adapter when they have one, else best-of-N by their reward.

:class:`ChatPolicy` holds one base policy in memory and answers "two replies for this user and
prompt", the chat page's unit of work:

* **adapter** — ``ADAPTERS/<user>/`` holds a peft LoRA adapter trained with PPO against the user's
  reward (``rlhf personal adapter``). It is loaded onto the shared base model on the user's first
  request, kept (up to ``max_adapters``, least recently used dropped first), and reloaded when the
  folder is replaced by a newer one; both replies are sampled with it;
* **rerank** — without an adapter, N candidates are sampled from the base policy and scored with
  the user's personal reward (the generic one for a user without a row yet); each reply is the best
  of its half, so both are best-of-N/2 draws (immediate, no training);
* **sample** — without a personal reward model, two plain samples.

Every answer names what produced it (``model_version``), which the feedback record keeps. A lock
serialises generation (one model, one CPU); reward versions and adapters are swapped between
requests by assignment, so no request is dropped or sees half a swap.

The ``rlhf serve`` model holder (issue 17) was not merged when this was written; this one stays
deliberately small: one base model, per-user adapters, no batching across requests.
"""

from __future__ import annotations

import json
import os
import re
import threading
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.config import opt
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer, pick_device
from rlhf.personal.model import PersonalReward
from rlhf.rollout.generate import SamplingParams, decode_responses, sample_tokens
from rlhf.serve.engine import check_serving_engine

ADAPTER_META = "adapter.json"


@dataclass
class ChatPolicyConfig:
    """How the chat page generates its two replies."""

    policy: str = opt("bundled", help="Base policy: 'bundled' or a local Hugging Face causal-LM folder.")
    reward: str | None = opt(None, help="Personal reward model folder (`rlhf personal train`): replies are reranked "
                                        "by each user's reward. Unset: two plain samples.")
    adapters: str | None = opt(None, help="Folder of per-user LoRA adapters (ADAPTERS/<user>/); default REWARD/adapters.")
    candidates: int = opt(8, help="Best-of-N: candidates sampled per turn when reranking (each reply is the best of half).")
    max_new_tokens: int = opt(48, help="Longest reply in tokens.")
    temperature: float = opt(1.0, help="Sampling temperature.")
    top_p: float = opt(1.0, help="Nucleus sampling mass (1 = off).")
    top_k: int = opt(0, help="Top-k sampling (0 = off).")
    max_adapters: int = opt(16, help="Adapters kept loaded at once (least recently used are dropped).")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the policy and the reward run: device, dtype, threads "
                                                          "(replies are sampled with transformers' forward passes).")

    def validate(self) -> None:
        if self.candidates < 2 or self.candidates % 2:
            raise ConfigError("--candidates must be an even number of at least 2")
        if self.max_new_tokens < 1 or self.temperature <= 0 or not 0 < self.top_p <= 1 or self.max_adapters < 1:
            raise ConfigError("--max-new-tokens and --max-adapters must be at least 1, --temperature positive, --top-p in (0, 1]")
        check_serving_engine(self.engine, "rlhf personal serve")


def adapter_key(user: str, stamp: tuple[int, int]) -> str:
    """A peft adapter name for (user, folder version): letters, digits and underscores only."""
    safe = re.sub(r"[^A-Za-z0-9]", "_", user)[:40]
    return f"u{zlib.crc32(user.encode('utf-8')):08x}_{safe}_{stamp[0]}_{stamp[1]}"


def seed_for(*parts: str) -> int:
    """A stable 31-bit seed from strings (the same ask samples the same replies)."""
    return zlib.crc32("\0".join(parts).encode("utf-8")) & 0x7FFFFFFF


class ChatPolicy:
    def __init__(self, cfg: ChatPolicyConfig, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32):
        """``device`` and ``dtype``: where the command's ``start(cfg.engine)`` put this process."""
        cfg.validate()
        self.cfg = cfg
        self.device = pick_device(device)
        self.tok = load_tokenizer(cfg.policy)
        self.base = load_causal_lm(cfg.policy, device=self.device, dtype=dtype)
        disable_dropout(self.base)
        self.model = self.base  # becomes a peft model once the first adapter is loaded
        self.params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
        self.reward = PersonalReward(cfg.reward, str(self.device)) if cfg.reward else None
        adapters = cfg.adapters or (str(Path(cfg.reward) / "adapters") if cfg.reward else None)
        self.adapters_dir = Path(adapters) if adapters else None
        self.policy_name = "bundled" if cfg.policy in ("bundled", "default") else Path(cfg.policy).name
        self._loaded: OrderedDict[str, str] = OrderedDict()  # user -> adapter key currently loaded
        self._lock = threading.Lock()

    # -- adapters --------------------------------------------------------------------------------

    def adapter_folder(self, user: str) -> Path | None:
        if self.adapters_dir is None:
            return None
        folder = self.adapters_dir / user
        return folder if (folder / "adapter_config.json").is_file() and (folder / ADAPTER_META).is_file() else None

    def _adapter(self, user: str) -> tuple[str, dict] | None:
        """The user's adapter, loaded (or reloaded when its folder changed); None without one. Under the lock."""
        folder = self.adapter_folder(user)
        if folder is None:
            return None
        try:
            st = os.stat(folder / ADAPTER_META)
            meta = json.loads((folder / ADAPTER_META).read_text(encoding="utf-8"))
        except (OSError, ValueError):  # replaced between the check and the read: use it next time
            return None
        key = adapter_key(user, (st.st_ino, st.st_mtime_ns))
        if self._loaded.get(user) != key:
            from peft import PeftModel

            if self.model is self.base:
                self.model = PeftModel.from_pretrained(self.base, str(folder), adapter_name=key)
            else:
                self.model.load_adapter(str(folder), adapter_name=key)
            old = self._loaded.pop(user, None)
            if old is not None:
                self.model.delete_adapter(old)
            self._loaded[user] = key
            while len(self._loaded) > self.cfg.max_adapters:
                _, dropped = self._loaded.popitem(last=False)
                self.model.delete_adapter(dropped)
            self.model.eval()
        self._loaded.move_to_end(user)
        return key, meta

    # -- generation ------------------------------------------------------------------------------

    def _sample(self, prompt: str, n: int, seed: int, adapter: str | None) -> list[str]:
        torch.manual_seed(seed)
        if adapter is not None:
            self.model.set_adapter(adapter)
            return decode_responses(self.tok, sample_tokens(self.model, self.tok, [prompt] * n, self.params))
        if self.model is not self.base:
            with self.model.disable_adapter():
                return decode_responses(self.tok, sample_tokens(self.model, self.tok, [prompt] * n, self.params))
        return decode_responses(self.tok, sample_tokens(self.model, self.tok, [prompt] * n, self.params))

    def mode(self, user: str) -> str:
        """What a turn for ``user`` would use right now: adapter, rerank or sample."""
        return "adapter" if self.adapter_folder(user) else "rerank" if self.reward is not None else "sample"

    def replies(self, user: str, prompt: str, seed: int) -> tuple[list[str], str]:
        """Two replies for ``user`` and the model version that produced them."""
        with self._lock:
            adapter = self._adapter(user)
            if adapter is not None:
                key, meta = adapter
                texts = self._sample(prompt, 2, seed, key)
                return texts, f"{self.policy_name}+adapter:{user}@{meta.get('version', key)}"
            if self.reward is None:
                return self._sample(prompt, 2, seed, None), self.policy_name
            candidates = self._sample(prompt, self.cfg.candidates, seed, None)
        # Scoring runs outside the generation lock: the reward has its own, and the next turn may sample meanwhile.
        self.reward.refresh()
        version, table = self.reward.version, self.reward.table
        scores = self.reward.score(user, [prompt] * len(candidates), candidates, table=table)
        return best_of_halves(candidates, scores), f"{self.policy_name}+rerank{len(candidates)}:{version}"


def best_of_halves(candidates: list[str], scores: torch.Tensor) -> list[str]:
    """The best-scored candidate of each half; the second half's pick avoids repeating the first's text."""
    half = len(candidates) // 2
    first = max(range(half), key=lambda i: float(scores[i]))
    rest = sorted(range(half, len(candidates)), key=lambda i: -float(scores[i]))
    second = next((i for i in rest if candidates[i].strip() != candidates[first].strip()), rest[0])
    return [candidates[first], candidates[second]]
