"""What a long run prints: expected time left, progress that reads well in a log file, the verdict.

* :class:`StageClock` estimates each demo stage's time from a quiet-machine reference run,
  scaled by how much work the options ask for and by how fast this machine has been so far
  (a core taken by another job shows up as a slowdown of the stages already done).
* :class:`LogFriendlyStream` wraps stderr when it is not a terminal: a progress bar redraws
  itself with carriage returns many times a second, which a log file keeps as one unreadable
  line; the wrapper writes a bar's state as a plain line at most every ``interval_s`` seconds,
  and its final state when it closes.
* :func:`quiet_library_bars` turns off transformers' per-file "Loading weights" and "Writing
  model shards" bars, which say nothing a person needs during a demo.
* :func:`verdict_lines` is the report's verdict as aligned plain text.
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Iterator, TextIO

from rlhf.eval.verdict import JudgeVerdict, headline, number

# `make demo` on a quiet 2-core machine (benchmarks/RESULTS.md, "The whole loop over three seeds",
# 2026-11-24 09:45): seconds per stage, and the work it did in the units StageClock.units counts.
REFERENCE_SECONDS = {"generate": 2.9, "label": 8.5, "pairs": 0.2, "reward": 57.5, "ppo": 48.3, "eval": 7.2, "report": 1.5}
REFERENCE_WORK = {"prompts": 53, "eval_prompts": 26, "num_completions": 4, "labelers": 3, "reward_epochs": 3.0,
                  "ppo_steps": 60, "ppo_batch_size": 32, "eval_samples": 8}


def stage_work(w: dict) -> dict[str, float]:
    """Work per stage in proportional units: completions, labels, pair passes, episodes, replies."""
    k = w["num_completions"]
    return {"generate": w["prompts"] * k, "label": w["prompts"] * w["labelers"], "pairs": 1.0,
            "reward": w["prompts"] * w["labelers"] * k * (k - 1) / 2 * w["reward_epochs"],
            "ppo": w["ppo_steps"] * w["ppo_batch_size"], "eval": w["eval_prompts"] * w["eval_samples"] * 2, "report": 1.0}


def duration(seconds: float) -> str:
    """"about 40 s", "about 3 min", "about 1 h 5 min"."""
    s = max(0, round(seconds))
    if s < 90:
        return f"about {max(5, 5 * round(s / 5))} s"
    m = round(s / 60)
    return f"about {m} min" if m < 60 else f"about {m // 60} h {m % 60} min"


@dataclass
class StageClock:
    """Expected seconds per stage = reference × (this run's work / the reference's) × slowdown so far."""

    work: dict[str, float]
    done: dict[str, tuple[float, float]] = field(default_factory=dict)  # stage -> (expected, actual) this process

    @classmethod
    def for_run(cls, **work: float) -> "StageClock":
        ours, ref = stage_work(work), stage_work(REFERENCE_WORK)
        return cls({s: REFERENCE_SECONDS[s] * ours[s] / ref[s] for s in REFERENCE_SECONDS})

    @property
    def slowdown(self) -> float:
        """Actual / expected over the stages this process ran (1 before the first one finishes)."""
        expected = sum(e for e, _ in self.done.values())
        actual = sum(a for _, a in self.done.values())
        return actual / expected if expected > 1.0 else 1.0

    def expected(self, stage: str) -> float:
        return self.work.get(stage, 0.0) * self.slowdown

    def left(self, stages: list[str]) -> float:
        return sum(self.expected(s) for s in stages)

    def finished(self, stage: str, seconds: float) -> None:
        self.done[stage] = (self.work.get(stage, 0.0), seconds)

    def announce(self, stage: str, remaining: list[str]) -> str:
        """"about 2 min; the demo has about 5 min left" for a stage about to start."""
        text = f"{duration(self.expected(stage))}; the demo has {duration(self.left(remaining))} left"
        if self.slowdown > 1.3:
            text += f" (this machine runs {self.slowdown:.1f}× slower than the quiet reference so far)"
        return text


class LogFriendlyStream:
    """A text stream for logs: bar redraws ("\\r...") become a plain line at most every ``interval_s``."""

    def __init__(self, base: TextIO, interval_s: float = 30.0, clock=time.monotonic):
        self.base, self.interval_s, self.clock = base, interval_s, clock
        self._line = ""                 # text since the last \r or \n
        self._last_bar_line = -float("inf")

    def write(self, text: str) -> int:
        if not isinstance(text, str):  # as a text stream does; click probes streams with write(b"")
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        for ch in text:
            if ch == "\r":
                if self._line.strip():  # a bar state is complete: keep one now and then
                    now = self.clock()
                    if now - self._last_bar_line >= self.interval_s:
                        self.base.write(self._line.rstrip() + "\n")
                        self._last_bar_line = now
                self._line = ""
            elif ch == "\n":
                if self._line.strip():
                    self.base.write(self._line.rstrip() + "\n")
                self._line = ""
            else:
                self._line += ch
        return len(text)

    def flush(self) -> None:
        self.base.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self.base, name)


@contextlib.contextmanager
def quiet_library_bars() -> Iterator[None]:
    """transformers' per-file loading/saving bars off for the duration (a demo loads and saves ~30 times)."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@contextlib.contextmanager
def log_friendly_stderr(interval_s: float = 30.0) -> Iterator[None]:
    """Replace sys.stderr with a :class:`LogFriendlyStream` when it is not a terminal; restore it after."""
    original = sys.stderr
    if original is None or original.isatty():
        yield
        return
    sys.stderr = LogFriendlyStream(original, interval_s)
    try:
        yield
    finally:
        sys.stderr.flush()
        sys.stderr = original


def verdict_lines(verdicts: list[JudgeVerdict], role_titles: dict[str, str]) -> list[str]:
    """The verdict as aligned text: one line per judge, grouped by role, columns sized to the names."""
    if not verdicts:
        return []
    width = max(len(v.label) for v in verdicts)
    word_w = max(len(v.word) for v in verdicts)
    nums = [(number(v.before), number(v.after)) for v in verdicts]
    bw, aw = max(len(b) for b, _ in nums), max(len(a) for _, a in nums)
    lines = [headline(verdicts)]
    role = None
    for v, (b, a) in zip(verdicts, nums):
        if v.role != role:
            role = v.role
            lines.append(f"  {role_titles[role]}")
        lines.append(f"    {v.label:<{width}}  {v.word:<{word_w}}  {b:>{bw}} → {a:<{aw}}  {v.change_text()}; {v.direction}")
    return lines
