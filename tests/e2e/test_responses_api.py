"""The OpenAI Responses API (`/v1/responses`) through the official openai SDK, against real
processes: nats-server, two `--auth keys` gateways sharing LLMFLEET_RESPONSES, and a sim
worker. Text, streaming (the SDK's helpers), function calls over two turns chained by
`previous_response_id` (also across gateways), structured output, `store: false`,
delete, input items, ownership between keys, and `max_output_tokens` -> incomplete."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator

import httpx
import openai
import pydantic
import pytest

from tests.keyhelp import make_key
from tests.procs import Fleet, Gateway

MODEL = "sim-resp"
SIM_TOKENS = 8
WEATHER = {
    "type": "function",
    "name": "get_weather",
    "description": "The weather in a city",
    "parameters": {
        "type": "object",
        "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city", "days"],
        "additionalProperties": False,
    },
    "strict": True,
}
SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
    "required": ["name", "age"],
    "additionalProperties": False,
}


class Person(pydantic.BaseModel):
    name: str
    age: int


@pytest.fixture(scope="module")
async def keys(nats_url: str) -> dict[str, str]:
    return {name: await make_key(nats_url, name, models=("*",)) for name in ("k-a", "k-b")}


@pytest.fixture(scope="module")
def gws(fleet: Fleet, keys: dict[str, str]) -> tuple[Gateway, Gateway]:
    fleet.worker(
        "--model", MODEL, "--engine", "sim", "--max-concurrency", "16",
        "--sim-ttft-ms", "1", "--sim-itl-ms", "1", "--sim-tokens", str(SIM_TOKENS),
    )  # fmt: skip
    g1 = fleet.gateway("--auth", "keys", wait_models=(MODEL,), key=keys["k-a"])
    g2 = fleet.gateway("--auth", "keys", wait_models=(MODEL,), key=keys["k-a"])
    return g1, g2


def client(gw: Gateway, secret: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gw.base_url, api_key=secret, max_retries=0)


@pytest.fixture(scope="module")
async def a(
    gws: tuple[Gateway, Gateway], keys: dict[str, str]
) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(gws[0], keys["k-a"]) as c:
        yield c


@pytest.fixture(scope="module")
async def b(
    gws: tuple[Gateway, Gateway], keys: dict[str, str]
) -> AsyncIterator[openai.AsyncOpenAI]:
    async with client(gws[0], keys["k-b"]) as c:
        yield c


async def test_create_text(a: openai.AsyncOpenAI) -> None:
    r = await a.responses.create(model=MODEL, input="Say something.", instructions="Be kind.")
    assert r.id.startswith("resp_") and r.object == "response"
    assert r.status == "completed" and r.model == MODEL
    assert len(r.output_text.split()) == SIM_TOKENS
    assert r.instructions == "Be kind." and r.store is True
    assert r.usage is not None and r.usage.output_tokens == SIM_TOKENS
    assert r.usage.total_tokens == r.usage.input_tokens + r.usage.output_tokens
    [msg] = r.output
    assert msg.type == "message" and msg.id.startswith("msg_") and msg.status == "completed"
    again = await a.responses.retrieve(r.id)
    assert again.output_text == r.output_text and again.id == r.id


async def test_stream_with_the_sdk_helpers(a: openai.AsyncOpenAI) -> None:
    deltas: list[str] = []
    seqs: list[int] = []
    async with a.responses.stream(model=MODEL, input="Stream please.") as stream:
        async for event in stream:
            seqs.append(event.sequence_number)
            if event.type == "response.output_text.delta":
                deltas.append(event.delta)
        final = await stream.get_final_response()
    assert seqs == list(range(len(seqs)))
    assert final.status == "completed" and "".join(deltas) == final.output_text
    assert len(final.output_text.split()) == SIM_TOKENS
    stored = await a.responses.retrieve(final.id)
    assert stored.output_text == final.output_text


async def test_function_calls_over_two_turns(
    gws: tuple[Gateway, Gateway], keys: dict[str, str], a: openai.AsyncOpenAI
) -> None:
    question = "What is the weather in Paris?"
    first = await a.responses.create(
        model=MODEL, input=question, tools=[WEATHER], tool_choice="required"
    )
    [call] = first.output
    assert call.type == "function_call" and call.name == "get_weather"
    assert call.call_id and call.id is not None and call.id.startswith("fc_")
    assert json.loads(call.arguments) == {"city": "sim", "days": 0}
    assert first.status == "completed"
    # The second turn, on the other gateway: the chain is in the shared bucket.
    async with client(gws[1], keys["k-a"]) as other:
        second = await other.responses.create(
            model=MODEL,
            previous_response_id=first.id,
            input=[{"type": "function_call_output", "call_id": call.call_id, "output": "sunny"}],
            tools=[WEATHER],
        )
    assert second.status == "completed" and second.previous_response_id == first.id
    assert second.output[0].type == "message" and second.output_text
    # sim counts the prompt's words: the question (history) and the tool's output
    assert first.usage is not None and second.usage is not None
    assert second.usage.input_tokens == len(question.split()) + 1
    items = await a.responses.input_items.list(second.id)
    assert [(i.type, getattr(i, "call_id", None)) for i in items.data] == [
        ("function_call_output", call.call_id)
    ]


async def test_function_call_streams_its_arguments(a: openai.AsyncOpenAI) -> None:
    pieces: list[str] = []
    async with a.responses.stream(
        model=MODEL,
        input="weather?",
        tools=[WEATHER],  # type: ignore[list-item]
        tool_choice={"type": "function", "name": "get_weather"},
    ) as stream:
        async for event in stream:
            if event.type == "response.function_call_arguments.delta":
                pieces.append(event.delta)
        final = await stream.get_final_response()
    [call] = final.output
    assert call.type == "function_call" and "".join(pieces) == call.arguments
    assert call.parsed_arguments == {"city": "sim", "days": 0}  # type: ignore[union-attr]


async def test_structured_output(a: openai.AsyncOpenAI) -> None:
    r = await a.responses.create(
        model=MODEL,
        input="A person, please.",
        text={
            "format": {"type": "json_schema", "name": "person", "schema": SCHEMA, "strict": True}
        },
    )
    assert json.loads(r.output_text) == {"name": "sim", "age": 0}
    assert r.text is not None and r.text.format is not None
    assert r.text.format.type == "json_schema"
    parsed = await a.responses.parse(model=MODEL, input="A person.", text_format=Person)
    assert parsed.output_parsed == Person(name="sim", age=0)
    obj = await a.responses.create(
        model=MODEL, input="JSON.", text={"format": {"type": "json_object"}}
    )
    assert isinstance(json.loads(obj.output_text), dict)


async def test_store_false_is_not_kept(a: openai.AsyncOpenAI) -> None:
    r = await a.responses.create(model=MODEL, input="forget me", store=False)
    assert r.status == "completed" and r.store is False
    with pytest.raises(openai.NotFoundError) as info:
        await a.responses.retrieve(r.id)
    assert info.value.body == {  # type: ignore[comparison-overlap]
        "message": f"Response with id '{r.id}' not found.",
        "type": "invalid_request_error",
        "param": None,
        "code": "not_found",
    }
    with pytest.raises(openai.BadRequestError) as bad:
        await a.responses.create(model=MODEL, input="more", previous_response_id=r.id)
    assert bad.value.code == "previous_response_not_found"


async def test_delete_then_get_is_404(a: openai.AsyncOpenAI, gws: tuple[Gateway, Gateway]) -> None:
    r = await a.responses.create(model=MODEL, input="short-lived")
    async with httpx.AsyncClient(base_url=gws[0].base_url) as http:
        h = {"authorization": f"Bearer {a.api_key}"}
        gone = await http.delete(f"/responses/{r.id}", headers=h)
        assert gone.status_code == 200
        assert gone.json() == {"id": r.id, "object": "response", "deleted": True}
        assert (await http.delete(f"/responses/{r.id}", headers=h)).status_code == 404
        assert (await http.post(f"/responses/{r.id}", headers=h)).status_code == 405
    with pytest.raises(openai.NotFoundError):
        await a.responses.retrieve(r.id)
    with pytest.raises(openai.NotFoundError):
        await a.responses.input_items.list(r.id)


async def test_input_items_pages(a: openai.AsyncOpenAI) -> None:
    given = [{"role": "user", "content": f"line {n}"} for n in range(5)]
    r = await a.responses.create(model=MODEL, input=given, max_output_tokens=2)  # type: ignore[arg-type]
    page = await a.responses.input_items.list(r.id)
    texts = [i.content[0].text for i in page.data]  # type: ignore[union-attr]
    assert texts == [f"line {n}" for n in reversed(range(5))]  # newest first by default
    assert page.first_id == page.data[0].id and page.has_more is False
    walked = [i.id async for i in a.responses.input_items.list(r.id, limit=2, order="asc")]
    assert walked == [i.id for i in reversed(page.data)]  # the SDK follows `after`


async def test_another_keys_responses_are_missing(
    a: openai.AsyncOpenAI, b: openai.AsyncOpenAI
) -> None:
    mine = await a.responses.create(model=MODEL, input="private")
    with pytest.raises(openai.NotFoundError):
        await b.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        await b.responses.input_items.list(mine.id)
    with pytest.raises(openai.NotFoundError):
        await b.responses.delete(mine.id)
    with pytest.raises(openai.BadRequestError) as info:
        await b.responses.create(model=MODEL, input="steal", previous_response_id=mine.id)
    assert info.value.code == "previous_response_not_found"
    assert info.value.param == "previous_response_id"  # type: ignore[attr-defined]
    never = "resp_" + "0" * 24
    with pytest.raises(openai.BadRequestError) as missing:
        await b.responses.create(model=MODEL, input="x", previous_response_id=never)
    assert missing.value.code == info.value.code  # foreign reads exactly as never existed
    assert (await a.responses.retrieve(mine.id)).output_text == mine.output_text


async def test_hostile_ids_and_pages_are_refused(
    a: openai.AsyncOpenAI, gws: tuple[Gateway, Gateway], keys: dict[str, str]
) -> None:
    """Ids that could name KV subjects (a part key, wildcards) or paths are missing; bad
    page parameters are 400s; another key's item id is no cursor."""
    mine = await a.responses.create(model=MODEL, input="private")
    headers = {"authorization": f"Bearer {keys['k-a']}"}
    base = gws[0].base_url + "/responses/"
    async with httpx.AsyncClient(headers=headers) as http:
        for bad in (mine.id + ".0", mine.id + ".*", "resp_>", "*", "x" * 5000, "%2e0", "é"):
            r = await http.get(base + bad)
            assert r.status_code == 404, (bad, r.text)
            with pytest.raises(openai.BadRequestError):
                await a.responses.create(model=MODEL, input="x", previous_response_id=bad)
        for query in ("limit=0", "limit=101", "limit=1e3", "order=sideways"):
            r = await http.get(base + mine.id + "/input_items?" + query)
            assert r.status_code == 400, (query, r.text)
        r = await http.get(base + mine.id)
        assert r.status_code == 200  # the real one still reads


async def test_max_output_tokens_is_incomplete(a: openai.AsyncOpenAI) -> None:
    r = await a.responses.create(model=MODEL, input="long", max_output_tokens=3)
    assert r.status == "incomplete" and r.incomplete_details is not None
    assert r.incomplete_details.reason == "max_output_tokens"
    assert len(r.output_text.split()) == 3 and r.max_output_tokens == 3
    async with a.responses.stream(model=MODEL, input="long", max_output_tokens=3) as stream:
        kinds = [event.type async for event in stream]
    assert kinds[-1] == "response.incomplete"


async def test_what_the_gateway_cannot_serve_is_a_400(a: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await a.responses.create(model=MODEL, input="x", background=True)
    assert info.value.param == "background"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as info:
        await a.responses.create(model=MODEL, input="x", tools=[{"type": "web_search"}])
    assert "web_search" in info.value.message
    with pytest.raises(openai.NotFoundError):
        await a.responses.create(model="no-such-model", input="x")
