"""The demo's training stage done by DPO or GRPO instead of PPO (``rlhf demo --algo dpo|grpo``).

Both start from the same labels and prompts as the PPO recipe, so the three can be compared on the
demo's evaluation (the same judges, prompts and seeds):

* ``dpo`` trains the policy straight on the demo's preference pairs (the labelers' rankings of the
  base model's own completions); no reward model is involved.
* ``grpo`` optimises the demo's reward model, scaled to unit spread as PPO's is, with G replies per
  prompt, the KL to the reference in the loss, the same KL ceiling and the same gold-judge watch.

Each writes ``summary.json`` with the keys the demo's summary reads from PPO's (steps, stop reason,
scores and KL where the method has them, None where it has not: DPO samples nothing while training).
"""

from __future__ import annotations

import json
from pathlib import Path

from rlhf.train.dpo import DPOConfig, run_dpo
from rlhf.train.grpo import GRPOConfig, run_grpo
from rlhf.train.reward import read_pairs
from rlhf.utils.io import atomic_write_json

ALGOS = ("ppo", "dpo", "grpo")
# What the demo's summary reads from its training stage (rlhf/demo.py: _summarise).
DEMO_KEYS = ("steps", "stop_reason", "score_first", "score_last", "kl_last", "episodes_per_second", "stage_share", "watch")
# The recipes' own settings. The demo's options cover what they share with PPO: the policy (LoRA or all
# weights, as --lora and the model's defaults say), steps, batch, learning rate (GRPO), reply length and
# temperature (GRPO), KL ceiling, watch, seed. For other settings run ``rlhf dpo`` / ``rlhf grpo`` on the
# demo's files.
DPO_RECIPE = dict(loss="sigmoid", beta=0.1, epochs=3.0, batch_size=16, val_fraction=0.15)
# DPO's learning rate: 1e-4 for all weights; an adapter needs a larger one. 3e-4 is the rate at which
# per-user DPO adapters on the bundled model moved their policy without breaking it (1e-3 gave word
# salad; benchmarks/RESULTS.md, personalization, session 8).
DPO_LR = {"full": 1e-4, "lora": 3e-4}
GRPO_RECIPE = dict(group_size=4, ppo_epochs=2, kl_coef=0.05, kl_in="loss", estimator="grpo")


def dpo_stage(cfg, pairs: Path, out: Path) -> dict:
    """DPO on the demo's pairs (``cfg`` is the demo's DemoConfig). Prompts are held out for validation
    when there are enough of them to leave some on both sides."""
    prompts = {p.prompt for p in read_pairs(str(pairs), skip_bad=True)[0]}
    recipe = {**DPO_RECIPE, "val_fraction": DPO_RECIPE["val_fraction"] if len(prompts) >= 20 else 0.0}
    dcfg = DPOConfig(pairs=str(pairs), out=str(out), policy=cfg.policy, **recipe, lora=bool(cfg.lora),
                     lr=DPO_LR["lora" if cfg.lora else "full"], skip_bad_pairs=True, seed=cfg.seed, engine=cfg.engine,
                     save_every=50)
    dcfg.validate()
    summary = run_dpo(dcfg)
    return _with_demo_keys(out, summary)


def grpo_stage(cfg, prompts: str, reward: str, out: Path) -> dict:
    """GRPO against ``reward`` (the demo's scaled reward-model spec), watched by the labelers' preference.
    It samples and learns as the demo's PPO would (policy kind, learning rate, reply length, temperature)."""
    gcfg = GRPOConfig(out=str(out), policy=cfg.policy, reward=reward, prompts=prompts, **GRPO_RECIPE, max_steps=cfg.ppo_steps,
                      lora=bool(cfg.lora), lr=cfg.ppo_lr, max_new_tokens=cfg.reply_tokens, temperature=cfg.temperature,
                      batch_size=cfg.ppo_batch_size, mini_batch_size=min(16, cfg.ppo_batch_size),
                      micro_batch_size=min(16, cfg.ppo_batch_size), kl_ceiling=cfg.kl_ceiling,
                      score_threshold=cfg.score_threshold, gold=cfg.labeler_scorer, watch_every=cfg.watch_every,
                      seed=cfg.seed, engine=cfg.engine)
    gcfg.validate()
    return _with_demo_keys(out, run_grpo(gcfg))


def _with_demo_keys(out: Path, summary: dict) -> dict:
    """Add the keys the demo reads that this method does not produce (as None), and write the summary back."""
    on_disk = json.loads((out / "summary.json").read_text())
    for key in DEMO_KEYS:
        on_disk.setdefault(key, {} if key == "stage_share" else None)
    atomic_write_json(out / "summary.json", on_disk)
    return {**summary, **{k: on_disk[k] for k in DEMO_KEYS}}
