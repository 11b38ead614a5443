"""Shared fixtures: a tiny causal LM built from a transformers config (no hub access), real data paths."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"
HH_DIR = REPO.parent / "shared" / "data" / "hh-harmless"

TINY_TEXTS = [
    "Thank you for asking! Open the windows at night and close the curtains by day.",
    "Sure, here is a simple recipe: rinse the rice, add water, simmer for twenty minutes.",
    "That is a stupid question. Figure it out yourself.",
    "I like turtles and the colour blue.",
    "Great question! Try a short walk, a glass of water, and an early night.",
    "Whatever. I do not care about your problem.",
    "my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next",
] * 20


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from rlhf.models.tokenizer import train_tokenizer

    return train_tokenizer(TINY_TEXTS, vocab_size=320)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer) -> Path:
    """A 2-layer Llama (width 32) with a trained BPE tokenizer and chat template, saved in HF format."""
    from rlhf.models.architecture import ModelShape, new_causal_lm

    out = tmp_path_factory.mktemp("tiny-model")
    model = new_causal_lm(tiny_tokenizer, ModelShape(hidden_size=32, num_layers=2, num_heads=2,
                                                     intermediate_size=64, max_positions=256), seed=0)
    model.save_pretrained(str(out))
    tiny_tokenizer.save_pretrained(str(out))
    return out


def load_benchmark(name: str):
    """benchmarks/<name>.py imported as a module, its folder on sys.path for the imports it makes itself."""
    import importlib.util
    import sys

    folder = REPO / "benchmarks"
    if str(folder) not in sys.path:
        sys.path.insert(0, str(folder))
    spec = importlib.util.spec_from_file_location(name, folder / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


def hh_missing_reason(folder: Path) -> str:
    """Why a test that needs real human preference pairs skips, and where such pairs come from."""
    return (f"real human preference pairs not found at {folder}: these tests read train.jsonl.gz and "
            "validation.jsonl.gz of {chosen, rejected} dialogues taken from Anthropic's public hh-rlhf data, "
            "harmless-base subset (MIT licence; https://huggingface.co/datasets/Anthropic/hh-rlhf or "
            "https://github.com/anthropics/hh-rlhf), placed in ../shared/data/hh-harmless beside the repository")


@pytest.fixture(scope="session")
def hh_dir() -> Path:
    if not (HH_DIR / "train.jsonl.gz").is_file():
        pytest.skip(hh_missing_reason(HH_DIR))
    return HH_DIR


def safetensors_weights(folder: Path) -> dict:
    """Every tensor in a folder's safetensors files, keyed "file/name", for exact weight comparisons."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        out.update({f"{f.name}/{k}": v for k, v in load_file(str(f)).items()})
    return out


def artifacts() -> Path:
    """Where tests leave files for people to look at (screenshots): $RLHF_ARTIFACTS or artifacts/."""
    out = Path(os.environ.get("RLHF_ARTIFACTS", REPO / "artifacts"))
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture()
def browser():
    """Debian's headless Chromium driven by Playwright (``playwright install`` cannot download here)."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} missing: apt-get install -y chromium (make test does it when root)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                                                               "--disable-component-update", "--disable-sync", "--no-first-run"])
        yield b
        b.close()


@pytest.fixture(scope="session")
def postgres_server():
    """A throwaway PostgreSQL server for the session (initdb in a temporary folder, 127.0.0.1 only,
    a free port; rlhf/feedback/pg_local.py), or a skip that says what is missing."""
    from rlhf.feedback.pg_local import start_local_postgres, unavailable_reason

    reason = unavailable_reason()
    if reason:
        if os.environ.get("RLHF_REQUIRE_POSTGRES"):  # set by .ci/run: CI must run these, not skip them
            pytest.fail(f"RLHF_REQUIRE_POSTGRES is set but {reason}")
        pytest.skip(f"{reason} (make test installs it when root)")
    server = start_local_postgres(durable=False)
    yield server
    server.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def store_url(request, tmp_path):
    """A fresh, empty labeling database on each backend: a SQLite file, or a new PostgreSQL database."""
    if request.param == "sqlite":
        yield str(tmp_path / "labels.sqlite")
        return
    server = request.getfixturevalue("postgres_server")
    url = server.create_database()
    yield url
    server.drop_database(url)


# -- personalization (rlhf/personal): synthetic chat feedback from users with opposite tastes -------

KIND_REPLIES = ["Thank you for asking! Open the windows at night and close the curtains by day.",
                "Sure, here is a simple recipe: rinse the rice, add water, simmer for twenty minutes.",
                "Great question! Try a short walk, a glass of water, and an early night."]
MEAN_REPLIES = ["That is a stupid question. Figure it out yourself.", "Whatever. I do not care about your problem."]


def personal_feedback_records(users: dict[str, str], per_user: int, seed: int = 0, start_time: float = 1.0e9) -> list[dict]:
    """Feedback records: each user sees a kind and a mean reply in random order and picks by taste
    ("kind" or "mean"), with no noise. Times increase through the list, users interleaved."""
    import random

    rng = random.Random(seed)
    prompts = ["my house is too hot", "how do I cook rice", "I feel tired all the time", "what should I read next"]
    out, t = [], start_time
    for i in range(per_user):
        for user, taste in users.items():
            kind, mean = rng.choice(KIND_REPLIES), rng.choice(MEAN_REPLIES)
            replies = [kind, mean] if rng.random() < 0.5 else [mean, kind]
            choice = replies.index(kind if taste == "kind" else mean)
            t += 1.0
            out.append({"id": f"{user}-{i}", "user": user, "prompt": rng.choice(prompts), "replies": replies,
                        "choice": choice, "edit": None, "model_version": "test", "time": t})
    return out


@pytest.fixture(scope="session")
def personal_model_dir(tmp_path_factory, tiny_model_dir) -> Path:
    """A personal reward model on the tiny backbone, trained on users ann (kind) and bob (mean): the default
    user part (linear on pair+reply features of the frozen backbone, priors by cross-validation)."""
    import json

    from rlhf.engine.config import EngineConfig
    from rlhf.personal.train import PersonalTrainConfig, train_personal

    root = tmp_path_factory.mktemp("personal")
    feedback = root / "feedback.jsonl"
    feedback.write_text("".join(json.dumps(r) + "\n" for r in personal_feedback_records({"ann": "kind", "bob": "mean"}, 24)),
                        encoding="utf-8")
    cfg = PersonalTrainConfig(feedback=str(feedback), out=str(root / "prm"), base=str(tiny_model_dir), dim=4, epochs=4,
                              batch_size=8, lr=1e-3, head_lr=1e-2, max_length=48, seed=0,
                              engine=EngineConfig(device="cpu", threads=1))
    cfg.validate()
    train_personal(cfg)
    return root / "prm"
