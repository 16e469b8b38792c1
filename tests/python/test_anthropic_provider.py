"""A provider that speaks Anthropic's Messages API (`api: anthropic`; the mock answers
`/v1/messages` as Anthropic does): chat completions and Responses requests translated to
Messages and back, streams included, a route falling back from an OpenAI-compatible target
to it, and Messages requests passed to it natively."""

import json

import anthropic
import openai
import pytest

from conftest import Gateway


@pytest.fixture(scope="module")
def gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: python, key: "sk-client-python" }}
providers:
  mock: {{ base_url: "{mock.base_url}", api_key: "sk-provider-openai", health: {{ enabled: false }} }}
  claude: {{ base_url: "{mock.base_url}", api: anthropic, api_key: "sk-provider-anthropic", health: {{ enabled: false }} }}
routes:
  - model: claude
    targets: [ {{ provider: claude, model: upstream-claude }} ]
  - model: claude-native
    targets: [ {{ provider: claude, model: upstream-claude }} ]
  - model: refused
    targets: [ {{ provider: claude, model: status-400 }} ]
  - model: cut
    targets: [ {{ provider: claude, model: drop-mid-stream }} ]
  - model: falls-back
    targets: [ {{ provider: mock, model: status-500 }}, {{ provider: claude, model: upstream-claude }} ]
  - model: openai-only
    targets: [ {{ provider: mock, model: upstream-fast }} ]
""",
    )
    yield g
    g.stop()


def oa(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)


def headers_of(recorded):
    return {k.lower(): v for k, v in recorded["headers"]}


WEATHER = {
    "type": "function",
    "function": {
        "name": "weather",
        "description": "The weather in a city",
        "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
}


def test_a_chat_request_is_translated_to_messages_and_back(gateway, mock):
    c = oa(gateway).chat.completions.create(
        model="claude", messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    )
    assert c.object == "chat.completion"
    assert c.choices[0].message.content == "mock reply from upstream-claude"
    assert c.choices[0].finish_reason == "stop"
    assert (c.usage.prompt_tokens, c.usage.completion_tokens, c.usage.total_tokens) == (7, 4, 11)
    last = mock.requests()[-1]
    assert last["path"] == "/v1/messages"
    h = headers_of(last)
    # The provider's key in Anthropic's header, the API version set; the client's key never.
    assert h["x-api-key"] == "sk-provider-anthropic"
    assert h["anthropic-version"] == "2023-06-01"
    assert "authorization" not in h
    assert "sk-client-python" not in json.dumps(last)
    sent = json.loads(last["body"])
    assert sent == {
        "model": "upstream-claude",
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "hello"}]}],
        "max_tokens": 4096,
    }


def test_a_chat_stream_falls_back_to_the_messages_provider(gateway, mock):
    stream = oa(gateway).chat.completions.create(
        model="falls-back", messages=[{"role": "user", "content": "x"}], stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == "tok0 tok1 tok2 "
    assert [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].usage.prompt_tokens == 7 and chunks[-1].usage.completion_tokens == 3
    paths = [r["path"] for r in mock.requests()[-2:]]
    assert paths == ["/v1/chat/completions", "/v1/messages"]


def test_a_stream_without_usage_asked_shows_none(gateway):
    chunks = list(oa(gateway).chat.completions.create(model="claude", messages=[{"role": "user", "content": "x"}], stream=True))
    assert all(ch.usage is None for ch in chunks)
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices) == "tok0 tok1 tok2 "


def test_tool_calls_both_ways(gateway, mock):
    c = oa(gateway)
    first = c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Weather in Paris?"}], tools=[WEATHER])
    call = first.choices[0].message.tool_calls[0]
    assert first.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["tools"] == [{"name": "weather", "description": "The weather in a city", "input_schema": WEATHER["function"]["parameters"]}]
    second = c.chat.completions.create(
        model="claude",
        tools=[WEATHER],
        messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
            {"role": "tool", "tool_call_id": call.id, "content": "18C"},
        ],
    )
    assert second.choices[0].message.content == "mock reply from upstream-claude: the tool said 18C"
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["messages"][1] == {"role": "assistant", "content": [{"type": "tool_use", "id": call.id, "name": "weather", "input": {"city": "Paris"}}]}
    assert sent["messages"][2] == {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "18C"}]}
    # Streamed: the arguments arrive in the pieces the provider sent them.
    chunks = list(c.chat.completions.create(model="claude", messages=[{"role": "user", "content": "Weather?"}], tools=[WEATHER], stream=True))
    pieces = [ch.choices[0].delta.tool_calls[0].function.arguments for ch in chunks if ch.choices and ch.choices[0].delta.tool_calls]
    assert pieces == ["", '{"city"', ':"Par', 'is"}']


def test_a_responses_request_reaches_a_messages_provider(gateway):
    r = oa(gateway).responses.create(model="claude", input="hello", max_output_tokens=32)
    assert r.output_text == "mock reply from upstream-claude"
    assert r.usage.input_tokens == 7
    with oa(gateway).responses.stream(model="claude", input="hello") as stream:
        final = stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 "


def test_a_messages_request_goes_to_it_natively(gateway, mock):
    a = anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-client-python", max_retries=0)
    msg = a.messages.create(
        model="claude", max_tokens=50, extra_body={"top_k": 5}, messages=[{"role": "user", "content": "hello"}], extra_headers={"anthropic-beta": "x-1"}
    )
    # The provider's own message, untouched (its id included).
    assert msg.id == "msg_mock_1" and msg.content[0].text == "mock reply from upstream-claude"
    last = mock.requests()[-1]
    sent = json.loads(last["body"])
    assert sent["model"] == "upstream-claude" and sent["top_k"] == 5 and sent["max_tokens"] == 50
    h = headers_of(last)
    assert h["x-api-key"] == "sk-provider-anthropic" and h["anthropic-beta"] == "x-1"
    with a.messages.stream(model="claude", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert final.id == "msg_mock_1" and final.content[0].text == "tok0 tok1 tok2 "
    assert events[-1].type == "message_stop"


def test_usage_of_a_native_stream_is_counted(gateway):
    """A native Messages stream's usage (input at its start, output at its end) is what the
    provider reported, in the metrics (and so in budgets and the ledger)."""
    import urllib.request

    a = anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-client-python", max_retries=0)
    with a.messages.stream(model="claude-native", max_tokens=50, messages=[{"role": "user", "content": "hi"}]) as stream:
        stream.get_final_message()
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.admin_port}/metrics") as r:
        text = r.read().decode()
    tokens = {}
    for line in text.splitlines():
        if line.startswith("lumen_tokens_total{") and 'route="claude-native"' in line:
            kind = line.split('kind="', 1)[1].split('"', 1)[0]
            tokens[kind] = float(line.rsplit(" ", 1)[1])
    assert tokens == {"prompt": 7, "completion": 3}, text[-3000:]


def test_provider_errors_reach_each_client_in_its_shape(gateway):
    with pytest.raises(openai.BadRequestError) as e:
        oa(gateway).chat.completions.create(model="refused", messages=[{"role": "user", "content": "x"}])
    assert e.value.message.endswith("mock upstream says 400")
    a = anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-client-python", max_retries=0)
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model="refused", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    assert e.value.body["type"] == "error" and e.value.body["error"]["message"] == "mock upstream says 400"


def test_a_broken_stream_ends_with_an_error_event(gateway):
    with pytest.raises(openai.APIError):
        for _ in oa(gateway).chat.completions.create(model="cut", messages=[{"role": "user", "content": "x"}], stream=True):
            pass


def test_an_endpoint_the_messages_api_lacks_is_a_clear_400(gateway, mock):
    before = len(mock.requests())
    with pytest.raises(openai.BadRequestError) as e:
        oa(gateway).embeddings.create(model="claude", input="x")
    assert "Messages API" in e.value.message
    assert len(mock.requests()) == before, "no provider was asked"


def test_a_native_stream_that_breaks_ends_with_anthropics_error_event(gateway):
    a = anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-client-python", max_retries=0)
    with pytest.raises(anthropic.APIStatusError) as e:
        with a.messages.stream(model="cut", max_tokens=8, messages=[{"role": "user", "content": "x"}]) as stream:
            for _ in stream:
                pass
    assert e.value.body["type"] == "error"


def test_chat_fields_the_messages_api_lacks_are_named_when_it_answers(gateway):
    """A chat request answered by the Messages provider (after the chat provider failed) names
    the fields the Messages API could not carry, whole and streamed."""
    c = oa(gateway)
    raw = c.chat.completions.with_raw_response.create(
        model="falls-back", messages=[{"role": "user", "content": "hi"}], seed=7, logprobs=True
    )
    assert raw.headers["x-lumen-provider"] == "claude"
    assert raw.headers["x-lumen-dropped-params"] == "logprobs, seed"
    with c.chat.completions.with_streaming_response.create(
        model="falls-back", messages=[{"role": "user", "content": "hi"}], seed=7, stream=True
    ) as stream:
        assert stream.headers["x-lumen-dropped-params"] == "seed"


def test_anthropic_only_blocks_and_server_tools_reach_a_messages_provider_as_they_came(gateway, mock):
    """A server tool or a document block has no chat form: a route whose target speaks the
    Messages API gets the request as it came; a route of chat targets refuses it with a 400
    naming the field, before any provider is called."""
    a = anthropic.Anthropic(base_url=gateway.base_url.removesuffix("/v1"), api_key="sk-client-python", max_retries=0)
    server_tool = [{"type": "web_search_20250305", "name": "web_search"}]
    document = [
        {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "The sky is blue."}},
        {"type": "text", "text": "What colour is the sky?"},
    ]
    msg = a.messages.create(model="claude", max_tokens=50, tools=server_tool, messages=[{"role": "user", "content": "hi"}])
    assert msg.id == "msg_mock_1"
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["tools"] == server_tool
    msg = a.messages.create(model="claude", max_tokens=50, messages=[{"role": "user", "content": document}])
    assert msg.id == "msg_mock_1"
    assert json.loads(mock.requests()[-1]["body"])["messages"][0]["content"] == document
    with a.messages.stream(model="claude", max_tokens=50, tools=server_tool, messages=[{"role": "user", "content": "hi"}]) as stream:
        assert stream.get_final_message().id == "msg_mock_1"
    # Chat targets only: a clear 400, and the provider never called.
    before = len(mock.requests())
    with pytest.raises(anthropic.BadRequestError) as e:
        a.messages.create(model="openai-only", max_tokens=50, tools=server_tool, messages=[{"role": "user", "content": "hi"}])
    assert "web_search" in e.value.body["error"]["message"]
    assert len(mock.requests()) == before
