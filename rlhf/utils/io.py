"""Atomic file and folder writes: an output appears complete or not at all."""

from __future__ import annotations

import json
import os
import secrets
import shutil
from pathlib import Path
from typing import Any


def _sibling_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")


def _new_temp_file(path: Path) -> tuple[int, Path]:
    """Create a fresh sibling file with mode 0666 minus the umask, as open() would.

    tempfile.mkstemp creates 0600 files, and os.replace keeps that mode: results in a shared
    folder would then be unreadable to everyone else. O_EXCL keeps the name unique and safe.
    """
    while True:
        tmp = _sibling_name(path)
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), tmp
        except FileExistsError:
            continue


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = _new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, ensure_ascii=False, default=str) + "\n")


def staging_dir(final: str | Path) -> Path:
    """A fresh sibling folder to build ``final`` in before :func:`publish_dir` moves it into place."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    while True:  # os.mkdir applies the umask (tempfile.mkdtemp would make it 0700)
        staged = _sibling_name(final)
        try:
            staged.mkdir(mode=0o777)
            return staged
        except FileExistsError:
            continue


def publish_dir(staged: str | Path, final: str | Path) -> Path:
    """Replace ``final`` with ``staged``. The old folder is moved aside first and removed last, so a
    crash leaves either the old or the new folder in place, never a half-written one."""
    staged, final = Path(staged), Path(final)
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
    os.replace(staged, final)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)
    return final
