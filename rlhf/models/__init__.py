"""Model loading/saving, prompt formatting, and the bundled tiny instruction model."""

from rlhf.models.loading import (BUNDLED_DIR, disable_dropout, format_prompt, load_causal_lm, load_tokenizer, shipped_prompts,
                                 pick_device, resolve_model_path, save_model)

__all__ = ["BUNDLED_DIR", "shipped_prompts", "disable_dropout", "format_prompt", "load_causal_lm", "load_tokenizer", "pick_device",
           "resolve_model_path", "save_model"]
