"""Our own decode loop for any Hugging Face causal LM: static KV cache, lean steps, optional torch.compile.

Why not ``model.generate``: on a small CPU model decoding is dominated by per-token Python and dispatch
work (logits processors, stopping criteria, cache bookkeeping, mask rebuilding), not by arithmetic.
This loop does one model forward and a handful of tensor ops per token:

* the KV cache is a transformers ``StaticCache`` sized once (prompt + new tokens, rounded up to a
  bucket so compiled shapes repeat) and reused between calls, so nothing is reallocated per step;
* the attention mask is one preallocated [B, L] tensor: a step sets one column;
* position ids follow the left padding (cumsum of the prompt mask), exactly as ``generate`` does;
* temperature, top-k and top-p are applied in a few tensor ops, in the same order and with the
  same keep rules as the transformers logits warpers, then ``torch.multinomial``;
* "has every row finished?" is checked only every ``check_every`` steps (a host sync on GPUs);
* decoding runs with ``torch.inference_mode`` and, by default, one intra-op thread: the per-step
  matmuls at rollout batch sizes are too small to split, and on a shared 2-core machine a second
  spinning OpenMP thread costs far more than it gains (measured: benchmarks/results/bench_generate.md);
* optionally (``RLHF_DECODE_COMPILE=1``) the one-token forward is compiled with torch.compile
  (inductor, C++ wrapper), which removes most remaining Python overhead but costs tens of seconds
  of compilation per new (batch, cache length) shape; any compile failure falls back to eager.

Models whose cache is not a plain full-attention static cache (sliding windows, linear attention,
encoder-decoders, ...) are not handled here: ``sample_response_ids`` returns None and the caller
uses ``model.generate``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import weakref
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name, "").strip()
    return int(value) if value else default


@dataclass
class DecodeSettings:
    """Process-wide knobs (environment variables give the defaults, so a run can be tuned without code)."""

    enabled: bool = True          # RLHF_FAST_DECODE=0 → always use model.generate
    compile: bool = False         # RLHF_DECODE_COMPILE=1 → torch.compile the one-token step
    threads: int = 1              # RLHF_DECODE_THREADS; 0 = leave torch's thread count alone
    check_every: int = 8          # steps between "all rows finished?" checks
    cache_bucket: int = 32        # cache length is rounded up to a multiple of this

    @classmethod
    def from_env(cls) -> "DecodeSettings":
        return cls(enabled=_env_int("RLHF_FAST_DECODE", 1) != 0, compile=_env_int("RLHF_DECODE_COMPILE", 0) != 0,
                   threads=_env_int("RLHF_DECODE_THREADS", 1))


SETTINGS = DecodeSettings.from_env()


class _ModelState:
    """What we keep per model between calls: its caches (reused, so compiled shapes and addresses repeat)
    and its compiled step. Held in a WeakKeyDictionary so a dropped model takes its caches with it."""

    def __init__(self):
        self.caches: dict[tuple, object] = {}
        self.compiled = None
        self.compile_failed = False
        self.unsupported: str | None = None


_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelState]" = weakref.WeakKeyDictionary()
_MAX_CACHES_PER_MODEL = 4  # bounds memory when batch sizes or prompt lengths vary a lot


def _state(model) -> _ModelState:
    state = _STATE.get(model)
    if state is None:
        state = _STATE[model] = _ModelState()
    return state


def unsupported_reason(model) -> str | None:
    """Why the fast path cannot decode this model (None when it can). Checked once per model."""
    state = _state(model)
    if state.unsupported is None:
        state.unsupported = _check_support(model) or ""
    return state.unsupported or None


def _check_support(model) -> str | None:
    from transformers import StaticCache
    from transformers.cache_utils import StaticLayer

    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return "not a decoder-only Hugging Face model"
    supports_cache = getattr(model, "_supports_default_dynamic_cache", None)
    if supports_cache is not None and not supports_cache():
        return f"{type(model).__name__} keeps a non-standard cache"
    params = inspect.signature(model.forward).parameters
    if not {"input_ids", "attention_mask", "position_ids", "past_key_values"} <= set(params):
        return "forward() lacks input_ids/attention_mask/position_ids/past_key_values"
    try:
        cache = StaticCache(config=config, max_cache_len=8)
    except Exception as err:  # noqa: BLE001 - any failure here just means "use generate"
        return f"StaticCache does not fit this config ({err})"
    # Our mask addresses cache slots directly (slot i = token i), which holds only for plain
    # full-attention layers; sliding windows roll their buffer and linear attention has no slots.
    if not cache.layers or any(type(layer) is not StaticLayer for layer in cache.layers):
        return "cache has sliding-window or non-attention layers"
    return None


def _get_cache(model, state: _ModelState, batch: int, length: int, dtype: torch.dtype, device: torch.device):
    from transformers import StaticCache

    key = (batch, length, dtype, device)
    cache = state.caches.pop(key, None)
    if cache is None:
        while len(state.caches) >= _MAX_CACHES_PER_MODEL:
            state.caches.pop(next(iter(state.caches)))
        cache = StaticCache(config=model.config, max_cache_len=length)
    else:
        cache.reset()  # zeroes keys/values and the write position in place (addresses stay the same)
    state.caches[key] = cache  # re-insert: most recently used last
    return cache


def _forward_last_logits(model, input_ids, attention_mask, position_ids, cache):
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                past_key_values=cache, use_cache=True)
    return out.logits[:, -1].float()


def _step_fn(model, state: _ModelState, settings: DecodeSettings):
    """The one-token forward: compiled when asked for and possible, else plain eager."""

    def eager(ids, mask, pos, cache):
        return _forward_last_logits(model, ids, mask, pos, cache)

    if not settings.compile or state.compile_failed or not getattr(model, "_can_compile_fullgraph", False):
        return eager
    if state.compiled is None:
        # dynamic=False: shapes are fixed per (batch, cache length) bucket; fullgraph so that a graph
        # break shows up as a failure (→ eager) instead of a silently slow half-compiled step.
        # cpp_wrapper removes the Python wrapper around inductor's kernels (measured ~15% faster).
        state.compiled = torch.compile(eager, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})

    compiled = state.compiled

    def guarded(ids, mask, pos, cache):
        if state.compile_failed:
            return eager(ids, mask, pos, cache)
        try:
            return compiled(ids, mask, pos, cache)
        except Exception as err:  # noqa: BLE001 - compilers fail in many ways; eager is always right
            log.warning("torch.compile of the decode step failed; decoding eagerly from now on (%s)", err)
            state.compile_failed = True
            return eager(ids, mask, pos, cache)

    return guarded


def filter_logits(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the transformers warper order); removed tokens get -inf.

    Keep rules match transformers: top-k keeps every token tied with the k-th; top-p keeps a token
    when the probability mass strictly above it is below ``top_p`` (so the top token always stays).
    """
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits = torch.sort(logits, dim=-1, descending=True).values
        probs = sorted_logits.softmax(dim=-1)
        mass_above = probs.cumsum(dim=-1) - probs
        # The smallest logit still kept is the threshold; comparing against it avoids a scatter.
        cutoff = sorted_logits.masked_fill(mass_above >= top_p, float("inf")).amin(dim=-1, keepdim=True)
        logits = logits.masked_fill(logits < cutoff, float("-inf"))
    return logits


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = filter_logits(logits, temperature, top_k, top_p).softmax(dim=-1)
    return torch.multinomial(probs, 1).squeeze(-1)


@contextlib.contextmanager
def _threads(n: int):
    before = torch.get_num_threads()
    if n > 0 and n != before:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def sample_response_ids(model, query_ids: torch.Tensor, query_mask: torch.Tensor, params,
                        eos_token_id: int | list[int], pad_token_id: int,
                        settings: DecodeSettings | None = None) -> torch.Tensor | None:
    """Sampled reply tokens [B, R] for left-padded prompts (R ≤ max_new_tokens: the loop stops early
    once every row has produced an EOS, as ``generate`` does); after a row's EOS it holds ``pad_token_id``.

    Returns None when this model needs ``model.generate`` instead (see ``unsupported_reason``).
    ``params`` is a ``SamplingParams`` (max_new_tokens, temperature, top_p, top_k).
    """
    settings = settings or SETTINGS
    if not settings.enabled or params.max_new_tokens < 1:
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fast decoding unavailable for %s: %s; using model.generate", type(model).__name__, reason)
        return None
    with _threads(settings.threads), torch.inference_mode():
        tokens = _decode(model, query_ids, query_mask, params, eos_token_id, pad_token_id, settings)
    # Clone outside inference mode: inference tensors cannot be saved for backward, and PPO feeds
    # these ids through the policy with gradients on.
    return tokens.clone()


def _decode(model, query_ids, query_mask, params, eos_token_id, pad_token_id, settings: DecodeSettings):
    state = _state(model)
    batch, prompt_len = query_ids.shape
    device = query_ids.device
    new = params.max_new_tokens
    bucket = max(1, settings.cache_bucket)
    length = -(-(prompt_len + new) // bucket) * bucket
    dtype = next(model.parameters()).dtype
    cache = _get_cache(model, state, batch, length, dtype, device)

    # Slot i of the cache holds token i of the padded sequence; the mask says which slots are real.
    mask = torch.zeros(batch, length, dtype=torch.long, device=device)
    mask[:, :prompt_len] = query_mask
    positions = (query_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=device)
    temperature, top_k, top_p = float(params.temperature), int(params.top_k or 0), float(params.top_p)

    prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions, past_key_values=cache,
                use_cache=True, **prefill_kwargs)
    logits = out.logits[:, -1].float()
    del out
    step = _step_fn(model, state, settings)
    next_pos = positions[:, -1:] + 1

    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
    produced = []
    for t in range(new):
        if t:
            if t % settings.check_every == 0 and bool(done.all()):
                break
            mask[:, prompt_len + t - 1] = 1  # the token fed now is written to this slot
            logits = step(produced[-1].unsqueeze(1), mask, next_pos, cache)
            next_pos += 1
        token = torch.where(done, pad, _pick(logits, temperature, top_k, top_p))
        done |= torch.isin(token, eos)
        produced.append(token)
    return torch.stack(produced, dim=1)
