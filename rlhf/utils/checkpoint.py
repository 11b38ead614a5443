"""Checkpoints that survive a kill at any moment, shared by every training stage.

Layout under a run's output folder::

    checkpoints/step-00000040/   model files (HF format, safetensors) written by the stage,
                                 trainer_state.pt (optimizer, scheduler, RNG: tensors and plain
                                 types only, loaded with weights_only=True), state.json
                                 (step, data position, anything the stage needs to resume)

A checkpoint is built in a staging folder and renamed into place, and ``state.json`` is written
last, so a folder without it is incomplete and ignored. Older checkpoints are pruned only after a
newer one is in place: the last good checkpoint always exists.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any, Callable

import torch

from rlhf.utils.io import atomic_write_json, publish_dir, staging_dir

_STEP_DIR = re.compile(r"^step-(\d+)$")


def save_torch_state(path: str | Path, obj: Any) -> None:
    torch.save(obj, str(path))


def load_torch_state(path: str | Path) -> Any:
    # weights_only=True: never unpickle arbitrary objects, even from our own checkpoints.
    return torch.load(str(path), map_location="cpu", weights_only=True)


class CheckpointManager:
    def __init__(self, out_dir: str | Path, keep: int = 2):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = max(1, keep)

    def all(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and (p / "state.json").is_file():
                found.append((int(m.group(1)), p))
        return sorted(found)

    def latest(self) -> Path | None:
        found = self.all()
        return found[-1][1] if found else None

    def save(self, step: int, write: Callable[[Path], None], state: dict[str, Any],
             trainer_state: dict[str, Any] | None = None) -> Path:
        """``write(folder)`` saves the model files; ``state`` goes to state.json (written last)."""
        final = self.root / f"step-{step:08d}"
        tmp = staging_dir(final)
        try:
            write(tmp)
            if trainer_state is not None:
                save_torch_state(tmp / "trainer_state.pt", trainer_state)
            atomic_write_json(tmp / "state.json", {"step": step, **state})
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
