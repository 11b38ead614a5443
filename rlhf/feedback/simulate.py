"""Scripted labelers: rank items by a scorer plus noise, through the same HTTP API as the web page.

A simulated labeler behaves like the page does: ``GET /api/next`` for an item in its own shuffled
order, ``POST /api/submit`` with a ranking of the shown positions, retrying a failed request with
the same submission id. So a simulated campaign exercises the real server, store and export.

Noise model (Thurstone, case V): each labeler perceives completion i's utility as
``u_i = s_i + ε_i`` with ``ε_i ~ N(0, σ²)`` drawn afresh for every labeler and item, where ``s_i`` is
the scorer's score (negated when lower is better), and ranks by ``u``. ``σ`` is in the scorer's
units (words for ``length``), so pick it against the spread of scores: σ = 0 gives the scorer's
exact order for every labeler; σ much larger than the spread gives random rankings. Two
neighbours whose perceived utilities differ by at most ``tie_margin`` are marked tied; with
probability ``skip_rate`` an item is skipped instead.
"""

from __future__ import annotations

import random
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import httpx

from rlhf.errors import ConfigError, RLHFError


@dataclass
class LabelerRun:
    """What one scripted labeler did."""

    name: str
    submitted: int = 0
    skipped: int = 0
    retries: int = 0
    latencies_s: list[float] = field(default_factory=list)


def noisy_ranking(scores: list[float], noise: float, rng: random.Random, higher_is_better: bool = True,
                  tie_margin: float = 0.0) -> tuple[list[int], list[list[int]]]:
    """Positions best first, and tie groups, from scores perturbed by N(0, noise²)."""
    sign = 1.0 if higher_is_better else -1.0
    utility = [sign * s + (rng.gauss(0.0, noise) if noise > 0 else 0.0) for s in scores]
    order = sorted(range(len(scores)), key=lambda i: (-utility[i], i))
    ties: list[list[int]] = []
    group = [order[0]]
    for prev, cur in zip(order, order[1:]):
        if tie_margin > 0 and utility[prev] - utility[cur] <= tie_margin:
            group.append(cur)
        else:
            if len(group) > 1:
                ties.append(group)
            group = [cur]
    if len(group) > 1:
        ties.append(group)
    return order, ties


class ApiClient:
    """The labeling API over HTTP, with retries for connection failures (not for 4xx answers)."""

    def __init__(self, base_url: str, token: str, timeout_s: float = 30.0, retry_for_s: float = 60.0):
        self.base_url = base_url.rstrip("/")
        self.http = httpx.Client(base_url=self.base_url, timeout=timeout_s,
                                 headers={"Authorization": f"Bearer {token}"})
        self.retry_for_s = retry_for_s
        self.retries = 0

    def request(self, method: str, path: str, **kwargs: Any) -> dict:
        deadline = time.monotonic() + self.retry_for_s
        while True:
            try:
                r = self.http.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                # The server may be restarting; a submission is safe to resend (same submission id).
                if time.monotonic() > deadline:
                    raise RLHFError(f"labeling server at {self.base_url} unreachable: {exc}") from None
                self.retries += 1
                time.sleep(0.2)
                continue
            if r.status_code == 503 and time.monotonic() < deadline:  # database busy: nothing stored, resend
                self.retries += 1
                time.sleep(0.2)
                continue
            if r.status_code >= 400:
                try:
                    msg = r.json().get("error", r.text)
                except ValueError:
                    msg = r.text
                raise RLHFError(f"{method} {path}: HTTP {r.status_code}: {msg}")
            return r.json()

    def close(self) -> None:
        self.http.close()


def label_as(base_url: str, token: str, scorer: Any, noise: float, seed: int | str = 0, tie_margin: float = 0.0,
             skip_rate: float = 0.0, max_items: int | None = None, scorer_lock: threading.Lock | None = None) -> LabelerRun:
    """Label items as the labeler owning ``token`` until none is left (or ``max_items``)."""
    from rlhf.judges.base import load_scorer, score_checked

    if isinstance(scorer, str):
        scorer = load_scorer(scorer)
    lock = scorer_lock or threading.Lock()
    rng = random.Random(f"simulate:{seed}")
    api = ApiClient(base_url, token)
    try:
        me = api.request("GET", "/api/me")
        run = LabelerRun(me["labeler"])
        while max_items is None or run.submitted + run.skipped < max_items:
            t0 = time.perf_counter()
            item = api.request("GET", "/api/next")["item"]
            if item is None:
                break
            body: dict[str, Any] = {"item": item["id"], "submission_id": uuid.uuid4().hex}
            if skip_rate > 0 and rng.random() < skip_rate:
                body.update(skipped=True, skip_reason="simulated skip")
                run.skipped += 1
            else:
                texts = item["completions"]
                with lock:  # scorers wrap torch models, which are not safe to share across threads
                    scores = score_checked(scorer, [item["prompt"]] * len(texts), texts).tolist()
                order, ties = noisy_ranking(scores, noise, rng, scorer.higher_is_better, tie_margin)
                body.update(ranking=order, ties=ties)
                run.submitted += 1
            api.request("POST", "/api/submit", json=body)
            run.latencies_s.append(time.perf_counter() - t0)
        run.retries = api.retries
        return run
    finally:
        api.close()


def create_labelers(base_url: str, admin_token: str, names: list[str], campaign: str | None = None) -> dict[str, str]:
    """name -> token, created through the admin API."""
    api = ApiClient(base_url, admin_token)
    try:
        return {n: api.request("POST", "/api/admin/labelers", json={"name": n, "campaign": campaign})["token"] for n in names}
    finally:
        api.close()


def simulate_labelers(base_url: str, admin_token: str, scorer: Any, n_labelers: int, noise: float, seed: int = 0,
                      campaign: str | None = None, name_prefix: str = "sim", tie_margin: float = 0.0,
                      skip_rate: float = 0.0, max_items: int | None = None) -> list[LabelerRun]:
    """Create ``n_labelers`` scripted labelers and run them concurrently until the campaign is done.

    They work at the same time, as people would, so each item gets its N labels from N different
    labelers. Returns one :class:`LabelerRun` per labeler.
    """
    from rlhf.judges.base import load_scorer

    if n_labelers < 1:
        raise ConfigError("simulate needs at least one labeler")
    if noise < 0:
        raise ConfigError("noise must be 0 or positive")
    if isinstance(scorer, str):
        scorer = load_scorer(scorer)
    names = [f"{name_prefix}-{i + 1}" for i in range(n_labelers)]
    tokens = create_labelers(base_url, admin_token, names, campaign)
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=n_labelers) as pool:
        futures = [pool.submit(label_as, base_url, tokens[n], scorer, noise, f"{seed}:{i}", tie_margin, skip_rate,
                               max_items, lock) for i, n in enumerate(names)]
        return [f.result() for f in futures]
