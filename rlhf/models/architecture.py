"""Fresh model configurations from `transformers` (Llama-style: RoPE, RMSNorm, SwiGLU)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass
class ModelShape:
    hidden_size: int = 256
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 704
    max_positions: int = 256


def new_causal_lm(tokenizer, shape: ModelShape, seed: int = 0):
    """A randomly initialised LlamaForCausalLM sized to ``tokenizer`` (tied input/output embeddings)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=shape.hidden_size, num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads, num_key_value_heads=shape.num_heads,
        intermediate_size=shape.intermediate_size, max_position_embeddings=shape.max_positions,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True, attention_dropout=0.0, rope_theta=10000.0,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model
