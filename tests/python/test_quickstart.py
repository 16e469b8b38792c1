"""The quickstart as a new user gets it: conf/lumen.yaml (ports moved to free ones), the gateway
spawning `lumen-llama` with SmolLM2-135M-Instruct, and the official openai SDK asking it real
questions through the gateway."""

import json
from pathlib import Path

import openai
import pytest

from conftest import REPO, Gateway, free_port

MODEL = REPO / "models" / "SmolLM2-135M-Instruct.Q4_1.gguf"

pytestmark = pytest.mark.skipif(
    not MODEL.exists(), reason="SmolLM2 not fetched: run `target/release/lumen-llama fetch-model smollm2`"
)


@pytest.fixture(scope="module")
def quickstart():
    text = (REPO / "conf" / "lumen.yaml").read_text()
    sidecar_port = free_port()
    text = text.replace("127.0.0.1:8081", f"127.0.0.1:{sidecar_port}")
    text = text.replace("models/SmolLM2-135M-Instruct.Q4_1.gguf", str(MODEL))
    # Gateway writes its own listen/admin lines first; drop the file's.
    body = "\n".join(l for l in text.splitlines() if not l.startswith(("listen:", "admin_listen:")))
    g = Gateway(body)
    client = openai.OpenAI(base_url=g.base_url, api_key="unused", max_retries=0, timeout=120)
    # The sidecar loads after the gateway is up: wait for its first answer.
    import time

    deadline = time.time() + 120
    while True:
        try:
            client.chat.completions.create(model="smollm2", messages=[{"role": "user", "content": "hi"}], max_tokens=1)
            break
        except openai.APIStatusError:
            if time.time() > deadline:
                raise
            time.sleep(0.5)
    yield g, client
    g.stop()


QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


def test_models_list_shows_the_local_model(quickstart):
    _, client = quickstart
    assert "smollm2" in [m.id for m in client.models.list()]


def test_real_answer_through_the_gateway(quickstart):
    _, client = quickstart
    resp = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, seed=42, max_tokens=16)
    assert "Paris" in resp.choices[0].message.content


def test_stream_matches_non_stream(quickstart):
    _, client = quickstart
    full = client.chat.completions.create(model="fast", messages=QUESTION, temperature=0, seed=7, max_tokens=24)
    text = ""
    for chunk in client.chat.completions.create(
        model="fast", messages=QUESTION, temperature=0, seed=7, max_tokens=24, stream=True
    ):
        for choice in chunk.choices:
            text += choice.delta.content or ""
    assert text == full.choices[0].message.content


def test_json_object_parses(quickstart):
    _, client = quickstart
    resp = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Give a JSON object with keys city and country for Paris."}],
        response_format={"type": "json_object"},
        temperature=0,
        max_tokens=64,
    )
    assert isinstance(json.loads(resp.choices[0].message.content), dict)


def test_max_tokens_gives_length_with_exact_usage(quickstart):
    _, client = quickstart
    resp = client.chat.completions.create(model="smollm2", messages=QUESTION, max_tokens=5, temperature=0)
    assert resp.choices[0].finish_reason == "length"
    assert resp.usage.completion_tokens == 5


def test_checksum_is_part_of_the_quickstart(quickstart):
    g, _ = quickstart
    assert "sha256=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53" in g.config.read_text()


def test_a_job_on_the_real_model_matches_the_synchronous_answer(quickstart):
    """The README's job example: the same question as a job, collected later, through the
    real sidecar; its result is what the synchronous endpoint answers."""
    import time
    import urllib.request

    g, client = quickstart
    base = f"http://127.0.0.1:{g.port}"
    body = {"model": "smollm2", "messages": QUESTION, "temperature": 0, "max_tokens": 8}
    req = urllib.request.Request(
        f"{base}/v1/jobs",
        data=json.dumps({"endpoint": "/v1/chat/completions", "body": body}).encode(),
        headers={"content-type": "application/json"},
    )
    with urllib.request.urlopen(req) as r:
        assert r.status == 202
        job = json.load(r)
    deadline = time.time() + 120
    while job["status"] not in ("completed", "failed"):
        assert time.time() < deadline, job
        time.sleep(0.2)
        with urllib.request.urlopen(f"{base}/v1/jobs/{job['id']}") as r:
            job = json.load(r)
    assert job["status"] == "completed", job
    sync = client.chat.completions.create(**body)
    assert job["result"]["choices"][0]["message"]["content"] == sync.choices[0].message.content
    assert "Paris" in sync.choices[0].message.content
    assert job["metrics"]["completion_tokens"] == sync.usage.completion_tokens


def test_responses_api_on_the_real_model(quickstart):
    """A Responses request, translated for the local sidecar, gets the same answer as the chat
    request it becomes; streamed, the same text again, then `response.completed` with usage."""
    _, client = quickstart
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
    resp = client.responses.create(model="smollm2", input=QUESTION[0]["content"], temperature=0, max_output_tokens=16)
    assert resp.status in ("completed", "incomplete")
    assert resp.output_text == chat.choices[0].message.content
    assert "Paris" in resp.output_text
    assert resp.usage.input_tokens == chat.usage.prompt_tokens
    assert resp.usage.output_tokens == chat.usage.completion_tokens
    with client.responses.stream(model="smollm2", input=QUESTION[0]["content"], temperature=0, max_output_tokens=16) as stream:
        events = list(stream)
        final = stream.get_final_response()
    assert events[-1].type in ("response.completed", "response.incomplete")
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == resp.output_text
    assert final.usage.output_tokens == resp.usage.output_tokens


def test_messages_api_on_the_real_model(quickstart):
    """A Messages request from the `anthropic` SDK, translated for the local sidecar, gets the
    same answer as the chat request it becomes; streamed, the same text, then `message_stop`."""
    import anthropic

    g, client = quickstart
    chat = client.chat.completions.create(model="smollm2", messages=QUESTION, temperature=0, max_tokens=16)
    a = anthropic.Anthropic(base_url=g.base_url.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=120)
    msg = a.messages.create(model="smollm2", messages=QUESTION, max_tokens=16, extra_body={"temperature": 0})
    assert msg.type == "message" and msg.stop_reason in ("end_turn", "max_tokens")
    assert msg.content[0].text == chat.choices[0].message.content
    assert msg.usage.input_tokens == chat.usage.prompt_tokens
    assert msg.usage.output_tokens == chat.usage.completion_tokens
    with a.messages.stream(model="smollm2", messages=QUESTION, max_tokens=16, extra_body={"temperature": 0}) as stream:
        events = list(stream)
        final = stream.get_final_message()
    assert events[-1].type == "message_stop"
    assert final.content[0].text == msg.content[0].text
    assert final.usage.output_tokens == msg.usage.output_tokens


def test_responses_json_schema_uses_the_sidecars_grammar(quickstart):
    """`text.format` `json_schema` on a Responses request reaches the sidecar as
    `response_format`, whose grammar makes the answer fit the schema."""
    _, client = quickstart
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    resp = client.responses.create(
        model="smollm2",
        input="Give the city and country of Paris as JSON.",
        text={"format": {"type": "json_schema", "name": "place", "schema": schema, "strict": True}},
        temperature=0,
        max_output_tokens=64,
    )
    place = json.loads(resp.output_text)
    assert set(place) == {"city", "country"}
    assert all(isinstance(v, str) for v in place.values())


def test_an_agents_sdk_agent_calls_a_tool_on_the_real_model(quickstart):
    """The OpenAI Agents SDK (Responses API) runs an agent whose function tool the local model
    calls: the sidecar's grammar makes SmolLM2 emit a valid call, the gateway translates it to
    a Responses `function_call`, the SDK runs the tool, and the run ends with the tool's
    output. Then an agent without a required tool answers in prose, plain and streamed."""
    import asyncio

    import agents

    g, _ = quickstart
    agents.set_tracing_disabled(True)
    seen = []

    @agents.function_tool
    def capital(country: str) -> str:
        """The capital of a country."""
        seen.append(country)
        return "Paris"

    def agent(**kw):
        c = openai.AsyncOpenAI(base_url=g.base_url, api_key="unused", max_retries=0, timeout=120)
        model = agents.OpenAIResponsesModel(model="smollm2", openai_client=c)
        settings = agents.ModelSettings(temperature=0, max_tokens=48, **kw.pop("settings", {}))
        return agents.Agent(name="geo", instructions="Answer in one word.", tools=[capital], model=model, model_settings=settings, **kw)

    called = agents.Runner.run_sync(
        agent(settings={"tool_choice": "required"}, tool_use_behavior="stop_on_first_tool"),
        "What is the capital of France? Use the tool.",
    )
    assert called.final_output == "Paris"
    assert len(seen) == 1 and isinstance(seen[0], str) and seen[0]

    result = agents.Runner.run_sync(agent(settings={"tool_choice": "none"}), QUESTION[0]["content"])
    assert isinstance(result.final_output, str) and result.final_output.strip()

    async def streamed():
        run = agents.Runner.run_streamed(agent(settings={"tool_choice": "none"}), QUESTION[0]["content"])
        kinds = [e.type async for e in run.stream_events()]
        return run.final_output, kinds

    final, kinds = asyncio.run(streamed())
    assert "raw_response_event" in kinds
    assert final == result.final_output


WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The current weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    }
]
WEATHER_QUESTION = [{"role": "user", "content": "What is the weather in Paris?"}]


def test_a_tool_round_trip_with_the_sdk_on_the_real_model(quickstart):
    """The openai SDK parses the sidecar's tool call (through the gateway), sends the tool's
    result back, and gets a text answer; streamed, the same call arrives in deltas."""
    _, client = quickstart
    resp = client.chat.completions.create(
        model="smollm2", messages=WEATHER_QUESTION, tools=WEATHER, tool_choice="required", temperature=0, max_tokens=64
    )
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    call = choice.message.tool_calls[0]
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    args = json.loads(call.function.arguments)
    assert isinstance(args["city"], str) and args["city"]

    name, arguments, ids, finish = "", "", [], None
    for chunk in client.chat.completions.create(
        model="smollm2", messages=WEATHER_QUESTION, tools=WEATHER, tool_choice="required", temperature=0, max_tokens=64, stream=True
    ):
        for c in chunk.choices:
            for d in c.delta.tool_calls or []:
                if d.id:
                    ids.append(d.id)
                name += (d.function and d.function.name) or ""
                arguments += (d.function and d.function.arguments) or ""
            finish = c.finish_reason or finish
    assert (name, arguments, finish) == ("get_weather", call.function.arguments, "tool_calls")
    assert len(ids) == 1

    history = WEATHER_QUESTION + [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"},
    ]

    async def follow_up():
        a = openai.AsyncOpenAI(base_url=client.base_url, api_key="unused", max_retries=0, timeout=120)
        return await a.chat.completions.create(model="smollm2", messages=history, tools=WEATHER, tool_choice="none", temperature=0, max_tokens=32)

    import asyncio

    answer = asyncio.run(follow_up())
    assert answer.choices[0].message.tool_calls is None
    assert answer.choices[0].message.content.strip()


def test_logprobs_on_the_real_model(quickstart):
    _, client = quickstart
    resp = client.chat.completions.create(
        model="smollm2", messages=QUESTION, temperature=0, max_tokens=6, logprobs=True, top_logprobs=2
    )
    content = resp.choices[0].logprobs.content
    assert len(content) == resp.usage.completion_tokens
    assert "".join(t.token for t in content) == resp.choices[0].message.content
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in content)


def test_a_second_turn_reuses_the_cached_prefix(quickstart):
    """Turn 2 of a chat resends turn 1: the sidecar's slot still holds it, so usage says most
    of the prompt was cached, and the answer is the one a cold start gives."""
    _, client = quickstart
    system = {"role": "system", "content": "You are a concise geography tutor. " * 12}
    turn1 = [system] + QUESTION
    first = client.chat.completions.create(model="smollm2", messages=turn1, temperature=0, max_tokens=12)
    turn2 = turn1 + [
        {"role": "assistant", "content": first.choices[0].message.content},
        {"role": "user", "content": "And of Italy?"},
    ]
    second = client.chat.completions.create(model="smollm2", messages=turn2, temperature=0, max_tokens=12)
    cached = second.usage.prompt_tokens_details.cached_tokens
    assert cached > second.usage.prompt_tokens // 2, (cached, second.usage.prompt_tokens)


def test_token_counts_on_a_local_route_are_the_models_own(quickstart):
    """`count_tokens` (anthropic SDK) and `responses.input_tokens` go to the sidecar's tokenizer
    for a local route: the count is exactly the prompt the request then reports, not an
    estimate from the body's size."""
    import anthropic

    g, client = quickstart
    a = anthropic.Anthropic(base_url=g.base_url.removesuffix("/v1"), api_key="unused", max_retries=0, timeout=120)
    messages = [{"role": "user", "content": "Name three rivers in Europe and the seas they reach. " * 4}]
    count = a.messages.count_tokens(model="smollm2", messages=messages)
    msg = a.messages.create(model="smollm2", messages=messages, max_tokens=4, extra_body={"temperature": 0})
    assert count.input_tokens == msg.usage.input_tokens
    counted = client.responses.input_tokens.count(model="smollm2", input=messages[0]["content"])
    resp = client.responses.create(model="smollm2", input=messages[0]["content"], max_output_tokens=16, temperature=0)
    assert counted.input_tokens == resp.usage.input_tokens
