"""Checks of a model folder's files before a library reads them, so that a broken folder is a
message naming the file and what is wrong, not a traceback from deep inside transformers.

Checked: every ``*.json`` file (config.json, tokenizer files, the safetensors index) is UTF-8 JSON
holding an object; config.json names a ``model_type``; every ``*.safetensors`` file has a
readable header and is as long as that header says (a truncated copy is the usual breakage); the
shards a ``model.safetensors.index.json`` names exist. Reading only headers keeps this cheap.
"""

from __future__ import annotations

import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from rlhf.errors import ConfigError, RLHFError, brief
from rlhf.utils.io import read_utf8

MAX_JSON_BYTES = 256 * 1024 * 1024  # tokenizer.json of large vocabularies runs to tens of MB
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024  # the format's own limit


def _json_object(path: Path) -> dict:
    text = read_utf8(path, ConfigError, max_bytes=MAX_JSON_BYTES)
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg} at column {exc.colno}); "
                          "the model folder is damaged") from None
    except (RecursionError, ValueError) as exc:
        raise ConfigError(f"{path}: not usable JSON ({type(exc).__name__}); the model folder is damaged") from None
    if not isinstance(obj, dict):
        raise ConfigError(f"{path}: expected a JSON object, got {type(obj).__name__}; the model folder is damaged")
    return obj


def check_safetensors(path: str | Path) -> None:
    """The file's header parses and every tensor it lists lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ConfigError(f"{path}: truncated safetensors file ({size} bytes, not even a header length)")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_SAFETENSORS_HEADER or 8 + n > size:
            raise ConfigError(f"{path}: truncated or not a safetensors file (header of {n:,} bytes in a file of "
                              f"{size:,} bytes)")
        raw = fh.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ConfigError(f"{path}: damaged safetensors header (not JSON)") from None
    if not isinstance(header, dict):
        raise ConfigError(f"{path}: damaged safetensors header (not an object)")
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(o, int) and not isinstance(o, bool) for o in offsets)):
            raise ConfigError(f"{path}: damaged safetensors header (tensor {brief(name)} has no valid data_offsets)")
        end = max(end, offsets[1])
    if 8 + n + end > size:
        raise ConfigError(f"{path}: truncated: {size:,} bytes, but its header describes {8 + n + end:,} "
                          "(an interrupted copy or download?)")


def check_model_folder(folder: str | Path, need_config: bool = True) -> None:
    """Raise ConfigError naming the first damaged file of a Hugging Face model folder."""
    folder = Path(folder)
    config = folder / "config.json"
    if need_config or config.exists():
        cfg = _json_object(config)
        if "model_type" not in cfg:
            raise ConfigError(f"{config}: no 'model_type' field, so transformers cannot tell which architecture "
                              "this is; the model folder is damaged or not a Hugging Face model")
    for path in sorted(folder.glob("*.json")):
        if path.name != "config.json":
            obj = _json_object(path)
            if path.name.endswith(".safetensors.index.json"):
                shards = set((obj.get("weight_map") or {}).values()) if isinstance(obj.get("weight_map"), dict) else set()
                missing = sorted(str(s) for s in shards if not (folder / str(s)).is_file())
                if missing:
                    raise ConfigError(f"{path}: names weight files that are missing: {', '.join(missing[:3])}")
    for path in sorted(folder.glob("*.safetensors")):
        check_safetensors(path)


@contextmanager
def library_errors(folder: str | Path) -> Iterator[None]:
    """Turn what a library raises while reading a model folder that passed the checks above (a
    config.json with impossible values, weights of other shapes) into a ConfigError naming the folder."""
    try:
        yield
    except RLHFError:
        raise
    except (OSError, ValueError, KeyError, TypeError, RuntimeError, AttributeError, IndexError) as exc:
        raise ConfigError(f"{folder}: cannot load this model folder ({type(exc).__name__}: {brief(str(exc), 300)})") from exc
