"""A client for OpenAI-compatible servers (``rlhf serve``, vLLM, llama.cpp's server, hosted APIs).

What a labeling or evaluation run needs from a remote model, and what goes wrong with one:

* **timeouts and retries** — each request has a timeout; timeouts, dropped connections, 429 and 5xx
  answers, and answers that are not the JSON the API promises are retried with exponential backoff
  (honouring ``Retry-After``), then reported as an :class:`EndpointError` that says what happened;
  other 4xx answers are the caller's mistake and are reported at once;
* **a rate limit** — at most ``rate_limit`` requests per second, however fast the server answers;
* **a cache** — every good answer is stored under a key of (model, endpoint, the whole request), so
  a rerun of the same labeling pays for nothing twice. The cache is a SQLite file and each answer
  is one committed transaction: a crash, a kill or a bad answer never leaves a half-written entry,
  and an answer is stored only after it was checked.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

import httpx

from rlhf.errors import RLHFError

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(RLHFError):
    """An OpenAI-compatible endpoint failed to give a usable answer."""


class ResponseCache:
    """Checked answers keyed by a hash of (model, endpoint path, request body); one SQLite file."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        try:
            self._db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("CREATE TABLE IF NOT EXISTS answers (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                             "path TEXT NOT NULL, request TEXT NOT NULL, response TEXT NOT NULL, created REAL NOT NULL)")
        except sqlite3.DatabaseError as exc:
            raise EndpointError(f"{self.path}: not a usable cache file ({exc}); move it away to start a new cache") from None

    @staticmethod
    def key(model: str, path: str, body: dict) -> str:
        canonical = json.dumps([model, path, body], sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

    def get(self, key: str) -> dict | None:
        with self._lock:
            row = self._db.execute("SELECT response FROM answers WHERE key = ?", (key,)).fetchone()
        return None if row is None else json.loads(row[0])

    def put(self, key: str, model: str, path: str, body: dict, response: dict) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO answers VALUES (?, ?, ?, ?, ?, ?)",
                             (key, model, path, json.dumps(body, sort_keys=True, ensure_ascii=False),
                              json.dumps(response, ensure_ascii=False), time.time()))

    def __len__(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM answers").fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _check_completions(data: Any, body: dict) -> str | None:
    """Why ``data`` is not a completions answer to ``body``, or None if it is."""
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        return "no 'choices' list"
    for c in data["choices"]:
        if not isinstance(c, dict) or not isinstance(c.get("text"), str):
            return "a choice without a 'text' string"
        if body.get("logprobs") is not None:
            lp = c.get("logprobs")
            if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list) or \
                    not isinstance(lp.get("token_logprobs"), list) or not isinstance(lp.get("top_logprobs"), list):
                return "logprobs were asked for but the answer has no tokens/token_logprobs/top_logprobs lists"
    return None


def _check_chat(data: Any, body: dict) -> str | None:
    if not isinstance(data, dict) or not isinstance(data.get("choices"), list) or not data["choices"]:
        return "no 'choices' list"
    for c in data["choices"]:
        message = c.get("message") if isinstance(c, dict) else None
        if not isinstance(message, dict) or not isinstance(message.get("content"), str):
            return "a choice without a message with 'content'"
        if body.get("logprobs") and not isinstance((c.get("logprobs") or {}).get("content"), list):
            return "logprobs were asked for but the answer has no logprobs.content list"
    return None


class OpenAIClient:
    """Calls one OpenAI-compatible server. ``base_url`` may end in ``/v1`` or not."""

    def __init__(self, base_url: str, api_key: str = "", timeout: float = 60.0, retries: int = 3, backoff: float = 1.0,
                 rate_limit: float = 0.0, cache: str | Path | ResponseCache | None = None,
                 sleep: Callable[[float], None] = time.sleep):
        base = base_url.rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise EndpointError(f"endpoint {base_url!r} must be an http:// or https:// URL")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.timeout, self.retries, self.backoff = timeout, max(0, retries), backoff
        self.min_interval = 1.0 / rate_limit if rate_limit > 0 else 0.0
        self._http = httpx.Client(headers=headers, timeout=timeout)
        self._last_request = 0.0
        self._sleep = sleep
        self.cache = cache if isinstance(cache, ResponseCache) or cache is None else ResponseCache(cache)
        self.requests = 0      # answers fetched from the server (not from the cache)
        self.cache_hits = 0

    # --- API ------------------------------------------------------------------------------------

    def models(self) -> list[str]:
        data = self._send("GET", "/models", None)
        if not isinstance(data, dict) or not isinstance(data.get("data"), list):
            raise EndpointError(f"{self.base_url}/models: answer is not a model list: {_snippet(data)}")
        return [str(m.get("id")) for m in data["data"] if isinstance(m, dict)]

    def completions(self, model: str, prompt: str | list[str], **params: Any) -> dict:
        """POST /v1/completions; ``params`` are the API's fields (max_tokens, logprobs, echo, ...)."""
        return self._cached("/completions", {"model": model, "prompt": prompt, **params}, _check_completions)

    def chat(self, model: str, messages: list[dict], **params: Any) -> dict:
        """POST /v1/chat/completions."""
        return self._cached("/chat/completions", {"model": model, "messages": messages, **params}, _check_chat)

    def close(self) -> None:
        self._http.close()

    # --- machinery --------------------------------------------------------------------------

    def _cached(self, path: str, body: dict, check: Callable[[Any, dict], str | None]) -> dict:
        key = ResponseCache.key(body["model"], path, body) if self.cache is not None else ""
        if self.cache is not None:
            hit = self.cache.get(key)
            if hit is not None:
                self.cache_hits += 1
                return hit
        data = self._send("POST", path, body, check)
        if self.cache is not None:
            self.cache.put(key, body["model"], path, body, data)
        return data

    def _wait_for_rate_limit(self) -> None:
        if self.min_interval:
            wait = self._last_request + self.min_interval - time.monotonic()
            if wait > 0:
                self._sleep(wait)
        self._last_request = time.monotonic()

    def _send(self, method: str, path: str, body: dict | None,
              check: Callable[[Any, dict], str | None] | None = None) -> Any:
        url = self.base_url + path
        problem = ""
        for attempt in range(self.retries + 1):
            if attempt:
                self._sleep(self._delay(attempt, problem))
            self._wait_for_rate_limit()
            try:
                response = self._http.request(method, url, json=body)
            except httpx.TimeoutException:
                problem = f"timed out (no answer within {self.timeout:g} s)"
                continue
            except httpx.TransportError as exc:
                problem = f"connection failed ({type(exc).__name__}: {exc})"
                continue
            self.requests += 1
            if response.status_code in RETRY_STATUS:
                problem = f"answered HTTP {response.status_code}: {_error_message(response)}"
                self._retry_after = response.headers.get("retry-after")
                continue
            if response.status_code >= 400:
                raise EndpointError(f"{method} {url} failed with HTTP {response.status_code}: {_error_message(response)}")
            try:
                data = response.json()
            except ValueError:
                problem = f"answered with something that is not JSON: {_snippet(response.text)}"
                continue
            why = check(data, body or {}) if check else None
            if why:
                problem = f"answered JSON that is not an OpenAI-format answer ({why}): {_snippet(data)}"
                continue
            return data
        tries = self.retries + 1
        raise EndpointError(f"{method} {url} {problem}; gave up after {tries} {'try' if tries == 1 else 'tries'}")

    _retry_after: str | None = None

    def _delay(self, attempt: int, problem: str) -> float:
        delay = self.backoff * 2 ** (attempt - 1)
        if self._retry_after:
            try:
                delay = max(delay, min(float(self._retry_after), 60.0))
            except ValueError:
                pass
            self._retry_after = None
        return delay


def _snippet(data: Any, limit: int = 160) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)[:limit * 2]
    text = " ".join(text.split())
    return repr(text[:limit] + ("…" if len(text) > limit else ""))


def _error_message(response: httpx.Response) -> str:
    try:
        data = response.json()
        if isinstance(data, dict) and isinstance(data.get("error"), dict):
            return str(data["error"].get("message"))
        return _snippet(data)
    except ValueError:
        return _snippet(response.text)
