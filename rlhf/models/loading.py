"""Loading and saving models and tokenizers, and the one place prompts are formatted.

Any local Hugging Face causal-LM folder works; ``bundled`` names the tiny instruction model that
ships in the package (built by ``rlhf base build``). Prompts are wrapped with the tokenizer's chat
template when it has one, so SFT, generation, reward scoring and PPO all see the same text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from rlhf.errors import ConfigError
from rlhf.models.cpu_gemm import use_fast_cpu_linears
from rlhf.utils.model_files import check_model_folder, library_errors

BUNDLED_NAMES = ("bundled", "default")
BUNDLED_DIR = Path(__file__).resolve().parent.parent / "assets" / "base-model"


def resolve_model_path(name: str | Path) -> Path:
    """``bundled`` → the packaged default model; anything else must be a local model folder."""
    if str(name) in BUNDLED_NAMES:
        if not (BUNDLED_DIR / "config.json").is_file():
            raise ConfigError(f"the bundled model is missing from {BUNDLED_DIR}; build it with "
                              f"`rlhf base build --out {BUNDLED_DIR}`")
        return BUNDLED_DIR
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ConfigError(f"model folder {path} not found (models load from local folders only; "
                          f"use 'bundled' for the packaged default)")
    if not (path / "config.json").is_file():
        raise ConfigError(f"{path} has no config.json: not a Hugging Face model folder")
    check_model_folder(path)  # a damaged file is a message naming it, not a traceback from transformers
    return path


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def load_tokenizer(path: str | Path, padding_side: str = "left"):
    from transformers import AutoTokenizer

    folder = resolve_model_path(path)
    with library_errors(folder):
        tok = AutoTokenizer.from_pretrained(str(folder))
    if tok.pad_token is None:
        # Causal LMs often ship without a pad token; EOS is safe because masks hide padding.
        tok.pad_token = tok.eos_token
    tok.padding_side = padding_side
    return tok


def load_causal_lm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                   train: bool = False):
    """A causal LM in float32 by default (bf16/fp16 are far slower than fp32 on most CPUs)."""
    from transformers import AutoModelForCausalLM

    folder = resolve_model_path(path)
    with library_errors(folder):
        model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=dtype)
    model.to(device)
    model.train(train)
    use_fast_cpu_linears(model)  # oneDNN fp32 products where the default BLAS is slow (rlhf/models/cpu_gemm.py)
    return model


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model inside a peft wrapper (whose forward passes its keyword arguments on
    to it), or ``model`` itself: where to look up which arguments ``forward()`` takes."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def disable_dropout(model: torch.nn.Module) -> None:
    """RL and exact resume need deterministic forward passes: zero every dropout probability."""
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def format_prompt(tokenizer, prompt: str) -> str:
    """The text a model sees before its reply: the chat template's user turn plus the assistant cue."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return prompt


def save_model(model, tokenizer, out_dir: str | Path) -> None:
    """HF format with safetensors, loadable by the plain Auto classes."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def load_model_weights(model, folder: str | Path) -> None:
    """Restore a checkpoint's safetensors weights into a built model (a peft model takes its adapter)."""
    from safetensors.torch import load_file

    from rlhf.errors import TrainingError

    folder = Path(folder)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise TrainingError(f"checkpoint {folder} has no safetensors weights")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    if hasattr(model, "peft_config"):
        from peft import set_peft_model_state_dict

        set_peft_model_state_dict(model, state)
    else:
        missing, unexpected = model.load_state_dict(state, strict=False)
        # Tied output embeddings are saved once; anything else missing means the wrong checkpoint.
        missing = [m for m in missing if "lm_head" not in m]
        if missing or unexpected:
            raise TrainingError(f"checkpoint {folder} does not match the model (missing {missing[:3]}, unexpected {unexpected[:3]})")


PROMPTS_DIR = Path(__file__).resolve().parent.parent / "assets" / "prompts"


def shipped_prompts(split: str = "train") -> Path:
    """Path of a shipped prompt set: ``train`` (rollouts, labeling) or ``eval`` (held-out phrasings)."""
    return PROMPTS_DIR / f"{split}.jsonl"
