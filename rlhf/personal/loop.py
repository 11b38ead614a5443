"""The continuous loop: refit each user's part as their feedback arrives, deploy only what is not worse.

Every ``interval`` seconds the loop reads the feedback in the database; a user whose comparison
count moved by ``every`` or more since their last refit gets a candidate (``rlhf.personal.update``):
fitted on all but their most recent choices, judged on those against the deployed version, written
as a new version with its held-out accuracy in ``versions.jsonl``, deployed when not worse. A
running chat server notices a deployed version by ``current.json``'s timestamp and swaps it in
between requests, so no request is dropped.

Deleting history counts too: a user whose comparisons went *down* is refitted on what is left and
deployed without the gate (their deleted choices must stop shaping their reward; with nothing left
their row goes back to zeros, the generic reward).

``loop_state.json`` in the model folder remembers each user's count at their last refit, so a
restarted loop carries on instead of refitting everyone.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from rlhf.config import opt
from rlhf.engine.config import EngineConfig
from rlhf.engine.runtime import start
from rlhf.errors import ConfigError
from rlhf.personal.model import PersonalReward
from rlhf.personal.records import feedback_pairs, read_feedback
from rlhf.personal.update import RefitResult, refit_user
from rlhf.utils.io import atomic_write_json

STATE_FILE = "loop_state.json"


@dataclass
class LoopConfig:
    """Refit user parts as feedback arrives, on a schedule; deploy a new version only when it is not worse."""

    model: str = opt(help="Personal reward model folder (`rlhf personal train`); versions are written and deployed here.")
    feedback: str = opt("labels.sqlite", help="Where feedback arrives: the chat server's database (or a feedback JSONL file).")
    every: int = opt(10, help="Refit a user once this many new comparisons of theirs arrived since their last refit.")
    interval: float = opt(10.0, help="Seconds between looks at the feedback.")
    holdout: float = opt(0.2, help="Share of each user's most recent feedback held out to judge a candidate.")
    users: list[str] = opt(factory=list, help="Only these users (default: everyone with feedback).")
    once: bool = opt(False, help="Look once, refit who is due, and exit.")
    max_seconds: float = opt(0.0, help="Stop after this long (0 = until interrupted).")
    engine: EngineConfig = opt(factory=EngineConfig, help="How the backbone runs for replies it has no cached features "
                                                          "of (device, threads).")

    def validate(self) -> None:
        if self.every < 1 or self.interval <= 0 or not 0 < self.holdout < 1 or self.max_seconds < 0:
            raise ConfigError("--every must be at least 1, --interval positive, --holdout in (0, 1), --max-seconds ≥ 0")


@dataclass
class LoopState:
    counts: dict[str, int] = field(default_factory=dict)  # user -> comparisons at their last refit

    @classmethod
    def read(cls, folder: Path) -> "LoopState":
        path = folder / STATE_FILE
        return cls(**json.loads(path.read_text(encoding="utf-8"))) if path.is_file() else cls()

    def write(self, folder: Path) -> None:
        atomic_write_json(folder / STATE_FILE, asdict(self))


def due_users(pairs_by_user: dict[str, list], state: LoopState, reward: PersonalReward, every: int,
              only: list[str] | None = None) -> list[tuple[str, bool]]:
    """(user, deleted) for each user due a refit: ``every`` more comparisons, or fewer than before (deletions)."""
    out = []
    users = set(pairs_by_user) | {u for u in state.counts if state.counts[u] > 0}
    for user in sorted(users):
        if only and user not in only:
            continue
        n = len(pairs_by_user.get(user, []))
        last = state.counts.get(user, reward.table.n_pairs(user))
        if n < last:
            out.append((user, True))
        elif n - last >= every:
            out.append((user, False))
    return out


def loop_tick(reward: PersonalReward, source: str, state: LoopState, cfg: LoopConfig) -> list[RefitResult]:
    """One look at the feedback: refit every user who is due. Updates ``state`` (and its file)."""
    pairs_by_user = feedback_pairs(read_feedback(source)) if _has_feedback(source) else {}
    results = []
    for user, deleted in due_users(pairs_by_user, state, reward, cfg.every, cfg.users or None):
        pairs = pairs_by_user.get(user, [])
        if deleted and not pairs:
            reward.refresh()
            table = reward.table.with_user(user, torch.zeros(reward.table.dim), 0)
            version = reward.dir.write_version(table, {"parent": reward.version, "source": "history deleted", "user": user})
            reward.dir.deploy(version)
            reward.dir.log({"time": time.time(), "user": user, "version": version, "deployed": True,
                            "reason": "history deleted: back to the generic reward"})
            reward.refresh()
        else:
            results.append(refit_user(reward, user, pairs, cfg.holdout, gate=not deleted))
        state.counts[user] = len(pairs)
        state.write(reward.dir.root)
    return results


def _has_feedback(source: str) -> bool:
    return "://" in source or Path(source).is_file()


def run_loop(cfg: LoopConfig) -> list[RefitResult]:
    """Loop until interrupted (or ``--once`` / ``--max-seconds``); returns every refit it made."""
    rt = start(cfg.engine)
    reward = PersonalReward(cfg.model, str(rt.device))
    state = LoopState.read(reward.dir.root)
    started, done = time.monotonic(), []
    while True:
        for r in loop_tick(reward, cfg.feedback, state, cfg):
            done.append(r)
            verdict = "deployed" if r.deployed else "kept the deployed version"
            print(json.dumps({"user": r.user, "version": r.version, "train_pairs": r.train_pairs,
                              "heldout_pairs": r.heldout_pairs, "accuracy_deployed": r.accuracy_deployed,
                              "accuracy_candidate": r.accuracy_candidate, "result": verdict, "reason": r.reason}),
                  flush=True)
        if cfg.once or (cfg.max_seconds and time.monotonic() - started >= cfg.max_seconds):
            return done
        try:
            time.sleep(cfg.interval)
        except KeyboardInterrupt:
            print("loop stopped", file=sys.stderr)
            return done
