"""Fallback seen from the official `openai` SDK: a failing primary is invisible to clients
(sync, async, streaming), and a failure after the first byte surfaces as an SDK error, never as
a silently truncated answer."""

import asyncio
import json
import urllib.request

import openai
import pytest

from conftest import Gateway


@pytest.fixture(scope="module")
def fallback_gateway(mock):
    g = Gateway(
        f"""
auth: off
providers:
  primary: {{ base_url: "{mock.base_url}", timeout: 1s, health: {{ enabled: false }} }}
  backup: {{ base_url: "{mock.base_url}" }}
routes:
  - model: unavailable-primary
    targets: [ {{ provider: primary, model: status-503 }}, {{ provider: backup, model: backup-model }} ]
  - model: dropping-primary
    targets: [ {{ provider: primary, model: drop-after-head }}, {{ provider: backup, model: backup-model }} ]
  - model: breaks-mid-stream
    targets: [ {{ provider: primary, model: drop-mid-stream }}, {{ provider: backup, model: backup-model }} ]
"""
    )
    yield g
    g.stop()


def client(g):
    return openai.OpenAI(base_url=g.base_url, api_key="unused", max_retries=0)


def test_sync_chat_falls_back_and_says_where_it_went(fallback_gateway):
    raw = client(fallback_gateway).chat.completions.with_raw_response.create(
        model="unavailable-primary", messages=[{"role": "user", "content": "hi"}]
    )
    assert raw.headers["x-lumen-provider"] == "backup"
    assert raw.headers["x-lumen-attempts"] == "2"
    assert raw.parse().choices[0].message.content == "mock reply from backup-model"


def test_stream_falls_back_before_the_first_byte(fallback_gateway):
    stream = client(fallback_gateway).chat.completions.create(
        model="dropping-primary", messages=[{"role": "user", "content": "hi"}], stream=True
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    assert text == "tok0 tok1 tok2 "


def test_async_stream_falls_back(fallback_gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=fallback_gateway.base_url, api_key="unused", max_retries=0)
        streams = await asyncio.gather(
            *[
                c.chat.completions.create(
                    model="unavailable-primary", messages=[{"role": "user", "content": "x"}], stream=True
                )
                for _ in range(5)
            ]
        )
        texts = []
        for s in streams:
            t = ""
            async for chunk in s:
                for choice in chunk.choices:
                    t += choice.delta.content or ""
            texts.append(t)
        await c.close()
        return texts

    assert asyncio.run(run()) == ["tok0 tok1 tok2 "] * 5


def test_failure_after_the_first_byte_raises_in_the_sdk(fallback_gateway):
    stream = client(fallback_gateway).chat.completions.create(
        model="breaks-mid-stream",
        messages=[{"role": "user", "content": "hi"}],
        stream=True,
        extra_body={"mock_chunks": 5},
    )
    with pytest.raises(openai.APIError):
        for _ in stream:
            pass


def test_health_endpoints_answer_plain_http(fallback_gateway):
    base = fallback_gateway.base_url.removesuffix("/v1")
    with urllib.request.urlopen(f"{base}/health") as r:
        health = json.load(r)
    assert health["providers"]["backup"]["status"] == "up"
    assert "version" in health
