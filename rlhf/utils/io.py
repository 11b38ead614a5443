"""Atomic file and folder writes: an output appears complete or not at all."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Any, Callable


def _sibling_name(path: Path) -> Path:
    # The maker's process id in the name lets remove_stale_staging tell a killed run's leftovers.
    return path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(6)}.tmp")


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


_STAGING = re.compile(r"^\..+?\.(\d+)\.[^.]+\.tmp$|^\..+\.old-(\d+)$")
_STAGING_UNNAMED = re.compile(r"^\..+\.[^.]+\.tmp$")  # older versions' names, without a process id


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def remove_stale_staging(folder: str | Path, unnamed: bool = False) -> list[Path]:
    """Remove the temporary files and folders that :func:`atomic_write_bytes`, :func:`staging_dir`
    and :func:`publish_dir` create, when the process that made them is gone (a killed run leaves
    them behind). Names carry the maker's process id; ``unnamed=True`` also removes names of the
    same shape without one (older versions'), for folders only this code writes in."""
    folder = Path(folder)
    removed = []
    if not folder.is_dir():
        return removed
    for entry in folder.iterdir():
        m = _STAGING.match(entry.name)
        if m is None:
            if not (unnamed and _STAGING_UNNAMED.match(entry.name)):
                continue
            pid = None
        else:
            pid = m.group(1) or m.group(2)
        if pid is not None and (int(pid) == os.getpid() or _alive(int(pid))):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry)
    return removed


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


def utf8_error_at(data: bytes, exc: UnicodeDecodeError) -> tuple[int, int]:
    """(line, byte column), both 1-based, of the first byte that is not UTF-8 in ``data``."""
    line = data.count(b"\n", 0, exc.start) + 1
    return line, exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1


def read_utf8(path: str | Path, error: Callable[[str], Exception], max_bytes: int | None = None) -> str:
    """A text file's contents, or ``error(message)`` naming the line and byte column of the first
    byte that is not UTF-8 (a leading byte-order mark is dropped). ``max_bytes`` bounds what is read."""
    path = Path(path)
    with open(path, "rb") as fh:
        data = fh.read() if max_bytes is None else fh.read(max_bytes + 1)
    if max_bytes is not None and len(data) > max_bytes:
        raise error(f"{path}: larger than {max_bytes:,} bytes; refusing to read it")
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        line, col = utf8_error_at(data, exc)
        raise error(f"{path}:{line}: not UTF-8 text: byte 0x{data[exc.start]:02x} at byte column {col} ({exc.reason})") from None
