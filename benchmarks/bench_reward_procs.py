"""Benchmark: reward-model training on N processes × 1 thread against 1 process × N threads.

The same run both ways: ``rlhf reward train`` on the hh-harmless training pairs with the settings
of bench_reward_trl.py (all-MiniLM-L6-v2, 16 pairs a step, max length 128, lr 1e-4, dropout off,
no validation split) for ``--steps`` steps; once as one process with ``--threads N``, once under
``accelerate launch --config_file configs/accelerate/ddp.yaml --num_processes N`` with
``--threads 1`` (gloo; each process trains on 8 of the 16 pairs, gradients averaged). Runs
alternate (and swap who goes first each round) so that load from other users of the machine hits
both alike. Throughput is pairs/s of the training loop (summary.json of the main process);
accuracy is ``rlhf reward eval`` on the hh-harmless validation pairs afterwards.

    .venv/bin/python benchmarks/bench_reward_procs.py --data ../shared/data/hh-harmless --rounds 3

Writes benchmarks/results/bench_reward_procs.json.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return "unknown"


def run(variant: str, a, data: Path, work: Path) -> dict:
    out = work / f"{variant}-{time.monotonic_ns()}"
    processes = a.processes if variant == "processes" else 1
    threads = 1 if variant == "processes" else a.processes
    train = ["-m", "rlhf", "reward", "train", "--pairs", str(data / "train.jsonl.gz"), "--out", str(out),
             "--max-steps", str(a.steps), "--batch-size", "16", "--max-length", "128", "--lr", "1e-4", "--head-lr", "0",
             "--val-fraction", "0", "--skip-bad-pairs", "--no-dropout", "--no-resume", "--device", "cpu",
             "--threads", str(threads), "--cpu-gemm", a.cpu_gemm, "--seed", "0"]
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(REPO / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", str(processes),
               "--main_process_port", str(free_port()), *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": str(threads)}
    load = os.getloadavg()[0]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)  # `-m rlhf` imports from cwd first
    if proc.returncode:
        raise SystemExit(f"{variant} failed:\n{proc.stderr[-3000:]}")
    summary = json.loads((out / "summary.json").read_text())
    ev = subprocess.run([sys.executable, "-m", "rlhf", "reward", "eval", "--model", str(out / "model"), "--pairs",
                         str(data / "validation.jsonl.gz"), "--skip-bad-pairs", "--json", "--device", "cpu"],
                        capture_output=True, text=True, env=env, cwd=REPO)
    if ev.returncode:
        raise SystemExit(f"eval failed:\n{ev.stderr[-3000:]}")
    acc = json.loads(ev.stdout.strip().splitlines()[-1])["accuracy"]
    return {"pairs_per_second": summary["pairs_per_second"], "train_seconds": summary["seconds"],
            "val_accuracy": acc, "peak_rss_mb_main_process": summary["peak_rss_mb"], "processes": summary["processes"],
            "load_avg_1m_before": round(load, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "hh-harmless")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--processes", type=int, default=2, help="N: processes × 1 thread against 1 process × N threads")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--cpu-gemm", default="auto", choices=["auto", "onednn", "blas"])
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "bench_reward_procs.json"))
    a = ap.parse_args()
    if not (a.data / "train.jsonl.gz").is_file():
        print(f"hh-harmless not found at {a.data}", file=sys.stderr)
        return 2
    names = {"threads": f"1 process x {a.processes} threads", "processes": f"{a.processes} processes x 1 thread"}
    runs: dict[str, list[dict]] = {k: [] for k in names}
    with tempfile.TemporaryDirectory(prefix="bench-reward-procs-") as tmp:
        for r in range(a.rounds):
            for variant in (["threads", "processes"] if r % 2 == 0 else ["processes", "threads"]):
                res = run(variant, a, a.data, Path(tmp))
                runs[variant].append(res)
                print(f"round {r + 1} {names[variant]:<24} {res['pairs_per_second']:6.2f} pairs/s  val acc "
                      f"{res['val_accuracy']:.4f}  (load {res['load_avg_1m_before']} -> {res['load_avg_1m_after']})", flush=True)
    med = {k: {m: statistics.median(x[m] for x in v) for m in ("pairs_per_second", "val_accuracy", "peak_rss_mb_main_process")}
           for k, v in runs.items()}
    print(f"\n{cpu_name()}, {os.cpu_count()} cores, --cpu-gemm {a.cpu_gemm}; medians of {a.rounds} runs, {a.steps} steps x 16 pairs")
    print(f"| | pairs/s | val accuracy | peak RSS MiB (per process) |\n| --- | --- | --- | --- |")
    for k in names:
        print(f"| {names[k]} | {med[k]['pairs_per_second']:.2f} | {med[k]['val_accuracy']:.4f} | "
              f"{med[k]['peak_rss_mb_main_process']:.0f} |")
    ratio = med["processes"]["pairs_per_second"] / med["threads"]["pairs_per_second"]
    print(f"processes / threads: {ratio:.2f}x")
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
              "settings": {"steps": a.steps, "processes": a.processes, "rounds": a.rounds, "cpu_gemm": a.cpu_gemm},
              "runs": runs, "median": med, "ratio_processes_over_threads": round(ratio, 3)}
    Path(a.results).parent.mkdir(parents=True, exist_ok=True)
    Path(a.results).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {a.results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
