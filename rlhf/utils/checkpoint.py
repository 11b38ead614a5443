"""Checkpoints that survive a kill at any moment, shared by every training stage.

Layout under a run's output folder::

    checkpoints/step-00000040/   model files (HF format, safetensors) written by the stage,
                                 trainer_state.pt (optimizer, scheduler, RNG: tensors and plain
                                 types only, loaded with weights_only=True), state.json
                                 (step, data position, options, anything the stage needs to
                                 resume), manifest.json (size and SHA-256 of every other file)

A checkpoint is built in a staging folder and renamed into place; ``manifest.json`` is written
last, so a folder without it is incomplete. Resume (:meth:`CheckpointManager.latest`) verifies the
newest checkpoint against its manifest and falls back to the newest intact one, warning with the
name of each damaged one (a disk that filled up, a copy cut short, bytes flipped on the way);
staging folders a killed run left behind are removed. Older checkpoints are pruned only after a
newer one is in place: the last good checkpoint always exists.

:func:`check_resume_options` is the one compatibility check of every trainer: a run resumes only
with the options it was started with, apart from those its config declares free (``resume_free``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import shutil
import sys
import zipfile
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.config import field_default
from rlhf.errors import ConfigError, RLHFError, brief
from rlhf.utils.io import atomic_write_json, publish_dir, remove_stale_staging, staging_dir
from rlhf.utils.model_files import check_safetensors

_STEP_DIR = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
# Options that never change what a training step computes: where and how fast it runs, and
# bookkeeping. A stage's config adds its own in a ``resume_free`` class attribute.
# engine: how a run executes (device, threads, rollout backend, fast paths), never what it computes.
ALWAYS_FREE = ("out", "resume", "device", "threads", "engine", "keep_checkpoints", "progress")


def save_torch_state(path: str | Path, obj: Any) -> None:
    torch.save(obj, str(path))


def load_torch_state(path: str | Path) -> Any:
    # weights_only=True: never unpickle arbitrary objects, even from our own checkpoints.
    return torch.load(str(path), map_location="cpu", weights_only=True)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """Record the size and SHA-256 of every file under ``folder`` (the manifest itself aside)."""
    files = {p.relative_to(folder).as_posix(): {"bytes": p.stat().st_size, "sha256": _sha256(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.name != MANIFEST}
    atomic_write_json(folder / MANIFEST, {"format": 1, "step": step, "files": files})


def verify_checkpoint(folder: str | Path) -> str | None:
    """None if the checkpoint is intact, else what is wrong with it (for the warning)."""
    folder = Path(folder)
    manifest = folder / MANIFEST
    if not manifest.is_file():
        return _verify_unlisted(folder)
    try:
        files = json.loads(manifest.read_text(encoding="utf-8"))["files"]
        assert isinstance(files, dict) and files
    except (OSError, ValueError, KeyError, TypeError, AssertionError, RecursionError):
        return f"{MANIFEST} is unreadable"
    for rel, info in files.items():
        path = folder / rel
        try:
            if not path.is_file():
                return f"{rel} is missing"
            if path.stat().st_size != info["bytes"]:
                return f"{rel} holds {path.stat().st_size:,} bytes, {info['bytes']:,} were written"
            if _sha256(path) != info["sha256"]:
                return f"{rel} does not match its checksum"
        except (OSError, KeyError, TypeError):
            return f"{rel} cannot be checked"
    return None


def _verify_unlisted(folder: Path) -> str | None:
    """Checkpoints written before manifests existed: check what can be checked without one."""
    try:
        json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return "state.json is missing or unreadable (and there is no manifest)"
    for path in folder.rglob("*.safetensors"):
        try:
            check_safetensors(path)
        except (RLHFError, OSError) as exc:
            return str(exc)
    for path in folder.rglob("*.pt"):
        try:
            with zipfile.ZipFile(path) as z:  # torch.save writes a zip; testzip checks every CRC
                if z.testzip() is not None:
                    return f"{path.name} is damaged"
        except (zipfile.BadZipFile, OSError):
            return f"{path.name} is damaged"
    return None


def warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


class CheckpointManager:
    def __init__(self, out_dir: str | Path, keep: int = 2):
        self.out = Path(out_dir)
        self.root = self.out / "checkpoints"
        self.keep = max(1, keep)

    def all(self) -> list[tuple[int, Path]]:
        """Complete checkpoints by step (complete: the manifest, or for older ones state.json, is there)."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and ((p / MANIFEST).is_file() or (p / "state.json").is_file()):
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        """The newest intact checkpoint, for resume. Damaged newer ones are named in a warning and
        left in place (a later save at the same step replaces them); leftover staging folders of
        killed runs are removed."""
        remove_stale_staging(self.root, unnamed=True)  # checkpoints/ holds only what this code writes
        remove_stale_staging(self.out)
        for step, path in reversed(self.all()):
            problem = verify_checkpoint(path)
            if problem is None:
                return path
            warn(f"checkpoint {path} is damaged ({problem}); resuming from an older one")
        return None

    def save(self, step: int, write: Callable[[Path], None], state: dict[str, Any],
             trainer_state: dict[str, Any] | None = None) -> Path:
        """``write(folder)`` saves the model files; ``state`` goes to state.json, the manifest last."""
        final = self.root / f"step-{step:08d}"
        tmp = staging_dir(final)
        try:
            write(tmp)
            if trainer_state is not None:
                save_torch_state(tmp / "trainer_state.pt", trainer_state)
            atomic_write_json(tmp / "state.json", {"step": step, **state})
            write_manifest(tmp, step)
            publish_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        for _, old in self.all()[:-self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        return final

    @staticmethod
    def load_state(ckpt: Path) -> dict[str, Any]:
        return json.loads((Path(ckpt) / "state.json").read_text())

    @staticmethod
    def load_trainer_state(ckpt: Path) -> dict[str, Any] | None:
        p = Path(ckpt) / "trainer_state.pt"
        return load_torch_state(p) if p.exists() else None


def check_resume_options(ckpt: Path, cfg: Any, saved: dict[str, Any] | None) -> None:
    """Refuse to resume ``ckpt`` with options other than those it was written with.

    Every field of the stage's config dataclass must match, except ``ALWAYS_FREE`` and the config's
    own ``resume_free`` (e.g. a later --max-steps where it does not shape the schedule). An option
    the checkpoint does not record (added to the config since) counts as its default.
    """
    if saved is None:
        return
    free = set(ALWAYS_FREE) | set(getattr(type(cfg), "resume_free", ()))
    changed = []
    for f in dataclasses.fields(cfg):
        if f.name in free:
            continue
        old = saved[f.name] if f.name in saved else field_default(f)
        new = getattr(cfg, f.name)
        if _normal(old) != _normal(new):
            changed.append(f"--{f.name.replace('_', '-')} {brief(old, 60)} → {brief(new, 60)}")
    if changed:
        raise ConfigError(f"{ckpt} was written with other options: {'; '.join(changed)}. Resuming would mix two "
                          "runs; run again with the old values, or use another --out (or --no-resume) to start over")


def _normal(value: Any) -> Any:
    # JSON turned tuples into lists and may have turned ints into floats: compare the values.
    if isinstance(value, (list, tuple)):
        return [_normal(v) for v in value]
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, float)):
        return float(value)
    return value
