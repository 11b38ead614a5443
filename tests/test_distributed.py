"""Several processes through accelerate (DDP on gloo, here on CPU): a 2-process run takes the same
steps as a 1-process run with the same global batch, for reward training, SFT and PPO; each
process reads a disjoint share of every batch; only the main process writes; a run resumes under
2 processes, also after a SIGKILL mid-step, to exactly the uninterrupted result.

Tolerance of the 1-vs-2-process comparisons, and why: the two runs compute the same sums in a
different order (each process's share of a batch is a separate forward with its own padding and
packing, and gloo adds the two gradient halves), so float32 results differ by rounding, ~1e-7
relative per operation. Adam divides by √v, which turns rounding differences in near-zero
gradients into weight differences of order 1e-7 to 1e-6 over a few steps at these learning
rates; a real difference in the data or the gradient (a repeated or lost example, local instead
of global whitening) moves the weights by about the learning rate, 1e-3. Weights must agree to
1e-5 and logged losses to 1e-5 relative. Runs with the same number of processes agree exactly.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, TINY_TEXTS
from conftest import safetensors_weights as weights
from rlhf.engine.distributed import Distributed
from rlhf.utils.metrics import read_metrics

PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next"]
ACCELERATE_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"


def launch(args: list[str], processes: int = 2, wait: bool = True, log: Path | None = None):
    """``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N -m rlhf ARGS``,
    as docs/scaling.md gives it (CPU: gloo, one thread per process)."""
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ACCELERATE_CONFIG),
           "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "rlhf", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false"}
    if not wait:
        out = open(log, "w") if log else subprocess.DEVNULL
        return subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True, cwd=REPO)
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert res.returncode == 0, res.stderr[-4000:]
    return res


def free_port() -> int:
    """A port no one listens on now (other launches on this machine may hold accelerate's default)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def close(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def assert_same_metrics(one: list[dict], two: list[dict], keys: tuple[str, ...], rel: float = 1e-5) -> None:
    assert [r["step"] for r in one] == [r["step"] for r in two]
    for r1, r2 in zip(one, two):
        for k in keys:
            if k in r1:
                assert r2[k] == pytest.approx(r1[k], rel=rel, abs=1e-6), (r1["step"], k, r1[k], r2[k])


def written_once(out: Path, summary_lines: str) -> None:
    """One writer: metrics has one line per step, the summary is printed by one process."""
    rows = read_metrics(out)
    assert len(rows) == len({r["step"] for r in rows})
    assert sum(1 for line in summary_lines.splitlines() if line.startswith("{")) == 1
    assert json.loads((out / "summary.json").read_text())["processes"] == 2


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist-data")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    sft = root / "sft.jsonl"
    sft.write_text("".join(json.dumps({"prompt": PROMPTS[i % 4], "completion": TINY_TEXTS[i % 6]}) + "\n" for i in range(32)))
    polite, rude = TINY_TEXTS[0], TINY_TEXTS[2]
    pairs = root / "pairs.jsonl"
    pairs.write_text("".join(json.dumps({"prompt": f"{PROMPTS[i % 4]} #{i}", "chosen": polite if i % 3 else TINY_TEXTS[4],
                                         "rejected": rude if i % 2 else TINY_TEXTS[5]}) + "\n" for i in range(48)))
    return {"prompts": prompts, "sft": sft, "pairs": pairs, "root": root}


# --- shards ------------------------------------------------------------------------------------------

def as_rank(rank: int, world: int) -> Distributed:
    dist = Distributed("cpu")
    dist.rank, dist.world_size = rank, world
    return dist


@pytest.mark.parametrize("world", [2, 4])
def test_each_process_reads_a_disjoint_share_and_an_epoch_covers_every_example_once(world):
    """The shares the trainers take (Distributed.shard of each global batch): over an epoch of
    reward batches, SFT batches and PPO steps, every example is read by exactly one process once."""
    from rlhf.models.reward_model import Encoded
    from rlhf.train.ppo_loop import step_prompts
    from rlhf.train.reward import epoch_batches
    from rlhf.utils.seed import epoch_order

    encoded = [(Encoded(list(range(3 + i % 7)), None, False, False), Encoded(list(range(2 + i % 5)), None, False, False))
               for i in range(96)]
    reward_batches = epoch_batches(encoded, 16, seed=3, epoch=1)
    sft_order = epoch_order(96, seed=3, epoch=1)
    sft_batches = [sft_order[s:s + 16] for s in range(0, 96, 16)]
    for batches in (reward_batches, sft_batches):
        seen = [i for b in batches for r in range(world) for i in as_rank(r, world).shard(b)]
        assert sorted(seen) == list(range(96))  # nothing repeated, nothing lost
        for b in batches:
            shares = [set(as_rank(r, world).shard(b)) for r in range(world)]
            assert all(len(s) == 16 // world for s in shares) and set().union(*shares) == set(b)
    prompts = [f"p{i}" for i in range(24)]
    seen = [p for step in range(3) for r in range(world)
            for p in as_rank(r, world).shard(step_prompts(prompts, step, 8, seed=1))]
    assert sorted(seen) == sorted(prompts)
    with pytest.raises(Exception, match="does not split evenly over"):
        as_rank(0, world).shard(list(range(world + 1)))


@pytest.mark.parametrize("variable, kind", [("ACCELERATE_USE_FSDP", "FSDP"), ("ACCELERATE_USE_DEEPSPEED", "DeepSpeed")])
def test_a_sharded_engine_config_is_refused_before_training(monkeypatch, variable, kind):
    """`accelerate launch --config_file fsdp.yaml` (or a DeepSpeed one) sets these; on a CPU
    accelerate would silently fall back to DDP, so the refusal reads them, before any process group."""
    from rlhf.engine.distributed import sharded_engine_requested
    from rlhf.errors import ConfigError

    assert sharded_engine_requested({}) is None and sharded_engine_requested({variable: "false"}) is None
    assert sharded_engine_requested({variable: "True"}) == kind
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv(variable, "true")
    with pytest.raises(ConfigError, match=f"{kind} is not supported .*ddp.yaml"):
        Distributed("cpu")


def test_ppo_rollouts_differ_across_processes_and_match_one_process(tiny_model_dir):
    """Each process samples its share of the step with per-episode seeds: two processes draw
    different replies, and together exactly the replies one process draws for the whole batch."""
    from rlhf.engine.config import EngineConfig
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.train.ppo import PPOTrainer
    from rlhf.train.ppo_config import PPOConfig

    class Length:
        name, higher_is_better = "length", True

    cfg = PPOConfig(out="unused", policy=str(tiny_model_dir), batch_size=8, mini_batch_size=8, micro_batch_size=4,
                    max_new_tokens=10, engine=EngineConfig(device="cpu"))
    tok, policy, ref = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir), load_causal_lm(tiny_model_dir)
    batch = [PROMPTS[0]] * 8  # one prompt: any difference between shares comes from the sampling seeds
    texts = {}
    for rank, world in ((0, 1), (0, 2), (1, 2)):
        trainer = PPOTrainer(cfg, policy, tok, Length(), ref, dist=as_rank(rank, world))
        trainer.step = 5
        texts[rank, world] = trainer.generate(batch).texts
    assert texts[0, 2] != texts[1, 2]
    assert texts[0, 2] + texts[1, 2] == texts[0, 1]


# --- 1 process vs 2 processes --------------------------------------------------------------------------

@pytest.mark.slow
def test_reward_training_on_two_processes_equals_one(tiny_model_dir, data, tmp_path):
    from rlhf.engine.config import EngineConfig
    from rlhf.train.reward import RewardTrainConfig, train_reward_model

    args = dict(pairs=str(data["pairs"]), base=str(tiny_model_dir), val_fraction=0.25, epochs=2, batch_size=8, lr=1e-3,
                max_length=48, eval_every=2, seed=5, dropout=False)
    one = train_reward_model(RewardTrainConfig(out=str(tmp_path / "one"), **args,
                                               engine=EngineConfig(device="cpu", threads=1)))
    flags = [x for k, v in args.items() for x in
             ((f"--{k.replace('_', '-')}", str(v)) if not isinstance(v, bool) else (f"--{'' if v else 'no-'}{k}",))]
    res = launch(["reward", "train", "--out", str(tmp_path / "two"), "--device", "cpu", *flags])
    written_once(tmp_path / "two", res.stdout)
    two = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert two["steps"] == one["steps"] and two["best_val_accuracy"] == one["best_val_accuracy"]
    assert close(weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")) < 1e-5
    assert_same_metrics(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"),
                        ("loss", "accuracy", "margin", "grad_norm", "val_accuracy"))
    ckpts = sorted(p.name for p in (tmp_path / "two" / "checkpoints").iterdir())
    assert ckpts == sorted(p.name for p in (tmp_path / "one" / "checkpoints").iterdir())


@pytest.mark.slow
def test_sft_on_two_processes_equals_one(tiny_model_dir, data, tmp_path):
    from rlhf.engine.config import EngineConfig
    from rlhf.train.sft import SFTConfig, run_sft

    args = dict(data=str(data["sft"]), model=str(tiny_model_dir), batch_size=8, epochs=2, lr=1e-3, warmup_steps=2,
                save_every=3, grad_accum=2)
    one = run_sft(SFTConfig(out=str(tmp_path / "one"), **args, engine=EngineConfig(device="cpu", threads=1)))
    res = launch(["sft", "--out", str(tmp_path / "two"), "--device", "cpu",
                  *[x for k, v in args.items() for x in (f"--{k.replace('_', '-')}", str(v))]])
    written_once(tmp_path / "two", res.stdout)
    assert json.loads(res.stdout.strip().splitlines()[-1])["steps"] == one["steps"] == 8
    assert close(weights(tmp_path / "one" / "model"), weights(tmp_path / "two" / "model")) < 1e-5
    assert_same_metrics(read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two"), ("loss", "grad_norm", "lr"))


PPO_ARGS = dict(reward="length", max_steps=4, batch_size=8, mini_batch_size=8, micro_batch_size=2, ppo_epochs=2,
                max_new_tokens=8, lr=3e-3, save_every=2, keep_checkpoints=10, seed=3, missing_eos_penalty=0.0,
                init_kl_coef=0.05, target_kl=1.0, kl_horizon=64)


def ppo_flags(model_dir, prompts, out) -> list[str]:
    return ["ppo", "--policy", str(model_dir), "--prompts", str(prompts), "--out", str(out), "--device", "cpu",
            "--no-progress", *[x for k, v in PPO_ARGS.items() for x in (f"--{k.replace('_', '-')}", str(v))]]


@pytest.fixture(scope="module")
def ppo_two(tiny_model_dir, data, tmp_path_factory) -> Path:
    """An uninterrupted 2-process PPO run (the reference of the resume tests)."""
    out = tmp_path_factory.mktemp("ppo") / "two"
    res = launch(ppo_flags(tiny_model_dir, data["prompts"], out))
    written_once(out, res.stdout)
    return out


@pytest.mark.slow
def test_ppo_on_two_processes_equals_one(tiny_model_dir, data, ppo_two, tmp_path):
    """With the minibatch the whole batch, two processes sample the same episodes (per-episode seeds),
    whiten advantages over the global batch and average their gradients: the run is one process's."""
    from rlhf.engine.config import EngineConfig
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import run_ppo

    one = run_ppo(PPOConfig(out=str(tmp_path / "one"), policy=str(tiny_model_dir), prompts=str(data["prompts"]),
                            progress=False, engine=EngineConfig(device="cpu", threads=1), **PPO_ARGS))
    assert one["steps"] == 4
    assert close(weights(tmp_path / "one" / "model"), weights(ppo_two / "model")) < 1e-5
    assert_same_metrics(read_metrics(tmp_path / "one"), read_metrics(ppo_two),
                        ("score_mean", "kl", "beta", "response_length", "advantage_mean", "return_mean",
                         "policy_loss", "value_loss", "grad_norm", "entropy"), rel=1e-4)


@pytest.mark.slow
def test_ppo_resumes_under_two_processes(tiny_model_dir, data, ppo_two, tmp_path):
    resumed = tmp_path / "resumed"
    shutil.copytree(ppo_two / "checkpoints" / "step-00000002", resumed / "checkpoints" / "step-00000002")
    shutil.copy(ppo_two / "metrics.jsonl", resumed / "metrics.jsonl")  # as a killed run leaves it
    res = launch(ppo_flags(tiny_model_dir, data["prompts"], resumed))
    assert "resuming from" in res.stderr and res.stderr.count("resuming from") == 1
    a, b = weights(ppo_two / "model"), weights(resumed / "model")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    drop = ("time_", "episodes_per_second")
    strip = lambda rows: [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]  # noqa: E731
    assert strip(read_metrics(ppo_two)) == strip(read_metrics(resumed))


@pytest.mark.slow
def test_ppo_killed_mid_step_under_two_processes_resumes_to_the_same_result(tiny_model_dir, data, ppo_two, tmp_path):
    """SIGKILL the whole launch (launcher and both workers) once the step-2 checkpoint exists, i.e.
    during a later step; the same command again finishes with the uninterrupted run's weights."""
    out = tmp_path / "killed"
    args = ppo_flags(tiny_model_dir, data["prompts"], out)
    proc = launch(args, wait=False, log=tmp_path / "first.log")
    marker = out / "checkpoints" / "step-00000002" / "state.json"
    deadline = time.monotonic() + 600
    while not marker.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert marker.exists(), (tmp_path / "first.log").read_text()[-3000:]
    assert not (out / "summary.json").exists()  # it really died before the end
    res = launch(args)
    assert "resuming from" in res.stderr
    a, b = weights(ppo_two / "model"), weights(out / "model")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(out)] == [1, 2, 3, 4]
