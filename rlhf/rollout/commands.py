"""``rlhf generate``: K sampled completions per prompt → a completions file."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import Literal

import click

from rlhf.config import config_command, opt
from rlhf.data.io import read_records, write_records
from rlhf.data.records import CompletionsRecord, PromptRecord


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
    device: str = opt("auto", help="cpu, cuda, or auto.")
    index: str = opt("", help="RAG: an index folder (rlhf index build); retrieved passages go in the prompt with their ids.")
    passages: int = opt(3, help="RAG: passages retrieved per prompt (--top-k is the sampling option).")
    index_mode: Literal["bm25", "dense", "hybrid"] = opt("hybrid", help="RAG: ranking used to retrieve (bm25, dense or hybrid).")

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
    from rlhf.models.loading import load_causal_lm, load_tokenizer, pick_device
    from rlhf.rollout.generate import SamplingParams, generate_completions

    prompts = read_records(cfg.prompts, PromptRecord)
    tok = load_tokenizer(cfg.model)
    model = load_causal_lm(cfg.model, device=pick_device(cfg.device))
    params = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    model_prompts, grounding = [p.prompt for p in prompts], [{} for _ in prompts]
    if cfg.index:  # RAG: the record keeps which passages were shown (rlhf/retrieval/rag.py)
        from rlhf.retrieval.index import Index
        from rlhf.retrieval.rag import grounding_fields, rag_prompt

        hits = Index.load(cfg.index).search_many(model_prompts, cfg.passages, cfg.index_mode)
        model_prompts = [rag_prompt(p, h) for p, h in zip(model_prompts, hits)]
        grounding = [grounding_fields(h, m, cfg.index, cfg.index_mode) for h, m in zip(hits, model_prompts)]
    outs = generate_completions(model, tok, model_prompts, cfg.num_completions, params,
                                batch_size=cfg.batch_size, seed=cfg.seed)
    write_records(cfg.out, [{**CompletionsRecord(p.id, p.prompt, c).to_json(), **g} for p, c, g in zip(prompts, outs, grounding)])
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
