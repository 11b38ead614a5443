"""Loading and saving models and tokenizers, and the one place prompts are formatted.

Any local Hugging Face causal-LM folder works; ``bundled`` names the tiny instruction model that
ships in the package (built by ``rlhf base build``). Prompts are wrapped with the tokenizer's chat
template when it has one, so SFT, generation, reward scoring and PPO all see the same text.
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import torch

from rlhf.errors import ConfigError
from rlhf.models.cpu_gemm import use_fast_cpu_linears
from rlhf.models.named import BUNDLED_DIR, NAMED_MODELS, ensure, lookup  # noqa: F401  (BUNDLED_DIR: re-exported)
from rlhf.utils.model_files import check_model_folder, library_errors

BUNDLED_NAMES = ("bundled", "default")
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")  # org/name, as the Hugging Face hub spells ids


def resolve_model_path(name: str | Path, progress=None) -> Path | str:
    """Where a model named on the command line lives.

    ``bundled`` and ``smollm2`` (rlhf/models/named.py) → their local folders (SmolLM2 converted
    into the cache on first use); an existing local folder → itself; ``org/name`` → the hub id, for
    transformers to load from its cache (or download, where the machine is online). Offline and
    not cached, that is a one-line error rather than a traceback from deep inside transformers.
    """
    named = lookup(str(name))
    if named is not None:
        return ensure(named, progress or _note)
    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ConfigError(f"{path} has no config.json: not a Hugging Face model folder")
        check_model_folder(path)  # a damaged file is a message naming it, not a traceback from transformers
        return path
    if HUB_ID.match(str(name)) and not str(name).startswith((".", "/", "~")):
        return _hub_model(str(name))
    raise ConfigError(f"model folder {path} not found (give a local Hugging Face folder, a hub id like "
                      f"org/name, or one of: {', '.join(NAMED_MODELS)})")


def _hub_model(repo_id: str) -> str:
    """A hub id transformers can load: cached already, or the machine is allowed to download."""
    from huggingface_hub import constants, try_to_load_from_cache

    if isinstance(try_to_load_from_cache(repo_id, "config.json"), str):
        return repo_id
    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise ConfigError(f"{repo_id}: not a local folder, and as a Hugging Face hub id it is not in the local cache "
                          f"while the hub is offline (HF_HUB_OFFLINE=1); download it once online, or name a local folder")
    return repo_id


def _note(msg: str) -> None:
    print(msg, file=sys.stderr)


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


def format_prompt(tokenizer, prompt: str, system: str | None = None) -> str:
    """The text a model sees before its reply: the chat template's (optional system and) user turn
    plus the assistant cue. Tokenizers without a template get the prompt as it is."""
    if getattr(tokenizer, "chat_template", None):
        turns = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        return tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n{prompt}" if system else prompt


_REPLY_MARK = "rlhf reply mark 7q"


def end_of_turn_id(tokenizer) -> int | None:
    """The token the chat template closes an assistant turn with (SmolLM2 ``<|im_end|>``, Llama 3
    ``<|eot_id|>``, the bundled model's ``<|endoftext|>``), or None without a template.

    Found by rendering a one-exchange conversation and reading the first special token after the
    assistant's text, so any template works without per-model code."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": _REPLY_MARK}]
    try:
        text = tokenizer.apply_chat_template(turns, tokenize=False)
    except Exception:  # noqa: BLE001 - templates that refuse this shape have no readable end of turn
        return None
    at = text.rfind(_REPLY_MARK)
    if at < 0:
        return None
    tail = tokenizer(text[at + len(_REPLY_MARK):], add_special_tokens=False)["input_ids"]
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}) or {})
    return next((i for i in tail if i in special), None)


def stop_token_ids(tokenizer, generation_config=None) -> list[int]:
    """Every token that ends a reply: the tokenizer's EOS, the chat template's end of turn (which
    some tokenizers do not call EOS) and, when given, a generation config's EOS ids (what a
    converted model records for ``generate``). Sampling stops at any of them and the reply's text
    is what comes before."""
    ids: list[int] = []
    cfg_eos = getattr(generation_config, "eos_token_id", None)
    for i in [tokenizer.eos_token_id, *(cfg_eos if isinstance(cfg_eos, (list, tuple)) else [cfg_eos]),
              end_of_turn_id(tokenizer)]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    return ids


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
