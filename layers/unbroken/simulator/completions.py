"""The answer to one `POST /chat/completions` on the wire, as OpenAI sends it: an SSE stream of
`chat.completion.chunk`s (one token a chunk, paced by `sim_tps`/`sim_ttft_ms`) or one `chat.completion` JSON body,
with the attempt's scripted fault applied: an error status before anything is sent, or a cut, reset, stall,
in-band error, malformed chunk or missing `[DONE]` after N chunks."""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from unbroken.simulator.controls import HOLD_LIMIT_SECONDS, Controls
from unbroken.simulator.conversation import count_prompt_tokens
from unbroken.simulator.errors import (
    MID_STREAM_ERROR_MESSAGE,
    ApiError,
    auth_error,
    context_length_error,
    http_fault_error,
    quota_error,
)
from unbroken.simulator.exchange import ConnectionAborted, Exchange
from unbroken.simulator.faults import CHUNK_FAULTS, Fault
from unbroken.simulator.script import Plan, ToolCall, plan_answer
from unbroken.simulator.tokens import chunks_of

TOOL_ARGUMENT_PIECE_CHARS = 12  # tool arguments are streamed in pieces of this many characters

Hold = Callable[[], Awaitable[None]]


def validate_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                       "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)") from None
    if not isinstance(body, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise ApiError(400, "you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise ApiError(400, "'messages' must be a non-empty array of message objects.", param="messages")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise ApiError(400, f"Invalid '{key}': expected an integer >= 1.", param=key)
    return body


async def answer(ex: Exchange, body: dict[str, Any], controls: Controls, fault: Fault | None, hold: Hold,
                 cached_tokens: int = 0) -> None:
    """Answer a validated request body. `hold` waits until the server closes (stall and timeout faults);
    `cached_tokens` is what the usage reports as read from the prompt cache."""
    model = body["model"]
    if fault is not None:
        if fault.kind == "http":
            raise http_fault_error(fault, model)
        if fault.kind == "auth":
            raise auth_error()
        if fault.kind == "quota":
            raise quota_error()
        if fault.kind == "context_length":
            raise context_length_error(count_prompt_tokens(body))
        if fault.kind == "timeout":
            await hold()
            ex.abort()
            raise ConnectionAborted
    plan = plan_answer(body, controls)
    if body.get("stream") is True:
        await _stream(ex, body, plan, controls, fault, hold, cached_tokens)
    else:
        await _complete(ex, body, plan, controls, fault, hold, cached_tokens)


async def _stream(ex: Exchange, body: dict[str, Any], plan: Plan, controls: Controls, fault: Fault | None,
                  hold: Hold, cached_tokens: int) -> None:
    loop = asyncio.get_running_loop()
    include_usage = isinstance(body.get("stream_options"), dict) and bool(
        body["stream_options"].get("include_usage"))
    completion_id = f"chatcmpl-sim-{secrets.token_hex(12)}"
    created = int(time.time())
    head, mid, tail = _sse_chunk_encoder(completion_id, created, body["model"], include_usage)

    def frame(delta: str, finish: str | None = None) -> bytes:
        reason = "null" if finish is None else f'"{finish}"'
        return f"data: {head}{delta}{mid}{reason}{tail}\n\n".encode()

    await ex.start(200, [("content-type", "text/event-stream"), ("cache-control", "no-cache")])
    if controls.ttft_seconds:
        await asyncio.sleep(controls.ttft_seconds)

    deltas: list[str]
    if plan.tool_calls:
        def header(call: ToolCall) -> dict[str, Any]:
            return {"index": call.index, "id": call.call_id, "type": "function",
                    "function": {"name": call.name, "arguments": ""}}

        first = json.dumps({"role": "assistant", "content": None, "tool_calls": [header(plan.tool_calls[0])]})
        deltas = []
        for call in plan.tool_calls:
            if call.index > 0:
                deltas.append(json.dumps({"tool_calls": [header(call)]}))
            deltas.extend(json.dumps({"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]})
                          for piece in chunks_of(call.arguments, TOOL_ARGUMENT_PIECE_CHARS))
    else:
        first = '{"role":"assistant","content":""}'
        deltas = [f'{{"content":{json.dumps(piece)}}}' for piece in plan.pieces]
    await ex.data(frame(first))

    stop_after = fault.after if fault is not None and fault.kind in CHUNK_FAULTS else None
    started = loop.time()
    sent = 0
    for delta in deltas:
        if stop_after is not None and sent >= stop_after:
            break
        if controls.tokens_per_second:
            delay = started + sent / controls.tokens_per_second - loop.time()
            await asyncio.sleep(max(0.0, delay))  # absolute schedule: no drift over a long answer
        else:
            await asyncio.sleep(0)  # let a reader in the same loop see tokens one by one
        await ex.data(frame(delta))
        sent += 1

    finish = plan.finish_reason
    if fault is not None and stop_after is not None:
        if fault.kind in ("cut", "reset"):
            ex.abort(reset=fault.kind == "reset")
            raise ConnectionAborted
        if fault.kind == "stall":
            await hold()
            ex.abort()
            raise ConnectionAborted
        if fault.kind == "error":
            err = {"error": {"message": MID_STREAM_ERROR_MESSAGE, "type": "server_error"}}
            await ex.data(f"data: {json.dumps(err)}\n\n".encode())
            await ex.end()  # a complete HTTP body: the connection stays usable, as with OpenAI
            return
        if fault.kind == "malformed":
            await ex.data(b'data: {"choices": [\n\n')
            await ex.end()
            return
        if fault.kind == "content_filter":
            finish = "content_filter"

    await ex.data(frame("{}", finish))
    if include_usage:
        usage = json.dumps(_usage(plan.prompt_tokens, sent, cached_tokens), separators=(",", ":"))
        envelope = head[: head.index(',"choices"')]
        await ex.data(f'data: {envelope},"choices":[],"usage":{usage}}}\n\n'.encode())
    if fault is None or fault.kind != "no_done":
        await ex.data(b"data: [DONE]\n\n")
    await ex.end()

async def _complete(ex: Exchange, body: dict[str, Any], plan: Plan, controls: Controls, fault: Fault | None,
                    hold: Hold, cached_tokens: int) -> None:
    pieces = plan.pieces
    finish = plan.finish_reason
    if fault is not None:
        if fault.kind in ("cut", "reset"):
            ex.abort(reset=fault.kind == "reset")
            raise ConnectionAborted
        if fault.kind == "stall":
            await hold()
            ex.abort()
            raise ConnectionAborted
        if fault.kind == "error":
            raise ApiError(500, MID_STREAM_ERROR_MESSAGE, "server_error")
        if fault.kind == "malformed":
            await ex.start(200, [("content-type", "application/json"), ("connection", "close")])
            await ex.data(b'{"choices": [')
            ex.keep_alive = False
            await ex.end()
            return
        if fault.kind == "content_filter":
            pieces, finish = pieces[: fault.after], "content_filter"
    produced = len(plan.tool_calls) if plan.tool_calls else len(pieces)
    delay = controls.ttft_seconds
    if controls.tokens_per_second:
        delay += produced / controls.tokens_per_second
    if delay:
        await asyncio.sleep(min(delay, HOLD_LIMIT_SECONDS))
    message: dict[str, Any] = {"role": "assistant", "content": "".join(pieces) if not plan.tool_calls else None,
                               "refusal": None, "annotations": []}
    completion_tokens = len(pieces)
    if plan.tool_calls:
        message["tool_calls"] = [
            {"id": c.call_id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
            for c in plan.tool_calls
        ]
        completion_tokens = sum(max(1, len(c.arguments) // 4) for c in plan.tool_calls)
    await ex.json(200, {
        "id": f"chatcmpl-sim-{secrets.token_hex(12)}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": body["model"],
        "system_fingerprint": "fp_simulated",
        "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
        "usage": _usage(plan.prompt_tokens, completion_tokens, cached_tokens),
    })


def _sse_chunk_encoder(
    completion_id: str, created: int, model: str, include_usage: bool
) -> tuple[str, str, str]:
    """Constant text around each chunk's delta and finish reason: a token costs one small json.dumps, not a
    whole chunk serialisation."""
    head = (
        f'{{"id":{json.dumps(completion_id)},"object":"chat.completion.chunk","created":{created},'
        f'"model":{json.dumps(model)},"system_fingerprint":"fp_simulated","choices":[{{"index":0,"delta":'
    )
    mid = ',"logprobs":null,"finish_reason":'
    tail = "}]" + (',"usage":null' if include_usage else "") + "}"
    return head, mid, tail


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": min(cached_tokens, prompt_tokens)},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }
