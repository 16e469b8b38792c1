"""The response cache seen from the official `openai` SDK: a cached answer replayed as a stream
parses like a live one, sync and async, and the cache headers are visible to clients."""

import asyncio

import openai
import pytest

from conftest import Gateway


@pytest.fixture(scope="module")
def cache_gateway(mock):
    g = Gateway(
        f"""
auth: off
providers:
  mock: {{ base_url: "{mock.base_url}" }}
routes:
  - model: cached
    targets: [ {{ provider: mock, model: upstream-cached }} ]
    cache: {{ ttl: 10m }}
"""
    )
    yield g
    g.stop()


def client(g):
    return openai.OpenAI(base_url=g.base_url, api_key="unused", max_retries=0)


def test_stream_hit_replays_as_a_valid_sse_stream(cache_gateway):
    c = client(cache_gateway)
    messages = [{"role": "user", "content": "cache me"}]
    first = c.chat.completions.with_raw_response.create(model="cached", messages=messages, temperature=0)
    assert first.headers["x-lumen-cache"] == "miss"
    answer = first.parse().choices[0].message.content

    raw = c.chat.completions.with_raw_response.create(
        model="cached", messages=messages, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    assert raw.headers["x-lumen-cache"] == "hit"
    text, usage, finish = "", None, None
    for chunk in raw.parse():
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == answer
    assert finish == "stop"
    assert usage is not None and usage.total_tokens == 11


def test_async_stream_first_then_json_hit(cache_gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=cache_gateway.base_url, api_key="unused", max_retries=0)
        messages = [{"role": "user", "content": "stream first"}]
        stream = await c.chat.completions.create(
            model="cached", messages=messages, temperature=0, stream=True, extra_body={"mock_chunks": 4}
        )
        streamed = ""
        async for chunk in stream:
            for choice in chunk.choices:
                streamed += choice.delta.content or ""
        raw = await c.chat.completions.with_raw_response.create(
            model="cached", messages=messages, temperature=0, extra_body={"mock_chunks": 4}
        )
        await c.close()
        return streamed, raw.headers["x-lumen-cache"], raw.parse().choices[0].message.content

    streamed, status, content = asyncio.run(run())
    assert streamed == "tok0 tok1 tok2 tok3 "
    assert status == "hit"
    assert content == streamed
