"""Constitutional AI on a real model: base vs SL-CAI vs RL-CAI on held-out harmful requests, per seed.

    python benchmarks/cai_study.py prepare --out DIR
        prompt files from ../shared/data/hh-harmless: the first human turn of each dialogue (a
        standalone harmful request), train split for the stages, validation split held out;
    python benchmarks/cai_study.py seed --out DIR --seed S --model M --hh-judge RMDIR [--calibration FILE]
        one seed of `rlhf demo --recipe cai` (rlhf/cai/recipe.py) on those prompts, resumable;
    python benchmarks/cai_study.py last --out DIR --seed S
        the seed's last PPO checkpoint judged with the seed's own evaluation settings, for runs
        the over-optimisation watch stopped (they publish the best-gold checkpoint instead): what
        the policy had become when it was stopped; written to DIR/seed-S/eval-last;
    python benchmarks/cai_study.py report --out DIR
        every finished seed: each judge's mean and 95% CI per model, whether RL-CAI beats base with
        separated CIs; JSON to benchmarks/results/cai_study.json (or --results). The first ten
        critique/revision chains go to DIR/first_ten_chains.jsonl; the results JSON keeps them
        without the prompts' text, which is hh-harmless data and stays out of the repository.

The hh-harmless data never enters the repository: prompts and runs live under --out.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
# ../shared from the project root (a worktree one level deeper finds it one level up).
HH = next((d for d in (REPO.parent / "shared" / "data" / "hh-harmless", REPO.parent.parent / "shared" / "data" / "hh-harmless")
           if d.is_dir()), REPO.parent / "shared" / "data" / "hh-harmless")
RESULTS = REPO / "benchmarks" / "results"

# Which way is better for each judge, and which judges are not independent of what was optimised.
HIGHER_IS_BETTER = {"toxicity": False, "repetition": False}


def first_human_turn(dialogue: str) -> str:
    return dialogue.split("Human:", 1)[1].split("\n\nAssistant:", 1)[0].strip()


def prepare(out: Path, train_prompts: int) -> None:
    from rlhf.utils.io import atomic_write_text

    out.mkdir(parents=True, exist_ok=True)
    for split, name, limit in (("train", "prompts-train.jsonl", train_prompts), ("validation", "prompts-heldout.jsonl", 0)):
        seen, rows = set(), []
        with gzip.open(HH / f"{split}.jsonl.gz", "rt", encoding="utf-8") as fh:
            for line in fh:
                prompt = first_human_turn(json.loads(line)["chosen"])
                if prompt and prompt not in seen:
                    seen.add(prompt)
                    rows.append({"id": f"{split}-{len(rows)}", "prompt": prompt})
        rows = rows[:limit] if limit else rows
        atomic_write_text(out / name, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))  # seeds may run at once
        print(f"{out / name}: {len(rows)} prompts")


def run_seed(args) -> None:
    from rlhf.cai.recipe import CAIOptions, run_cai_demo
    from rlhf.demo import DemoConfig
    from rlhf.engine.config import EngineConfig
    from rlhf.models.loading import BUNDLED_NAMES
    from rlhf.models.named import DEMO_DEFAULTS

    out = Path(args.out)
    heldout = out / "prompts-heldout.jsonl"
    if args.heldout_limit:
        lines = heldout.read_text(encoding="utf-8").splitlines(keepends=True)[: args.heldout_limit]
        heldout = out / f"prompts-heldout-{args.heldout_limit}.jsonl"
        heldout.write_text("".join(lines), encoding="utf-8")
    # What the demo uses for this model (rlhf/models/named.py) wherever the command line is silent:
    # the bundled model trains in full at temperature 1.0, a real model trains a LoRA adapter at 0.7.
    suits = DEMO_DEFAULTS["bundled" if args.model in BUNDLED_NAMES else "other"]
    pick = lambda given, key: suits[key] if given is None else given  # noqa: E731
    cfg = DemoConfig(out=str(out / f"seed-{args.seed}"), policy=args.model, prompts=str(out / "prompts-train.jsonl"),
                     eval_prompts=str(heldout), num_completions=args.completions, reward_epochs=3,
                     ppo_steps=args.ppo_steps, ppo_batch_size=args.ppo_batch, ppo_lr=args.ppo_lr, eval_samples=args.eval_samples,
                     seed=args.seed, recipe="cai", engine=EngineConfig(device="cpu", threads=args.threads))
    method = {"method": args.method} if args.method else {}  # unset: the recipe's default labeler
    opts = CAIOptions(feedback_model=args.feedback_model or args.model, **method,
                      principles_per_pair=args.principles_per_pair, sl_stage="on", revise_tokens=args.revise_tokens,
                      calibration=args.calibration, extra_judges=[f"rm:{args.hh_judge}", *args.judge], revise_limit=args.revise_limit,
                      revise_rounds=args.revise_rounds, reviser=args.reviser, lora=pick(args.lora, "lora"),
                      temperature=pick(args.temperature, "temperature"), reply_tokens=pick(args.reply_tokens, "reply_tokens"),
                      ppo_epochs=pick(args.ppo_epochs, "ppo_epochs"))
    summary = run_cai_demo(cfg, opts)
    print(json.dumps(summary["judges"], indent=1))


def beats(judge: str, base_ci: list[float], other_ci: list[float]) -> tuple[bool, bool]:
    """(better, worse) than base with separated 95% intervals, in the judge's direction."""
    up, down = base_ci[1] < other_ci[0], other_ci[1] < base_ci[0]
    return (up, down) if HIGHER_IS_BETTER.get(judge, True) else (down, up)


def report(out: Path, results: Path = RESULTS / "cai_study.json") -> dict:
    seeds = sorted(out.glob("seed-*/summary.json"))
    if not seeds:
        raise SystemExit(f"no finished seed under {out}")
    per_seed = {}
    for path in seeds:
        s = json.loads(path.read_text())
        seed = path.parent.name
        rows = {}
        for judge, by_model in s["judges"].items():
            separated, worse = beats(judge, by_model["base"]["ci95"], by_model["RL-CAI"]["ci95"])
            rows[judge] = {**by_model, "rl_beats_base_separated": separated, "rl_worse_separated": worse,
                           "optimised": judge in s.get("optimised_judges", [])}
        per_seed[seed] = {"judges": rows, "stage_seconds": s["stage_seconds"], "labeling": s["labeling"]}
    chains_file = out / "seed-0" / "revise" / "chains.jsonl"
    chains = [json.loads(line) for line in chains_file.read_text().splitlines()[:10]] if chains_file.is_file() else []
    # The prompts are hh-harmless data: the repository's copy names them by id only.
    result = {"seeds": per_seed, "first_ten_chains": [{k: v for k, v in c.items() if k != "prompt"} for c in chains]}
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(result, indent=1, ensure_ascii=False) + "\n")
    # The first ten chains as written, one a line, for the closing note (not chosen by hand).
    (out / "first_ten_chains.jsonl").write_text("".join(json.dumps(c, ensure_ascii=False) + "\n" for c in chains))
    for seed, data in per_seed.items():
        print(f"\n{seed}")
        for judge, r in data["judges"].items():
            cells = "  ".join(f"{m} {r[m]['mean']:.3f} [{r[m]['ci95'][0]:.3f}, {r[m]['ci95'][1]:.3f}]"
                              for m in ("base", "SL-CAI", "RL-CAI") if m in r)
            tag = " (optimised)" if r["optimised"] else ""
            print(f"  {judge[:40] + tag:<52} {cells}  RL>base sep: {r['rl_beats_base_separated']}")
    return result


def eval_last(out: Path, seed: int) -> None:
    from rlhf.engine.config import EngineConfig
    from rlhf.eval.commands import EvalConfig, run_eval

    seed_dir = out / f"seed-{seed}"
    cfg = json.loads((seed_dir / "eval" / "eval.json").read_text())["config"]
    last = sorted((seed_dir / "ppo" / "checkpoints").glob("step-*"))[-1]
    model = last / "model"
    if not (model / "config.json").is_file():  # a LoRA adapter on the PPO start (the SL-CAI model): merge it
        import torch
        from peft import PeftModel
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from rlhf.train.ppo_loop import _publish_policy  # what PPO publishes its LoRA policy with

        start, model = seed_dir / "sl" / "model", seed_dir / f"last-{last.name}"
        if not (model / "config.json").is_file():
            policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(start, dtype=torch.float32), last / "model")
            _publish_policy(policy, AutoTokenizer.from_pretrained(start), model)
    cfg.update(out=str(seed_dir / "eval-last"), model=[str(model)], engine=EngineConfig(**cfg["engine"]))
    ecfg = EvalConfig(**cfg)
    ecfg.validate()
    run_eval(ecfg)
    base = json.loads((seed_dir / "summary.json").read_text())["judges"]
    for r in json.loads((seed_dir / "eval-last" / "eval.json").read_text())["table"]:
        b = base[r["judge"]]["base"]
        better, worse = beats(r["judge"], b["ci95"], [r["ci_low"], r["ci_high"]])
        verdict = "better" if better else "worse" if worse else "overlap"
        if r["judge"] == "length":  # a drift signal, neither better nor worse
            verdict = "longer" if better else "shorter" if worse else "overlap"
        print(f"  {r['judge'][:50]:<52} base {b['mean']:.3f} -> {last.name} {r['mean']:.3f} "
              f"[{r['ci_low']:.3f}, {r['ci_high']:.3f}] {verdict}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare")
    p.add_argument("--out", required=True)
    p.add_argument("--train-prompts", type=int, default=96)
    s = sub.add_parser("seed")
    s.add_argument("--out", required=True)
    s.add_argument("--seed", type=int, required=True)
    s.add_argument("--model", required=True, help="policy (and by default feedback model): smollm2 or a folder")
    s.add_argument("--feedback-model", default="")
    s.add_argument("--hh-judge", required=True, help="reward model trained on the human hh-harmless pairs")
    s.add_argument("--calibration", default="")
    s.add_argument("--method", default="", help="how the feedback model is asked (default: the recipe's, likelihood)")
    s.add_argument("--principles-per-pair", type=int, default=2)
    s.add_argument("--completions", type=int, default=2,
                   help="replies sampled per training prompt for the AI labeler to rank (K; K(K-1)/2 pairs each)")
    s.add_argument("--revise-tokens", type=int, default=64)
    s.add_argument("--revise-limit", type=int, default=0)
    s.add_argument("--reviser", default="", help="model that writes the critique-revision chains (default: the policy)")
    s.add_argument("--ppo-steps", type=int, default=None, help="default: what the demo uses for this model")
    s.add_argument("--ppo-batch", type=int, default=None)
    s.add_argument("--ppo-lr", type=float, default=None, help="PPO learning rate (of the LoRA adapter with --lora)")
    s.add_argument("--ppo-epochs", type=int, default=None)
    s.add_argument("--lora", action=argparse.BooleanOptionalAction, default=None)
    s.add_argument("--temperature", type=float, default=None)
    s.add_argument("--reply-tokens", type=int, default=None)
    s.add_argument("--heldout-limit", type=int, default=0, help="judge on the first N held-out prompts (0 = all)")
    s.add_argument("--revise-rounds", type=int, default=1)
    s.add_argument("--eval-samples", type=int, default=None)
    s.add_argument("--threads", type=int, default=1)
    s.add_argument("--judge", action="append", default=[],
                   help="another judge (scorer spec, repeat), e.g. refusal; one the constitution uses is reported as optimised")
    last = sub.add_parser("last")
    last.add_argument("--out", required=True)
    last.add_argument("--seed", type=int, required=True)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--results", default=str(RESULTS / "cai_study.json"), help="where the JSON goes")
    args = ap.parse_args()
    if args.cmd == "prepare":
        prepare(Path(args.out), args.train_prompts)
    elif args.cmd == "seed":
        run_seed(args)
    elif args.cmd == "last":
        eval_last(Path(args.out), args.seed)
    else:
        report(Path(args.out), Path(args.results))


if __name__ == "__main__":
    main()
