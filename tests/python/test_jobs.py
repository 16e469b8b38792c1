"""Async jobs, compatible shape A, driven the way its own clients drive it: a plain `requests`
polling loop, and an EventSource-style SSE reader that can only put the key in the URL."""

import json
import time

import pytest
import requests

from conftest import Gateway


@pytest.fixture(scope="module")
def jobs_gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: web, key: "sk-web" }}
  - {{ id: other, key: "sk-other" }}
providers:
  mock: {{ base_url: "{mock.base_url}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
  - model: slow
    targets: [ {{ provider: mock, model: slow-300 }} ]
jobs: {{ workers: 2, default_model: fast }}
"""
    )
    yield g
    g.stop()


def root(g):
    return f"http://127.0.0.1:{g.port}"


def test_shape_a_polling_loop(jobs_gateway):
    base = root(jobs_gateway)
    headers = {"X-API-Key": "sk-web"}
    r = requests.post(f"{base}/generate", json={"prompt": "Tell me a story", "max_tokens": 50}, headers=headers)
    assert r.status_code == 202
    queued = r.json()
    assert set(queued) == {"status", "task_id", "message"}
    assert queued["status"] == "queued"
    task = queued["task_id"]

    deadline = time.time() + 10
    while True:
        status = requests.get(f"{base}/status/{task}", headers=headers).json()
        assert set(status) == {"status", "task_id", "message"}
        assert status["task_id"] == task
        if status["status"] == "completed":
            break
        assert status["status"] in ("queued", "processing"), status
        assert time.time() < deadline
        time.sleep(0.05)

    result = requests.get(f"{base}/result/{task}", headers=headers).json()
    assert set(result) == {"status", "task_id", "result", "metrics"}
    assert result["status"] == "completed"
    assert result["result"] == "tok0 tok1 tok2 "
    metrics = result["metrics"]
    assert set(metrics) == {
        "queue_wait_time",
        "processing_time",
        "total_time",
        "prompt_tokens",
        "completion_tokens",
        "tokens_per_second",
    }
    assert metrics["completion_tokens"] == 3
    assert metrics["total_time"] >= metrics["processing_time"] >= 0

    # The documented defaults reached the provider.
    sent = json.loads([r for r in jobs_gateway_requests(jobs_gateway) if "Tell me a story" in r["body"]][0]["body"])
    assert sent["max_tokens"] == 50
    assert sent["temperature"] == 0.7
    assert sent["top_p"] == 0.9

    # Another key: 404, never the result. Unknown task: 404.
    assert requests.get(f"{base}/result/{task}", headers={"X-API-Key": "sk-other"}).status_code == 404
    assert requests.get(f"{base}/status/nope", headers=headers).status_code == 404
    assert requests.get(f"{base}/status/{task}").status_code == 401


def jobs_gateway_requests(g):
    # The mock fixture is shared; find it through the gateway's config.
    text = g.config.read_text()
    url = text.split('base_url: "', 1)[1].split('"', 1)[0]
    return requests.get(f"{url}/_mock/requests").json()


def event_source(url):
    """What a browser's EventSource does: GET with no custom headers, read `data:` lines."""
    with requests.get(url, stream=True, headers={"Accept": "text/event-stream"}) as r:
        assert r.status_code == 200, r.text
        assert r.headers["content-type"].startswith("text/event-stream")
        data = []
        for line in r.iter_lines(decode_unicode=True):
            if line and line.startswith("data:"):
                event = json.loads(line[5:].strip())
                yield event
                data.append(event)


def test_shape_a_stream_with_the_key_in_the_url(jobs_gateway):
    base = root(jobs_gateway)
    r = requests.post(
        f"{base}/generate",
        json={"prompt": "stream me", "model": "slow"},
        headers={"X-API-Key": "sk-web"},
    )
    task = r.json()["task_id"]
    events = list(event_source(f"{base}/stream/{task}?api_key=sk-web"))
    assert events, "no events"
    for e in events:
        assert "status" in e and "message" in e
    assert events[-1]["status"] == "completed"
    assert events[-1]["result"] == "tok0 tok1 tok2 "
    # Connected while it was still running: the tokens came as deltas before the result.
    assert events[0]["status"] in ("queued", "processing")
    deltas = "".join(e.get("delta", "") for e in events)
    assert deltas == "tok0 tok1 tok2 "
    # The key in the URL is checked like a header, and never works for another tenant's task.
    bad = requests.get(f"{base}/stream/{task}?api_key=sk-other")
    assert bad.status_code == 404
    assert requests.get(f"{base}/stream/{task}?api_key=wrong").status_code == 401
    # The key never reaches logs.
    assert "sk-web" not in jobs_gateway.logs()
