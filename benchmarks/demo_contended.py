"""Benchmark: `rlhf demo` while another CPU-bound process holds a core (issue 16).

    .venv/bin/python benchmarks/demo_contended.py --tree before=/path/to/old/checkout --tree after=.

Each `--tree NAME=PATH` is a checkout of this repository; its `rlhf demo` runs from that source
(`python -m rlhf` with PYTHONPATH=PATH, this venv's packages) with its own defaults, into a fresh
folder, while `--competitors` processes spin in pure Python (`while True: pass`, one core each) for
the whole run. Trees alternate, first to last, for `--rounds` rounds, so the machine's other load
hits them alike. Records per run: wall seconds, each stage's seconds (the demo's summary.json), peak
RSS of the demo process tree (GNU time), and the 1-minute load average before and after. A quiet
machine with one competitor reads about 3 (2 cores: the demo's threads plus the competitor).

Writes benchmarks/results/demo_contended.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def run_demo(tree: Path, out: Path, competitors: int) -> dict:
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(competitors)]
    try:
        time.sleep(2)  # let the competitors take their cores
        env = {**os.environ, "PYTHONPATH": str(tree), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
        cmd = ["/usr/bin/time", "-f", "%M", sys.executable, "-m", "rlhf", "demo", "--out", str(out)]
        load_before, t = os.getloadavg()[0], time.perf_counter()
        proc = subprocess.run(cmd, env=env, cwd=tree, capture_output=True, text=True)
        wall, load_after = time.perf_counter() - t, os.getloadavg()[0]
    finally:
        for s in spinners:
            s.kill()
            s.wait()
    if proc.returncode:
        raise SystemExit(f"rlhf demo from {tree} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    summary = json.loads((out / "summary.json").read_text())
    return {"wall_seconds": round(wall, 1), "stage_seconds": summary.get("stage_seconds"),
            "peak_rss_mib": round(peak_kib / 1024), "load_1m_before": round(load_before, 2),
            "load_1m_after": round(load_after, 2)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tree", action="append", required=True, help="NAME=PATH of a checkout (repeat)")
    ap.add_argument("--competitors", type=int, default=1, help="spinning processes during each run")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--work", default=None, help="where the demo runs go (default: a temporary folder, removed)")
    ap.add_argument("--results", default=str(REPO / "benchmarks" / "results" / "demo_contended.json"))
    args = ap.parse_args()
    trees = {}
    for spec in args.tree:
        name, sep, path = spec.partition("=")
        if not sep or not (Path(path) / "rlhf" / "__init__.py").is_file():
            raise SystemExit(f"--tree {spec!r}: expected NAME=PATH of an rlhf checkout")
        trees[name] = Path(path).resolve()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="demo-contended-"))
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    try:
        for r in range(args.rounds):
            for name, tree in trees.items():
                out = work / f"{name}-{r}"
                shutil.rmtree(out, ignore_errors=True)
                run = run_demo(tree, out, args.competitors)
                runs[name].append(run)
                print(f"round {r} {name}: {run['wall_seconds']:.0f} s, stages {run['stage_seconds']}, "
                      f"peak {run['peak_rss_mib']} MiB, load {run['load_1m_before']} -> {run['load_1m_after']}", flush=True)
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    stages = sorted({s for rs in runs.values() for r in rs for s in (r["stage_seconds"] or {})},
                    key=lambda s: ["generate", "label", "pairs", "reward", "ppo", "eval", "report"].index(s)
                    if s in ["generate", "label", "pairs", "reward", "ppo", "eval", "report"] else 99)
    print(f"\n| tree | wall s | {' | '.join(stages)} | peak MiB | load 1m before → after |")
    print("| --- | --- |" + " --- |" * len(stages) + " --- | --- |")
    for name, rs in runs.items():
        for r in rs:
            cells = " | ".join(f"{(r['stage_seconds'] or {}).get(s, 0):.0f}" for s in stages)
            print(f"| {name} | {r['wall_seconds']:.0f} | {cells} | {r['peak_rss_mib']} | "
                  f"{r['load_1m_before']} → {r['load_1m_after']} |")
    payload = {"cpu": cpu_name(), "cores": os.cpu_count(), "competitors": args.competitors,
               "trees": {n: str(p) for n, p in trees.items()}, "runs": runs,
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    tmp = results.with_name(f".{results.name}.{os.getpid()}.tmp")  # written whole or not at all
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, results)
    print(f"\nwrote {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
