"""The Batch API through the official `openai` SDK, as its users write it: `files.create` →
`batches.create` → poll `batches.retrieve` → `files.content`; 500 lines on the mock provider,
10 on a real `lumen-llama` sidecar (with interactive requests served meanwhile), a batch
cancelled mid-way, and a malformed file refused naming its line."""

import asyncio
import json
import statistics
import subprocess
import threading
import time

import openai
import pytest

from conftest import Gateway
from test_sidecar import LUMEN_LLAMA, Sidecar


def client(g, key="sk-batch"):
    return openai.OpenAI(base_url=g.base_url, api_key=key, max_retries=0, timeout=60)


def jsonl(lines):
    return ("\n".join(json.dumps(l) for l in lines) + "\n").encode()


def chat(custom_id, model, content, **extra):
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": 8, **extra},
    }


def wait(c, batch_id, timeout=120):
    deadline = time.time() + timeout
    while True:
        b = c.batches.retrieve(batch_id)
        if b.status in ("completed", "failed", "expired", "cancelled"):
            return b
        assert time.time() < deadline, b
        time.sleep(0.1)


@pytest.fixture(scope="module")
def batch_gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: batch, key: "sk-batch" }}
  - {{ id: other, key: "sk-other" }}
providers:
  mock: {{ base_url: "{mock.base_url}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
  - model: "*embed*"
    targets: [ {{ provider: mock }} ]
jobs: {{ workers: 8 }}
batches: {{ concurrency: 8 }}
"""
    )
    yield g
    g.stop()


def test_500_lines_through_the_sdk(batch_gateway, mock):
    c = client(batch_gateway)
    lines = [chat(f"line-{i}", "fast", f"batch line {i}") for i in range(500)]
    f = c.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert f.purpose == "batch" and f.bytes > 0 and f.filename == "requests.jsonl"
    assert c.files.retrieve(f.id).id == f.id
    b = c.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h", metadata={"job": "nightly"}
    )
    assert b.status == "in_progress" and b.request_counts.total == 500
    done = wait(c, b.id)
    assert done.status == "completed", done
    assert done.request_counts.completed == 500 and done.request_counts.failed == 0
    assert done.metadata == {"job": "nightly"}
    assert done.error_file_id is None
    out = c.files.content(done.output_file_id).text
    rows = [json.loads(l) for l in out.splitlines() if l]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"line-{i}" for i in range(500))
    for r in rows:
        assert r["response"]["status_code"] == 200
        assert r["response"]["body"]["choices"][0]["message"]["content"]
        assert r["error"] is None
    # Listing with the SDK's pager.
    assert b.id in [x.id for x in c.batches.list(limit=5)]
    assert {x.id for x in c.files.list(purpose="batch")} >= {f.id}
    # Another key sees none of it.
    other = client(batch_gateway, "sk-other")
    with pytest.raises(openai.NotFoundError):
        other.batches.retrieve(b.id)
    with pytest.raises(openai.NotFoundError):
        other.files.content(done.output_file_id)
    assert c.files.delete(f.id).deleted


def test_embeddings_batch_and_async_client(batch_gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=batch_gateway.base_url, api_key="sk-batch", max_retries=0)
        lines = [
            {"custom_id": f"e{i}", "method": "POST", "url": "/v1/embeddings", "body": {"model": "text-embed", "input": f"x{i}"}}
            for i in range(20)
        ]
        f = await c.files.create(file=("emb.jsonl", jsonl(lines)), purpose="batch")
        b = await c.batches.create(input_file_id=f.id, endpoint="/v1/embeddings", completion_window="24h")
        while b.status not in ("completed", "failed"):
            await asyncio.sleep(0.1)
            b = await c.batches.retrieve(b.id)
        assert b.status == "completed" and b.request_counts.completed == 20, b
        content = await c.files.content(b.output_file_id)
        rows = [json.loads(l) for l in content.text.splitlines() if l]
        assert all(r["response"]["body"]["data"][0]["embedding"] for r in rows)

    asyncio.run(run())


def test_cancel_mid_way(batch_gateway):
    c = client(batch_gateway)
    lines = [chat(f"slow-{i}", "fast", f"slow {i}", mock_chunks=2, mock_delay_ms=100) for i in range(200)]
    f = c.files.create(file=("slow.jsonl", jsonl(lines)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    deadline = time.time() + 30
    while c.batches.retrieve(b.id).request_counts.completed < 8:
        assert time.time() < deadline
        time.sleep(0.05)
    cancelling = c.batches.cancel(b.id)
    assert cancelling.status in ("cancelling", "cancelled")
    done = wait(c, b.id)
    assert done.status == "cancelled"
    assert 8 <= done.request_counts.completed < 200
    rows = [l for l in c.files.content(done.output_file_id).text.splitlines() if l]
    assert len(rows) == done.request_counts.completed
    with pytest.raises(openai.ConflictError):
        c.batches.cancel(b.id)


def test_a_malformed_file_is_refused_naming_its_line(batch_gateway):
    c = client(batch_gateway)
    data = jsonl([chat("a", "fast", "hi")]) + b'{"custom_id": "b", "method": "POST", "url": "/v1/chat/completions"}\n'
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("bad.jsonl", data), purpose="batch")
    assert "line 2: body is missing" in str(e.value)
    with pytest.raises(openai.BadRequestError) as e:
        c.files.create(file=("x.jsonl", jsonl([chat("a", "fast", "hi")])), purpose="fine-tune")
    assert e.value.body["param"] == "purpose"


@pytest.fixture(scope="module")
def sidecar_gateway(tmp_path_factory):
    d = tmp_path_factory.mktemp("batch-sidecar")
    model = d / "tiny-chat.gguf"
    subprocess.run([str(LUMEN_LLAMA), "gen-test-model", "--out", str(model)], check=True)
    s = Sidecar(["--model", f"tiny={model}:ctx=512,slots=2"], d / "sidecar.log")
    g = Gateway(
        f"""
keys:
  - {{ id: batch, key: "sk-batch" }}
providers:
  local: {{ base_url: "{s.base}/v1", timeout: 120s }}
routes:
  - model: tiny
    targets: [ {{ provider: local }} ]
jobs: {{ workers: 4 }}
batches: {{ concurrency: 4, capacity_share: 0.5 }}
"""
    )
    yield g, s
    g.stop()
    s.stop()


def test_ten_lines_on_the_real_sidecar_while_interactive_requests_are_served(sidecar_gateway):
    g, _ = sidecar_gateway
    c = client(g)

    def interactive(n):
        took = []
        for _ in range(n):
            t = time.perf_counter()
            r = c.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": "Hello"}], max_tokens=8, temperature=0
            )
            took.append(time.perf_counter() - t)
            assert r.choices[0].message.content is not None
        return took

    before = interactive(10)
    lines = [chat(f"local-{i}", "tiny", f"Hello {i}", temperature=0) for i in range(10)]
    f = c.files.create(file=("local.jsonl", jsonl(lines)), purpose="batch")
    b = c.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h")
    during = []
    t = threading.Thread(target=lambda: during.extend(interactive(10)))
    t.start()
    done = wait(c, b.id, timeout=300)
    t.join()
    assert done.status == "completed" and done.request_counts.completed == 10, done
    rows = [json.loads(l) for l in c.files.content(done.output_file_id).text.splitlines() if l]
    assert sorted(r["custom_id"] for r in rows) == sorted(f"local-{i}" for i in range(10))
    for r in rows:
        body = r["response"]["body"]
        assert body["usage"]["completion_tokens"] >= 1 and body["choices"][0]["message"]["content"] is not None
    # Figures for the record, not a timed assertion: interactive p50 before and during the batch.
    print(f"\ninteractive p50 before {statistics.median(before) * 1e3:.1f} ms, during the batch {statistics.median(during) * 1e3:.1f} ms")
