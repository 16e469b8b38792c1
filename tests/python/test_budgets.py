"""Prices and dollar budgets seen from the official SDKs: `openai` (sync, async, streaming)
reads what an answer cost and what is left, and a spent budget raises the SDK's own
`RateLimitError` carrying `budget_exceeded`; `anthropic` gets the same refusal in Anthropic's
shape. Every answer the mock gives costs what its `usage` says at the configured price."""

import asyncio
import json
import urllib.request

import anthropic
import openai
import pytest

from conftest import Gateway


@pytest.fixture(scope="module")
def gateway(mock):
    g = Gateway(
        f"""
keys:
  - {{ id: sync, key: "sk-sync", budget: {{ usd_per_day: 0.004 }} }}
  - {{ id: async, key: "sk-async", budget: {{ usd_per_day: 1 }} }}
  - {{ id: claude, key: "sk-claude", budget: {{ usd_per_day: 0.0001 }} }}
prices:
  - {{ provider: mock, model: up, input: 1.0, output: 2.0 }}
providers:
  mock: {{ base_url: "{mock.base_url}", health: {{ enabled: false }} }}
routes:
  - model: fast
    targets: [ {{ provider: mock, model: up }} ]
"""
    )
    yield g
    g.stop()


# 1,000 prompt tokens at $1/M and 500 completion tokens at $2/M: $0.002.
USAGE = {"prompt_tokens": 1000, "completion_tokens": 500, "total_tokens": 1500}
HI = [{"role": "user", "content": "hi"}]


def admin(g, path):
    with urllib.request.urlopen(f"http://127.0.0.1:{g.admin_port}{path}") as r:
        return json.load(r)


def test_an_answer_says_what_it_cost_and_a_spent_budget_raises_rate_limit_error(gateway):
    client = openai.OpenAI(base_url=gateway.base_url, api_key="sk-sync", max_retries=0)
    for spent in [0.0, 0.002]:
        raw = client.chat.completions.with_raw_response.create(
            model="fast", messages=HI, max_tokens=10, extra_body={"mock_usage": USAGE}
        )
        assert raw.headers["x-lumen-cost-usd"] == "0.002000"
        # What is left after this request's reservation (its worst case: 10 completion tokens
        # at 2 µ$ and its prompt's estimate at 1 µ$, under 200 µ$ in all).
        left = float(raw.headers["x-lumen-budget-remaining-usd"])
        assert 0.004 - spent - 0.0002 < left < 0.004 - spent - 0.00002, left
        assert raw.parse().choices[0].message.content == "mock reply from up"
    with pytest.raises(openai.RateLimitError) as refused:
        client.chat.completions.create(
            model="fast", messages=HI, max_tokens=10, extra_body={"mock_usage": USAGE}
        )
    assert refused.value.code == "key_budget_exceeded"
    assert refused.value.type == "budget_exceeded"
    assert int(refused.value.response.headers["retry-after"]) >= 1
    day = next(b for b in admin(gateway, "/admin/budgets")["budgets"] if b["name"] == "sync")
    assert day["windows"][0]["used_usd"] == 0.004


def test_async_streams_are_charged_and_counted_in_the_ledger(gateway):
    async def run():
        client = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="sk-async", max_retries=0)
        streams = await asyncio.gather(
            *[
                client.chat.completions.create(
                    model="fast",
                    messages=HI,
                    stream=True,
                    stream_options={"include_usage": True},
                    extra_body={"mock_usage": USAGE},
                )
                for _ in range(3)
            ]
        )
        texts = []
        for s in streams:
            text = ""
            async for chunk in s:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                elif chunk.usage:
                    assert chunk.usage.prompt_tokens == 1000
            texts.append(text)
        return texts

    assert asyncio.run(run()) == ["tok0 tok1 tok2 "] * 3
    # Streams carry no cost header (their head goes out first); the ledger has their cost.
    report = admin(gateway, "/admin/usage?key=async")
    assert report["total"]["cost_micros"] == 3 * 2000, report
    day = next(b for b in admin(gateway, "/admin/budgets")["budgets"] if b["name"] == "async")
    assert day["windows"][0]["used_usd"] == 0.006
    assert day["windows"][0]["reserved_usd"] == 0


def test_anthropic_sdk_gets_the_refusal_in_its_own_shape(gateway):
    """A Messages request is translated for the mock, which reports 7 prompt and 4 completion
    tokens: 15 µ$ an answer, against a budget of 100 µ$."""
    client = anthropic.Anthropic(base_url=gateway.base_url[: -len("/v1")], api_key="sk-claude", max_retries=0)
    raw = client.messages.with_raw_response.create(model="fast", max_tokens=10, messages=HI)
    assert raw.headers["x-lumen-cost-usd"] == "0.000015"
    assert raw.parse().usage.input_tokens == 7
    answered = 1
    with pytest.raises(anthropic.RateLimitError) as refused:
        while answered < 10:
            client.messages.create(model="fast", max_tokens=10, messages=HI)
            answered += 1
    assert 2 <= answered < 7, answered
    body = refused.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "rate_limit_error"
    assert "budget" in body["error"]["message"]
