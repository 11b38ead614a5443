"""Our own decode loop for any Hugging Face causal LM: static KV cache, lean steps, optional torch.compile.

Why not ``model.generate``: on a small CPU model decoding is dominated by per-token Python and dispatch
work (logits processors, stopping criteria, cache bookkeeping, mask rebuilding), not by arithmetic.
This loop does one model forward and a handful of tensor ops per token:

* the KV cache is a transformers ``StaticCache`` sized once (prompt + new tokens, rounded up to a
  bucket so compiled shapes repeat) and reused between calls, so nothing is reallocated per step;
* the attention mask is one preallocated tensor, already in the form the attention kernel takes:
  a step sets one column;
* position ids follow the left padding (cumsum of the prompt mask), exactly as ``generate`` does;
* temperature, top-k and top-p are applied in a few tensor ops, in the same order and with the
  same keep rules as the transformers logits warpers, on a short candidate list rather than a
  sorted vocabulary, and the draw is inverse-CDF (``torch.multinomial`` and ``torch.sort`` cost more
  than the model step on a small CPU model);
* "has every row finished?" is checked only every ``check_every`` steps (a host sync on GPUs);
* decoding runs with ``torch.inference_mode``, and by default (``--rollout-threads 0``) with one
  intra-op thread for a model under ``SPLIT_MIN_PARAMETERS`` and torch's thread count (``--threads``)
  for a larger one: a tiny model's per-token products take tens of microseconds, too little to split,
  and on a shared 2-core machine a second spinning OpenMP thread costs far more than it gains
  (benchmarks/results/bench_generate.md); a 28M or 135M model's products are large enough that two
  threads decode 1.2-1.5x faster on a quiet 2-core machine (benchmarks/RESULTS.md, session 8);
* the one-token forward skips the model's ``forward()`` for Llama-style decoders (rlhf/rollout/lean_step.py:
  the same submodules, a dozen tensor ops a layer, attention over the written slots only); checked
  against the full forward on a model's first step, which is used instead where they differ;
* optionally (``--compile``) the one-token forward is compiled with torch.compile (inductor, C++
  wrapper), which removes most remaining Python overhead but costs tens of seconds of compilation
  per new (batch, cache length) shape; any compile failure falls back to eager;
* the random numbers of a draw can be given per episode (``uniforms``, from per-episode seeds), so
  an episode's reply does not depend on which batch or process sampled it.

The settings come from the ``engine`` section of the running stage (``DecodeSettings``), never
from the environment.

Models whose cache is not a plain full-attention static cache (sliding windows, linear attention,
encoder-decoders, ...) are not handled here: ``sample_response_ids`` returns None and the caller
uses ``model.generate``.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch

from rlhf.algos import rounding_gap, token_logprobs
from rlhf.models.loading import unwrap_peft
from rlhf.models.shared_prefix import MIN_SHARED_TOKENS, cache_argument, head_cache, rest_of_rows, shared_prefix_length
from rlhf.rollout.lean_step import lean_problem, lean_step

log = logging.getLogger(__name__)


@dataclass
class DecodeSettings:
    """How the loop runs (from the engine section: --compile, --rollout-threads)."""

    compile: bool = False         # torch.compile the one-token step
    threads: int = 1              # intra-op threads while decoding; 0 = by model size (``decode_threads``)
    check_every: int = 8          # steps between "all rows finished?" checks
    cache_bucket: int = 32        # cache length is rounded up to a multiple of this


def episode_uniforms(seeds: list[int], steps: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B, steps] uniform numbers in [0, 1), row b drawn from its own generator seeded ``seeds[b]``
    (float64, as the inverse-CDF draw uses them): an episode's draws depend on its seed alone."""
    rows = [torch.rand(steps, generator=torch.Generator().manual_seed(int(s)), dtype=torch.float64) for s in seeds]
    return torch.stack(rows).to(device) if rows else torch.empty(0, steps, dtype=torch.float64, device=device)


class _ModelState:
    """What we keep per model between calls: its caches (reused, so compiled shapes and addresses repeat)
    and its compiled step. Held in a WeakKeyDictionary so a dropped model takes its caches with it."""

    def __init__(self):
        self.caches: dict[tuple, object] = {}
        self.compiled: dict[bool, object] = {}  # the compiled step, with and without recording
        self.compile_failed = False
        self.unsupported: str | None = None
        self.cache_arg = "past_key_values"  # forward()'s name for the KV cache ("cache" from transformers 5.24)
        self.prefill_kwargs: dict = {}      # {"logits_to_keep": 1} where forward() takes it
        self.parameters: int | None = None  # counted once, for ``decode_threads``
        self.shared_prefix: bool | None = None  # shared-prefix prefill reproduces the plain one (None: not yet seen)
        self.lean: bool | None = None  # the lean step reproduces the full forward (None: not yet checked)


_STATE: "weakref.WeakKeyDictionary[torch.nn.Module, _ModelState]" = weakref.WeakKeyDictionary()
# Below this many parameters a decode step's products are too small to share between threads (see the
# module docstring): the bundled 2.1M model decodes no faster with two threads, a 28M one 1.2-1.4x faster.
SPLIT_MIN_PARAMETERS = 20_000_000
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
    params = inspect.signature(unwrap_peft(model).forward).parameters
    cache_arg = cache_argument(model)  # whichever name this model's forward declares
    if cache_arg is None or not {"input_ids", "attention_mask", "position_ids"} <= set(params):
        return "forward() lacks input_ids/attention_mask/position_ids/cache (or past_key_values)"
    state = _state(model)
    state.cache_arg = cache_arg
    state.prefill_kwargs = {"logits_to_keep": 1} if "logits_to_keep" in params else {}
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


def _forward_last(model, cache_arg, record, input_ids, attention_mask, position_ids, cache):
    """Logits [B, V] at the last position, and with ``record`` the final hidden state there [B, H]."""
    out = model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                use_cache=True, output_hidden_states=record, **{cache_arg: cache})
    return out.logits[:, -1].float(), (out.hidden_states[-1][:, -1] if record else None)


def _step_fn(model, state: _ModelState, settings: DecodeSettings, record: bool):
    """The one-token forward: compiled when asked for and possible, else plain eager."""

    def eager(ids, mask, pos, cache):
        return _forward_last(model, state.cache_arg, record, ids, mask, pos, cache)

    if not settings.compile or state.compile_failed or not getattr(model, "_can_compile_fullgraph", False):
        return eager
    if record not in state.compiled:
        # dynamic=False: shapes are fixed per (batch, cache length) bucket; fullgraph so that a graph
        # break shows up as a failure (→ eager) instead of a silently slow half-compiled step.
        # cpp_wrapper removes the Python wrapper around inductor's kernels (measured ~15% faster).
        state.compiled[record] = torch.compile(eager, fullgraph=True, dynamic=False, options={"cpp_wrapper": True})

    compiled = state.compiled[record]

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


_CANDIDATES = 64  # top-p looks at the top 64 tokens first; a full sort only when they hold < top_p of the mass


def candidates(logits: torch.Tensor, temperature: float, top_k: int, top_p: float):
    """The tokens sampling may pick, as (logits [B, K], token ids [B, K]) with removed ones at -inf.

    Same rules and order as the transformers warpers (temperature, then top-k, then top-p): top-k keeps
    the k largest; top-p keeps a token when the probability mass strictly above it is below ``top_p``
    (so the most likely token always stays). On CPU a full sort of the vocabulary costs more than the
    whole model step at this size (measured ~0.9 ms for 16 x 1570), so top-p works on a ``topk``
    candidate list, which is exact whenever the candidates already hold ``top_p`` of the mass (the
    nucleus is then inside them) and falls back to sorting everything otherwise.
    With neither filter every token is a candidate (ids None: the logits are the full vocabulary).
    """
    if temperature != 1.0:
        logits = logits / temperature
    vocab = logits.shape[-1]
    top_k = top_k if 0 < top_k < vocab else 0
    if not top_k and top_p >= 1.0:
        return logits, None
    # Accelerators sort fast and would pay a host sync for the coverage check: sort everything there.
    k = top_k or (min(vocab, _CANDIDATES) if logits.device.type == "cpu" else vocab)
    values, ids = torch.topk(logits, k, dim=-1)  # sorted, largest first
    if top_p < 1.0:
        # Probabilities over what survived top-k: the candidates themselves when top-k is on,
        # else the whole vocabulary (the candidates are then only its head).
        log_total = torch.logsumexp(values if top_k else logits, dim=-1, keepdim=True)
        probs = (values - log_total).exp()
        if not top_k and k < vocab and bool((probs.sum(dim=-1) < top_p).any()):
            values, ids = torch.sort(logits, dim=-1, descending=True)  # a nucleus wider than the candidates
            probs = (values - log_total).exp()
        values = values.masked_fill(probs.cumsum(dim=-1) - probs >= top_p, float("-inf"))
    return values, ids


def _pick(logits: torch.Tensor, temperature: float, top_k: int, top_p: float,
          u: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row: argmax when temperature is 0, else a draw from the filtered distribution.

    Drawing is inverse-CDF with one uniform number per row (cumsum + searchsorted): the same
    distribution as ``torch.multinomial`` at a small fraction of its CPU cost (measured 0.44 ms vs
    ~0.03 ms for 16 x 1570). The CDF is float64 so that u < 1 can never land past the last token
    with nonzero probability; zero-probability (removed) tokens can never be drawn. ``u`` [B, 1]:
    the uniform numbers to draw with (per-episode streams); None draws them from torch's generator.
    """
    if temperature <= 0:
        return logits.argmax(dim=-1)
    values, ids = candidates(logits, temperature, top_k, top_p)
    cdf = values.softmax(dim=-1).cumsum(dim=-1, dtype=torch.float64)
    if u is None:
        u = torch.rand(values.shape[0], 1, dtype=torch.float64, device=values.device)
    pick = torch.searchsorted(cdf, u * cdf[:, -1:], right=True).clamp_(max=values.shape[-1] - 1)
    return pick.squeeze(-1) if ids is None else ids.gather(-1, pick).squeeze(-1)


def decode_threads(model, settings: DecodeSettings) -> int:
    """Intra-op threads for decoding ``model``: ``settings.threads`` when set, else (0) one thread for a
    model under ``SPLIT_MIN_PARAMETERS`` and torch's current thread count (``--threads``) for a larger one."""
    if settings.threads > 0:
        return settings.threads
    state = _state(model)
    if state.parameters is None:
        state.parameters = sum(p.numel() for p in model.parameters())
    return torch.get_num_threads() if state.parameters >= SPLIT_MIN_PARAMETERS else 1


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


@dataclass
class Decoded:
    """What the loop produced. B = batch, R = reply length."""

    tokens: torch.Tensor                 # [B, R] sampled ids; ``pad_token_id`` after a row's EOS
    logprobs: torch.Tensor | None = None  # [B, R] log π(y_t) under the temperature-scaled full distribution
    hidden: torch.Tensor | None = None   # [B, R, H] final hidden state at the position that predicted y_t


def sample_response_ids(model, query_ids: torch.Tensor, query_mask: torch.Tensor, params,
                        eos_token_id: int | list[int], pad_token_id: int,
                        settings: DecodeSettings | None = None, record: bool = False,
                        uniforms: torch.Tensor | None = None) -> Decoded | None:
    """Sampled reply tokens [B, R] for left-padded prompts (R ≤ max_new_tokens: the loop stops early
    once every row has produced an EOS, as ``generate`` does); after a row's EOS it holds ``pad_token_id``.

    With ``record``, also the log-probability of each sampled token and the final hidden state that
    predicted it — what PPO's first forward over the finished replies would compute (its "old"
    logprobs and, through the value head, its values), had while sampling at the cost of a
    log-softmax per step. The logprobs are of the temperature-scaled distribution before top-k/top-p,
    as ``rlhf.models.policy.policy_forward`` scores them. Values past a row's EOS are junk for the
    caller's mask to hide.

    Returns None when this model needs ``model.generate`` instead (see ``unsupported_reason``).
    ``params`` is a ``SamplingParams`` (max_new_tokens, temperature, top_p, top_k). ``uniforms``
    [B, max_new_tokens]: the numbers each row draws with (see ``episode_uniforms``); None = torch's RNG.
    """
    settings = settings or DecodeSettings()
    if params.max_new_tokens < 1:
        return None
    reason = unsupported_reason(model)
    if reason is not None:
        log.info("fast decoding unavailable for %s: %s; using model.generate", type(model).__name__, reason)
        return None
    with _threads(decode_threads(model, settings)), torch.inference_mode():
        out = _decode(model, query_ids, query_mask, params, eos_token_id, pad_token_id, settings, record, uniforms)
    # Clone outside inference mode: inference tensors cannot be saved for backward, and PPO feeds
    # these ids through the policy with gradients on.
    return Decoded(*(None if t is None else t.clone() for t in out))


def _prefill(model, state: _ModelState, cache, query_ids, query_mask, mask, record: bool):
    """The prompts' forward into ``cache``: logits [B, V] and (``record``) the final hidden state [B, H] at
    each row's last prompt token, and the prompt's position ids [B, ·]; fills ``mask``'s prompt slots.

    When the prompts share a head of ``MIN_SHARED_TOKENS`` or more (a chat template's system prompt),
    it runs once as a batch of one and its keys and values go into every row's first slots; the rest
    of each prompt follows, left-padded, after them (rlhf/models/shared_prefix.py: the same states as
    a full prefill). The first time a model takes this path both prefills run and their logits are
    compared; a model they disagree on is prefilled plainly from then on. The checking call keeps the
    shared result, as every later call would: a run resumed from a checkpoint checks on a later step
    than the uninterrupted run did, and must sample from the same numbers there."""
    shared = shared_prefix_length(query_ids, query_mask)
    if shared >= MIN_SHARED_TOKENS and state.shared_prefix is not False:
        if state.shared_prefix:
            return _prefill_shared(model, state, cache, query_ids, query_mask, mask, record, shared)
        plain = _prefill_plain(model, state, cache, query_ids, query_mask, mask, record)
        cache.reset()  # the shared prefill rewrites the prompt's mask slots and fills the cache afresh
        got = _prefill_shared(model, state, cache, query_ids, query_mask, mask, record, shared)
        gap = rounding_gap(plain[0], got[0])
        state.shared_prefix = gap is None
        if state.shared_prefix:
            return got
        log.info("shared-prefix prefill off for %s: logits differ by %.2e", type(model).__name__, gap)
        cache.reset()
    return _prefill_plain(model, state, cache, query_ids, query_mask, mask, record)


def _prefill_plain(model, state: _ModelState, cache, query_ids, query_mask, mask, record: bool):
    mask[:, :query_ids.shape[1]] = query_mask
    positions = (query_mask.long().cumsum(dim=1) - 1).clamp(min=0)
    out = model(input_ids=query_ids, attention_mask=mask, position_ids=positions, use_cache=True,
                output_hidden_states=record, **{state.cache_arg: cache}, **state.prefill_kwargs)
    return out.logits[:, -1].float(), (out.hidden_states[-1][:, -1] if record else None), positions


def _prefill_shared(model, state: _ModelState, cache, query_ids, query_mask, mask, record: bool, shared: int):
    batch, prompt_len = query_ids.shape
    start = query_mask.argmax(dim=1)  # left padding: row r's tokens begin here
    head = head_cache(model, query_ids[:1, int(start[0]):int(start[0]) + shared], **state.prefill_kwargs)
    for i, layer in enumerate(head.layers):  # slots 0..shared-1 of every row: the head's states
        cache.update(layer.keys.expand(batch, -1, -1, -1), layer.values.expand(batch, -1, -1, -1), i)
    rest, positions = rest_of_rows(query_mask.long(), start, shared)
    mask[:, :shared] = 1
    mask[:, shared:prompt_len] = rest[:, shared:]
    positions = positions[:, shared:]
    out = model(input_ids=query_ids[:, shared:], attention_mask=mask, position_ids=positions, use_cache=True,
                output_hidden_states=record, **{state.cache_arg: cache}, **state.prefill_kwargs)
    return out.logits[:, -1].float(), (out.hidden_states[-1][:, -1] if record else None), positions


def _lean_usable(model, state: _ModelState) -> bool:
    if state.lean is None:
        problem = lean_problem(model)
        if problem is not None:
            log.info("lean decode step off for %s: %s", type(model).__name__, problem)
            state.lean = False
    return state.lean is not False


def _check_lean(model, state: _ModelState, step, fed, step_mask, positions, cache, slots, slot: int, record: bool):
    """A model's first step through both the full forward and the lean one: the lean step is kept for
    the model when it gives the same logits (and hidden states) to float32 rounding. Either way this
    call returns what every later call will compute, and leaves that computation's keys and values in
    the cache slot, so a run that checks on a later step (resumed from a checkpoint) samples from the
    same numbers as one that checked on its first. A lean step that fails outright (a layout it does not
    know) is dropped the same way: the full forward is always right."""
    full = step(fed, step_mask, positions, cache)
    saved = []
    try:
        saved = [(layer.keys[:, :, slot].clone(), layer.values[:, :, slot].clone()) for layer in cache.layers]
        lean = lean_step(model, fed, positions, slots, cache, slot, record)
        gap = rounding_gap(full[0], lean[0])
        if gap is None and record:
            gap = rounding_gap(full[1], lean[1])
        reason = None if gap is None else f"it differs from the full forward by {gap:.2e}"
    except Exception as err:  # noqa: BLE001
        # Whatever the lean step cannot run (a cache or layer layout it does not know), the full forward can.
        reason = f"it failed ({type(err).__name__}: {err})"
    state.lean = reason is None
    if state.lean:
        return lean
    log.info("lean decode step off for %s: %s", type(model).__name__, reason)
    for layer, (keys, values) in zip(cache.layers, saved):  # put back what the lean step overwrote
        layer.keys[:, :, slot] = keys
        layer.values[:, :, slot] = values
    return full


def _decode(model, query_ids, query_mask, params, eos_token_id, pad_token_id, settings: DecodeSettings, record: bool,
            uniforms: torch.Tensor | None):
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
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=device)
    temperature, top_k, top_p = float(params.temperature), int(params.top_k or 0), float(params.top_p)

    logits, hidden, positions = _prefill(model, state, cache, query_ids, query_mask, mask, record)
    step = _step_fn(model, state, settings, record)
    next_pos = positions[:, -1:] + 1
    # With SDPA attention a one-token step needs no causal structure, only "which slots are real":
    # hand transformers the final boolean [B, 1, 1, L] mask (returned as-is by its mask builder)
    # instead of having it rebuild one from the 2D mask every step. Other implementations get 2D.
    if getattr(model.config, "_attn_implementation", None) == "sdpa":
        step_mask = mask.bool()[:, None, None, :].contiguous()
        real_slots = step_mask[:, 0, 0]
    else:
        step_mask = real_slots = mask

    # The lean step (compiled steps keep the full forward: the compiler removes the same overhead).
    lean = not settings.compile and _lean_usable(model, state)
    # The lean step's mask: the SDPA step mask's boolean view, or a boolean copy of the 2D one.
    slots = (real_slots if real_slots.dtype == torch.bool else mask.bool()) if lean else None

    done = torch.zeros(batch, dtype=torch.bool, device=device)
    pad = torch.full((batch,), pad_token_id, dtype=torch.long, device=device)
    scale = temperature if temperature > 0 else 1.0
    produced, logprobs, hiddens = [], [], []
    for t in range(new):
        if t:
            if t % settings.check_every == 0 and bool(done.all()):
                break
            slot = prompt_len + t - 1  # the token fed now is written to this slot
            real_slots[:, slot] = 1
            fed = produced[-1].unsqueeze(1)
            if lean and slots is not real_slots:
                slots[:, slot] = True
            if not lean:
                logits, hidden = step(fed, step_mask, next_pos, cache)
            elif state.lean:
                logits, hidden = lean_step(model, fed, next_pos, slots, cache, slot, record)
            else:
                logits, hidden = _check_lean(model, state, step, fed, step_mask, next_pos, cache, slots, slot, record)
                lean = state.lean
            next_pos += 1
        u = None if uniforms is None else uniforms[:, t:t + 1]
        token = torch.where(done, pad, _pick(logits, temperature, top_k, top_p, u))
        if record:
            logprobs.append(token_logprobs(logits / scale if scale != 1.0 else logits, token))
            hiddens.append(hidden)
        done |= torch.isin(token, eos)
        produced.append(token)
    tokens = torch.stack(produced, dim=1)
    if not record:
        return tokens, None, None
    return tokens, torch.stack(logprobs, dim=1), torch.stack(hiddens, dim=1)
