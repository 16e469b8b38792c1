"""The official `openai` Python SDK against the real gateway: what existing clients do when
they only change `base_url`."""

import asyncio

import openai
import pytest


def client(gateway, **kw):
    return openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0, **kw)


def test_sync_chat(gateway, mock):
    resp = client(gateway).chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "hello"}]
    )
    assert resp.choices[0].message.content == "mock reply from upstream-fast"
    assert resp.usage.total_tokens == 11
    last = mock.requests()[-1]
    assert '"model":"upstream-fast"' in last["body"].replace(" ", "")
    headers = dict(last["headers"])
    assert headers["authorization"] == "Bearer sk-provider-python"
    assert "sk-client-python" not in str(last["headers"])


def test_async_chat(gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)
        results = await asyncio.gather(
            *[c.chat.completions.create(model="fast", messages=[{"role": "user", "content": str(i)}]) for i in range(10)]
        )
        await c.close()
        return results

    results = asyncio.run(run())
    assert [r.choices[0].message.content for r in results] == ["mock reply from upstream-fast"] * 10


def test_streaming_chat(gateway):
    stream = client(gateway).chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock_chunks": 5},
    )
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            text += choice.delta.content or ""
            finish = choice.finish_reason or finish
    assert text == "tok0 tok1 tok2 tok3 tok4 "
    assert finish == "stop"
    assert usage is not None and usage.completion_tokens == 5


def test_async_streaming_chat(gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)
        stream = await c.chat.completions.create(
            model="fast", messages=[{"role": "user", "content": "x"}], stream=True, extra_body={"mock_chunks": 3}
        )
        text = ""
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
        await c.close()
        return text

    assert asyncio.run(run()) == "tok0 tok1 tok2 "


def test_embeddings(gateway):
    resp = client(gateway).embeddings.create(model="text-embedding-3-small", input=["a", "b", "c"])
    assert [d.index for d in resp.data] == [0, 1, 2]
    assert len(resp.data[0].embedding) == 3


def test_models_list(gateway):
    ids = [m.id for m in client(gateway).models.list()]
    assert ids == ["fast"]
    assert client(gateway).models.retrieve("fast").id == "fast"


def test_unknown_model_raises_not_found(gateway):
    with pytest.raises(openai.NotFoundError) as err:
        client(gateway).chat.completions.create(model="gpt-9", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404
    assert err.value.code == "model_not_found"


def test_bad_request_raises_bad_request(gateway):
    with pytest.raises(openai.BadRequestError) as err:
        client(gateway).chat.completions.create(model="fast", messages="not a list")
    assert err.value.status_code == 400


def test_request_id_is_returned(gateway):
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="fast", messages=[{"role": "user", "content": "x"}], extra_headers={"x-request-id": "py-trace-1"}
    )
    assert raw.headers["x-request-id"] == "py-trace-1"


def test_wrong_key_raises_authentication_error(gateway):
    c = openai.OpenAI(base_url=gateway.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        c.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 401
    assert err.value.code == "invalid_api_key"
    assert "sk-wrong" not in str(err.value)
    assert "sk-wrong" not in gateway.logs()


def test_model_outside_allow_list_raises_permission_denied(gateway):
    c = openai.OpenAI(base_url=gateway.base_url, api_key="sk-embed-only", max_retries=0)
    assert [m.id for m in c.models.list()] == []
    with pytest.raises(openai.PermissionDeniedError) as err:
        c.chat.completions.create(model="fast", messages=[{"role": "user", "content": "x"}])
    assert err.value.code == "model_not_allowed"
    assert c.embeddings.create(model="text-embedding-3-small", input="x").data[0].index == 0


def test_a_stream_without_stream_options_is_accounted_but_unchanged(gateway):
    """Lumen asks the provider for usage on the client's behalf (usage accounting), and keeps
    the extra chunk from a client that did not ask: code that reads `chunk.choices[0]` on every
    chunk keeps working, and /admin/usage still has the stream's tokens."""
    import json
    import urllib.request

    def usage():
        url = f"http://127.0.0.1:{gateway.admin_port}/admin/usage?key=python&model=fast"
        with urllib.request.urlopen(url) as r:
            return json.load(r)["total"]

    before = usage()
    stream = client(gateway).chat.completions.create(
        model="fast",
        messages=[{"role": "user", "content": "hello"}],
        stream=True,
        extra_body={"mock_chunks": 4},
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == "tok0 tok1 tok2 tok3 "
    import time

    deadline = time.time() + 5
    while usage()["requests"] == before["requests"] and time.time() < deadline:
        time.sleep(0.05)
    after = usage()
    assert after["requests"] == before["requests"] + 1
    assert after["completion_tokens"] == before["completion_tokens"] + 4
    assert after["prompt_tokens"] > before["prompt_tokens"]
