"""The agent recipe's measurements: exact match without retrieval, with plain RAG, with ReAct before
and after RL (95% CIs, single- and two-hop apart), tool-call validity and turns, recall@3 of BM25,
dense and hybrid ranking, and the first five held-out transcripts.

    python benchmarks/bench_agent.py --out runs/agent-bench [--threads 1] [--rl-steps 30] [--sft-epochs 3]
    python benchmarks/bench_agent.py --policy smollm2 --out runs/agent-smollm2 --results agent_smollm2.json

Runs ``rlhf demo --recipe agent`` (index → SFT → RL over episodes → evaluation; a rerun skips
finished stages), prints the table and writes benchmarks/results/agent.json.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import time
from pathlib import Path

from rlhf.agents.demo import AgentDemoConfig, run_agent_demo, summary_markdown
from rlhf.engine.config import EngineConfig
from rlhf.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True, check=False).stdout
        return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), platform.processor())
    except OSError:
        return platform.processor()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/agent-bench")
    ap.add_argument("--policy", default="bundled")
    ap.add_argument("--threads", type=int, default=1, help="CPU threads (the engine's --threads; 0 = auto)")
    ap.add_argument("--device", default="cpu", help="the engine's --device")
    ap.add_argument("--sft-epochs", type=float, default=None, help="default: what suits --policy (rlhf agent demo --help)")
    ap.add_argument("--rl-steps", type=int, default=None, help="default: what suits --policy")
    ap.add_argument("--eval-limit", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--results", default="agent.json", help="file name under benchmarks/results/")
    args = ap.parse_args()
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    summary = run_agent_demo(AgentDemoConfig(out=args.out, policy=args.policy, sft_epochs=args.sft_epochs,
                                             rl_steps=args.rl_steps, eval_limit=args.eval_limit, seed=args.seed,
                                             engine=EngineConfig(device=args.device, threads=args.threads)))
    table = summary_markdown(summary)
    print(table)
    atomic_write_json(RESULTS / args.results, {**summary, "command": vars(args), "cpu": cpu_model(),
                                               "load_average_before": load_before, "load_average_after": os.getloadavg(),
                                               "seconds": round(time.perf_counter() - t0, 1)})


if __name__ == "__main__":
    main()
