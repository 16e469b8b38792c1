"""Anthropic's Messages API through the real gateway with the official `anthropic` SDK:
requests translated to chat completions for an OpenAI-compatible provider (the mock),
answers, streams and errors translated back into Anthropic's shapes."""

import asyncio
import json
import subprocess
import time

import anthropic
import pytest
import requests

from conftest import Gateway


@pytest.fixture(scope="module")
def gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: python, key: "sk-client-python" }}
  - {{ id: narrow, key: "sk-client-narrow", models: [other] }}
providers:
  mock: {{ base_url: "{mock.base_url}", api_key: "sk-provider-python", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
  - model: cut
    targets: [ {{ provider: mock, model: drop-mid-stream }} ]
  - model: refused
    targets: [ {{ provider: mock, model: status-400 }} ]
  - model: falls-back
    targets: [ {{ provider: mock, model: status-500 }}, {{ provider: mock, model: upstream-fast }} ]
  - model: whole
    targets: [ {{ provider: mock, model: ignores-stream }} ]
  - model: cached
    targets: [ {{ provider: mock, model: upstream-cached }} ]
    cache: {{ ttl: 1h, when: always }}
jobs: {{ workers: 1 }}
""",
    )
    yield g
    g.stop()


def client(gateway, key="sk-client-python"):
    # The SDK sends the key as `x-api-key`, and `anthropic-version` on every request.
    return anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key=key, max_retries=0)


WEATHER = {
    "name": "weather",
    "description": "The weather in a city",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_create_is_translated_both_ways(gateway, mock):
    msg = client(gateway).messages.create(
        model="fast", max_tokens=64, system="Be brief.", messages=[{"role": "user", "content": "hello"}]
    )
    assert msg.type == "message" and msg.role == "assistant" and msg.model == "fast"
    assert msg.id.startswith("msg_")
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "mock reply from upstream-fast"
    assert msg.stop_reason == "end_turn"
    assert msg.usage.input_tokens == 7 and msg.usage.output_tokens == 4
    last = mock.requests()[-1]
    assert last["path"].endswith("/chat/completions")
    sent = json.loads(last["body"])
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    assert sent["max_tokens"] == 64 and sent["model"] == "upstream-fast"
    headers = str(last["headers"]).lower()
    assert "sk-client-python" not in headers and "anthropic-version" not in headers


def test_async_create(gateway):
    async def run():
        c = anthropic.AsyncAnthropic(
            base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-client-python", max_retries=0
        )
        results = await asyncio.gather(
            *[c.messages.create(model="fast", max_tokens=8, messages=[{"role": "user", "content": str(i)}]) for i in range(5)]
        )
        await c.close()
        return results

    assert [r.content[0].text for r in asyncio.run(run())] == ["mock reply from upstream-fast"] * 5


def test_stream_emits_anthropics_events(gateway):
    with client(gateway).messages.stream(model="fast", max_tokens=64, messages=[{"role": "user", "content": "hello"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    types = [e.type for e in events]
    assert types[0] == "message_start"
    assert types[-1] == "message_stop"
    assert "content_block_start" in types and "content_block_stop" in types and "message_delta" in types
    assert "".join(e.text for e in events if e.type == "text") == "tok0 tok1 tok2 "
    assert final.content[0].text == "tok0 tok1 tok2 "
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 3


def test_a_whole_answer_to_a_stream_request_is_streamed(gateway):
    """A provider that ignores `stream: true`: the SDK's stream still gets Anthropic's events."""
    with client(gateway).messages.stream(model="whole", max_tokens=64, messages=[{"role": "user", "content": "hello"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    types = [e.type for e in events]
    assert types[0] == "message_start" and types[-1] == "message_stop"
    assert final.content[0].text == "mock reply from ignores-stream"
    assert final.stop_reason == "end_turn"
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 4


def test_a_tool_round_trip(gateway, mock):
    c = client(gateway)
    first = c.messages.create(model="fast", max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Weather in Paris?"}])
    assert first.stop_reason == "tool_use"
    uses = [b for b in first.content if b.type == "tool_use"]
    assert len(uses) == 1 and uses[0].name == "weather" and uses[0].input == {"city": "Paris"}
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["tools"] == [
        {"type": "function", "function": {"name": "weather", "description": WEATHER["description"], "parameters": WEATHER["input_schema"]}}
    ]
    second = c.messages.create(
        model="fast",
        max_tokens=64,
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": [b.model_dump() for b in first.content]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": uses[0].id, "content": "18C and sunny"}]},
        ],
    )
    assert second.content[0].text == "mock reply from upstream-fast: the tool said 18C and sunny"
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["messages"][1]["tool_calls"][0]["id"] == uses[0].id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": uses[0].id, "content": "18C and sunny"}


def test_streamed_tool_input_arrives_in_pieces(gateway):
    with client(gateway).messages.stream(
        model="fast", max_tokens=64, tools=[WEATHER], messages=[{"role": "user", "content": "Weather?"}]
    ) as stream:
        events = list(stream)
        final = stream.get_final_message()
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert pieces == ['{"city"', ':"Par', 'is"}']
    assert final.stop_reason == "tool_use"
    assert final.content[-1].type == "tool_use" and final.content[-1].input == {"city": "Paris"}


def test_count_tokens(gateway):
    c = client(gateway)
    short = c.messages.count_tokens(model="fast", messages=[{"role": "user", "content": "hi"}])
    long = c.messages.count_tokens(
        model="fast", system="You are a careful assistant. " * 20, tools=[WEATHER], messages=[{"role": "user", "content": "hi " * 100}]
    )
    assert 0 < short.input_tokens < long.input_tokens
    with pytest.raises(anthropic.NotFoundError):
        c.messages.count_tokens(model="nope", messages=[{"role": "user", "content": "hi"}])


def test_errors_take_anthropics_shape(gateway):
    c = client(gateway)
    with pytest.raises(anthropic.AuthenticationError) as e:
        client(gateway, key="sk-wrong").messages.create(model="fast", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["type"] == "authentication_error"
    with pytest.raises(anthropic.PermissionDeniedError) as e:
        client(gateway, key="sk-client-narrow").messages.create(model="fast", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "permission_error"
    with pytest.raises(anthropic.NotFoundError) as e:
        c.messages.create(model="nope", max_tokens=8, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["error"]["type"] == "not_found_error"
    with pytest.raises(anthropic.BadRequestError) as e:
        c.messages.create(model="fast", max_tokens=8, messages=[{"role": "user", "content": "x"}], tools=[{"type": "web_search_20250305", "name": "web_search"}])
    assert e.value.body["error"]["type"] == "invalid_request_error"
    assert "web_search" in e.value.body["error"]["message"]
    # A provider's own error, whole or on a stream before any event, reshaped.
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as e:
            c.messages.create(model="refused", max_tokens=8, stream=stream, messages=[{"role": "user", "content": "x"}])
        assert e.value.body == {"type": "error", "error": {"type": "invalid_request_error", "message": "mock upstream says 400"}}


def test_max_tokens_is_required_as_in_anthropics_api(gateway):
    r = requests.post(
        f"{gateway.base_url}/messages",
        headers={"x-api-key": "sk-client-python", "anthropic-version": "2023-06-01"},
        json={"model": "fast", "messages": [{"role": "user", "content": "x"}]},
    )
    assert r.status_code == 400
    assert r.json()["type"] == "error" and "max_tokens" in r.json()["error"]["message"]


def test_a_stream_that_breaks_ends_with_an_error_event(gateway):
    with pytest.raises(anthropic.APIStatusError) as e:
        with client(gateway).messages.stream(model="cut", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as stream:
            for _ in stream:
                pass
    assert e.value.body["type"] == "error"


def test_fallback_before_the_first_event(gateway):
    with client(gateway).messages.stream(model="falls-back", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as stream:
        final = stream.get_final_message()
    assert final.content[0].text == "tok0 tok1 tok2 "


def test_curl_with_a_bearer_token(gateway):
    out = subprocess.run(
        [
            "curl", "-sS", f"{gateway.base_url}/messages",
            "-H", "authorization: Bearer sk-client-python",
            "-H", "content-type: application/json",
            "-d", json.dumps({"model": "fast", "max_tokens": 8, "messages": [{"role": "user", "content": "x"}]}),
        ],
        capture_output=True, text=True, check=True,
    )
    body = json.loads(out.stdout)
    assert body["type"] == "message" and body["content"][0]["text"] == "mock reply from upstream-fast"


@pytest.mark.parametrize(
    "endpoint,body,text",
    [
        ("/v1/messages", {"model": "fast", "max_tokens": 8, "stream": True, "messages": [{"role": "user", "content": "x"}]},
         lambda r: r["content"][0]["text"]),
        ("/v1/responses", {"model": "fast", "input": "x"}, lambda r: r["output"][0]["content"][0]["text"]),
    ],
)
def test_jobs_take_messages_and_responses_requests(gateway, endpoint, body, text):
    """A job's result is the whole answer in its endpoint's own API (a streamed request
    included: a job collects it whole)."""
    headers = {"authorization": "Bearer sk-client-python"}
    root = gateway.base_url.removesuffix("/v1")
    r = requests.post(f"{root}/v1/jobs", json={"endpoint": endpoint, "body": body}, headers=headers)
    assert r.status_code == 202, r.text
    job = r.json()
    deadline = time.time() + 10
    while job["status"] not in ("completed", "failed"):
        assert time.time() < deadline, job
        time.sleep(0.05)
        job = requests.get(f"{root}/v1/jobs/{job['id']}", headers=headers).json()
    assert job["status"] == "completed", job
    assert text(job["result"]) == "mock reply from upstream-fast"


def test_the_cache_answers_translated_requests_in_each_api(gateway, mock):
    """A Messages request and the Responses and chat requests that mean the same are one cache
    entry (the chat answer), each hit translated back into its client's API, streams too."""
    import openai

    c = client(gateway)
    before = len(mock.requests())
    ask = dict(model="cached", max_tokens=32, system="Be brief.", messages=[{"role": "user", "content": "cache me"}])
    first = c.messages.with_raw_response.create(**ask)
    assert first.headers["x-lumen-cache"] == "miss"
    second = c.messages.with_raw_response.create(**ask)
    assert second.headers["x-lumen-cache"] == "hit"
    assert second.parse().content[0].text == first.parse().content[0].text == "mock reply from upstream-cached"
    assert second.parse().id != first.parse().id
    with c.messages.stream(**ask) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert events[-1].type == "message_stop"
    assert final.content[0].text == "mock reply from upstream-cached"
    oa = openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)
    r = oa.responses.with_raw_response.create(model="cached", instructions="Be brief.", input="cache me", max_output_tokens=32)
    assert r.headers["x-lumen-cache"] == "hit"
    assert r.parse().output_text == "mock reply from upstream-cached"
    # Stored like any response: it continues.
    follow = oa.responses.retrieve(r.parse().id)
    assert follow.output_text == "mock reply from upstream-cached"
    chat = oa.chat.completions.with_raw_response.create(
        model="cached", max_tokens=32,
        messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "cache me"}],
    )
    assert chat.headers["x-lumen-cache"] == "hit"
    assert len(mock.requests()) == before + 1, "one provider call for all of them"
