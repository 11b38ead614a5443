"""The whole loop on a tiny model (every stage, summary.json, the report in Chromium), and the
over-optimisation watch catching a deliberately exploitable proxy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import artifacts
from rlhf.demo import DemoConfig, run_demo
from rlhf.engine.config import EngineConfig
from rlhf.train.ppo_config import PPOConfig
from rlhf.train.ppo_loop import run_ppo
from rlhf.utils.metrics import read_metrics

PROMPTS = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next",
           "how can I sleep better", "my plant is dying"]


@pytest.fixture
def prompts_file(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    return path


@pytest.fixture(scope="module")
def tiny_demo(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    prompts = root / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"id": f"p{i}", "prompt": p}) + "\n" for i, p in enumerate(PROMPTS)))
    cfg = DemoConfig(out=str(root / "run"), policy=str(tiny_model_dir), prompts=str(prompts), eval_prompts=str(prompts),
                     num_completions=3, labelers=2, labeler_scorer="weighted:sentiment+length", reward_base=str(tiny_model_dir),
                     reward_epochs=2, reward_lr=1e-3, ppo_steps=3, ppo_batch_size=8, watch_every=1, eval_samples=2,
                     engine=EngineConfig(device="cpu"), kl_ceiling=1000.0)
    return cfg, run_demo(cfg)


def test_demo_runs_every_stage_and_writes_the_summary(tiny_demo):
    cfg, summary = tiny_demo
    on_disk = json.loads((Path(cfg.out) / "summary.json").read_text())
    assert on_disk["stage_seconds"] == summary["stage_seconds"]
    assert set(summary["stage_seconds"]) >= {"generate", "label", "pairs", "reward", "ppo", "eval", "report"}
    assert summary["scripted_labelers"] is True and summary["labeling"]["submitted"] == 2 * len(PROMPTS)
    assert 0.0 <= summary["reward_model"]["val_accuracy"] <= 1.0
    assert summary["ppo"]["steps"] == 3 and summary["ppo"]["stop_reason"] == "max_steps"
    assert summary["final_kl"] is not None
    for judge in ("toxicity", "sentiment", "relevance", "length", "repetition"):
        j = summary["judges"][judge]
        assert {"before", "after", "improvement_pct", "ci_separated"} <= set(j)
        assert j["before"]["ci95"][0] <= j["before"]["mean"] <= j["before"]["ci95"][1]
    rankings = [json.loads(ln) for ln in (Path(cfg.out) / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 2 * len(PROMPTS) and {r["labeler"] for r in rankings} == {"sim-1", "sim-2"}
    assert len(read_metrics(Path(cfg.out) / "ppo")) == 3


def test_demo_rerun_skips_finished_stages(tiny_demo):
    cfg, first = tiny_demo
    again = run_demo(cfg)
    assert again["stage_seconds"] == {**first["stage_seconds"], "report": again["stage_seconds"]["report"]}
    assert again["this_run_seconds"] < first["total_seconds"]  # every stage's outputs were complete
    assert again["judges"] == first["judges"]


@pytest.mark.browser
def test_report_renders_plots_and_tables_in_chromium(tiny_demo, browser):
    cfg, summary = tiny_demo
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"file://{summary['report']}")
    images = page.locator("img")
    assert images.count() >= 4  # score, gold, KL, β, length curves
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert all(w > 100 for w in widths), widths
    assert page.locator("table").count() >= 4
    assert page.locator("text=Before and after").count() == 1 and page.locator("text=Lineage").count() == 1
    page.screenshot(path=str(artifacts() / "demo-report.png"), full_page=True)


def test_watch_flags_an_exploitable_proxy_and_stops(tiny_model_dir, prompts_file, tmp_path):
    """Reward = reply length (exploitable); gold judge = shorter is better. The watch must flag and stop,
    and the final policy must be the best-gold one."""
    out = tmp_path / "hack"
    cfg = PPOConfig(out=str(out), policy=str(tiny_model_dir), reward="length", gold="weighted:-1*length",
                    prompts=str(prompts_file), max_steps=40, batch_size=8, mini_batch_size=8, micro_batch_size=8,
                    max_new_tokens=12, lr=3e-3, init_kl_coef=0.0, adaptive_kl=False, missing_eos_penalty=0.0,
                    watch_every=1, watch_patience=2, max_length_ratio=1.5, engine=EngineConfig(device="cpu"), seed=0,
                    progress=False)
    cfg.validate()
    summary = run_ppo(cfg)
    assert summary["stop_reason"] == "reward_hacking" and summary["steps"] < 40
    assert summary["watch"]["flags"], summary
    rows = read_metrics(out)
    assert rows[-1]["stop_reason"] == "reward_hacking" and "hacking_flag" in rows[-1]
    watch = json.loads((out / "watch.json").read_text())
    assert watch["flags"] == summary["watch"]["flags"] and len(watch["points"]) == summary["steps"]
    # The final model is the best-gold checkpoint, not the hacked last policy.
    from safetensors.torch import load_file

    best = load_file(str(out / "best-gold" / "model.safetensors"))
    final = load_file(str(out / "model" / "model.safetensors"))
    assert best.keys() == final.keys() and all((best[k] == final[k]).all() for k in best)
