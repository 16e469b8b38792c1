"""A provider that speaks OpenAI's Responses API natively (`api: responses`; the mock answers
`/v1/responses` as OpenAI does): Responses requests reach it as they came (built-in tools and
the provider's own stored responses included), chat requests go to its chat completions, and
a route with a chat-only target still refuses what only the Responses API can serve."""

import json

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
  native: {{ base_url: "{mock.base_url}", api: responses, api_key: "sk-provider-native", health: {{ enabled: false }} }}
  chat: {{ base_url: "{mock.base_url}", health: {{ enabled: false }} }}
routes:
  - model: gpt
    targets: [ {{ provider: native, model: upstream-gpt }} ]
  - model: chat-only
    targets: [ {{ provider: chat, model: upstream-fast }} ]
  - model: chat-then-native
    targets: [ {{ provider: chat, model: status-500 }}, {{ provider: native, model: upstream-gpt }} ]
  - model: native-then-chat
    targets: [ {{ provider: native, model: status-500 }}, {{ provider: chat, model: upstream-fast }} ]
""",
    )
    yield g
    g.stop()


def client(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)


def test_a_responses_request_reaches_it_as_it_came(gateway, mock):
    r = client(gateway).responses.create(
        model="gpt", input="hi", tools=[{"type": "web_search"}], reasoning={"effort": "low"}
    )
    # The provider's own response (its id), with the built-in tool it was given.
    assert r.id == "resp_mock_1"
    assert r.output_text == "mock responses reply from upstream-gpt with [\"web_search\"]"
    last = mock.requests()[-1]
    assert last["path"] == "/v1/responses"
    sent = json.loads(last["body"])
    assert sent["model"] == "upstream-gpt" and sent["reasoning"] == {"effort": "low"}
    headers = {k.lower(): v for k, v in last["headers"]}
    assert headers["authorization"] == "Bearer sk-provider-native"
    with client(gateway).responses.stream(model="gpt", input="hi") as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 " and events[-1].type == "response.completed"


def test_the_providers_own_ids_continue_there(gateway, mock):
    first = client(gateway).responses.create(model="gpt", input="hi")
    second = client(gateway).responses.create(model="gpt", input="again", previous_response_id=first.id)
    assert second.output_text.endswith(f"prev={first.id}")


def test_a_chat_request_goes_to_its_chat_completions(gateway, mock):
    c = client(gateway).chat.completions.create(model="gpt", messages=[{"role": "user", "content": "x"}])
    assert c.choices[0].message.content == "mock reply from upstream-gpt"
    assert mock.requests()[-1]["path"] == "/v1/chat/completions"


def test_what_only_the_responses_api_serves_needs_such_a_target(gateway, mock):
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="chat-only", input="x", tools=[{"type": "web_search"}])
    assert "web_search" in e.value.message
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="chat-only", input="x", previous_response_id="resp_unknown")
    assert e.value.code == "previous_response_not_found"
    # A target that cannot take the request is passed over (not tried, not counted): the
    # native one answers.
    before = len(mock.requests())
    r = c.responses.create(model="chat-then-native", input="x", tools=[{"type": "web_search"}])
    assert r.output_text == 'mock responses reply from upstream-gpt with ["web_search"]'
    assert [q["path"] for q in mock.requests()[before:]] == ["/v1/responses"]
    # A plain request falls back from the failing chat target to the native one.
    r = c.responses.create(model="chat-then-native", input="x")
    assert r.output_text.startswith("mock responses reply from upstream-gpt")


def test_usage_of_a_native_stream_is_counted(gateway):
    import urllib.request

    with client(gateway).responses.stream(model="gpt", input="count me") as stream:
        stream.get_final_response()
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.admin_port}/metrics") as r:
        text = r.read().decode()
    prompt = [l for l in text.splitlines() if l.startswith("lumen_tokens_total{") and 'route="gpt"' in l and 'kind="prompt"' in l]
    assert prompt and float(prompt[0].rsplit(" ", 1)[1]) >= 5, text[-2000:]


def test_dropped_params_are_named_for_the_target_that_answered(gateway):
    """`x-lumen-dropped-params` says what the answering target was not given: nothing for a
    native Responses target, even when a chat target was tried first; `reasoning` and
    `metadata` when a chat target answers after the native one failed."""
    c = client(gateway)
    ask = dict(input="hi", reasoning={"effort": "low"}, metadata={"team": "a"})
    for model in ["gpt", "chat-then-native"]:
        raw = c.responses.with_raw_response.create(model=model, **ask)
        assert "x-lumen-dropped-params" not in raw.headers, (model, dict(raw.headers))
        assert raw.parse().output_text.startswith("mock responses reply")
    raw = c.responses.with_raw_response.create(model="native-then-chat", **ask)
    assert raw.headers["x-lumen-attempts"] == "2"
    assert raw.headers["x-lumen-dropped-params"] == "reasoning, metadata"
    assert raw.parse().output_text == "mock reply from upstream-fast"
    with c.responses.with_streaming_response.create(model="native-then-chat", stream=True, **ask) as stream:
        assert stream.headers["x-lumen-dropped-params"] == "reasoning, metadata"
    with c.responses.with_streaming_response.create(model="chat-then-native", stream=True, **ask) as stream:
        assert "x-lumen-dropped-params" not in stream.headers
