"""`rlhf demo --recipe cai` on a tiny model: every stage, base vs SL-CAI vs RL-CAI in the summary."""

import json
from pathlib import Path

import pytest

from rlhf.cai.recipe import CAIOptions, run_cai_demo
from rlhf.demo import DemoConfig
from rlhf.engine.config import EngineConfig

PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next",
           "how can I sleep better", "my plant is dying"]
CONSTITUTION = """\
principles:
  - id: polite
    critique: Find rudeness.
    revision: Be polite.
    comparison: Which reply is more polite?
    evaluator: {scorer: non-toxicity, weight: 1}
critique_examples:
  - {prompt: hi, reply: go away, critique: rude, revision: hello there}
"""


@pytest.mark.slow
def test_cai_recipe_runs_every_stage(tiny_model_dir, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    constitution = tmp_path / "c.yaml"
    constitution.write_text(CONSTITUTION)
    cfg = DemoConfig(out=str(tmp_path / "run"), policy=str(tiny_model_dir), prompts=str(prompts), eval_prompts=str(prompts),
                     num_completions=4, reward_base=str(tiny_model_dir), reward_epochs=2, reward_lr=1e-3, ppo_steps=2,
                     ppo_batch_size=8, watch_every=1, eval_samples=2, kl_ceiling=1000.0,
                     labeler_scorer="weighted:sentiment+length", recipe="cai",
                     engine=EngineConfig(device="cpu", threads=1))
    opts = CAIOptions(constitution=str(constitution), feedback_model=str(tiny_model_dir), method="choice",
                      principles_per_pair=0, sl_stage="on", revise_tokens=6, sft_epochs=1)
    summary = run_cai_demo(cfg, opts)
    out = Path(cfg.out)
    assert set(summary["stage_seconds"]) == {"revise", "sft", "generate", "label", "pairs", "reward", "ppo", "eval"}
    assert summary["supervised_stage"] and summary["feedback_model"] == str(tiny_model_dir)
    for judge in ("toxicity", "relevance", "length"):
        assert set(summary["judges"][judge]) == {"base", "SL-CAI", "RL-CAI"}
    rankings = [json.loads(line) for line in (out / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == len(PROMPTS) and all(r["labeler"] == f"ai:{tiny_model_dir}" for r in rankings)
    reward = json.loads((out / "reward" / "summary.json").read_text())
    assert reward["soft_target_pairs"] > 0  # the reward model trained against the AI labeler's probabilities
    assert json.loads((out / "revise" / "summary.json").read_text())["prompts"] == len(PROMPTS)
    again = run_cai_demo(cfg, opts)  # a rerun skips every finished stage
    assert again["stage_seconds"] == summary["stage_seconds"] and again["judges"] == summary["judges"]
    assert summary["optimised_judges"] == ["toxicity", f"rm:{out / 'reward' / 'model'}"]
