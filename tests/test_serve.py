"""The OpenAI-compatible server: in-process (TestClient) and for real over 127.0.0.1.

The model is the tiny preset with the release's 131072-piece vocabulary, so
the bundled tokenizer works. Every completion is compared with a solo run of
the same request (``generate_tokens`` on a plain Engine, text through
``stream_text``), so batching, streaming and stop strings are checked
against an independent path.
"""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from lowmem.api import load
from lowmem.batch import BatchEngine
from lowmem.decoding import GenerationRequest, generate_tokens
from lowmem.openai_api import chat_prompt
from lowmem.sampling import SamplingParams
from lowmem.scheduler import Scheduler
from lowmem.serve import create_app
from lowmem.tokenizer import release_tokenizer_path, stream_text
from quant.config import preset
from quant.packed import QuantSettings
from quant.pipeline import quantize_checkpoint
from quant.synthetic import write_checkpoint

CONTEXT = 64
ENGINE = dict(backend="host", context=CONTEXT, prefill_buckets=(8, 32))
PROMPT = "The answer to life, the universe and everything is"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    cfg = preset("tiny", vocab_size=131072)
    ckpt = write_checkpoint(cfg, root / "ckpt-0", seed=3)
    quantize_checkpoint(ckpt, root / "tiny-vocab", cfg, QuantSettings(4, 32),
                        tokenizer=release_tokenizer_path())
    return root / "tiny-vocab"


@pytest.fixture(scope="module")
def runtime(model_dir):
    rt = load(model_dir, **ENGINE)
    yield rt
    rt.close()


def solo_text(rt, prompt: str, max_tokens: int, temperature=0.0, seed=0, stops=(),
              top_p=1.0, top_k=0):
    """(text, tokens) of the request run alone on the runtime's engine."""
    ids = rt.encode(prompt)
    req = GenerationRequest(max_tokens, SamplingParams(temperature, top_p, top_k), seed)
    tokens = list(generate_tokens(rt.engine, ids, req))
    return "".join(stream_text(rt.tokenizer, iter(tokens), stops, context=ids)), tokens


@pytest.fixture(scope="module")
def client(model_dir, runtime):
    rt = load(model_dir, **ENGINE)
    app = create_app(Scheduler(BatchEngine(rt.engine, 4), max_queue=16), rt.tokenizer, "tiny")
    with TestClient(app) as c:
        _wait_healthy(c)
        yield c
    rt.close()


def _wait_healthy(c, limit_s=300):
    """Poll /health (503 "starting" during the warm-up) until it says ok."""
    deadline = time.monotonic() + limit_s
    while (r := c.get("/health")).status_code != 200:
        assert r.status_code == 503 and r.json() == {"status": "starting"}, r.text
        assert time.monotonic() < deadline, "the warm-up did not finish"
        time.sleep(0.2)


def _sse(text: str) -> list:
    lines = [line[len("data: "):] for line in text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(x) for x in lines[:-1]]


def test_completion_equals_solo_run_with_usage_and_logprobs(client, runtime):
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6,
                                             "temperature": 0, "logprobs": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    text, tokens = solo_text(runtime, PROMPT, 6)
    choice = body["choices"][0]
    assert choice["text"] == text and choice["finish_reason"] == "length"
    assert choice["logprobs"]["tokens"] == [runtime.tokenizer.sp.id_to_piece(t) for t in tokens]
    assert all(lp <= 0 for lp in choice["logprobs"]["token_logprobs"])
    n_prompt = len(runtime.encode(PROMPT))
    assert body["usage"] == {"prompt_tokens": n_prompt, "completion_tokens": 6,
                             "total_tokens": n_prompt + 6}


def test_streaming_completion_and_chat(client, runtime):
    req = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0.8, "seed": 11, "stream": True,
           "stream_options": {"include_usage": True}}
    chunks = _sse(client.post("/v1/completions", json=req).text)
    text, _ = solo_text(runtime, PROMPT, 5, temperature=0.8, seed=11)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == text
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"
    assert chunks[-1]["usage"]["completion_tokens"] == 5
    messages = [{"role": "user", "content": "Hello there"}]
    chunks = _sse(client.post("/v1/chat/completions", json={
        "messages": messages, "max_tokens": 4, "temperature": 0, "stream": True}).text)
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)
    chat_text, _ = solo_text(runtime, chat_prompt({"messages": messages}), 4, stops=("\nUser:",))
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == chat_text


def test_stop_string_ends_the_text_before_it(client, runtime):
    full, _ = solo_text(runtime, PROMPT, 8)
    stop = full[len(full) // 2:len(full) // 2 + 2]
    assert stop and stop in full
    r = client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 8,
                                             "temperature": 0, "stop": [stop]}).json()
    assert r["choices"][0]["text"] == full[:full.index(stop)]
    assert r["choices"][0]["finish_reason"] == "stop"


def test_models_health_metrics(client):
    models = client.get("/v1/models").json()["data"]
    assert models[0]["id"] == "tiny" and "Assistant:" in models[0]["chat_template"]
    assert models[0]["context_length"] == CONTEXT
    assert client.get("/health").json() == {"status": "ok"}
    client.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    metrics = client.get("/metrics").text
    for name in ("queue_depth", "running_sequences", "kv_slots_in_use", "tokens_per_second",
                 "expert_bytes_moved_total", "tokens_generated_total"):
        assert f"\nlowmem_{name} " in "\n" + metrics, name
    assert "lowmem_kv_slots_capacity 4" in metrics


@pytest.mark.parametrize("body, param, words", [
    ({"prompt": PROMPT, "temperature": "hot"}, "temperature", "number"),
    ({"prompt": PROMPT, "n": 2}, "n", "n=1"),
    ({"prompt": PROMPT, "max_tokens": 0}, "max_tokens", "integer"),
    ({"prompt": 5}, "prompt", "string"),
    ({"prompt": PROMPT, "stop": [1]}, "stop", "stop"),
    ({"prompt": PROMPT, "top_k": 1.5}, "top_k", "integer"),
    ({"prompt": "word " * 80}, "prompt", f"context of {CONTEXT}"),
    ({"prompt": PROMPT, "logprobs": 21}, "logprobs", "[0, 20]"),
])
def test_bad_requests_get_400_naming_the_field(client, body, param, words):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param and words in err["message"]
    assert err["type"] == "invalid_request_error"


def test_malformed_json_and_bad_messages(client):
    r = client.post("/v1/completions", content=b"{not json",
                    headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "bot", "content": 1}]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages[0]"
    hi = [{"role": "user", "content": "Hi"}]
    for body, words in (({"messages": hi, "top_logprobs": 2}, "needs 'logprobs'"),
                        ({"messages": hi, "logprobs": True, "top_logprobs": 21}, "[0, 20]")):
        r = client.post("/v1/chat/completions", json=body)
        assert r.status_code == 400 and r.json()["error"]["param"] == "top_logprobs"
        assert words in r.json()["error"]["message"]


def test_full_queue_gets_429_with_retry_after(model_dir):
    rt = load(model_dir, **ENGINE)
    app = create_app(Scheduler(BatchEngine(rt.engine, 1), max_queue=0), rt.tokenizer,
                     warm_up=False)
    with TestClient(app) as c:
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
    rt.close()
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert r.json()["error"]["type"] == "rate_limit_error"


def test_health_and_requests_wait_for_the_warm_up(model_dir):
    """Until the warm-up is done /health is 503 "starting" and completions get 503 with
    Retry-After; then both work (the warm-up is held on an event to see the first state)."""
    import threading
    rt = load(model_dir, **ENGINE)
    batch, release = BatchEngine(rt.engine, 2), threading.Event()
    real = batch.warm_up
    batch.warm_up = lambda **kw: (release.wait(60), real(**kw))[1]
    with TestClient(create_app(Scheduler(batch), rt.tokenizer)) as c:
        r = c.get("/health")
        assert r.status_code == 503 and r.json() == {"status": "starting"}
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 2})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1"
        assert "starting" in r.json()["error"]["message"]
        release.set()
        _wait_healthy(c)
        r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 3,
                                             "temperature": 0})
        assert r.status_code == 200
        assert r.json()["choices"][0]["text"] == solo_text(rt, PROMPT, 3)[0]
    rt.close()


def test_no_warmup_option():
    from lowmem.serve import build_parser
    assert build_parser().parse_args([]).warmup is True
    assert build_parser().parse_args(["--no-warmup"]).warmup is False
    assert "--no-warmup" in build_parser().format_help()
    assert build_parser().parse_args([]).prefill_tokens is None
    assert build_parser().parse_args(["--prefill-tokens", "8"]).prefill_tokens == 8
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--prefill-tokens", "0"])
    assert e.value.code == 2
    assert build_parser().parse_args([]).batch_wait_ms == 20.0
    assert build_parser().parse_args(["--batch-wait-ms", "0"]).batch_wait_ms == 0.0
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(["--batch-wait-ms", "-1"])
    assert e.value.code == 2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def live_server(model_dir):
    """``python -m lowmem.serve`` in a subprocess on 127.0.0.1; SIGTERM at the end."""
    port = _free_port()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(Path(__file__).parents[1])] + sys.path))
    cmd = [sys.executable, "-m", "lowmem.serve", "--model", str(model_dir), "--port", str(port),
           "--max-batch", "4", "--max-queue", "64", "--context", str(CONTEXT),
           "--backend", "host", "--prefill-tokens", "8"]   # prompts split across steps
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    for _ in range(240):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
        assert proc.poll() is None, proc.stdout.read().decode()
    yield proc, url
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


def test_openai_client_against_live_server(live_server, runtime):
    import openai
    proc, url = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=5, temperature=0)
    assert r.choices[0].text == solo_text(runtime, PROMPT, 5)[0]
    assert r.usage.completion_tokens == 5
    stream = client.chat.completions.create(
        model="x", messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0,
        stream=True)
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    expected, _ = solo_text(runtime, chat_prompt({"messages": [{"role": "user", "content": "Hi"}]}),
                            4, stops=("\nUser:",))
    assert text == expected


def solo_top_logprobs(rt, ids: list[int], tokens: list[int], n: int) -> list[dict]:
    """{piece: log-probability} of the n likeliest tokens at each generated position, from
    the solo engine's fp32 logits (float64 log-softmax: an independent reference)."""
    rt.engine.reset()
    logits, out = rt.engine.feed(ids), []
    for token in tokens:
        x = np.asarray(logits, np.float64)
        lsm = x - x.max() - np.log(np.exp(x - x.max()).sum())
        out.append({rt.tokenizer.sp.id_to_piece(int(i)): lsm[i] for i in np.argsort(-lsm)[:n]})
        logits = rt.engine.feed([token])
    return out


def test_top_logprobs_with_the_openai_client(live_server, runtime):
    """``logprobs: N`` (completions) and ``top_logprobs`` (chat): the N likeliest tokens of
    each position, most likely first, with the model's log-probabilities."""
    import openai
    _, url = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = client.completions.create(model="x", prompt=PROMPT, max_tokens=4, temperature=0,
                                  logprobs=3)
    _, tokens = solo_text(runtime, PROMPT, 4)
    want = solo_top_logprobs(runtime, runtime.encode(PROMPT), tokens, 3)
    got = r.choices[0].logprobs.top_logprobs
    assert [list(g) for g in got] == [list(w) for w in want]       # same tokens, same order
    for g, w in zip(got, want):
        assert list(g.values()) == pytest.approx(list(w.values()), abs=1e-4)
    assert r.choices[0].logprobs.token_logprobs == pytest.approx(
        [max(w.values()) for w in want], abs=1e-4)                  # greedy: the top one
    messages = [{"role": "user", "content": "Hi"}]
    chat = client.chat.completions.create(model="x", messages=messages, max_tokens=3,
                                          temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    ids = runtime.encode(chat_prompt({"messages": messages}))
    _, tokens = solo_text(runtime, chat_prompt({"messages": messages}), len(content))
    want = solo_top_logprobs(runtime, ids, tokens, 2)
    assert [c.token for c in content] == [runtime.tokenizer.sp.id_to_piece(t) for t in tokens]
    for c, w in zip(content, want):
        assert [a.token for a in c.top_logprobs] == list(w)
        assert [a.logprob for a in c.top_logprobs] == pytest.approx(list(w.values()), abs=1e-4)
        assert c.top_logprobs[0].bytes == list(c.top_logprobs[0].token.encode())


def test_concurrent_streams_each_equal_their_solo_run(live_server, runtime):
    """32 concurrent streaming requests of mixed lengths, settings and seeds: none lost."""
    import openai
    _, url = live_server
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=300)
    reqs = [dict(prompt=f"{PROMPT} {'again ' * (i % 5)}", max_tokens=2 + i % 4,
                 temperature=0.0 if i % 3 == 0 else 0.9, seed=i) for i in range(32)]

    def run(kw):
        stream = client.completions.create(model="x", stream=True, **kw)
        return "".join(c.choices[0].text for c in stream if c.choices)

    with ThreadPoolExecutor(32) as pool:
        got = list(pool.map(run, reqs))
    expected = [solo_text(runtime, r["prompt"], r["max_tokens"], r["temperature"], r["seed"])[0]
                for r in reqs]
    assert got == expected
    metrics = httpx.get(url + "/metrics").text
    assert "lowmem_running_sequences 0" in metrics and "lowmem_queue_depth 0" in metrics


def test_non_streaming_client_that_hangs_up_is_cancelled():
    """The watcher a non-streaming request runs: a client gone -> its sequence cancelled."""
    import asyncio

    from lowmem.serve import Server

    class Sched:
        cancelled = []

        def cancel(self, seq):
            self.cancelled.append(seq)

    class Req:
        def __init__(self):
            self.polls = 0

        async def is_disconnected(self):
            self.polls += 1
            return self.polls >= 3          # connected for two polls, then gone

    class Gen:
        seq = "seq-7"
    server = Server(Sched(), tokenizer=None, model_name="x")
    request = Req()
    asyncio.run(asyncio.wait_for(server._cancel_on_disconnect(request, Gen()), timeout=5))
    assert Sched.cancelled == ["seq-7"] and request.polls == 3


def test_raw_http_errors_and_sigterm(live_server):
    proc, url = live_server
    r = httpx.post(url + "/v1/chat/completions", content=b"[1,", timeout=30,
                   headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
            "prompt": PROMPT, "max_tokens": 40, "stream": True}) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        proc.send_signal(signal.SIGTERM)   # mid-stream: it finishes or is cancelled, cleanly
        rest = [line for line in lines if line.startswith("data: ")]
    assert json.loads(first[6:])["choices"][0]["text"] is not None
    assert rest[-1] == "data: [DONE]"
    assert json.loads(rest[-2][6:])["choices"][0]["finish_reason"] in ("length", "cancelled")
    assert proc.wait(timeout=60) == 0
    assert "warm-up: compiled every step shape" in proc.stdout.read().decode()
