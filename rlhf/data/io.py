"""Reading and writing the data contracts: JSON Lines (optionally gzipped) and Hugging Face datasets.

Readers validate every record and raise :class:`DataError` naming file, line and field. Writers are
atomic: the file appears complete or not at all (write to a temporary file, then rename).
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Any, BinaryIO, Iterable, Iterator, Literal, TypeVar

from rlhf.data.records import RECORD_TYPES, as_dict
from rlhf.errors import DataError
from rlhf.utils.io import atomic_write_bytes

R = TypeVar("R")


# Bounds on one record, so that no input line can make a reader use unbounded memory or recursion.
MAX_LINE_BYTES = 64 * 1024 * 1024
MAX_NESTING = 64


def _open_binary(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")


def _nesting_depth(obj: Any, limit: int) -> int:
    """Depth of nested lists/objects (a flat object is 1), walked without recursion; stops past ``limit``."""
    depth, stack = 0, [(obj, 1)]
    while stack:
        value, d = stack.pop()
        if isinstance(value, (dict, list)):
            depth = max(depth, d)
            if depth > limit:
                return depth
            stack.extend((v, d + 1) for v in (value.values() if isinstance(value, dict) else value))
    return depth


def parse_json_line(raw: bytes, path: str | Path, line_no: int) -> Any:
    """One JSON Lines line → its value, or DataError naming the line (and the byte column of a byte
    that is not UTF-8). A leading byte-order mark on the first line is allowed."""
    if line_no == 1:
        raw = raw.removeprefix(b"\xef\xbb\xbf")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(path, line_no, f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at byte column {exc.start + 1} "
                                       f"({exc.reason})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataError(path, line_no, f"malformed JSON ({exc.msg} at column {exc.colno})") from None
    except RecursionError:
        raise DataError(path, line_no, f"JSON nested more than {MAX_NESTING} levels deep") from None
    except ValueError as exc:  # e.g. an integer of more than 4,300 digits
        raise DataError(path, line_no, f"malformed JSON ({exc})") from None
    if _nesting_depth(obj, MAX_NESTING) > MAX_NESTING:
        raise DataError(path, line_no, f"JSON nested more than {MAX_NESTING} levels deep")
    return obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line; malformed lines raise DataError.

    Lines are read as bytes with a size bound and decoded one by one, so an error names its line;
    a gzip file that is not gzip (or is cut short) is an error naming the file, not a traceback.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(path, None, "file not found")
    if path.is_dir():
        raise DataError(path, None, "is a directory; expected a .jsonl file")
    line_no = 0
    try:
        with _open_binary(path) as fh:
            while True:
                raw = fh.readline(MAX_LINE_BYTES + 1)
                if not raw:
                    return
                line_no += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise DataError(path, line_no, f"line longer than {MAX_LINE_BYTES // 2**20} MiB; refusing to read it")
                if not raw.strip():
                    continue
                obj = parse_json_line(raw, path, line_no)
                if not isinstance(obj, dict):
                    raise DataError(path, line_no, f"expected a JSON object per line, got {type(obj).__name__}")
                yield line_no, obj
    except (gzip.BadGzipFile, EOFError, zlib.error) as exc:
        where = "" if line_no == 0 else f" after line {line_no}"
        raise DataError(path, None, f"not a valid gzip file{where} ({exc or type(exc).__name__}); "
                                    "a .gz name needs gzip content") from None


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
