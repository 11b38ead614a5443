"""The whole loop on a tiny model (every stage, summary.json, the report in Chromium), and the
over-optimisation watch catching a deliberately exploitable proxy."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import artifacts
from rlhf.demo import DemoConfig, run_demo
from rlhf.errors import ConfigError
from rlhf.engine.config import EngineConfig
from rlhf.config import config_to_dict
from rlhf.demo import REAL_PEOPLE, judge_labels
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
    agreement = summary["reward_agreement"]  # the reward model against the labelers' preference, on each model's replies
    assert [(r["optimised"].startswith("rm:"), r["gold"], r["prompts"]) for r in agreement] == [
        (True, cfg.labeler_scorer, len(PROMPTS))] * 2
    assert all(r["pairs"] <= len(PROMPTS) for r in agreement)  # one pair per prompt at two samples
    assert agreement[0]["rate"] is not None  # the gold judge (sentiment + length) separates some pair
    assert "picks the same one of two replies to a prompt" in Path(summary["report"]).read_text()  # the verdict, in words
    for judge in ("toxicity", "sentiment", "relevance", "length", "repetition"):
        j = summary["judges"][judge]
        assert {"before", "after", "improvement_pct", "ci_separated"} <= set(j)
        assert j["before"]["ci95"][0] <= j["before"]["mean"] <= j["before"]["ci95"][1]
    rankings = [json.loads(ln) for ln in (Path(cfg.out) / "rankings.jsonl").read_text().splitlines()]
    assert len(rankings) == 2 * len(PROMPTS) and {r["labeler"] for r in rankings} == {"sim-1", "sim-2"}
    assert len(read_metrics(Path(cfg.out) / "ppo")) == 3


def test_demo_rerun_skips_finished_stages(tiny_demo, monkeypatch):
    cfg, first = tiny_demo
    monkeypatch.setattr("rlhf.utils.metrics.peak_rss_mb", lambda: 1.0)  # a rerun that only rewrites the summary is small
    again = run_demo(cfg)
    assert again["stage_seconds"] == {**first["stage_seconds"], "report": again["stage_seconds"]["report"]}
    assert again["this_run_seconds"] < first["total_seconds"]  # every stage's outputs were complete
    # ... and keeps the peak memory of the run that did the stages, as it keeps their seconds
    assert again["this_run_peak_rss_mb"] == 1 and again["peak_rss_mb"] == first["peak_rss_mb"] > 1
    assert again["judges"] == first["judges"]


@pytest.mark.browser
def test_report_renders_plots_and_tables_in_chromium(tiny_demo, browser):
    cfg, summary = tiny_demo
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    page.goto(f"file://{summary['report']}")
    images = page.locator("img")
    assert images.count() >= 4  # reward and gold, KL, β, length curves
    widths = page.eval_on_selector_all("img", "els => els.map(e => e.complete ? e.naturalWidth : 0)")
    assert all(w >= 800 for w in widths), widths
    assert page.locator("table").count() >= 4
    assert page.locator("text=Before and after").count() == 1 and page.locator("text=Lineage").count() == 1
    # the verdict opens the page: its heading and the independent judges' headline in the first screen
    verdict = page.get_by_role("heading", name="Verdict")
    assert verdict.bounding_box()["y"] < 200
    headline = page.locator(".headline")
    assert headline.inner_text().startswith("Independent judges, tuned against base model:")
    assert headline.bounding_box()["y"] < 900
    assert page.locator("text=Independent: never used in training").count() == 2  # in the verdict and the table
    page.screenshot(path=str(artifacts() / "report-top.png"))
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


# --- what the demo prints (issue 16) -------------------------------------------------------------

def _rlhf(args: list[str], cwd, **kw):
    """Run `rlhf ARGS` with this checkout's code, as a user runs a printed command."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent), "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "rlhf", *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=600, **kw)


def _copy_db(src: Path, dst: Path) -> None:
    with sqlite3.connect(src) as a, sqlite3.connect(dst) as b:
        a.backup(b)


def test_printed_real_people_commands_run_in_order_on_a_copy_of_the_demo_database(tiny_demo, tiny_model_dir, tmp_path):
    """Every line the demo prints for real people runs as printed, in order, on a copy of its database.

    Two additions only, each for the test's sake: `serve` gets a free --port (8000 may be taken
    here), and the last line, reward training, gets a tiny backbone and batch (this database holds
    six prompts; the demo's holds 53). A scripted person ranks at ann's link while the server runs.
    """
    cfg, _ = tiny_demo
    db = tmp_path / "labels.sqlite"
    _copy_db(Path(cfg.out) / "labels.sqlite", db)
    lines = [shlex.split(ln, comments=True) for ln in REAL_PEOPLE.format(db=db, completions=Path(cfg.out) / "completions.jsonl")
             .splitlines() if ln.strip().startswith("rlhf ")]
    assert [a[1:3] for a in lines] == [["label", "import"], ["label", "add-admin"], ["label", "add-labeler"],
                                       ["label", "serve"], ["label", "status"], ["label", "export"], ["reward", "train"]]
    links = {}
    for args in lines:
        if args[1:3] == ["label", "serve"]:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
            server = subprocess.Popen([sys.executable, "-m", "rlhf", *args[1:], "--port", str(port)], cwd=tmp_path, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            try:
                url = f"http://127.0.0.1:{port}"
                for _ in range(300):
                    try:
                        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                        break
                    except OSError:
                        time.sleep(0.1)
                token = links["ann"].split("#token=")[1]
                done = _rlhf(["label", "simulate", "--server", url, "--token", token, "--scorer", "length"], tmp_path)
                assert done.returncode == 0, done.stderr
                assert json.loads(done.stdout.splitlines()[-1])["ranked"] == len(PROMPTS)
            finally:
                server.send_signal(signal.SIGINT)  # Ctrl-C, as the printed comment says
                server.wait(timeout=30)
            continue
        if args[1:3] == ["reward", "train"]:
            args = [*args, "--base", str(tiny_model_dir), "--batch-size", "2", "--epochs", "1", "--val-fraction", "0",
                    "--freeze-layers", "0"]
        res = _rlhf(args[1:], tmp_path)
        assert res.returncode == 0, (args, res.stderr[-2000:])
        if args[2] in ("add-labeler", "add-admin"):
            links[args[3] if args[2] == "add-labeler" else "admin"] = res.stdout.strip().splitlines()[-1]
        if args[2] == "status":
            status = json.loads(res.stdout)
            assert status["campaign"]["name"] == "people" and status["labelers"][0]["done"] == len(PROMPTS)
    assert len((tmp_path / "rankings.jsonl").read_text().splitlines()) == len(PROMPTS)
    assert (tmp_path / "reward" / "model" / "rlhf_reward.json").is_file()


def test_demo_prints_its_results_once_aligned_without_library_bars_or_carriage_returns(tiny_demo, tmp_path):
    """The demo command into a log file (not a terminal), rerunning its eval stage, which loads four
    models and writes files: no transformers bars, no \\r redraws, the verdict once, aligned."""
    cfg, _ = tiny_demo
    out = tmp_path / "run"
    shutil.copytree(cfg.out, out)
    (out / "eval" / "eval.json").unlink()  # the eval stage runs again; the others are skipped
    conf = {**config_to_dict(cfg), "out": str(out)}
    (tmp_path / "demo.yaml").write_text(yaml.safe_dump(conf))
    res = _rlhf(["demo", "--config", str(tmp_path / "demo.yaml")], tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    err = res.stderr
    assert "Loading weights" not in err and "Writing model shards" not in err and "\r" not in err and "\x1b[" not in err
    assert "[eval 6/7] started" in err and "[reward] already done" in err
    labels = judge_labels(cfg, out / "reward" / "model")
    for judge in ("toxicity", "sentiment", "relevance", "repetition"):
        assert sum(ln.strip().startswith(labels[judge]) for ln in err.splitlines()) == 1, (judge, err)  # printed once
    assert err.count("Independent judges, tuned against base model") == 1
    assert "mean ± std" not in err  # the eval table went to eval/table.txt, not the terminal
    rows = [ln for ln in err.splitlines() if ln.startswith("    ") and "→" in ln]
    assert len(rows) == 7 and len({ln.index("→") for ln in rows}) == 1, "\n".join(rows)  # aligned, long names too
    assert err.count("rlhf label import") == 1 and "report: " in err
    assert "over-optimisation watch" in err


def test_reward_extra_terms_join_the_rl_reward_and_are_judged_as_optimised(monkeypatch, tmp_path):
    import rlhf.demo as demo_module

    monkeypatch.setattr(demo_module, "reward_scale", lambda reward_model, completions: 0.25)
    cfg = DemoConfig(reward_extra="5*relevance+-0.1*length+0.5")
    assert demo_module.rl_reward(cfg, tmp_path / "rm", tmp_path / "c.jsonl") == \
        f"weighted:0.25*rm:{tmp_path / 'rm'}+5*relevance+-0.1*length+0.5"
    assert demo_module.extra_reward_scorers(cfg.reward_extra) == ["relevance", "length"]  # the constant is no scorer
    assert demo_module.extra_reward_scorers("refusal") == ["refusal"] and demo_module.extra_reward_scorers("") == []
    assert demo_module.rl_reward(DemoConfig(), tmp_path / "rm", tmp_path / "c.jsonl") == f"weighted:0.25*rm:{tmp_path / 'rm'}"
    with pytest.raises(ConfigError, match="names no scorer"):  # checked before the first stage writes anything
        run_demo(DemoConfig(out=str(tmp_path / "run"), reward_extra="5*"))
    assert not (tmp_path / "run").exists()
