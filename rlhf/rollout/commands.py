"""``rlhf generate``: K sampled completions per prompt → a completions file."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import click

from rlhf.config import config_command, opt
from rlhf.data.context import LONG_PROMPT_HELP, LongPromptPolicy, fit_prompts, prompt_budget
from rlhf.data.io import read_records, write_records
from rlhf.data.records import CompletionsRecord, PromptRecord
from rlhf.engine.config import EngineConfig


@dataclass
class GenerateConfig:
    """Sample completions from a causal LM for every prompt in a prompts file."""

    prompts: str = opt(help="Prompts file (JSON Lines with id and prompt).")
    out: str = opt(help="Completions file to write (JSON Lines); written atomically.")
    model: str = opt("bundled", help="Local Hugging Face model folder, or 'bundled' for the packaged default.")
    num_completions: int = opt(4, help="Completions sampled per prompt (K).")
    max_new_tokens: int = opt(48, help="Longest reply in tokens; generation also stops at EOS.")
    temperature: float = opt(1.0, help="Sampling temperature; 0 means greedy decoding.")
    top_p: float = opt(1.0, help="Nucleus sampling: keep the smallest token set with this probability mass.")
    top_k: int = opt(0, help="Keep only the k most likely tokens (0 = off).")
    batch_size: int = opt(32, help="Sequences decoded together.")
    seed: int = opt(0, help="Random seed for sampling.")
    index: str = opt("", help="RAG: an index folder (rlhf index build); retrieved passages go in the prompt with their ids.")
    passages: int = opt(3, help="RAG: passages retrieved per prompt (--top-k is the sampling option).")
    index_mode: Literal["bm25", "dense", "hybrid"] = opt("hybrid", help="RAG: ranking used to retrieve (bm25, dense or hybrid).")
    long_prompts: LongPromptPolicy = opt("truncate", help=LONG_PROMPT_HELP)
    engine: EngineConfig = opt(factory=EngineConfig, help="How sampling runs (device, rollout backend, threads, ...).")

    def validate(self) -> None:
        from rlhf.errors import ConfigError

        if self.num_completions < 1:
            raise ConfigError("--num-completions must be at least 1")
        if self.max_new_tokens < 1:
            raise ConfigError("--max-new-tokens must be at least 1")
        if not 0 < self.top_p <= 1:
            raise ConfigError("--top-p must be in (0, 1]")
        if self.temperature < 0:
            raise ConfigError("--temperature must be 0 (greedy) or positive")
        if self.index and self.passages < 1:
            raise ConfigError("--passages must be at least 1")


def generate_file(cfg: GenerateConfig) -> int:
    """Sample ``cfg.num_completions`` replies for every prompt in ``cfg.prompts`` and write the
    completions file atomically. Returns the number of prompts."""
    from rlhf.engine.runtime import start
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.backends import make_backend
    from rlhf.rollout.generate import SamplingParams, generate_completions

    rt = start(cfg.engine)
    prompts = read_records(cfg.prompts, PromptRecord)
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device=rt.device, dtype=rt.dtype)
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    # RAG first (passages go in front of the question), then every prompt is fitted to the model's
    # context (rlhf/data/context.py): cut from the left, so passages go before the question does.
    model_prompts, grounding = [p.prompt for p in prompts], [{} for _ in prompts]
    if cfg.index:  # the record keeps which passages were shown (rlhf/retrieval/rag.py)
        from rlhf.retrieval.index import Index
        from rlhf.retrieval.rag import grounding_fields, rag_prompt

        hits = Index.load(cfg.index).search_many(model_prompts, cfg.passages, cfg.index_mode)
        model_prompts = [rag_prompt(p, h) for p, h in zip(model_prompts, hits)]
        grounding = [grounding_fields(h, m, cfg.index, cfg.index_mode) for h, m in zip(hits, model_prompts)]
    texts, cuts = fit_prompts(tok, model_prompts, prompt_budget(model, tok, cfg.max_new_tokens),
                              cfg.long_prompts, [f"prompt {p.id!r}" for p in prompts], cfg.prompts)
    cuts.report("generate")
    if cfg.index:  # the prompt as the model saw it, after any cut
        grounding = [{**g, "model_prompt": t} for g, t in zip(grounding, texts)]
    outs = generate_completions(model, tok, texts, cfg.num_completions, params,
                                batch_size=cfg.batch_size, seed=cfg.seed, backend=make_backend(rt.engine, model, tok))
    # Without RAG the record's prompt is the text the model saw (truncated where it was cut); with
    # RAG it is the user's question, and model_prompt holds what the model saw.
    write_records(cfg.out, [{**CompletionsRecord(p.id, p.prompt if cfg.index else t, c).to_json(), **g}
                            for p, t, c, g in zip(prompts, texts, outs, grounding)])
    return len(prompts)


@config_command(GenerateConfig, name="generate")
def generate(cfg: GenerateConfig) -> None:
    """K completions per prompt, batched with the KV cache, left padding, stopping at EOS."""
    from rlhf.utils.metrics import peak_rss_mb

    t0 = time.perf_counter()
    n = generate_file(cfg)
    click.echo(json.dumps({"prompts": n, "completions": n * cfg.num_completions,
                           "seconds": round(time.perf_counter() - t0, 2), "peak_rss_mb": round(peak_rss_mb()),
                           "out": cfg.out}))
