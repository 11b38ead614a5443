"""The one-token decode step of a Llama-style decoder in plain tensor ops, without the model's forward().

Why: on a small CPU model a decode step through ``model(...)`` spends about as long in transformers'
per-call machinery (output capturing, mask building, cache bookkeeping, the attention-function
lookup and several wrappers around every layer) as in the products. This step calls the model's own
submodules (embedding, norms, the four attention projections, the MLP, the LM head) and does the rest
in a dozen tensor ops a layer:

* rotary embeddings come from the model's own ``rotary_emb`` (so every RoPE variant it supports
  stays right), once a step for all layers;
* the new token's keys and values go straight into the static cache's slot, and attention reads
  only the slots written so far (``slot + 1``), not the whole preallocated length;
* attention is ``scaled_dot_product_attention`` with the boolean "real slot" mask and grouped
  query heads handled by the kernel, so nothing is repeated.

Calling the submodules rather than reading their weights keeps whatever wraps them: LoRA layers
(with the adapter on or switched off for the reference), the oneDNN routing of rlhf/models/cpu_gemm.py.

Which models: those whose decoder layers are one of ``LEAN_LAYER_TYPES`` — pre-norm blocks of
attention then MLP, each added to the residual, rotary positions, no extra norms inside attention —
found by structure (``lean_problem``), never by model name. Even then the decode loop checks on a
model's first step that this step's logits equal the full forward's to float32 rounding, and decodes
through the full forward from then on if they do not (rlhf/rollout/decode.py).
"""

from __future__ import annotations

import torch
from torch import nn

from rlhf.models.loading import unwrap_peft

# Decoder layers whose forward is exactly: x += o_proj(attn(rope(q_proj(n1(x))), rope(k_proj(n1(x))),
# v_proj(n1(x)))); x += mlp(n2(x)); with full attention (sliding windows are refused by the caller's
# cache check). Transformers 5's Llama, Mistral and Qwen2 layers all read so; Qwen3 (norms on q and k),
# Gemma (scaled embeddings, extra norms) and others do not and keep the full forward.
LEAN_LAYER_TYPES = ("LlamaDecoderLayer", "MistralDecoderLayer", "Qwen2DecoderLayer")
_ATTENTION_PARTS = {"q_proj", "k_proj", "v_proj", "o_proj"}
_LAYER_PARTS = {"self_attn", "mlp", "input_layernorm", "post_attention_layernorm"}


def lean_problem(model) -> str | None:
    """Why ``lean_step`` cannot run this model (None when it can, subject to the numerical check)."""
    base = unwrap_peft(model)
    decoder = getattr(base, "model", None)
    parts = ("embed_tokens", "layers", "norm", "rotary_emb")
    if decoder is None or not all(hasattr(decoder, p) for p in parts) or not hasattr(base, "lm_head"):
        return "not a decoder with embed_tokens/layers/norm/rotary_emb and an lm_head"
    for layer in decoder.layers:
        if type(layer).__name__ not in LEAN_LAYER_TYPES:
            return f"{type(layer).__name__} is not one of the layers the lean step reproduces"
        if {name for name, _ in layer.named_children()} != _LAYER_PARTS:
            return f"{type(layer).__name__} has parts beyond attention, MLP and two norms"
        attention = layer.self_attn
        children = {name for name, _ in attention.named_children()}
        if children != _ATTENTION_PARTS or not hasattr(attention, "scaling") or not hasattr(attention, "head_dim"):
            return f"{type(attention).__name__} has parts beyond the four projections"
    return None


def lean_step(model, token: torch.Tensor, positions: torch.Tensor, real_slots: torch.Tensor, cache, slot: int,
              record: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Logits [B, V] (float32) for ``token`` [B, 1] at ``positions`` [B, 1], written to cache slot ``slot``,
    attending to the slots ``real_slots`` [B, ≥ slot + 1] (bool) marks; with ``record`` also the final
    (normed) hidden state [B, H], as ``output_hidden_states`` gives it. ``cache``: the transformers
    StaticCache the prefill filled (slot i holds token i of the left-padded sequence)."""
    base = unwrap_peft(model)
    decoder = base.model
    batch = token.shape[0]
    end = slot + 1
    x = decoder.embed_tokens(token)                           # [B, 1, H]
    cos, sin = decoder.rotary_emb(x, positions)               # [B, 1, D] each
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)             # broadcast over heads
    mask = real_slots[:, None, None, :end]                    # [B, 1, 1, end]
    for i, layer in enumerate(decoder.layers):
        x = x + _attention(layer.self_attn, layer.input_layernorm(x), cos, sin, mask, cache.layers[i], slot, batch)
        x = x + layer.mlp(layer.post_attention_layernorm(x))
    hidden = decoder.norm(x)
    return base.lm_head(hidden)[:, -1].float(), (hidden[:, -1] if record else None)


def _attention(attention: nn.Module, h: torch.Tensor, cos, sin, mask, cache_layer, slot: int, batch: int):
    head_dim = attention.head_dim
    q = attention.q_proj(h).view(batch, 1, -1, head_dim).transpose(1, 2)  # [B, heads, 1, D]
    k = attention.k_proj(h).view(batch, 1, -1, head_dim).transpose(1, 2)  # [B, kv heads, 1, D]
    v = attention.v_proj(h).view(batch, 1, -1, head_dim).transpose(1, 2)
    q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
    keys, values = cache_layer.keys, cache_layer.values                    # [B, kv heads, L, D]
    keys[:, :, slot:slot + 1] = k
    values[:, :, slot:slot + 1] = v
    end = slot + 1
    out = nn.functional.scaled_dot_product_attention(q, keys[:, :, :end], values[:, :, :end], attn_mask=mask,
                                                     scale=attention.scaling, enable_gqa=q.shape[1] != k.shape[1])
    return attention.o_proj(out.transpose(1, 2).reshape(batch, 1, -1))


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding, as transformers' ``apply_rotary_pos_emb`` (rotate-half convention)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin
