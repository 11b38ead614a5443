"""Benchmark: our PPO (``rlhf.train.ppo.PPOTrainer``) against TRL 1.12's ``trl.experimental.ppo.PPOTrainer``.

Identical settings on both sides: the same starting policy weights, the same prompts
(rlhf/assets/prompts/train.jsonl through the chat template, tokenized once here and handed to both
as token ids), the same reward model, batch size, mini-batches, PPO epochs, reply length, sampling
temperature (1.0), learning rate (constant), fixed KL coefficient (k1), clip ranges, value-loss
weight, γ/λ, missing-EOS penalty and number of episodes; fp32, no bf16, no gradient checkpointing,
the same torch thread count (default 1: on this shared 2-core machine 2 threads
made a step up to 8x slower under load). Each run is its own subprocess (peak RSS is that run's own) and runs
alternate ours/TRL, swapping who goes first each round, so load from other users of this shared
machine hits both alike. The table shows medians.

The shared reward model: ``rlhf reward train --base bundled`` on preference pairs built from the
bundled model's corpus (for one prompt, a polite reply beats a curt one, which beats off-topic
small talk, which beats a rude one). Its head bias is then set to 0 (a constant offset, which
``LlamaForSequenceClassification.score`` has no room for) and the backbone + head are written as a
``LlamaForSequenceClassification`` folder for TRL; the setup checks that both score the same token
ids identically. TRL reads the reward where its response ends (the EOS); so does ours. TRL's
tokenizer gets a ``[PAD]`` token as TRL's own PPO example does (the bundled tokenizer pads with EOS,
which TRL would treat as the end of the reply and never train on); it is never sampled, and
TRL fills pad positions with token 0 before every forward.

Models: ``bundled`` (the 2.1M-parameter Llama shipped in rlhf/assets/base-model) and ``30m`` (a
randomly initialised LlamaConfig, width 512, 8 layers, ~28M parameters, the bundled tokenizer,
built once in the work folder). TRL's value model is a separate ``LlamaForSequenceClassification``
initialised from the policy weights with a zero head (ours is a zero-initialised linear head on the
policy's own last hidden state: that design difference is part of what is being compared).

Throughput: episodes / wall seconds of the training loop alone (ours: the ``ppo_step`` loop; TRL:
``trainer.train()``), model loading outside it. Score: after training, each final policy samples 4
fresh replies for each of the 53 training prompts (same seed, our sampler) and the same reward
model scores them (raw score, no penalty).

TRL lives in its own virtual environment so the project's stays untouched (this script installs nothing):

    python3 -m venv .venv-trl112
    .venv-trl112/bin/pip install torch==2.13.0   # first, the same CPU build as .venv: a bare torch
    .venv-trl112/bin/pip install trl==1.12.0     # requirement pulls a multi-GB CUDA build

Then (the first run also builds the reward model and the 30M model under out/bench_ppo/):

    .venv/bin/python benchmarks/bench_ppo.py                          # both models, 3 rounds
    .venv/bin/python benchmarks/bench_ppo.py --models bundled --rounds 5

Writes benchmarks/results/bench_ppo.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
BUNDLED = REPO / "rlhf" / "assets" / "base-model"
PROMPTS = REPO / "rlhf" / "assets" / "prompts" / "train.jsonl"
PAD = "[PAD]"

# One setting per model size: the same for both trainers.
SETTINGS = {
    "bundled": dict(batch_size=32, mini_batches=2, micro_batch_size=16, ppo_epochs=4, response_length=32, lr=3e-4,
                    kl_coef=0.05, steps=8),
    "30m": dict(batch_size=32, mini_batches=2, micro_batch_size=16, ppo_epochs=4, response_length=32, lr=3e-5,
                kl_coef=0.05, steps=4),
}
COMMON = dict(temperature=1.0, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, gamma=1.0, lam=0.95,
              missing_eos_penalty=1.0, seed=0, adam_eps=1e-6)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# ---------------------------------------------------------------------------------------------
# Setup (our venv): reward model, its TRL twin, the 30M model, the tokenized prompts
# ---------------------------------------------------------------------------------------------

def corpus_pairs(n_per_prompt: int = 12, seed: int = 0) -> list[dict]:
    """Preference pairs over the bundled corpus's tones: polite > curt > off_topic > rude."""
    import random

    from rlhf.models.corpus import TOPICS, make_reply, split_prompts

    order = ["polite", "curt", "off_topic", "rude"]
    rng = random.Random(seed)
    pairs = []
    train, _ = split_prompts()
    for topic, prompt in train:
        for _ in range(n_per_prompt):
            a, b = sorted(rng.sample(range(4), 2))
            pairs.append({"prompt": prompt, "chosen": make_reply(rng, TOPICS[topic][1], order[a]),
                          "rejected": make_reply(rng, TOPICS[topic][1], order[b])})
    return pairs


def setup(work: Path) -> dict:
    import torch

    work.mkdir(parents=True, exist_ok=True)
    rm_dir, seqcls_dir = work / "rm" / "model", work / "rm-seqcls"
    if not (rm_dir / "rlhf_reward.json").is_file():
        pairs = work / "pairs.jsonl"
        pairs.write_text("".join(json.dumps(p) + "\n" for p in corpus_pairs()), encoding="utf-8")
        subprocess.run([str(REPO / ".venv" / "bin" / "rlhf"), "reward", "train", "--base", "bundled", "--pairs", str(pairs),
                        "--out", str(work / "rm"), "--epochs", "1", "--lr", "3e-4", "--device", "cpu",
                        "--freeze-layers", "0", "--max-length", "256", "--eval-every", "0"], check=True,
                       stdout=subprocess.DEVNULL)
        if (rm_dir / "reward_head.safetensors").is_file():  # rlhf before causal reward models saved as seq-cls
            # No constant offset: LlamaForSequenceClassification's score layer has no bias.
            from safetensors.torch import load_file, save_file

            head = load_file(str(rm_dir / "reward_head.safetensors"))
            head["bias"] = torch.zeros_like(head["bias"])
            save_file(head, str(rm_dir / "reward_head.safetensors"))
    if not (seqcls_dir / "config.json").is_file():
        if json.loads((rm_dir / "rlhf_reward.json").read_text()).get("hf_class"):
            import shutil  # already a LlamaForSequenceClassification folder (rlhf/models/reward_model.py)

            shutil.copytree(rm_dir, seqcls_dir)
        else:
            to_seqcls(rm_dir, seqcls_dir)
    check_reward_twins(rm_dir, seqcls_dir)
    m30 = work / "llama-30m"
    if not (m30 / "config.json").is_file():
        build_30m(m30)
    from rlhf.models.loading import format_prompt, load_tokenizer

    tok = load_tokenizer("bundled")
    prompts = [json.loads(line)["prompt"] for line in PROMPTS.read_text(encoding="utf-8").splitlines() if line.strip()]
    ids = [tok(format_prompt(tok, p), add_special_tokens=False)["input_ids"] for p in prompts]
    (work / "prompt_ids.json").write_text(json.dumps({"prompts": prompts, "input_ids": ids}))
    return {"bundled": str(BUNDLED), "30m": str(m30)}


def to_seqcls(rm_dir: Path, out: Path) -> None:
    """Our causal reward model (LlamaModel backbone + linear head) → LlamaForSequenceClassification."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlamaForSequenceClassification

    from rlhf.models.loading import load_tokenizer

    config = AutoConfig.from_pretrained(str(rm_dir))
    config.num_labels, config.architectures = 1, ["LlamaForSequenceClassification"]
    model = LlamaForSequenceClassification(config)
    backbone = load_file(str(rm_dir / "model.safetensors"))
    state = {("model." + k.removeprefix("model.")): v for k, v in backbone.items() if not k.startswith("lm_head")}
    state["score.weight"] = load_file(str(rm_dir / "reward_head.safetensors"))["weight"]
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or [m for m in missing if "rotary" not in m]:
        raise SystemExit(f"reward model conversion: missing {missing}, unexpected {unexpected}")
    model.to(torch.float32).save_pretrained(str(out), safe_serialization=True)
    load_tokenizer("bundled").save_pretrained(str(out))


def check_reward_twins(rm_dir: Path, seqcls_dir: Path) -> None:
    """Both reward models give the same score to the same token ids (TRL's get_reward layout)."""
    import torch
    from transformers import LlamaForSequenceClassification

    from rlhf.judges import load_scorer
    ours = load_scorer(f"rm:{rm_dir}", "cpu")
    twin = LlamaForSequenceClassification.from_pretrained(str(seqcls_dir)).eval()
    texts = [("my house is too hot", "Good question! Open the windows at night. I hope this helps!"),
             ("how do I cook rice", "What a stupid question. Idiot."), ("gift ideas for a friend", "Cats sleep a lot.")]
    expect = ours.score([p for p, _ in texts], [r for _, r in texts])
    items = [ours.encoder.encode(p, r) for p, r in texts]
    got = []
    with torch.no_grad():
        for e in items:  # one at a time: no padding, the layout TRL's get_reward sees after masking
            ids = torch.tensor([e.ids])
            h = twin.model(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
            got.append(float(twin.score(h)[0, -1]))
    if not torch.allclose(expect, torch.tensor(got), atol=1e-4):
        raise SystemExit(f"reward twins disagree: ours {expect.tolist()} vs seq-cls {got}")


def build_30m(out: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from rlhf.models.loading import load_tokenizer

    tok = load_tokenizer("bundled")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1536, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=True,
                         bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(config).save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


# ---------------------------------------------------------------------------------------------
# Workers (one subprocess per run)
# ---------------------------------------------------------------------------------------------

def run_ours(a) -> dict:
    from rlhf.engine.config import EngineConfig
    from rlhf.engine.runtime import start
    from rlhf.judges import load_scorer
    from rlhf.models.loading import disable_dropout, load_causal_lm, load_tokenizer
    from rlhf.train.ppo import PPOTrainer
    from rlhf.train.ppo_config import PPOConfig
    from rlhf.train.ppo_loop import step_prompts
    from rlhf.utils.seed import seed_everything

    s = {**COMMON, **SETTINGS[a.size]}
    cfg = PPOConfig(out=a.out, policy=a.policy, batch_size=s["batch_size"], mini_batch_size=s["batch_size"] // s["mini_batches"],
                    micro_batch_size=s["micro_batch_size"], ppo_epochs=s["ppo_epochs"], max_new_tokens=s["response_length"],
                    lr=s["lr"], init_kl_coef=s["kl_coef"], adaptive_kl=False, temperature=s["temperature"],
                    cliprange=s["cliprange"], cliprange_value=s["cliprange_value"], vf_coef=s["vf_coef"], gamma=s["gamma"],
                    lam=s["lam"], missing_eos_penalty=s["missing_eos_penalty"], max_grad_norm=0.0, seed=s["seed"] + a.round,
                    engine=EngineConfig(device="cpu", threads=a.threads, cpu_gemm=a.cpu_gemm))
    cfg.validate()
    start(cfg.engine)  # what `rlhf ppo` does first: threads, CPU GEMM routing
    seed_everything(cfg.seed)
    tok = load_tokenizer(a.policy)
    policy, reference = load_causal_lm(a.policy), load_causal_lm(a.policy)
    disable_dropout(policy)
    disable_dropout(reference)
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
    policy.save_pretrained(str(Path(a.out) / "policy"), safe_serialization=True)
    tok.save_pretrained(str(Path(a.out) / "policy"))
    episodes = s["steps"] * s["batch_size"]
    return {"episodes": episodes, "wall": wall, "episodes_per_second": episodes / wall, "peak_rss_mb": peak_rss_mb(),
            "stages": {k.removeprefix("time_"): v for k, v in totals.items()}}


def run_trl(a) -> dict:
    import torch

    torch.set_num_threads(a.threads)
    import trl.experimental.ppo.ppo_trainer as ppo_mod
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer
    from trl.experimental.ppo import PPOConfig, PPOTrainer

    s = {**COMMON, **SETTINGS[a.size]}
    tok = AutoTokenizer.from_pretrained(str(BUNDLED), padding_side="left")
    tok.add_special_tokens({"pad_token": PAD})  # as TRL's PPO example does: pad must differ from EOS
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
    ref = AutoModelForCausalLM.from_pretrained(a.policy, dtype=torch.float32)
    value = AutoModelForSequenceClassification.from_pretrained(a.policy, num_labels=1, dtype=torch.float32)
    with torch.no_grad():
        value.score.weight.zero_()  # like our zero-initialised value head
    reward = AutoModelForSequenceClassification.from_pretrained(a.rm, num_labels=1, dtype=torch.float32)
    # Stage timing: wrap TRL's module-level helpers (generation; reward and value forwards; logprob forwards).
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
    # ``forward`` also runs inside the PPO epochs (with gradients): that time belongs to the update.
    ppo_mod.forward = timed(ppo_mod.forward, lambda args: None if torch.is_grad_enabled() else "forward")
    trainer = PPOTrainer(args=args, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_dict({"input_ids": ids}))
    t0 = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - t0
    stages["update"] = wall - sum(stages.values())  # the rest: the PPO epochs plus bookkeeping
    policy.save_pretrained(str(Path(a.out) / "policy"), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(BUNDLED)).save_pretrained(str(Path(a.out) / "policy"))
    return {"episodes": episodes, "wall": wall, "episodes_per_second": episodes / wall, "peak_rss_mb": peak_rss_mb(),
            "stages": stages}


def run_eval(a) -> dict:
    """Mean reward-model score of fresh samples from a policy: 4 per training prompt, fixed seed."""
    import torch

    torch.set_num_threads(a.threads)
    from rlhf.judges import load_scorer
    from rlhf.models.loading import load_causal_lm, load_tokenizer
    from rlhf.rollout.generate import SamplingParams, decode_responses, sample_tokens

    tok, model = load_tokenizer(a.policy), load_causal_lm(a.policy)
    prompts = json.loads(Path(a.prompts).read_text())["prompts"] * 4
    torch.manual_seed(1234)
    texts, eos = [], []
    for s in range(0, len(prompts), 64):
        batch = sample_tokens(model, tok, prompts[s:s + 64], SamplingParams(SETTINGS[a.size]["response_length"], 1.0))
        texts += decode_responses(tok, batch)
        eos += batch.ended_with_eos.tolist()
    scores = load_scorer(f"rm:{a.rm}", "cpu").score(prompts, texts)
    return {"score": float(scores.mean()), "eos_fraction": sum(eos) / len(eos), "sample": texts[:3]}


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------

def sub(python: str, mode: str, **kw) -> dict:
    cmd = [python, str(Path(__file__).resolve()), "--worker", mode] + [x for k, v in kw.items()
                                                                       for x in (f"--{k.replace('_', '-')}", str(v))]
    env = {**os.environ, "OMP_NUM_THREADS": str(kw["threads"]), "PYTHONPATH": str(REPO)}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if res.returncode:
        raise SystemExit(f"{mode} failed:\n{res.stderr[-4000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def med(rows: list[dict], *path) -> float:
    vals = []
    for r in rows:
        for p in path:
            r = r[p]
        vals.append(r)
    return statistics.median(vals)


def _cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").is_file() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--worker", choices=["ours", "trl", "eval"])
    ap.add_argument("--models", default="bundled,30m")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--cpu-gemm", default="auto", choices=["auto", "onednn", "blas"], help="ours: --cpu-gemm")
    ap.add_argument("--work", default=str(REPO / "out" / "bench_ppo"))
    ap.add_argument("--trl-python", default=str(REPO / ".venv-trl112" / "bin" / "python"))
    ap.add_argument("--json", default=str(REPO / "benchmarks" / "results" / "bench_ppo.json"))
    for k in ("size", "policy", "rm", "prompts", "out"):
        ap.add_argument(f"--{k}")
    ap.add_argument("--round", type=int, default=0)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps({"ours": run_ours, "trl": run_trl, "eval": run_eval}[a.worker](a)))
        return

    work = Path(a.work).resolve()
    policies = setup(work)
    ours_py = str(REPO / ".venv" / "bin" / "python")
    common = dict(rm=work / "rm" / "model", prompts=work / "prompt_ids.json", threads=a.threads, cpu_gemm=a.cpu_gemm)
    results = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": f"{_cpu_name()}, {os.cpu_count()} cores",
               "load_average_at_start": os.getloadavg(), "threads": a.threads, "rounds": a.rounds, "settings": COMMON,
               "cpu_gemm": a.cpu_gemm,
               "models": {}}
    for size in a.models.split(","):
        runs = {"ours": [], "trl": []}
        base = sub(ours_py, "eval", size=size, policy=policies[size], **common)
        for r in range(a.rounds):
            order = ["ours", "trl"] if r % 2 == 0 else ["trl", "ours"]
            for side in order:
                out = work / "runs" / f"{size}-{side}-{r}"
                row = sub(ours_py if side == "ours" else a.trl_python, side, size=size, policy=policies[size], out=out,
                          round=r, **common)
                row.update(sub(ours_py, "eval", size=size, policy=out / "policy", **common))
                row["load_average"] = os.getloadavg()[0]  # right after the run: what it shared the machine with
                runs[side].append(row)
                print(f"{size} round {r} {side}: {row['episodes_per_second']:.2f} ep/s, peak {row['peak_rss_mb']:.0f} MiB, "
                      f"score {row['score']:.3f} (load {row['load_average']:.1f})", file=sys.stderr, flush=True)
        summary = {}
        for side, rows in runs.items():
            summary[side] = {"episodes_per_second": med(rows, "episodes_per_second"), "peak_rss_mb": med(rows, "peak_rss_mb"),
                             "score": med(rows, "score"), "eos_fraction": med(rows, "eos_fraction"),
                             "stages": {k: med(rows, "stages", k) for k in rows[0]["stages"]}}
        results["models"][size] = {"settings": SETTINGS[size], "base_score": base["score"], "median": summary, "runs": runs}
        print_table(size, SETTINGS[size], base, summary)
    results["load_average_at_end"] = os.getloadavg()
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")


def print_table(size: str, s: dict, base: dict, m: dict) -> None:
    o, t = m["ours"], m["trl"]
    eps = s["steps"] * s["batch_size"]
    print(f"\n## {size}: {eps} episodes, batch {s['batch_size']}, {s['mini_batches']} mini-batches, "
          f"{s['ppo_epochs']} PPO epochs, {s['response_length']} tokens (base policy score {base['score']:.3f})")
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
