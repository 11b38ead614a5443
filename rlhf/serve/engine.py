"""What the server runs: a causal LM that completes token ids and reports per-token log-probabilities.

Log-probabilities are the model's own (a log-softmax of the raw logits, before temperature, top-p
or penalties), which is what a client reading option probabilities needs, whatever sampling
settings it asked for. One request runs at a time (``lock``): a CPU gains nothing from two
interleaved forward passes, and the model is not re-entrant.
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass, field

import torch

from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError
from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_device, stop_token_ids


def check_serving_engine(engine: EngineConfig, verb: str) -> None:
    """Servers take device, dtype, threads and the CPU GEMM routing from the ``engine`` section, and
    sample with plain forward passes of their own (per-token log-probabilities, stop strings, per-user
    adapters), not with a rollout backend: refuse the rollout options rather than ignore them."""
    asked = ([f"--rollout {engine.rollout}"] if engine.rollout in ("fast", "vllm") else []) + (["--compile"] if engine.compile else [])
    if asked:
        raise ConfigError(f"{verb} samples with its own forward passes: {' and '.join(asked)} "
                          f"{'do' if len(asked) > 1 else 'does'} not apply here (leave --rollout at auto or hf, --compile off)")


@dataclass
class TokenInfo:
    """One token of a prompt or completion: its text, log-probability, and the top alternatives."""

    token_id: int
    text: str
    logprob: float | None                      # None for the first prompt token (nothing predicts it)
    top: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class Completion:
    text: str
    tokens: list[TokenInfo]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"


class ServedModel:
    """A loaded model plus tokenizer, with the few operations the OpenAI API needs."""

    def __init__(self, model_ref: str, device: str | torch.device = "auto", dtype: torch.dtype = torch.float32):
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(model_ref, padding_side="left")
        self.model = load_causal_lm(model_ref, device=self.device, dtype=dtype)
        self.model.eval()
        self.lock = threading.Lock()
        self.context_length = int(getattr(self.model.config, "max_position_embeddings", 2048) or 2048)
        self.eos_ids = stop_token_ids(self.tokenizer, self.model.generation_config)  # EOS and the end of turn

    # --- text <-> tokens ---------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def token_text(self, token_id: int) -> str:
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def chat_text(self, messages: list[dict]) -> str:
        """The prompt text for a chat: the tokenizer's chat template, or "role: content" lines without one."""
        if getattr(self.tokenizer, "chat_template", None):
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return "".join(f"{m['role']}: {m['content']}\n" for m in messages) + "assistant:"

    def _top(self, logprobs: torch.Tensor, k: int) -> list[tuple[str, float]]:
        """The k most likely next tokens as (text, log-prob); tokens with the same text are merged."""
        if k <= 0:
            return []
        values, ids = torch.topk(logprobs, min(k, logprobs.numel()))
        merged: dict[str, float] = {}
        for v, i in zip(values.tolist(), ids.tolist()):
            text = self.token_text(i)
            merged[text] = float(torch.logaddexp(torch.tensor(merged[text]), torch.tensor(v))) if text in merged else v
        return list(merged.items())

    # --- operations --------------------------------------------------------------------------

    @torch.no_grad()
    def prompt_logprobs(self, ids: list[int], top_k: int) -> list[TokenInfo]:
        """Log-probability of every prompt token given those before it (for ``echo``)."""
        if not ids:
            return []
        logits = self.model(torch.tensor([ids], device=self.device)).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        out = [TokenInfo(ids[0], self.token_text(ids[0]), None)]
        for t in range(1, len(ids)):
            lp = logprobs[t - 1]
            out.append(TokenInfo(ids[t], self.token_text(ids[t]), float(lp[ids[t]]), self._top(lp, top_k)))
        return out

    @torch.no_grad()
    def complete(self, ids: list[int], max_tokens: int, temperature: float = 1.0, top_p: float = 1.0, n: int = 1,
                 seed: int | None = None, stop: list[str] | None = None, top_k_logprobs: int = 0) -> list[Completion]:
        """``n`` completions of the prompt ``ids``, each with its tokens' log-probabilities.

        temperature 0 is greedy decoding. Generation ends at EOS, after ``max_tokens``, or at the
        first stop string (the stop string itself is left out of the text, as OpenAI does).
        """
        if max_tokens <= 0:
            return [Completion("", [], "length") for _ in range(n)]
        if seed is not None:
            torch.manual_seed(seed)
        query = torch.tensor([ids], device=self.device)
        kwargs = dict(max_new_tokens=max_tokens, num_return_sequences=n, output_logits=True,
                      return_dict_in_generate=True, eos_token_id=self.eos_ids or None,
                      pad_token_id=self.tokenizer.pad_token_id, use_cache=True)
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        out = self.model.generate(input_ids=query, attention_mask=torch.ones_like(query), **kwargs)
        new = out.sequences[:, query.shape[1]:]
        logprobs = torch.stack([torch.log_softmax(step.float(), dim=-1) for step in out.logits], dim=1)  # [n, T, V]
        completions = []
        for row in range(new.shape[0]):
            tokens, finish = [], "length"
            for t, tid in enumerate(new[row].tolist()):
                if tid in self.eos_ids:
                    finish = "stop"
                    break
                lp = logprobs[row, t]
                tokens.append(TokenInfo(tid, self.token_text(tid), float(lp[tid]), self._top(lp, top_k_logprobs)))
            completions.append(self._apply_stop(tokens, finish, stop or []))
        return completions

    def _apply_stop(self, tokens: list[TokenInfo], finish: str, stop: list[str]) -> Completion:
        ids = [t.token_id for t in tokens]
        text = self.tokenizer.decode(ids, skip_special_tokens=True)
        cuts = [text.find(s) for s in stop if s and s in text]
        if not cuts:
            return Completion(text, tokens, finish)
        cut = min(cuts)
        # Keep the tokens whose text ends before the stop string starts: the text the client receives.
        kept = 0
        while kept < len(ids) and len(self.tokenizer.decode(ids[:kept + 1], skip_special_tokens=True)) <= cut:
            kept += 1
        return Completion(text[:cut], tokens[:kept], "stop")


def finite(x: float | None) -> float | None:
    """JSON has no -inf: a log-probability of an impossible token is sent as a very negative number."""
    if x is None:
        return None
    return x if math.isfinite(x) else -9999.0
