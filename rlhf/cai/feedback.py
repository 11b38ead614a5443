"""Feedback models: what critiques, revises and compares under a constitution.

Two sources behind one interface:

* :class:`LocalFeedbackModel` — any local Hugging Face causal LM folder or named model, run here;
* :class:`EndpointFeedbackModel` — any OpenAI-compatible server (``rlhf serve``, vLLM, llama.cpp's
  server, a hosted API), through :class:`rlhf.serve.client.OpenAIClient` (timeouts, retries, a rate
  limit, a cache).

Both answer three questions:

* ``option_logprobs`` — the log-probability of each option label ("A"/"B", "Yes"/"No") as the
  continuation of a prompt; the labeler normalises them (rlhf/cai/preference.py);
* ``continuation_logprobs`` — the summed log-probability (and token count) of a given text after a prompt;
* ``generate`` — sampled or greedy text (critiques, revisions, reasoning).

Prompts come in *groups* that share a beginning (one conversation asked under several principles);
the local model runs that shared beginning once and only the different endings per question, which
on a CPU is most of the cost (measured in benchmarks/RESULTS.md, "Constitutional AI").
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

import torch

from rlhf.cai.local import LocalFeedbackModel
from rlhf.cai.prompts import chat_with_template, plain_chat
from rlhf.errors import ConfigError
from rlhf.models.loading import load_tokenizer
from rlhf.serve.client import OpenAIClient


class FeedbackModel(Protocol):
    name: str

    def format(self, messages: list[dict], assistant_prefix: str = "") -> str: ...

    def option_logprobs(self, groups: list[list[str]], options: list[str]) -> list[torch.Tensor]: ...

    def continuation_logprobs(self, groups: list[list[tuple[str, str]]]) -> list[list[tuple[float, int]]]: ...

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float, seed: int) -> list[str]: ...


class EndpointFeedbackModel:
    """A model behind an OpenAI-compatible completions API.

    Option log-probabilities come from the top log-probabilities of the first generated token
    (``max_tokens: 1, logprobs: k``); tokens whose text is the label (with or without a leading space)
    are added up. A label missing from the top k gets the smallest of the k as an upper bound, and the
    labeler counts how often that happened. Continuations are scored with ``echo``.
    """

    def __init__(self, client, model: str, tokenizer: str | None = None, top_logprobs: int = 20):
        self.client, self.model = client, model
        self.name = model
        self.top_logprobs = top_logprobs
        self.tokenizer = load_tokenizer(tokenizer) if tokenizer else None
        self.missing_labels = 0  # option labels that were not among the top-k tokens

    def format(self, messages: list[dict], assistant_prefix: str = "") -> str:
        if self.tokenizer is not None:
            return chat_with_template(self.tokenizer, messages, assistant_prefix)
        return plain_chat(messages, assistant_prefix)

    def option_logprobs(self, groups: list[list[str]], options: list[str]) -> list[torch.Tensor]:
        out = []
        for group in groups:
            rows = []
            for text in group:
                answer = self.client.completions(self.model, text, max_tokens=1, temperature=0.0, logprobs=self.top_logprobs)
                top = (answer["choices"][0]["logprobs"]["top_logprobs"] or [None])[0] or {}
                rows.append(self._label_logprobs(top, options))
            out.append(torch.tensor(rows, dtype=torch.float64))
        return out

    def _label_logprobs(self, top: dict, options: list[str]) -> list[float]:
        if not top:
            self.missing_labels += len(options)
            return [0.0] * len(options)  # no information: equal for every option
        floor = min(float(v) for v in top.values())
        row = []
        for label in options:
            hits = [float(v) for k, v in top.items() if k.strip() == label.strip()]
            if hits:
                row.append(float(torch.logsumexp(torch.tensor(hits), 0)))
            else:
                self.missing_labels += 1
                row.append(floor)
        return row

    def continuation_logprobs(self, groups: list[list[tuple[str, str]]]) -> list[list[tuple[float, int]]]:
        out = []
        for group in groups:
            sums = []
            for context, continuation in group:
                answer = self.client.completions(self.model, context + continuation, max_tokens=0, echo=True, logprobs=0)
                lp = answer["choices"][0]["logprobs"]
                scored = [float(v) for offset, v in zip(lp.get("text_offset") or [], lp["token_logprobs"])
                          if offset >= len(context) and v is not None]
                if not scored:
                    raise ConfigError(f"{self.name}: the endpoint's echo answer has no token offsets after the prompt; "
                                      "it cannot score continuations")
                sums.append((sum(scored), len(scored)))
            out.append(sums)
        return out

    def generate(self, prompts: list[str], max_new_tokens: int, temperature: float = 0.7, seed: int = 0) -> list[str]:
        texts = []
        for i, p in enumerate(prompts):
            answer = self.client.completions(self.model, p, max_tokens=max_new_tokens, temperature=temperature,
                                             seed=seed + i)
            texts.append(answer["choices"][0]["text"].strip())
        return texts


def load_feedback_model(model: str | None, endpoint: str | None = None, *, device: str | torch.device = "auto",
                        dtype: torch.dtype = torch.float32,
                        tokenizer: str | None = None, cache: str | Path | None = None, timeout: float = 60.0,
                        retries: int = 3, rate_limit: float = 0.0, api_key: str = "", batch_size: int = 16):
    """A local model, an endpoint's model, or None for ``none`` (evaluators decide alone)."""
    if endpoint:
        client = OpenAIClient(endpoint, api_key=api_key, timeout=timeout, retries=retries, rate_limit=rate_limit, cache=cache)
        name = model
        if not name:
            served = client.models()
            if len(served) != 1:
                raise ConfigError(f"{endpoint} serves {len(served)} models ({', '.join(served[:5])}); name one with --feedback-model")
            name = served[0]
        return EndpointFeedbackModel(client, name, tokenizer)
    if not model or model == "none":
        return None
    return LocalFeedbackModel(model, device=device, dtype=dtype, batch_size=batch_size, cache=cache)

