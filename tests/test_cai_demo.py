"""`rlhf demo --recipe cai` on a tiny model: every stage, base vs SL-CAI vs RL-CAI in the summary."""

import json
from pathlib import Path

import pytest

from rlhf.cai.recipe import CAIOptions, run_cai_demo
from rlhf.demo import DemoConfig
from rlhf.engine.config import EngineConfig
from rlhf.errors import ConfigError

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


def test_a_reviser_writes_the_chains_the_policy_is_fine_tuned_on(tiny_model_dir, tmp_path):
    """The bundled policy cannot critique itself (it is refused as a critic), but with --reviser another
    model writes the chains, as Bai et al. fine-tune a pretrained model on a helpful model's revisions."""
    from rlhf.cai.recipe import _revise
    from rlhf.engine.runtime import start

    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS[:2])))
    constitution = tmp_path / "c.yaml"
    constitution.write_text(CONSTITUTION)
    cfg = DemoConfig(out=str(tmp_path / "run"), policy="bundled", seed=0, engine=EngineConfig(device="cpu", threads=1))
    rt = start(cfg.engine, quiet=True)
    with pytest.raises(ConfigError, match="too small"):
        _revise(cfg, CAIOptions(constitution=str(constitution), revise_tokens=4), str(prompts), tmp_path / "self", rt)
    _revise(cfg, CAIOptions(constitution=str(constitution), revise_tokens=4, reviser=str(tiny_model_dir)), str(prompts),
            tmp_path / "rev", rt)
    summary = json.loads((tmp_path / "rev" / "summary.json").read_text())
    assert summary["model"] == str(tiny_model_dir) and summary["prompts"] == 2
    sft = [json.loads(line) for line in (tmp_path / "rev" / "sft.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in sft] == PROMPTS[:2]
