"""`rlhf serve` as a real process on 127.0.0.1, and the client against it and against broken servers."""

import json
import math
import os
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from rlhf.cai.feedback import EndpointFeedbackModel
from rlhf.cai.local import LocalFeedbackModel
from rlhf.serve.client import EndpointError, OpenAIClient, ResponseCache

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def server(tiny_model_dir):
    """`rlhf serve` started as its own process; the test stops it."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "rlhf", "serve", "--model", str(tiny_model_dir), "--port", "0",
                             "--served-name", "tiny", "--threads", "1", "--max-logprobs", "400"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError(f"rlhf serve did not start: {proc.stderr.read()}")
        url = json.loads(line)["url"]
        assert url.startswith("http://127.0.0.1:")  # loopback by default
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def local(tiny_model_dir):
    return LocalFeedbackModel(str(tiny_model_dir), device="cpu")


def test_models_completions_and_logprobs_match_the_model(server, local):
    client = OpenAIClient(server)
    assert client.models() == ["tiny"]
    prompt = "<|user|>my house is too hot\n<|assistant|>"
    answer = client.completions("tiny", prompt, max_tokens=4, temperature=0.0, logprobs=5)
    choice = answer["choices"][0]
    lp = choice["logprobs"]
    special = {"<|endoftext|>", "<|user|>", "<|assistant|>"}  # in the token list, left out of the text
    assert "".join(t for t in lp["tokens"] if t not in special) == choice["text"]
    assert answer["usage"]["completion_tokens"] == len(lp["tokens"]) == 4
    # Greedy: each token is the most likely one, and its log-probability is the model's own.
    first_text = lp["tokens"][0]
    assert max(lp["top_logprobs"][0].values()) == pytest.approx(lp["token_logprobs"][0], abs=1e-5)
    assert len(lp["top_logprobs"][0]) <= 5
    want = local.continuation_logprobs([[(prompt, first_text)]])[0][0][0]
    assert lp["token_logprobs"][0] == pytest.approx(want, abs=1e-4)
    # echo with max_tokens 0 scores a given text: the sum over the reply equals the local model's.
    scored = client.completions("tiny", prompt + "open the windows", max_tokens=0, echo=True, logprobs=0)
    slp = scored["choices"][0]["logprobs"]
    assert slp["token_logprobs"][0] is None and scored["choices"][0]["text"] == prompt + "open the windows"
    total = sum(v for off, v in zip(slp["text_offset"], slp["token_logprobs"]) if off >= len(prompt))
    assert total == pytest.approx(local.continuation_logprobs([[(prompt, "open the windows")]])[0][0][0], abs=1e-3)


def test_chat_completions(server):
    client = OpenAIClient(server)
    answer = client.chat("tiny", [{"role": "user", "content": "how do I cook rice"}], max_tokens=5, temperature=0.0,
                         logprobs=True, top_logprobs=2)
    choice = answer["choices"][0]
    assert choice["message"]["role"] == "assistant" and isinstance(choice["message"]["content"], str)
    assert choice["finish_reason"] in ("stop", "length")
    assert all(len(t["top_logprobs"]) <= 2 for t in choice["logprobs"]["content"])


def test_bad_requests_are_reported_at_once(server):
    client = OpenAIClient(server, retries=3, backoff=0.0)
    with pytest.raises(EndpointError, match="HTTP 404.*serves 'tiny'"):
        client.completions("other", "hi", max_tokens=1)
    with pytest.raises(EndpointError, match="HTTP 400.*logprobs"):
        client.completions("tiny", "hi", max_tokens=1, logprobs=1000)
    assert client.requests == 2  # a caller's mistake is not retried


def test_endpoint_feedback_equals_the_local_model(server, local, tmp_path):
    client = OpenAIClient(server, cache=tmp_path / "cache.sqlite")
    remote = EndpointFeedbackModel(client, "tiny", top_logprobs=400)  # the whole tiny vocabulary: no label missing
    texts = [["<|user|>which reply is better\n<|assistant|>The answer is (",
              "<|user|>which reply is worse\n<|assistant|>The answer is ("]]
    got = remote.option_logprobs(texts, ["A", "B"])[0]
    want = local.option_logprobs(texts, ["A", "B"])[0]
    assert torch.allclose(got, want, atol=1e-4) and remote.missing_labels == 0
    requests = client.requests
    again = remote.option_logprobs(texts, ["A", "B"])[0]
    assert client.requests == requests and client.cache_hits == 2 and torch.equal(got, again)


class _Broken(BaseHTTPRequestHandler):
    mode = "garbage"
    calls = 0

    def do_POST(self):
        type(self).calls += 1
        self.rfile.read(int(self.headers.get("content-length", 0)))
        if self.mode == "slow":
            time.sleep(1.5)
        if self.mode == "flaky" and type(self).calls == 1:
            self.send_response(503)
            self.send_header("Retry-After", "0")
            self.end_headers()
            return
        body = {"garbage": b"<html>upstream exploded</html>", "wrong-json": b'{"foo": 1}', "slow": b"{}",
                "flaky": json.dumps({"choices": [{"text": "ok", "index": 0}]}).encode()}[self.mode]
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture()
def broken():
    servers = []

    def start(mode: str) -> str:
        handler = type("Handler", (_Broken,), {"mode": mode, "calls": 0})
        httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        servers.append(httpd)
        return f"http://127.0.0.1:{httpd.server_address[1]}"

    yield start
    for s in servers:
        s.shutdown()
        s.server_close()


def test_timeouts_and_garbage_give_clear_errors_and_leave_the_cache_intact(server, broken, tmp_path):
    cache_path = tmp_path / "cache.sqlite"
    good = OpenAIClient(server, cache=cache_path)
    kept = good.completions("tiny", "hello", max_tokens=2, temperature=0.0)
    good.cache.close()
    sleeps = []
    slow = OpenAIClient(broken("slow"), timeout=0.3, retries=1, backoff=0.01, cache=cache_path, sleep=sleeps.append)
    with pytest.raises(EndpointError, match=r"timed out \(no answer within 0.3 s\); gave up after 2 tries"):
        slow.completions("tiny", "new prompt", max_tokens=2)
    assert sleeps == [0.01]
    for mode, words in (("garbage", "not JSON: '<html>upstream exploded</html>'"),
                        ("wrong-json", "not an OpenAI-format answer \\(no 'choices' list\\)")):
        bad = OpenAIClient(broken(mode), retries=2, backoff=0.0, cache=cache_path)
        with pytest.raises(EndpointError, match=words):
            bad.completions("tiny", "new prompt", max_tokens=2)
        assert bad.requests == 3
        # What was cached before is still there and still served, without asking the broken server.
        assert bad.completions("tiny", "hello", max_tokens=2, temperature=0.0) == kept and bad.requests == 3
    assert len(ResponseCache(cache_path)) == 1


def test_retry_after_a_server_error_then_succeed_and_rate_limit(broken):
    sleeps = []
    client = OpenAIClient(broken("flaky"), retries=2, backoff=0.5, rate_limit=1000.0, sleep=sleeps.append)
    assert client.completions("m", "x")["choices"][0]["text"] == "ok"
    assert client.requests == 2 and 0.5 in sleeps
    with pytest.raises(EndpointError, match="http:// or https://"):
        OpenAIClient("localhost:8000")


def test_label_against_a_garbage_server_writes_nothing(broken, tmp_path):
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps({"prompt_id": "p", "prompt": "hi", "completions": ["a b", "c"]}) + "\n")
    out = tmp_path / "rankings.jsonl"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    run = subprocess.run([sys.executable, "-m", "rlhf", "cai", "label", "--feedback-endpoint", broken("garbage"),
                          "--feedback-model", "m", "--completions", str(completions), "--out", str(out), "--retries", "0",
                          "--method", "choice", "--no-evaluators"], capture_output=True, text=True, env=env, cwd=REPO,
                         timeout=300)
    assert run.returncode == 2, run.stderr
    assert "error:" in run.stderr and "not JSON" in run.stderr
    assert not out.exists() and not list(tmp_path.glob(".rankings*"))
    assert math.isfinite(len(run.stderr))


def test_servers_take_the_engine_section_but_refuse_its_rollout_options():
    """`rlhf serve` and `rlhf personal serve` sample with their own forward passes: a rollout backend or
    --compile asked for is an error, not silently ignored; device, dtype and threads are the section's."""
    from click.testing import CliRunner

    from rlhf.cli import app
    from rlhf.engine.config import EngineConfig
    from rlhf.errors import ConfigError
    from rlhf.personal.policy import ChatPolicyConfig
    from rlhf.serve.server import ServeConfig

    for verb, flags, said in ((["serve"], ["--rollout", "vllm"], "--rollout vllm does not apply"),
                              (["serve"], ["--rollout", "fast", "--compile"], "--rollout fast and --compile do not apply"),
                              (["personal", "serve"], ["--compile"], "--compile does not apply")):
        result = CliRunner().invoke(app, [*verb, *flags])
        assert result.exit_code != 0 and said in result.output, result.output
    ServeConfig(engine=EngineConfig(rollout="hf", threads=1, device="cpu")).validate()  # what the server runs anyway
    with pytest.raises(ConfigError, match="rlhf personal serve samples with its own forward passes"):
        ChatPolicyConfig(engine=EngineConfig(rollout="fast")).validate()
