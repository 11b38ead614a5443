"""Rerunning `rlhf ppo` into a folder that holds a finished run says what happened and what to do:
a higher --max-steps extends a run that stopped at its step limit; otherwise nothing is trained and
the message names the ways forward."""

from __future__ import annotations

import json

import pytest
import torch

from rlhf.judges.base import SCORER_KINDS
from rlhf.train.ppo_config import PPOConfig
from rlhf.train.ppo_loop import run_ppo
from rlhf.utils.metrics import read_metrics
from rlhf.engine.config import EngineConfig


class LetterScorer:
    name = "letters"
    higher_is_better = True

    def score(self, prompts, completions):
        return torch.tensor([sum(ch in "et" for ch in c) / max(1, len(c)) for c in completions], dtype=torch.float32)


@pytest.fixture(autouse=True)
def letters(monkeypatch):
    monkeypatch.setitem(SCORER_KINDS, "letters", lambda arg, device: LetterScorer())


def run(model_dir, prompts, out, max_steps: int) -> dict:
    cfg = PPOConfig(out=str(out), policy=str(model_dir), reward="letters", prompts=str(prompts), max_steps=max_steps,
                    batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=1, max_new_tokens=6, lr=1e-3,
                    save_every=10, engine=EngineConfig(device="cpu"), seed=1, progress=False, missing_eos_penalty=0.0)
    cfg.validate()
    return run_ppo(cfg)


def test_rerun_with_more_steps_extends_and_a_finished_run_says_how_to_go_on(tiny_model_dir, tmp_path, capsys):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"id": str(i), "prompt": p}) + "\n" for i, p in enumerate(["hot house", "rice"])))
    out = tmp_path / "run"
    assert run(tiny_model_dir, prompts, out, 2)["steps"] == 2
    capsys.readouterr()

    summary = run(tiny_model_dir, prompts, out, 3)
    err = capsys.readouterr().err
    assert summary["steps"] == 3 and summary["stop_reason"] == "max_steps"
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3]
    assert "finished its 2 steps; extending it to --max-steps 3" in err

    again = run(tiny_model_dir, prompts, out, 3)
    err = capsys.readouterr().err
    assert again["steps"] == 3 and len(read_metrics(out)) == 3
    assert "already holds a finished run (stopped: max_steps after 3 steps)" in err
    assert "raise --max-steps above 3 to extend it" in err and "use another --out (or --no-resume)" in err
