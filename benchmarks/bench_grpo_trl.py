"""Benchmark: our GRPO (``rlhf.train.grpo.GRPOTrainer``) against TRL 1.16's ``GRPOTrainer`` on identical settings.

Same starting policy (the bundled 2.1M Llama, or the ~28M Llama that benchmarks/bench_ppo.py
builds), the same prompts (rlhf/assets/prompts/train.jsonl through the chat template: TRL gets the
formatted text, whose token ids are ours), the same reward — one Python callable on both sides, our
``rm:`` scorer over the reward model bench_ppo.py trains on the bundled corpus, so scoring costs and
returns the same — and the same group size, episodes per optimizer step, reply length, sampling
temperature, constant learning rate, β of the k3 KL in the loss (so both hold and run the reference),
clip ε, group-std scaling, token-level loss (TRL's ``dapo``), one pass per batch, clipping; fp32, no
gradient checkpointing, dropout off, no missing-EOS penalty (TRL has none), one torch thread. Each run
is its own subprocess (peak RSS is that run's own); runs alternate ours/TRL, swapping who goes first
each round; the table shows medians.

Throughput: episodes (replies) per second of the training loop alone (ours: the ``grpo_step`` loop;
TRL: ``train_runtime``), model loading outside it; CPU seconds of the same span beside it. Quality:
afterwards each final policy samples 4 fresh replies per training prompt with the same seed and the
reward model scores them (bench_ppo.py's eval worker, the same for both).

    .venv/bin/python benchmarks/bench_grpo_trl.py                     # both models, 3 rounds
    .venv/bin/python benchmarks/bench_grpo_trl.py --models bundled --rounds 1

Writes benchmarks/results/bench_grpo_trl.json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_ppo import _cpu_name, peak_rss_mb, setup  # noqa: E402  (the shared reward model, 30M model and prompts)

SETTINGS = {
    "bundled": dict(group_size=4, batch_size=32, micro_batch_size=16, response_length=32, lr=3e-4, kl_coef=0.04, steps=8),
    "30m": dict(group_size=4, batch_size=32, micro_batch_size=16, response_length=32, lr=3e-5, kl_coef=0.04, steps=4),
}
COMMON = dict(temperature=1.0, cliprange=0.2, seed=0)
# ours-blas: our trainer with every linear layer on torch's default BLAS instead of the oneDNN routing
# that rlhf/models/cpu_gemm.py picks on non-Intel CPUs (slower on CPUs without AVX-512, e.g. Zen 3).
SIDE_ENV = {"ours-blas": {"RLHF_CPU_GEMM": "blas"}}
KEYS = ("episodes_per_second", "episodes_per_cpu_second", "seconds", "cpu_seconds", "peak_rss_mb", "score", "eos_fraction")


def run_ours(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from rlhf.judges import load_scorer
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer
    from rlhf.engine.config import EngineConfig
    from rlhf.train.grpo import GRPOConfig, GRPOTrainer
    from rlhf.train.ppo_loop import step_prompts
    from rlhf.utils.seed import seed_everything

    s = {**COMMON, **SETTINGS[a.size]}
    cfg = GRPOConfig(out=a.out, policy=a.policy, group_size=s["group_size"], batch_size=s["batch_size"],
                     mini_batch_size=s["batch_size"], micro_batch_size=s["micro_batch_size"], ppo_epochs=1,
                     max_new_tokens=s["response_length"], temperature=s["temperature"], lr=s["lr"], kl_coef=s["kl_coef"],
                     kl_in="loss", loss_aggregation="token", cliprange=s["cliprange"], missing_eos_penalty=0.0,
                     seed=s["seed"] + a.round, engine=EngineConfig(device="cpu", threads=a.threads))
    cfg.validate()
    seed_everything(cfg.seed)
    tok = load_tokenizer(a.policy)
    policy, reference = load_causal_lm(a.policy), load_causal_lm(a.policy)
    disable_dropout(policy)
    disable_dropout(reference)
    trainer = GRPOTrainer(cfg, policy, tok, load_scorer(f"rm:{a.rm}", "cpu"), reference)
    prompts = json.loads(Path(a.prompts).read_text())["prompts"]
    totals: dict[str, float] = {}
    t0, c0 = time.perf_counter(), time.process_time()
    for step in range(s["steps"]):
        stats, _ = trainer.grpo_step(step_prompts(prompts, step, cfg.batch_size // cfg.group_size, cfg.seed))
        for k in ("time_generate", "time_score", "time_forward", "time_update"):
            totals[k] = totals.get(k, 0.0) + stats[k]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    policy.save_pretrained(str(Path(a.out) / "policy"), safe_serialization=True)
    tok.save_pretrained(str(Path(a.out) / "policy"))
    episodes = s["steps"] * s["batch_size"]
    return {"episodes": episodes, "seconds": wall, "cpu_seconds": cpu, "episodes_per_second": episodes / wall,
            "episodes_per_cpu_second": episodes / cpu, "peak_rss_mb": peak_rss_mb(),
            "stages": {k.removeprefix("time_"): v for k, v in totals.items()}}


def run_trl(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from rlhf.judges import load_scorer
    from rlhf.models.loading import format_prompt

    s = {**COMMON, **SETTINGS[a.size]}
    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    prompts = json.loads(Path(a.prompts).read_text())["prompts"]
    ds = Dataset.from_dict({"prompt": [format_prompt(tok, p) for p in prompts], "raw_prompt": prompts})
    scorer = load_scorer(f"rm:{a.rm}", "cpu")

    def reward(prompts, completions, raw_prompt, **kwargs):  # our scorer, as our trainer calls it
        return scorer.score(list(raw_prompt), [c.strip() for c in completions]).tolist()

    args = GRPOConfig(output_dir=a.out, per_device_train_batch_size=s["micro_batch_size"],
                      gradient_accumulation_steps=s["batch_size"] // s["micro_batch_size"], num_generations=s["group_size"],
                      max_completion_length=s["response_length"], temperature=s["temperature"], top_p=1.0, top_k=0,
                      learning_rate=s["lr"], lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0,
                      beta=s["kl_coef"], epsilon=s["cliprange"], num_iterations=1, loss_type="dapo", scale_rewards="group",
                      max_steps=s["steps"], bf16=False, fp16=False, gradient_checkpointing=False, use_cpu=True,
                      disable_dropout=True, report_to="none", save_strategy="no", logging_steps=1, seed=s["seed"] + a.round,
                      dataloader_num_workers=0, disable_tqdm=True, log_completions=False)
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    trainer = GRPOTrainer(model=policy, reward_funcs=[reward], args=args, train_dataset=ds, processing_class=tok)
    c0 = time.process_time()
    metrics = trainer.train().metrics
    cpu = time.process_time() - c0
    wall = float(metrics["train_runtime"])
    policy.save_pretrained(str(Path(a.out) / "policy"), safe_serialization=True)
    AutoTokenizer.from_pretrained(a.policy).save_pretrained(str(Path(a.out) / "policy"))
    episodes = trainer.state.global_step * s["batch_size"]
    return {"episodes": episodes, "seconds": wall, "cpu_seconds": cpu, "episodes_per_second": episodes / wall,
            "episodes_per_cpu_second": episodes / cpu, "peak_rss_mb": peak_rss_mb(), "stages": {}}


def sub(python: str, script: Path, mode: str, extra_env: dict | None = None, **kw) -> dict:
    cmd = [python, str(script), "--worker", mode] + [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(kw["threads"]), "PYTHONPATH": str(REPO), **(extra_env or {})}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ours", "trl"])
    ap.add_argument("--models", default="bundled,30m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sides", default="ours,trl", help="ours, trl, and ours-blas (ours with RLHF_CPU_GEMM=blas)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(REPO / "out" / "bench_grpo"))
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl" / "bin" / "python"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bench_grpo_trl.json"))
    for k in ("size", "policy", "rm", "prompts", "out"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps({"ours": run_ours, "trl": run_trl}[a.worker](a)))
        return

    work = Path(a.work).resolve()
    policies = setup(work)
    me, ppo_bench = Path(__file__).resolve(), REPO / "benchmarks" / "bench_ppo.py"
    common = dict(rm=work / "rm" / "model", prompts=work / "prompt_ids.json", threads=a.threads)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
               "load_average_at_start": os.getloadavg(), "threads": a.threads, "rounds": a.rounds, "settings": COMMON,
               "models": {}}
    for size in a.models.split(","):
        sides = a.sides.split(",")
        runs = {side: [] for side in sides}
        base = sub(sys.executable, ppo_bench, "eval", size=size, policy=policies[size], **common)
        for r in range(a.rounds):
            for side in sides[r % len(sides):] + sides[:r % len(sides)]:
                out = work / "runs" / f"{size}-{side}-{r}"
                python = a.trl_python if side == "trl" else sys.executable
                row = sub(python, me, "trl" if side == "trl" else "ours", SIDE_ENV.get(side), size=size, policy=policies[size],
                          out=out, round=r, **common)
                row.update(sub(sys.executable, ppo_bench, "eval", size=size, policy=out / "policy", **common))
                row["load_average"] = os.getloadavg()[0]
                runs[side].append(row)
                print(f"{size} round {r} {side}: {row['episodes_per_second']:.2f} ep/s ({row['episodes_per_cpu_second']:.2f} "
                      f"per CPU s), peak {row['peak_rss_mb']:.0f} MiB, score {row['score']:.3f} (load {row['load_average']:.1f})",
                      file=sys.stderr, flush=True)
        median = {side: {k: statistics.median(x[k] for x in rows) for k in KEYS} for side, rows in runs.items()}
        results["models"][size] = {"settings": SETTINGS[size], "base_score": base["score"], "median": median, "runs": runs}
        print_table(size, SETTINGS[size], base, median)
    results["trl_version"] = subprocess.run([a.trl_python, "-c", "import trl; print(trl.__version__)"], capture_output=True,
                                            text=True).stdout.strip()
    results["load_average_at_end"] = os.getloadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def print_table(size: str, s: dict, base: dict, m: dict) -> None:
    eps = s["steps"] * s["batch_size"]
    ours = [x for x in m if x != "trl"]
    print(f"\n## {size}: {eps} episodes, {s['batch_size'] // s['group_size']} prompts × G={s['group_size']} a step, "
          f"{s['response_length']} tokens, β {s['kl_coef']} (base policy score {base['score']:.3f})")
    print("| median | " + " | ".join(ours) + " | TRL 1.16 | " + " | ".join(f"{x}/TRL" for x in ours) + " |")
    print("| --- " * (2 * len(ours) + 2) + "|")
    for key in KEYS:
        t = m["trl"][key]
        print(f"| {key} | " + " | ".join(f"{m[x][key]:.3f}" for x in ours) + f" | {t:.3f} | "
              + " | ".join(f"{m[x][key] / t if t else float('nan'):.2f}" for x in ours) + " |")


if __name__ == "__main__":
    main()
