"""Metrics to JSON Lines (one object per step) and TensorBoard, plus peak memory."""

from __future__ import annotations

import json
import math
import resource
import sys
from pathlib import Path
from typing import Any

from rlhf.utils.io import atomic_write_text


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


class MetricsLogger:
    """Appends ``{"step": n, ...}`` lines to ``metrics.jsonl`` and scalars to TensorBoard.

    On resume from step ``resume_step`` lines logged after it are dropped, so that a resumed run's
    log reads exactly like an uninterrupted one. A line that does not parse (what a kill in the
    middle of a write leaves at the end) is dropped too, with a warning.
    """

    def __init__(self, out_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None,
                 filename: str = "metrics.jsonl"):
        self.path = Path(out_dir) / filename
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            atomic_write_text(self.path, "")
        elif self.path.exists():
            rows, torn = _parse_lines(self.path, keep_text=True)
            if torn:
                print(f"warning: {self.path}: dropped {len(torn)} damaged line(s) (line {', '.join(map(str, torn[:3]))}), "
                      "as a kill in the middle of a write leaves them", file=sys.stderr)
            kept = [text for row, text in rows if _step(row) <= resume_step]
            atomic_write_text(self.path, "".join(k + "\n" for k in kept))
        self._fh = open(self.path, "a", encoding="utf-8")
        self._tb = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"), purge_step=resume_step)
            except ImportError:  # tensorboard not installed: JSON Lines still has everything
                self._tb = None

    def log(self, step: int, metrics: dict[str, Any]) -> None:
        clean = {k: (float(v) if hasattr(v, "item") else v) for k, v in metrics.items()}
        self._fh.write(json.dumps({"step": step, **clean}, default=str) + "\n")
        self._fh.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        self._fh.close()
        if self._tb is not None:
            self._tb.close()

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def _step(row: dict[str, Any]) -> float:
    step = row.get("step", 0)
    return step if isinstance(step, (int, float)) and not isinstance(step, bool) else float("inf")


def _parse_lines(path: Path, keep_text: bool = False) -> tuple[list, list[int]]:
    """The rows that parse as JSON objects (with their text if asked), and the numbers of the lines
    that do not."""
    rows, bad = [], []
    for n, line in enumerate(path.read_bytes().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line.decode("utf-8"))
        except (UnicodeDecodeError, ValueError, RecursionError):
            row = None
        if isinstance(row, dict):
            rows.append((row, line.decode("utf-8")) if keep_text else row)
        else:
            bad.append(n)
    return rows, bad


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Every logged row; damaged lines (a torn last line after a kill) are left out."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return _parse_lines(path)[0]
