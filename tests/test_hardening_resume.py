"""Self-healing resume (issue 15, items 2 and 3): a damaged newest checkpoint is named and skipped,
the run resumes from the newest intact one and ends exactly like an uninterrupted run; a torn
metrics.jsonl tail is repaired; staging folders of killed runs are removed; a SIGKILLed SFT run
resumes exactly; and no trainer resumes silently with changed options."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, safetensors_weights as weights
from rlhf.errors import ConfigError
from rlhf.train.sft import SFTConfig, run_sft
from rlhf.utils.metrics import read_metrics
from rlhf.engine.config import EngineConfig

SFT_ROWS = [{"prompt": "how do I cook rice", "completion": "Rinse the rice and simmer it."},
            {"prompt": "my house is too hot", "completion": "Open the windows at night."},
            {"prompt": "I feel tired all the time", "completion": "Sleep early and drink water."},
            {"prompt": "what should I read next", "completion": "Try a short novel you can finish."}] * 16


def sft_cfg(tmp_path: Path, model_dir: Path, out: Path, **kw) -> SFTConfig:
    data = tmp_path / "sft.jsonl"
    if not data.exists():
        data.write_text("".join(json.dumps(r) + "\n" for r in SFT_ROWS))
    base = dict(data=str(data), out=str(out), model=str(model_dir), batch_size=8, epochs=2, lr=1e-3, warmup_steps=2,
                save_every=3, keep_checkpoints=20, engine=EngineConfig(device="cpu", threads=1))
    base.update(kw)
    return SFTConfig(**base)


@pytest.fixture(scope="module")
def sft_full(tmp_path_factory, tiny_model_dir):
    """One uninterrupted SFT run (16 steps, checkpoints every 3), the reference for every resume below."""
    tmp = tmp_path_factory.mktemp("sft-full")
    run_sft(sft_cfg(tmp, tiny_model_dir, tmp / "full"))
    return tmp


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def cut(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x40
    path.write_bytes(bytes(data))


DAMAGE = {
    "weights cut short": lambda c: cut(c / "model" / "model.safetensors"),
    "a flipped byte in the weights": lambda c: flip(c / "model" / "model.safetensors"),
    "trainer state cut short": lambda c: cut(c / "trainer_state.pt"),
    "state.json torn": lambda c: cut(c / "state.json", 0.6),
    "weights deleted": lambda c: (c / "model" / "model.safetensors").unlink(),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_sft_resumes_from_the_newest_intact_checkpoint_and_ends_exactly_alike(sft_full, tiny_model_dir, tmp_path,
                                                                              capsys, damage):
    full = sft_full / "full"
    resumed = tmp_path / "resumed"
    for name in ("step-00000003", "step-00000006"):
        shutil.copytree(full / "checkpoints" / name, resumed / "checkpoints" / name)
    DAMAGE[damage](resumed / "checkpoints" / "step-00000006")
    # What a kill in the middle of a metrics write leaves: a torn last line.
    text = (full / "metrics.jsonl").read_text()
    (resumed / "metrics.jsonl").write_text(text + '{"step": 17, "loss": 0.5, "grad_no')
    capsys.readouterr()
    summary = run_sft(sft_cfg(sft_full, tiny_model_dir, resumed))
    err = capsys.readouterr().err
    assert "step-00000006 is damaged" in err and "resuming from an older one" in err, err
    assert "resuming from" in err and "step-00000003" in err
    assert "dropped 1 damaged line(s)" in err
    assert summary["steps"] == 16
    assert same_weights(full / "model", resumed / "model")
    assert read_metrics(full) == read_metrics(resumed)
    # The damaged checkpoint was rewritten by the resumed run: intact now.
    from rlhf.utils.checkpoint import verify_checkpoint

    assert verify_checkpoint(resumed / "checkpoints" / "step-00000006") is None


def test_every_checkpoint_has_a_manifest_written_last(sft_full):
    from rlhf.utils.checkpoint import verify_checkpoint

    ckpt = sft_full / "full" / "checkpoints" / "step-00000006"
    manifest = json.loads((ckpt / "manifest.json").read_text())
    listed = set(manifest["files"])
    on_disk = {p.relative_to(ckpt).as_posix() for p in ckpt.rglob("*") if p.is_file()} - {"manifest.json"}
    assert listed == on_disk and {"state.json", "trainer_state.pt", "model/model.safetensors"} <= listed
    assert manifest["files"]["trainer_state.pt"]["bytes"] == (ckpt / "trainer_state.pt").stat().st_size
    assert verify_checkpoint(ckpt) is None


def test_stale_staging_folders_of_killed_runs_are_removed(sft_full, tiny_model_dir, tmp_path):
    full = sft_full / "full"
    resumed = tmp_path / "resumed"
    shutil.copytree(full / "checkpoints" / "step-00000015", resumed / "checkpoints" / "step-00000015")
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    dead = 2 ** 22 + 12345  # above the default pid_max: no such process
    stale = [resumed / "checkpoints" / f".step-00000018.{dead}.k2j3h4.tmp",  # a checkpoint being staged
             resumed / "checkpoints" / ".step-00000018.x7y8z9ab.tmp",  # the same, named by an older version
             resumed / "checkpoints" / f".step-00000015.old-{dead}",  # publish_dir's moved-aside folder
             resumed / f".model.{dead}.q1w2e3.tmp"]  # the final model being staged
    for folder in stale:
        (folder / "model").mkdir(parents=True)
        (folder / "model" / "model.safetensors").write_bytes(b"\0" * 1000)
    (resumed / f".summary.json.{dead}.abcd.tmp").write_text("{")
    mine = resumed / "checkpoints" / f".step-00000099.{os.getpid()}.live.tmp"  # a live process's: kept
    mine.mkdir()
    run_sft(sft_cfg(sft_full, tiny_model_dir, resumed))
    assert not any(p.exists() for p in stale) and not (resumed / f".summary.json.{dead}.abcd.tmp").exists()
    assert mine.is_dir()
    assert same_weights(full / "model", resumed / "model")


@pytest.mark.slow  # two interpreter starts with torch: about 30 s idle, far more on a loaded machine
def test_sigkilled_sft_run_resumes_exactly(sft_full, tiny_model_dir, tmp_path):
    """A real SIGKILL of `rlhf sft` in the middle of training; the same command again finishes the run
    with the weights and metrics of an uninterrupted one."""
    killed = tmp_path / "killed"
    cfg = sft_cfg(sft_full, tiny_model_dir, killed)
    args = [sys.executable, "-m", "rlhf", "sft"]
    options = [(k, v) for key, value in vars(cfg).items()  # a section's options are flags of their own
               for k, v in (vars(value).items() if dataclasses.is_dataclass(value) else [(key, value)])]
    for key, value in options:
        flag = "--" + key.replace("_", "-")
        args += [flag if value is not False else "--no-" + key.replace("_", "-")] if isinstance(value, bool) else [flag, str(value)]
    env = dict(os.environ, PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while not (killed / "checkpoints" / "step-00000003" / "manifest.json").exists():
        if proc.poll() is not None:
            pytest.fail(f"sft exited ({proc.returncode}) before the kill: {proc.stderr.read().decode()[-2000:]}")
        assert time.monotonic() < deadline, "no checkpoint within 240 s"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    assert not (killed / "model").exists()  # really killed mid-run
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming from" in done.stderr
    assert same_weights(sft_full / "full" / "model", killed / "model")
    assert read_metrics(sft_full / "full") == read_metrics(killed)


def test_sft_refuses_to_resume_with_other_options(sft_full, tiny_model_dir, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(sft_full / "full" / "checkpoints" / "step-00000003", resumed / "checkpoints" / "step-00000003")
    with pytest.raises(ConfigError, match=r"--lr 0\.001 → 0\.002; --warmup-steps 2 → 4"):
        run_sft(sft_cfg(sft_full, tiny_model_dir, resumed, lr=2e-3, warmup_steps=4))
    run_sft(sft_cfg(sft_full, tiny_model_dir, resumed, save_every=5))  # free: only when checkpoints are written
    assert same_weights(sft_full / "full" / "model", resumed / "model")


# -- reward models and PPO ------------------------------------------------------------------------

def reward_cfg(tiny_model_dir, tmp_path, out: Path, **kw):
    from rlhf.train.reward import RewardTrainConfig

    prompts = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next"]
    rows = [{"prompt": f"{prompts[i % 4]} ({i})", "chosen": "Thank you for asking! Here is how.",
             "rejected": "Whatever. Figure it out yourself."} for i in range(32)]
    train = tmp_path / "pairs.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    base = dict(pairs=str(train), out=str(out), base=str(tiny_model_dir), val_fraction=0.25, epochs=2, batch_size=8,
                lr=1e-3, max_length=48, eval_every=2, keep_checkpoints=20, seed=5, engine=EngineConfig(device="cpu", threads=1))
    base.update(kw)
    return RewardTrainConfig(**base)


def test_reward_training_refuses_changed_lr_margin_and_head_lr(tiny_model_dir, tmp_path):
    """On main this resumed silently: old schedule, new margin from mid-run, new values in summary.json."""
    from rlhf.train.reward import train_reward_model

    out = tmp_path / "run"
    train_reward_model(reward_cfg(tiny_model_dir, tmp_path, out, max_steps=2))
    with pytest.raises(ConfigError) as err:
        train_reward_model(reward_cfg(tiny_model_dir, tmp_path, out, lr=3e-3, margin=0.5, head_lr=1e-2))
    text = str(err.value)
    assert "--lr 0.001 → 0.003" in text and "--margin 0.0 → 0.5" in text and "--head-lr 0.003 → 0.01" in text
    assert "step-00000002" in text
    summary = json.loads((out / "summary.json").read_text())
    assert summary["config"]["lr"] == 1e-3 and summary["steps"] == 2  # nothing was overwritten
    # Going further is allowed: --max-steps does not shape the reward schedule.
    assert train_reward_model(reward_cfg(tiny_model_dir, tmp_path, out, max_steps=4))["steps"] == 4


def test_reward_training_skips_a_damaged_newest_checkpoint(tiny_model_dir, tmp_path, capsys):
    from rlhf.train.reward import train_reward_model

    full = tmp_path / "full"
    train_reward_model(reward_cfg(tiny_model_dir, tmp_path, full))
    steps = sorted((full / "checkpoints").iterdir())
    resumed = tmp_path / "resumed"
    for ckpt in steps[:2]:
        shutil.copytree(ckpt, resumed / "checkpoints" / ckpt.name)
    shutil.copy(full / "metrics.jsonl", resumed / "metrics.jsonl")
    flip(resumed / "checkpoints" / steps[1].name / "trainer_state.pt")
    capsys.readouterr()
    train_reward_model(reward_cfg(tiny_model_dir, tmp_path, resumed))
    err = capsys.readouterr().err
    assert f"{steps[1].name} is damaged (trainer_state.pt does not match its checksum)" in err
    assert same_weights(steps[-1] / "model", resumed / "checkpoints" / steps[-1].name / "model")
    assert read_metrics(full) == read_metrics(resumed)


def test_ppo_refuses_any_changed_option_not_only_a_fixed_list(tiny_model_dir, tmp_path, capsys):
    """PPO's check now covers every option (main's list missed e.g. --cliprange and --vf-coef)."""
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo

    prompts = tmp_path / "p.jsonl"
    long = "word " * 3000 + "how do I cook rice"  # longer than the context: cut and reported
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n"
                               for i, p in enumerate(["my house is too hot", long] * 4)))

    def cfg(**kw):
        base = dict(out=str(tmp_path / "ppo"), policy=str(tiny_model_dir), reward="length", prompts=str(prompts),
                    max_steps=1, batch_size=4, mini_batch_size=4, micro_batch_size=4, ppo_epochs=1, max_new_tokens=6,
                    save_every=1, engine=EngineConfig(device="cpu", threads=1), progress=False)
        base.update(kw)
        return PPOConfig(**base)

    run_ppo(cfg())
    assert "ppo: 4 of 8 prompts were longer than the 250 tokens" in capsys.readouterr().err
    with pytest.raises(ConfigError, match=r"--cliprange 0\.2 → 0\.3; --vf-coef 0\.1 → 0\.5"):
        run_ppo(cfg(max_steps=2, cliprange=0.3, vf_coef=0.5))
    assert run_ppo(cfg(kl_ceiling=100.0, save_every=5))["steps"] == 1  # stop criteria and saving may change


def test_check_resume_options_treats_unrecorded_options_as_their_default(tmp_path):
    from rlhf.utils.checkpoint import check_resume_options

    cfg = SFTConfig(data="d", out="o")
    saved = {k: v for k, v in vars(cfg).items() if k != "max_length"}  # written before max_length existed
    check_resume_options(tmp_path, cfg, saved)
    with pytest.raises(ConfigError, match="--max-length 256 → 128"):
        check_resume_options(tmp_path, SFTConfig(data="d", out="o", max_length=128), saved)
    check_resume_options(tmp_path, SFTConfig(data="d", out="elsewhere", engine=EngineConfig(device="cpu", threads=1)), saved)
