"""Scripted chat users with conflicting tastes, for experiments: they talk to the chat API over HTTP.

A scripted user has a taste, a scorer spec whose score is their utility (their *gold* preference),
and picks between the two replies the way ``rlhf label simulate``'s labelers rank: by utility plus
Gaussian (Thurstone) noise σ drawn afresh per turn (``rlhf.feedback.simulate.noisy_ranking``). The
tastes come in opposite pairs, so one reward for everyone cannot serve both sides of a pair:

    concise  ↔ detailed   reply length in words          (±0.1 per word)
    polite   ↔ blunt      VADER sentiment                (±1.5 × compound)
    focused  ↔ playful    MiniLM relevance to the prompt (±4 × cosine)
    cautious ↔ direct     share of hedged sentences      (±4 × caution)

The weights put one standard deviation of a within-prompt utility difference near 1 on the bundled
model's replies, so one σ means the same for every taste (σ = 0.25 agrees with the noiseless choice
about 88% of the time there). The bundled model rarely hedges (three replies in four have no hedge,
so half the cautious/direct comparisons are ties decided by noise); the experiments on it use the
first three pairs, and cautious/direct suits models that do hedge.

Optional behaviour: ``both_bad_below`` marks both replies bad when neither reaches that utility;
``edit_rate`` makes the user, that often, save their preferred version among the chosen reply, the
other one, the two joined and the chosen reply's first sentence (when it differs from the chosen one).
"""

from __future__ import annotations

import random
import re
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from rlhf.errors import ConfigError
from rlhf.feedback.simulate import ApiClient, noisy_ranking
from rlhf.judges.base import Scorer, load_scorer, score_checked

TASTES: dict[str, str] = {
    "concise": "weighted:-0.1*length", "detailed": "weighted:0.1*length",
    "polite": "weighted:1.5*sentiment", "blunt": "weighted:-1.5*sentiment",
    "focused": "weighted:4*relevance", "playful": "weighted:-4*relevance",
    "cautious": "weighted:4*caution", "direct": "weighted:-4*caution",
}
CONFLICTING_PAIRS = (("concise", "detailed"), ("polite", "blunt"), ("focused", "playful"))
SIX_USERS = tuple(t for pair in CONFLICTING_PAIRS for t in pair)


def taste_scorer(taste: str) -> Scorer:
    if taste not in TASTES:
        raise ConfigError(f"unknown taste {taste!r}; known: {', '.join(TASTES)}")
    return load_scorer(TASTES[taste])


@dataclass
class ScriptedUser:
    """One user: a name, a taste (its scorer is the gold utility), noise and optional behaviours."""

    name: str
    taste: str
    noise: float = 0.25
    both_bad_below: float | None = None
    edit_rate: float = 0.0
    scorer: Any = None
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        if self.noise < 0 or not 0 <= self.edit_rate <= 1:
            raise ConfigError("noise must be 0 or more and edit_rate in [0, 1]")
        if self.scorer is None:
            self.scorer = taste_scorer(self.taste)

    def utility(self, prompt: str, replies: list[str]) -> list[float]:
        with self.lock:  # scorers wrap torch models, which are not safe to share across threads
            return score_checked(self.scorer, [prompt] * len(replies), replies).tolist()

    def choose(self, prompt: str, replies: list[str], rng: random.Random) -> tuple[int | None, str | None]:
        """(choice: 0, 1 or None for both bad; edit or None)."""
        gold = self.utility(prompt, replies)
        if self.both_bad_below is not None and max(gold) < self.both_bad_below:
            return None, None
        order, _ = noisy_ranking(gold, self.noise, rng)
        choice = order[0]
        edit = None
        if self.edit_rate > 0 and rng.random() < self.edit_rate:
            chosen, other = replies[choice], replies[1 - choice]
            first = re.split(r"(?<=[.!?])\s+", chosen.strip())[0]
            options = [chosen, other, f"{chosen} {other}", first]
            best = max(range(len(options)), key=lambda i: self.utility(prompt, [options[i]])[0])
            edit = options[best] if options[best].strip() != chosen.strip() else None
        return choice, edit


@dataclass
class UserRun:
    """What one scripted user did over HTTP."""

    name: str
    taste: str
    turns: int = 0
    both_bad: int = 0
    edits: int = 0
    retries: int = 0
    model_versions: dict[str, int] = field(default_factory=dict)


def chat_as(base_url: str, token: str, user: ScriptedUser, prompts: list[str], turns: int, seed: int | str = 0) -> UserRun:
    """Ask ``turns`` questions (drawn from ``prompts``) as ``user`` and answer each, through the chat API."""
    rng = random.Random(f"chat:{seed}:{user.name}")
    api = ApiClient(base_url, token)
    run = UserRun(user.name, user.taste)
    try:
        for _ in range(turns):
            prompt = rng.choice(prompts)
            turn = api.request("POST", "/api/chat/ask", json={"prompt": prompt, "ask_id": uuid.uuid4().hex})["turn"]
            choice, edit = user.choose(turn["prompt"], turn["replies"], rng)
            api.request("POST", "/api/chat/choose", json={"turn": turn["id"], "submission_id": uuid.uuid4().hex,
                                                          "choice": choice, "edit": edit})
            run.turns += 1
            run.both_bad += choice is None
            run.edits += edit is not None
            run.model_versions[turn["model_version"]] = run.model_versions.get(turn["model_version"], 0) + 1
        run.retries = api.retries
        return run
    finally:
        api.close()


def create_chat_users(base_url: str, admin_token: str, names: list[str]) -> dict[str, str]:
    """name → token, created through the admin API."""
    api = ApiClient(base_url, admin_token)
    try:
        return {n: api.request("POST", "/api/admin/chat/users", json={"name": n})["token"] for n in names}
    finally:
        api.close()


def simulate_users(base_url: str, admin_token: str, tastes: list[str], prompts: list[str], turns: int,
                   noise: float = 0.25, seed: int = 0, name_prefix: str = "", both_bad_below: float | None = None,
                   edit_rate: float = 0.0) -> list[UserRun]:
    """Create one chat user per taste (named PREFIX + taste) and let them all chat at once."""
    if not tastes or turns < 1 or not prompts:
        raise ConfigError("simulate needs at least one taste, one turn and one prompt")
    scorers = {t: taste_scorer(t) for t in set(tastes)}  # one per taste: MiniLM-backed ones load once
    locks = {t: threading.Lock() for t in scorers}
    users = [ScriptedUser(f"{name_prefix}{t}" if tastes.count(t) == 1 else f"{name_prefix}{t}-{i + 1}", t, noise,
                          both_bad_below, edit_rate, scorers[t], locks[t]) for i, t in enumerate(tastes)]
    tokens = create_chat_users(base_url, admin_token, [u.name for u in users])
    with ThreadPoolExecutor(max_workers=len(users)) as pool:
        futures = [pool.submit(chat_as, base_url, tokens[u.name], u, prompts, turns, seed) for u in users]
        return [f.result() for f in futures]
