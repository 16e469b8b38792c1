"""OpenAI's Responses API through the real gateway with the official `openai` SDK: requests
translated to chat completions for an OpenAI-compatible provider (the mock), answers and
streams translated back."""

import asyncio
import json

import openai
import pytest
import requests

from conftest import Gateway


@pytest.fixture(scope="module")
def gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: python, key: "sk-client-python" }}
  - {{ id: other, key: "sk-client-other" }}
providers:
  mock: {{ base_url: "{mock.base_url}", api_key: "sk-provider-python", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
  - model: cut
    targets: [ {{ provider: mock, model: drop-mid-stream }} ]
  - model: falls-back
    targets: [ {{ provider: mock, model: status-500 }}, {{ provider: mock, model: upstream-fast }} ]
  - model: whole
    targets: [ {{ provider: mock, model: ignores-stream }} ]
  - model: whole-cut
    targets: [ {{ provider: mock, model: whole-then-drop }} ]
""",
    )
    yield g
    g.stop()


def client(gateway):
    return openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)


WEATHER = {
    "type": "function",
    "name": "weather",
    "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
}


def test_create_is_translated_both_ways(gateway, mock):
    resp = client(gateway).responses.create(model="fast", instructions="Be brief.", input="hello", max_output_tokens=64)
    assert resp.object == "response" and resp.status == "completed"
    assert resp.output_text == "mock reply from upstream-fast"
    assert resp.model == "fast"
    assert resp.usage.input_tokens == 7 and resp.usage.output_tokens == 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 0
    last = mock.requests()[-1]
    assert last["path"].endswith("/chat/completions")
    sent = json.loads(last["body"])
    assert sent["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hello"},
    ]
    assert sent["max_tokens"] == 64 and sent["model"] == "upstream-fast"
    assert "sk-client-python" not in str(last["headers"])


def test_async_create(gateway):
    async def run():
        c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)
        results = await asyncio.gather(*[c.responses.create(model="fast", input=str(i)) for i in range(5)])
        await c.close()
        return results

    assert [r.output_text for r in asyncio.run(run())] == ["mock reply from upstream-fast"] * 5


def test_stream_emits_the_documented_events(gateway):
    with client(gateway).responses.stream(model="fast", input="hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:4] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
    ]
    assert types.count("response.output_text.delta") == 3
    assert types[-1] == "response.completed"
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert final.output_text == "tok0 tok1 tok2 "
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 3


def test_a_whole_answer_to_a_stream_request_is_streamed_and_stored(gateway):
    """A provider that ignores `stream: true` and answers whole JSON: the SDK's stream still
    gets the documented events (not a JSON body it would read as no events), and the
    completed response is stored for its next turn."""
    c = client(gateway)
    with c.responses.stream(model="whole", input="hello") as stream:
        events = list(stream)
        final = stream.get_final_response()
    types = [e.type for e in events]
    assert types[:2] == ["response.created", "response.in_progress"]
    assert types[-1] == "response.completed"
    assert final.output_text == "mock reply from ignores-stream"
    assert final.usage.input_tokens == 7 and final.usage.output_tokens == 4
    stored = c.responses.retrieve(final.id)
    assert stored.output_text == final.output_text and stored.status == "completed"
    nxt = c.responses.create(model="fast", input="and then?", previous_response_id=final.id)
    assert nxt.status == "completed"


def test_a_whole_answer_cut_mid_body_ends_the_stream_with_response_failed(gateway):
    """The provider ignored `stream` and then broke off: the client's event stream still ends
    with the API's failure event, not a silent cut."""
    r = requests.post(
        f"{gateway.base_url}/responses",
        headers={"authorization": "Bearer sk-client-python"},
        json={"model": "whole-cut", "input": "hello", "stream": True},
        timeout=30,
    )
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = [l.removeprefix("event: ") for l in r.text.splitlines() if l.startswith("event: ")]
    assert events[0] == "response.created" and events[-1] == "response.failed", r.text


def test_a_function_tool_round_trip(gateway, mock):
    c = client(gateway)
    first = c.responses.create(model="fast", input="Weather in Paris?", tools=[WEATHER])
    calls = [item for item in first.output if item.type == "function_call"]
    assert len(calls) == 1
    call = calls[0]
    assert call.name == "weather" and json.loads(call.arguments) == {"city": "Paris"}
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["tools"][0] == {
        "type": "function",
        "function": {k: WEATHER[k] for k in ("name", "description", "parameters")},
    }
    second = c.responses.create(
        model="fast",
        tools=[WEATHER],
        input=[
            {"role": "user", "content": "Weather in Paris?"},
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "18C and sunny"},
        ],
    )
    assert second.output_text == "mock reply from upstream-fast: the tool said 18C and sunny"
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["messages"][1]["tool_calls"][0]["id"] == call.call_id
    assert sent["messages"][2] == {"role": "tool", "tool_call_id": call.call_id, "content": "18C and sunny"}


def test_streamed_tool_arguments_arrive_in_pieces(gateway):
    with client(gateway).responses.stream(model="fast", input="Weather?", tools=[WEATHER]) as stream:
        events = list(stream)
        final = stream.get_final_response()
    deltas = [e.delta for e in events if e.type == "response.function_call_arguments.delta"]
    assert deltas == ['{"city"', ':"Par', 'is"}']
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == {"city": "Paris"}
    assert final.output[0].type == "function_call" and final.output[0].call_id == "call_mock_1"


def test_structured_output_is_asked_for_as_response_format(gateway, mock):
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"], "additionalProperties": False}
    client(gateway).responses.create(
        model="fast",
        input="x",
        text={"format": {"type": "json_schema", "name": "out", "schema": schema, "strict": True}},
    )
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["response_format"] == {
        "type": "json_schema",
        "json_schema": {"name": "out", "schema": schema, "strict": True},
    }


def test_fields_a_chat_target_cannot_take_are_dropped_and_said(gateway, mock):
    raw = client(gateway).responses.with_raw_response.create(
        model="fast", input="x", reasoning={"effort": "low"}, metadata={"team": "a"}
    )
    assert raw.headers["x-lumen-dropped-params"] == "reasoning, metadata"
    assert raw.parse().output_text == "mock reply from upstream-fast"
    sent = json.loads(mock.requests()[-1]["body"])
    assert "reasoning" not in sent and "metadata" not in sent


def test_a_built_in_tool_or_bad_input_is_a_clear_400(gateway):
    c = client(gateway)
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="fast", input="x", tools=[{"type": "web_search"}])
    assert e.value.status_code == 400
    assert "web_search" in e.value.message
    with pytest.raises(openai.BadRequestError):
        c.responses.create(model="fast", input=[{"type": "function_call_output", "output": "x"}])
    with pytest.raises(openai.NotFoundError):
        c.responses.create(model="nope", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="fast", input="x", previous_response_id="resp_123")
    assert e.value.code == "previous_response_not_found" and e.value.param == "previous_response_id"
    with pytest.raises(openai.BadRequestError) as e:
        c.responses.create(model="fast", input="x", max_output_tokens=-1)
    assert "max_output_tokens" in e.value.message


def test_a_stream_that_breaks_ends_with_response_failed(gateway):
    with client(gateway).responses.stream(model="cut", input="x") as stream:
        events = list(stream)
    assert events[-1].type == "response.failed"
    assert events[-1].response.status == "failed"
    assert events[-1].response.error is not None


def test_fallback_before_the_first_event(gateway):
    with client(gateway).responses.stream(model="falls-back", input="x") as stream:
        final = stream.get_final_response()
    assert final.output_text == "tok0 tok1 tok2 "


def test_an_agents_sdk_agent_with_a_function_tool_runs_to_completion(gateway, mock):
    """The OpenAI Agents SDK (Responses API by default): the model calls the tool, the SDK runs
    it and sends its output back, and the model's answer is the run's final output; streamed
    too."""
    import agents

    agents.set_tracing_disabled(True)

    @agents.function_tool
    def weather(city: str) -> str:
        """The weather in a city."""
        return f"18C in {city}"

    def agent():
        c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-client-python", max_retries=0)
        model = agents.OpenAIResponsesModel(model="fast", openai_client=c)
        return agents.Agent(name="weather", instructions="Use the tool.", tools=[weather], model=model)

    result = agents.Runner.run_sync(agent(), "Weather in Paris?")
    assert result.final_output == "mock reply from upstream-fast: the tool said 18C in Paris"
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["messages"][0] == {"role": "system", "content": "Use the tool."}
    assert sent["messages"][-1]["role"] == "tool"

    async def streamed():
        run = agents.Runner.run_streamed(agent(), "Weather in Paris?")
        kinds = [e.type async for e in run.stream_events()]
        return run.final_output, kinds

    final, kinds = asyncio.run(streamed())
    assert "raw_response_event" in kinds
    # Streamed, the mock answers the tool's output in tokens rather than quoting it.
    assert final == "tok0 tok1 tok2 "


def test_a_stored_response_is_read_listed_and_deleted_by_its_key_only(gateway):
    c = client(gateway)
    resp = c.responses.create(model="fast", input="hello", metadata={"t": "1"})
    assert resp.store is True
    got = c.responses.retrieve(resp.id)
    assert got.id == resp.id and got.output_text == resp.output_text
    items = c.responses.input_items.list(resp.id)
    assert [(i.role, i.content[0].text) for i in items.data] == [("user", "hello")]
    other = openai.OpenAI(base_url=gateway.base_url, api_key="sk-client-other", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(resp.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(resp.id)
    with pytest.raises(openai.BadRequestError):
        other.responses.create(model="fast", input="x", previous_response_id=resp.id)
    c.responses.delete(resp.id)
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(resp.id)
    # `store: false` (what Codex sends): nothing is kept.
    unstored = c.responses.create(model="fast", input="x", store=False)
    assert unstored.store is False
    with pytest.raises(openai.NotFoundError):
        c.responses.retrieve(unstored.id)


def test_previous_response_id_continues_the_conversation(gateway, mock):
    """Three turns, the second streamed: each turn's chat request carries the whole
    conversation, and the instructions are this turn's only."""
    c = client(gateway)
    first = c.responses.create(model="fast", instructions="Be brief.", input="My name is Ada.")
    with c.responses.stream(model="fast", input="What is my name?", previous_response_id=first.id) as stream:
        second = stream.get_final_response()
    assert second.previous_response_id == first.id
    third = c.responses.create(model="fast", instructions="Be kind.", input="Thanks.", previous_response_id=second.id)
    assert third.output_text == "mock reply from upstream-fast"
    sent = json.loads(mock.requests()[-1]["body"])
    assert sent["messages"] == [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "My name is Ada."},
        {"role": "assistant", "content": "mock reply from upstream-fast"},
        {"role": "user", "content": "What is my name?"},
        {"role": "assistant", "content": "tok0 tok1 tok2 "},
        {"role": "user", "content": "Thanks."},
    ]
    items = c.responses.input_items.list(third.id, order="asc")
    assert [i.type for i in items.data] == ["message"] * 5


def test_previous_response_id_across_two_nodes_sharing_redis(mock, redis_server):
    """Two gateways on one Redis: a conversation goes on whichever node each turn reaches."""
    config = f"""
keys:
  - {{ id: python, key: "sk-client-python" }}
redis: {{ url: "{redis_server.url}" }}
providers:
  mock: {{ base_url: "{mock.base_url}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: upstream-fast }} ]
"""
    a, b = Gateway(config), Gateway(config)
    try:
        ca, cb = client(a), client(b)
        first = ca.responses.create(model="fast", input="one")
        with cb.responses.stream(model="fast", input="two", previous_response_id=first.id) as stream:
            second = stream.get_final_response()
        third = ca.responses.create(model="fast", input="three", previous_response_id=second.id)
        sent = json.loads(mock.requests()[-1]["body"])
        assert [m["content"] for m in sent["messages"]] == [
            "one", "mock reply from upstream-fast", "two", "tok0 tok1 tok2 ", "three",
        ]
        assert cb.responses.retrieve(third.id).output_text == third.output_text
        ca.responses.delete(first.id)
        with pytest.raises(openai.NotFoundError):
            cb.responses.retrieve(first.id)
    finally:
        a.stop()
        b.stop()
