"""Reading and writing the data contracts: JSON Lines (optionally gzipped) and Hugging Face datasets.

Readers validate every record and raise :class:`DataError` naming file, line and field. Writers are
atomic: the file appears complete or not at all (write to a temporary file, then rename).
"""

from __future__ import annotations

import gzip
import io
import json
from pathlib import Path
from typing import Any, Iterable, Iterator, Literal, TypeVar

from rlhf.data.records import RECORD_TYPES, as_dict
from rlhf.errors import DataError
from rlhf.utils.io import atomic_write_bytes

R = TypeVar("R")


def _open_text(path: Path) -> io.TextIOBase:
    if path.suffix == ".gz":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8")
    return open(path, encoding="utf-8")


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise DataError."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, "is a directory; expected a .jsonl file")
    with _open_text(path) as fh:
        try:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(path, line_no, f"malformed JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(obj, dict):
                    raise DataError(path, line_no, f"expected a JSON object per line, got {type(obj).__name__}")
                yield line_no, obj
        except UnicodeDecodeError as exc:
            raise DataError(path, None, f"not UTF-8 text ({exc.reason})") from None


def read_records(path: str | Path, kind: str | type[R], *, on_error: Literal["raise", "skip"] = "raise",
                 skipped: list[str] | None = None) -> list[R]:
    """Read a contract file (``.jsonl``, ``.jsonl.gz``, or a ``datasets.save_to_disk`` folder).

    ``on_error="skip"`` drops invalid records (never malformed JSON) and appends each reason to
    ``skipped`` so the caller can report how many it lost and why.
    """
    cls = RECORD_TYPES[kind] if isinstance(kind, str) else kind
    path = Path(path)
    rows: Iterable[tuple[int | None, dict]]
    if path.is_dir():
        rows = _iter_dataset_dir(path)
    else:
        rows = iter_jsonl(path)
    out = []
    for line_no, obj in rows:
        try:
            out.append(cls.from_json(obj, path, line_no))
        except DataError as exc:
            if on_error == "raise":
                raise
            if skipped is not None:
                skipped.append(str(exc))
    if not out:
        raise DataError(path, None, f"holds no valid {cls.kind} records")
    return out


def write_records(path: str | Path, records: Iterable[Any]) -> Path:
    """Write records (dataclasses with ``to_json``, or dicts) as JSON Lines, atomically."""
    path = Path(path)
    lines = [json.dumps(r if isinstance(r, dict) else as_dict(r), ensure_ascii=False) for r in records]
    data = ("\n".join(lines) + ("\n" if lines else "")).encode("utf-8")
    if path.suffix == ".gz":
        data = gzip.compress(data, mtime=0)
    atomic_write_bytes(path, data)
    return path


def records_to_dataset(records: Iterable[Any]):
    """A Hugging Face ``datasets.Dataset`` with one column per contract field."""
    import datasets

    return datasets.Dataset.from_list([r if isinstance(r, dict) else as_dict(r) for r in records])


def dataset_to_records(dataset, kind: str | type[R], name: str = "<dataset>") -> list[R]:
    cls = RECORD_TYPES[kind] if isinstance(kind, str) else kind
    return [cls.from_json(dict(row), name, i + 1) for i, row in enumerate(dataset)]


def _iter_dataset_dir(path: Path) -> Iterator[tuple[int | None, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises several types for a folder that is not a dataset
        raise DataError(path, None, f"not a JSON Lines file nor a saved Hugging Face dataset ({exc})") from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(path, None, f"a DatasetDict without a 'train' split (has {list(ds)})")
        ds = ds["train"]
    for i, row in enumerate(ds):
        yield i + 1, dict(row)
