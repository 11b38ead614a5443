"""Fitting texts into a model's context: one stated policy for every stage that takes text.

A model reads at most ``context_length(model)`` positions. A stage that feeds it a prompt and asks
for ``max_new_tokens`` more must keep the prompt within the rest (:func:`prompt_budget`). What
happens to a longer prompt is the stage's ``long_prompts`` policy:

* ``truncate`` (the default): keep the END of the prompt (the part the reply answers; SFT and
  reward training cut from the same side), count every prompt cut and the characters dropped, and
  report them;
* ``refuse``: stop with a message naming the prompt and its length.

Memory stays bounded whatever the input: before a long text is tokenized it is clipped to the
characters that could possibly matter (``max_tokens`` × the longest token in the vocabulary), so a
1 MB prompt costs what a prompt of the context's length costs.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Literal

from rlhf.errors import ConfigError, DataError

LongPromptPolicy = Literal["truncate", "refuse"]
LONG_PROMPT_HELP = ("What to do with a prompt longer than the model's context leaves room for: truncate (keep its "
                    "end, count and report what was cut) or refuse (stop with a message).")
# Position limits are named differently across architectures.
_CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def context_length(model, tokenizer=None) -> int | None:
    """How many positions the model reads (from its config), else the tokenizer's limit, else None."""
    config = getattr(model, "config", model)
    for attr in _CONTEXT_ATTRS:
        value = getattr(config, attr, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    # transformers puts a huge sentinel (about 1e30) there when the tokenizer names no limit.
    return limit if isinstance(limit, int) and 0 < limit < 10_000_000 else None


def prompt_budget(model, tokenizer, max_new_tokens: int, what: str = "--max-new-tokens") -> int | None:
    """Positions left for the prompt once ``max_new_tokens`` are reserved; None if the model names no limit."""
    ctx = context_length(model, tokenizer)
    if ctx is None:
        return None
    if max_new_tokens >= ctx:
        raise ConfigError(f"{what} {max_new_tokens} leaves no room for a prompt: the model reads {ctx} positions "
                          "in all (prompt and reply)")
    return ctx - max_new_tokens


def max_token_chars(tokenizer) -> int:
    """An upper bound on the characters one token covers (the longest vocabulary entry), at least 1."""
    cached = getattr(tokenizer, "_rlhf_max_token_chars", None)
    if cached is None:
        cached = max([len(t) for t in tokenizer.get_vocab()] + [1])
        try:
            tokenizer._rlhf_max_token_chars = cached
        except AttributeError:
            pass
    return cached


def clip_chars(tokenizer, text: str, max_tokens: int, keep: Literal["end", "start"] = "end") -> str:
    """``text`` cut to the characters that ``max_tokens`` tokens can cover at most, from the kept end.
    Tokenizing the result gives at least ``min(max_tokens, tokens(text))`` tokens, so a later exact
    cut at ``max_tokens`` is unchanged; the work and memory of tokenizing stay bounded."""
    limit = max(1, max_tokens) * max_token_chars(tokenizer) + 16
    if len(text) <= limit:
        return text
    return text[-limit:] if keep == "end" else text[:limit]


@dataclass
class PromptCuts:
    """What a stage cut to fit the context, for its report."""

    prompts: int = 0
    truncated: int = 0
    chars_dropped: int = 0
    longest_tokens: int = 0
    budget: int | None = None
    examples: list[str] = field(default_factory=list)

    def to_json(self) -> dict:
        return {"prompts": self.prompts, "truncated": self.truncated, "chars_dropped": self.chars_dropped,
                "prompt_token_budget": self.budget}

    def report(self, stage: str, stream=None) -> None:
        """One line on stderr when something was cut (nothing is printed otherwise)."""
        if self.truncated:
            print(f"{stage}: {self.truncated} of {self.prompts} prompts were longer than the {self.budget} tokens the "
                  f"model's context leaves for them; kept their ends ({self.chars_dropped:,} characters dropped; "
                  f"first: {', '.join(self.examples)}). --long-prompts refuse stops instead.",
                  file=stream or sys.stderr)


def fit_prompts(tokenizer, prompts: list[str], budget: int | None, policy: LongPromptPolicy = "truncate",
                names: list[str] | None = None, source: str = "prompts") -> tuple[list[str], PromptCuts]:
    """Each prompt as the model will see it (the chat template applied by ``format_prompt``) within
    ``budget`` tokens: cut from the left under ``truncate``, a DataError under ``refuse``.

    ``names`` (e.g. prompt ids) and ``source`` (the file) make messages point at the prompt."""
    from rlhf.models.loading import format_prompt

    cuts = PromptCuts(prompts=len(prompts), budget=budget)
    if budget is None:
        return list(prompts), cuts
    if policy not in ("truncate", "refuse"):
        raise ConfigError(f"--long-prompts must be truncate or refuse, not {policy!r}")
    overhead = _count(tokenizer, format_prompt(tokenizer, ""))
    if overhead >= budget:
        raise ConfigError(f"the chat template alone takes {overhead} of the {budget} tokens left for a prompt")
    out = []
    for i, prompt in enumerate(prompts):
        clipped = clip_chars(tokenizer, prompt, budget)
        n = _count(tokenizer, format_prompt(tokenizer, clipped))
        if n <= budget and clipped is prompt:
            out.append(prompt)
            continue
        name = names[i] if names is not None else f"prompt {i + 1}"
        if policy == "refuse":
            size = f"{n} tokens" if clipped is prompt else f"{len(prompt):,} characters"
            raise DataError(source, None, f"{name} is {size} long; the model's context leaves {budget} tokens for a "
                                          "prompt (use --long-prompts truncate to keep its end)")
        kept = _keep_end(tokenizer, clipped, budget - overhead, budget)
        cuts.truncated += 1
        cuts.chars_dropped += len(prompt) - len(kept)
        cuts.longest_tokens = max(cuts.longest_tokens, n)
        if len(cuts.examples) < 3:
            cuts.examples.append(str(name))
        out.append(kept)
    return out, cuts


def _count(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _keep_end(tokenizer, text: str, tokens: int, budget: int) -> str:
    """The end of ``text`` whose formatted prompt fits ``budget``: ``tokens`` tokens, fewer if merges
    at the new start make the formatted prompt longer than the sum of its parts."""
    from rlhf.models.loading import format_prompt

    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    keep = min(tokens, len(ids))
    while keep > 0:
        kept = tokenizer.decode(ids[len(ids) - keep:], skip_special_tokens=True)
        if _count(tokenizer, format_prompt(tokenizer, kept)) <= budget:
            return kept
        keep -= max(1, keep // 20)
    return ""
