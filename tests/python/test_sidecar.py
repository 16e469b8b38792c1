"""The official `openai` SDK (sync, async, streaming) against a real `lumen-llama`.

The server is started here on a free port with the generated test models (made by
`lumen-llama gen-test-model`), and with SmolLM2 when `models/SmolLM2-135M-Instruct.Q4_1.gguf`
has been fetched (`lumen-llama fetch-model smollm2`); the SmolLM2 tests are skipped, saying
so, only when that file is absent.

Binaries come from $LUMEN_BIN_DIR (default: <repo>/target/release).
Run: `python3 -m pytest tests/python/test_sidecar.py` (needs `pip install openai pytest`).
"""

import asyncio
import json
import math
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import openai
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN_DIR = Path(os.environ.get("LUMEN_BIN_DIR", REPO / "target" / "release"))
LUMEN_LLAMA = BIN_DIR / "lumen-llama"
MODELS_DIR = Path(os.environ.get("LUMEN_MODELS_DIR", REPO / "models"))
SMOLLM2 = MODELS_DIR / "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
STARTUP_TIMEOUT = 120


class Sidecar:
    """A running `lumen-llama serve --port 0`; the port comes from its first stdout line."""

    def __init__(self, model_args, log_path):
        self.log = open(log_path, "wb")
        self.proc = subprocess.Popen(
            [str(LUMEN_LLAMA), "serve", "--host", "127.0.0.1", "--port", "0", *model_args],
            stdout=subprocess.PIPE,
            stderr=self.log,
        )
        line = self.proc.stdout.readline().decode()
        assert "listening on" in line, f"unexpected first line {line!r}"
        self.port = int(line.strip().rsplit(":", 1)[1])
        self.base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while True:
            try:
                with urllib.request.urlopen(self.base + "/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            assert self.proc.poll() is None, f"lumen-llama exited; see {log_path}"
            assert time.monotonic() < deadline, "lumen-llama not healthy in time"
            time.sleep(0.05)

    def client(self):
        return openai.OpenAI(base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=300)

    def async_client(self):
        return openai.AsyncOpenAI(
            base_url=self.base + "/v1", api_key="unused", max_retries=0, timeout=300
        )

    def post_json(self, path, body):
        req = urllib.request.Request(
            self.base + path,
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.load(r)
        except urllib.error.HTTPError as e:
            return e.code, json.load(e)

    def stop(self):
        self.proc.kill()
        self.proc.wait()
        self.proc.stdout.close()
        self.log.close()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    assert LUMEN_LLAMA.is_file(), f"{LUMEN_LLAMA} not built (set LUMEN_BIN_DIR)"
    d = tmp_path_factory.mktemp("models")
    chat, rerank = d / "tiny-chat.gguf", d / "tiny-rerank.gguf"
    subprocess.run([str(LUMEN_LLAMA), "gen-test-model", "--out", str(chat)], check=True)
    subprocess.run(
        [str(LUMEN_LLAMA), "gen-test-model", "--kind", "rerank", "--out", str(rerank)], check=True
    )
    s = Sidecar(
        [
            "--model", f"tiny={chat}:ctx=512,slots=4",
            "--model", f"emb={chat}:pooling=mean",
            "--model", f"rank={rerank}:pooling=rank",
        ],
        d / "sidecar.log",
    )
    yield s
    s.stop()


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    if not SMOLLM2.is_file():
        pytest.skip(
            f"SKIPPED: {SMOLLM2} is absent; run `lumen-llama fetch-model smollm2` to run it"
        )
    d = tmp_path_factory.mktemp("smollm2")
    s = Sidecar(
        ["--model", f"smollm2={SMOLLM2}:ctx=1024,slots=2,sha256={SMOLLM2_SHA256}"],
        d / "sidecar.log",
    )
    yield s
    s.stop()


def ask(client, **kw):
    return client.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "Hello"}], temperature=0, **kw
    )


def test_models_are_listed(tiny):
    ids = {m.id for m in tiny.client().models.list()}
    assert ids == {"tiny", "emb", "rank"}


def test_chat_with_exact_usage(tiny):
    r = ask(tiny.client(), max_tokens=12)
    assert r.object == "chat.completion"
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.role == "assistant"
    assert len(r.choices[0].message.content) == 12
    assert (r.usage.prompt_tokens, r.usage.completion_tokens, r.usage.total_tokens) == (25, 12, 37)


def test_streaming_matches_non_streaming(tiny):
    client = tiny.client()
    whole = ask(client, max_tokens=20)
    text, finish, usage = "", None, None
    for chunk in ask(client, max_tokens=20, stream=True, stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    assert text == whole.choices[0].message.content
    assert finish == "length"
    assert usage.completion_tokens == 20 and usage.prompt_tokens == 25


def test_stop_strings_are_not_returned(tiny):
    client = tiny.client()
    full = ask(client, max_tokens=30).choices[0].message.content
    stop = full[8:11]
    r = ask(client, max_tokens=30, stop=[stop])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)]


def test_async_requests_run_concurrently(tiny):
    async def run():
        client = tiny.async_client()
        results = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model="tiny",
                    messages=[{"role": "user", "content": f"question {i}"}],
                    max_tokens=16,
                    seed=i,
                )
                for i in range(6)
            ]
        )
        await client.close()
        return results

    for r in asyncio.run(run()):
        assert r.usage.completion_tokens == 16
        assert r.choices[0].finish_reason == "length"


def test_async_streaming(tiny):
    async def run():
        client = tiny.async_client()
        stream = await client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Hello"}],
            temperature=0,
            max_tokens=10,
            stream=True,
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
        await client.close()
        return text

    assert asyncio.run(run()) == ask(tiny.client(), max_tokens=10).choices[0].message.content


def test_text_completions(tiny):
    r = tiny.client().completions.create(model="tiny", prompt="Once upon", temperature=0)
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 16
    assert len(r.choices[0].text) == 16


def test_embeddings_are_normalised_and_truncatable(tiny):
    client = tiny.client()
    # The SDK asks for base64 by default and decodes it; ask for floats too.
    for fmt in [openai.NOT_GIVEN, "float"]:
        r = client.embeddings.create(model="emb", input=["hello", "world"], encoding_format=fmt)
        assert [d.index for d in r.data] == [0, 1]
        for d in r.data:
            assert len(d.embedding) == 128
            assert math.isclose(math.sqrt(sum(x * x for x in d.embedding)), 1.0, rel_tol=1e-4)
        assert r.usage.prompt_tokens == 12
    short = client.embeddings.create(model="emb", input="hello", dimensions=8).data[0].embedding
    assert len(short) == 8
    assert math.isclose(math.sqrt(sum(x * x for x in short)), 1.0, rel_tol=1e-4)


def test_rerank_orders_documents(tiny):
    docs = ["cats purr", "stocks fell", "a cat sat", "rain"]
    status, r = tiny.post_json(
        "/v1/rerank", {"model": "rank", "query": "cats", "documents": docs, "top_n": 3}
    )
    assert status == 200, r
    scores = [x["relevance_score"] for x in r["results"]]
    assert len(scores) == 3 and scores == sorted(scores, reverse=True)
    status, r = tiny.post_json("/v1/rerank", {"model": "emb", "query": "q", "documents": ["d"]})
    assert status == 400 and r["error"]["code"] == "model_not_supported"


def test_errors_have_openai_shape(tiny):
    client = tiny.client()
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "x"}])
    assert e.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError) as e:
        ask(client, max_tokens=10_000)
    assert e.value.code == "context_length_exceeded"


def test_smollm2_knows_the_capital_of_france(smollm2):
    client = smollm2.client()
    kw = dict(
        model="smollm2",
        messages=[
            {"role": "user", "content": "What is the capital of France? Answer in one word."}
        ],
        temperature=0,
        seed=42,
        max_tokens=16,
    )
    r = client.chat.completions.create(**kw)
    assert "Paris" in r.choices[0].message.content
    streamed = "".join(
        c.choices[0].delta.content or ""
        for c in client.chat.completions.create(stream=True, **kw)
        if c.choices
    )
    assert streamed == r.choices[0].message.content


def test_smollm2_json_object_parses(smollm2):
    r = smollm2.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Describe a cat as JSON with keys name and age."}],
        temperature=0,
        max_tokens=200,
        response_format={"type": "json_object"},
    )
    assert r.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(r.choices[0].message.content), dict)


def test_smollm2_max_tokens_5(smollm2):
    r = smollm2.client().chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Tell me a long story about dragons."}],
        temperature=0,
        max_tokens=5,
    )
    assert r.choices[0].finish_reason == "length"
    assert r.usage.completion_tokens == 5
