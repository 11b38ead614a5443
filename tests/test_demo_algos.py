"""``rlhf demo --algo dpo|grpo`` on a tiny model: the same labels and prompts as PPO's recipe, each
algorithm's own training stage and evaluation, in one output folder."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import safetensors_weights as weights
from rlhf.demo import DemoConfig, run_demo
from rlhf.engine.config import EngineConfig
from rlhf.utils.metrics import read_metrics
from test_demo import PROMPTS


@pytest.fixture(scope="module")
def demos(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo-algos")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    runs = {}
    for algo in ("dpo", "grpo"):  # the second run reuses the first one's labels, pairs and reward model
        cfg = DemoConfig(out=str(root / "run"), policy=str(tiny_model_dir), prompts=str(prompts), eval_prompts=str(prompts),
                         num_completions=3, labelers=2, labeler_scorer="weighted:sentiment+length",
                         reward_base=str(tiny_model_dir), reward_epochs=2, reward_lr=1e-3, ppo_steps=3, ppo_batch_size=8,
                         watch_every=1, eval_samples=2, engine=EngineConfig(device="cpu", threads=1), kl_ceiling=1000.0, algo=algo)
        runs[algo] = (cfg, run_demo(cfg))
    return runs


def test_each_algorithm_trains_and_is_evaluated_on_the_same_labels(demos, tiny_model_dir):
    for algo, (cfg, summary) in demos.items():
        out = Path(cfg.out)
        assert summary["algo"] == algo and algo in summary["stage_seconds"]
        assert summary["paths"]["policy"] == str(out / algo / "model")
        assert summary["paths"]["eval"] == str(out / f"eval-{algo}")
        assert summary["final_kl"] is not None  # a sampled estimate: near 0 after a few tiny steps, either sign
        assert {"toxicity", "sentiment", "relevance"} <= set(summary["judges"])
        trained = weights(out / algo / "model")
        assert any(not torch.equal(a, b) for a, b in zip(trained.values(), weights(tiny_model_dir).values()))
        assert read_metrics(out / algo)
    dpo, grpo = demos["dpo"][1], demos["grpo"][1]
    assert dpo["ppo"]["score_first"] is None and dpo["ppo"]["reward"] is None   # DPO optimises no reward
    assert grpo["ppo"]["steps"] == 3 and grpo["ppo"]["reward"].startswith("weighted:")
    assert grpo["ppo"]["watch"]["best_gold_step"] is not None                 # the gold judge watched GRPO too
    # Both train the policy the demo's PPO would: a model other than `bundled` gets a LoRA adapter, and GRPO
    # samples at the demo's temperature and reply length with its learning rate.
    configs = {a: json.loads((Path(c.out) / a / "summary.json").read_text())["config"] for a, (c, _) in demos.items()}
    assert configs["dpo"]["lora"] is True and configs["dpo"]["lr"] == 3e-4
    assert configs["grpo"]["lora"] is True
    assert (configs["grpo"]["temperature"], configs["grpo"]["max_new_tokens"], configs["grpo"]["lr"]) == (0.7, 32, 3e-4)
    # One set of labels: the grpo run found the dpo run's labels, pairs and reward model and skipped them.
    assert dpo["paths"]["pairs"] == grpo["paths"]["pairs"]
    assert json.loads((Path(demos["grpo"][0].out) / "eval-grpo" / "eval.json").read_text())["models"]


def test_sft_on_preferred_completions_comes_before_rl_and_rl_starts_from_it(demos, tiny_model_dir, tmp_path):
    import dataclasses
    import shutil

    from rlhf.data.io import read_records
    from rlhf.errors import ConfigError

    cfg, _ = demos["grpo"]
    out = tmp_path / "run"
    shutil.copytree(cfg.out, out)  # the labels, pairs and reward model of the runs above
    # The copied GRPO stage was trained from the base model: a run that starts from the SFT model must not reuse it.
    with pytest.raises(ConfigError, match="use a new --out"):
        run_demo(dataclasses.replace(cfg, out=str(out), sft_preferred=True))
    summary = run_demo(dataclasses.replace(cfg, out=str(out), sft_preferred=True, algo="ppo"))
    with pytest.raises(ConfigError, match="--reward-extra differs"):  # nor one whose RL reward had other terms
        run_demo(dataclasses.replace(cfg, out=str(out), sft_preferred=True, algo="ppo", reward_extra="0.5*length"))
    preferred = read_records(out / "preferred.jsonl", "sft")
    ranked = {r.prompt: set(r.completions) for r in read_records(out / "rankings.jsonl", "rankings")}
    assert preferred and summary["sft"]["examples"] == len(preferred)
    assert all(e.completion in ranked[e.prompt] for e in preferred)  # one of the item's own ranked completions
    assert "sft" in summary["stage_seconds"]
    sft_model = out / "sft" / "model"
    assert any(not torch.equal(a, b) for a, b in zip(weights(sft_model).values(), weights(tiny_model_dir).values()))
    ppo_config = json.loads((out / "ppo" / "summary.json").read_text())["config"]
    assert ppo_config["policy"] == str(sft_model)  # RL starts from, and keeps its KL to, the SFT model
    assert "final KL from the starting model, SFT included" in (out / "report.html").read_text()
    ev = json.loads((out / "eval" / "eval.json").read_text())
    assert ev["config"]["model"] == [str(tiny_model_dir), str(out / "ppo" / "model")]  # judged against the starting model
