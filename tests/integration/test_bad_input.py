"""No client input crashes the router (issue 8, item 12), through a real uvicorn server with a store.

Whatever a client sends to a POST endpoint or as a resume cursor is a 4xx with the spec's error object (naming the
parameter to blame), is answered without a traceback in the router's logs, and leaves the kept-alive connection
serving the next request. A generation that crashes inside the router ends its journaled response with
`response.failed`, which the stream, a resume and an Idempotency-Key retry all see.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from tests.support.server import API_KEY, RouterThread, base_config, sim_model
from tests.support.sse import parse_sse
from unbroken.journal.backends import open_store
from unbroken.protocol.reasoning_codec import PREFIX
from unbroken.protocol.responses import ResponseEmitter

RESPONSES, CHAT, COMPACT = "/v1/responses", "/v1/chat/completions", "/v1/responses/compact"
SURROGATE = "\ud800"  # json.dumps writes it as the escape `\ud800`
WATCHED_LOGGERS = ("", "unbroken", "uvicorn", "uvicorn.error", "asyncio")
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
filler = st.text(max_size=12)


# -- the server, the client and the logs ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    config = base_config(sim_model("demo"), compaction_key="00112233445566778899aabbccddeeff")
    with RouterThread(config, store=open_store("memory://")) as server:
        yield server


class Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        if not any(r is record for r in self.records):  # watched on a logger and its ancestors: seen twice
            self.records.append(record)

    def tracebacks(self) -> list[str]:
        return [f"{r.name}: {r.getMessage()}" for r in self.records if r.exc_info]


@pytest.fixture
def logs() -> Iterator[Records]:
    handler = Records()
    loggers = [logging.getLogger(name) for name in WATCHED_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield handler
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


class OneConnection:
    """A kept-alive client whose pool must only ever hold the connection it opened first."""

    def __init__(self, router: RouterThread) -> None:
        self.root = router.base_url.removesuffix("/v1")
        self.client = httpx.Client(base_url=self.root, timeout=30.0,
                                   headers={"authorization": f"Bearer {API_KEY}"})
        self.connections: set[int] = set()

    def request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        response = self.client.request(method, path, **kwargs)
        self.connections.update(id(c) for c in self.client._transport._pool.connections)  # type: ignore[attr-defined]
        return response

    def post(self, path: str, body: Any = None, *, content: bytes | None = None, **kwargs: Any) -> httpx.Response:
        raw = content if content is not None else json.dumps(body).encode()  # ensure_ascii: surrogates escaped
        headers = {"content-type": "application/json", **kwargs.pop("headers", {})}
        return self.request("POST", path, content=raw, headers=headers, **kwargs)

    def assert_still_serves(self) -> None:
        assert self.request("GET", "/healthz").json() == {"status": "ok"}
        assert len(self.connections) == 1, f"{len(self.connections)} connections opened: one was dropped"

    def close(self) -> None:
        self.client.close()


@pytest.fixture
def conn(router: RouterThread) -> Iterator[OneConnection]:
    client = OneConnection(router)
    yield client
    client.close()


def assert_error(response: httpx.Response, param: str | None, *, status: int = 400) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}, err
    assert isinstance(err["message"], str) and err["message"] and "Traceback" not in err["message"]
    assert err["type"] == "invalid_request_error"
    if param is not None:
        assert err["param"] == param, err
    return err


def check(conn: OneConnection, logs: Records, path: str, body: Any = None, *, param: str | None,
          content: bytes | None = None, status: int = 400) -> dict[str, Any]:
    err = assert_error(conn.post(path, body, content=content), param, status=status)
    conn.assert_still_serves()
    assert logs.tracebacks() == []
    return err


# -- bodies the JSON parser refuses ---------------------------------------------------------------------------------

UNPARSEABLE = {
    "invalid utf-8": b'{"model": "demo", "input": "\xff\xfe"}',
    "overlong utf-8": b'{"model": "demo", "input": "\xc0\xaf"}',
    "5000-digit number": b'{"model": "demo", "input": "x", "temperature": ' + b"9" * 5000 + b"}",
    "nested arrays": b'{"model": "demo", "input": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",
    "nested objects": b'{"model": "demo", "input": ' + b'{"a": ' * 10_000 + b"1" + b"}" * 10_000 + b"}",
    "truncated": b'{"model": "demo", "input": "x',
    "empty": b"",
    "a list": b"[1, 2]",
    "a string": b'"hello"',
    "a number": b"42",
    "null": b"null",
    "NaN": b'{"model": "demo", "input": "x", "temperature": NaN}',
    "Infinity": b'{"model": "demo", "input": "x", "x_extension": [-Infinity]}',
    "1e400": b'{"model": "demo", "input": "x", "x_extension": 1e400}',
}


@pytest.mark.parametrize("path", [RESPONSES, CHAT, COMPACT])
@pytest.mark.parametrize("name", list(UNPARSEABLE))
def test_bodies_the_parser_refuses(conn: OneConnection, logs: Records, path: str, name: str) -> None:
    check(conn, logs, path, content=UNPARSEABLE[name], param="body")


@FAST
@given(path=st.sampled_from([RESPONSES, CHAT, COMPACT]), depth=st.integers(65, 500),
       kind=st.sampled_from(["[", '{"k": ']), key=st.sampled_from(["input", "metadata", "tools", "zzz"]))
def test_nesting_deeper_than_the_limit(conn: OneConnection, logs: Records, path: str, depth: int, kind: str,
                                       key: str) -> None:
    close = "]" if kind == "[" else "}"
    nested = kind * depth + "1" + close * depth
    content = f'{{"model": "demo", "{key}": {nested}}}'.encode()
    err = check(conn, logs, path, content=content, param=None)
    assert err["param"].startswith(key), err


# -- a lone surrogate in every string position ----------------------------------------------------------------------


def _responses_positions(s: str) -> list[tuple[dict[str, Any], str]]:
    msg = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": s}]}
    tool = {"type": "function", "name": "f", "description": s, "parameters": {"type": "object"}}
    return [
        ({"model": s, "input": "x"}, "model"),
        ({"model": "demo", "input": s}, "input"),
        ({"model": "demo", "input": "x", "instructions": s}, "instructions"),
        ({"model": "demo", "input": "x", "metadata": {s: "v"}}, "metadata"),
        ({"model": "demo", "input": "x", "metadata": {"k": s}}, "metadata.k"),
        ({"model": "demo", "input": [msg]}, "input[0].content[0].text"),
        ({"model": "demo", "input": [{"role": "user", "content": s}]}, "input[0].content"),
        ({"model": "demo", "input": "x", "tools": [dict(tool, name=s, description="d")]}, "tools[0].name"),
        ({"model": "demo", "input": "x", "tools": [tool]}, "tools[0].description"),
        ({"model": "demo", "input": "x", "tools": [dict(tool, description="d", parameters={
            "type": "object", "properties": {"a": {"type": "string", "description": s}}})]},
         "tools[0].parameters.properties.a.description"),
        ({"model": "demo", "input": [{"type": "function_call", "call_id": "c1", "name": "f", "arguments": s}]},
         "input[0].arguments"),
        ({"model": "demo", "input": [{"type": "function_call_output", "call_id": s, "output": "o"}]},
         "input[0].call_id"),
        ({"model": "demo", "input": "x", "previous_response_id": s}, "previous_response_id"),
        ({"model": "demo", "input": "x", "text": {"format": {"type": "json_schema", "name": "n", "schema": {
            "type": "object", "description": s}}}}, "text.format.schema.description"),
    ]


def _chat_positions(s: str) -> list[tuple[dict[str, Any], str]]:
    tool = {"type": "function", "function": {"name": "f", "description": s}}
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": s}}
    return [
        ({"model": s, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "demo", "messages": [{"role": "user", "content": s}]}, "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "system", "content": s}, {"role": "user", "content": "x"}]},
         "messages[0].content"),
        ({"model": "demo", "messages": [{"role": "user", "content": [{"type": "text", "text": s}]}]},
         "messages[0].content[0].text"),
        ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "metadata": {s: "v"}}, "metadata"),
        ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "metadata": {"k": s}}, "metadata.k"),
        ({"model": "demo", "messages": [{"role": "user", "content": "x"}],
          "tools": [{"type": "function", "function": {"name": s}}]}, "tools[0].function.name"),
        ({"model": "demo", "messages": [{"role": "user", "content": "x"}], "tools": [tool]},
         "tools[0].function.description"),
        ({"model": "demo", "messages": [{"role": "assistant", "tool_calls": [call]}]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"model": "demo", "messages": [{"role": "tool", "tool_call_id": s, "content": "x"}]},
         "messages[0].tool_call_id"),
    ]


def _compact_positions(s: str) -> list[tuple[dict[str, Any], str]]:
    return [
        ({"model": s, "input": "x"}, "model"),
        ({"model": "demo", "input": s}, "input"),
        ({"model": "demo", "input": "x", "instructions": s}, "instructions"),
        ({"model": "demo", "input": [{"role": "user", "content": s}]}, "input[0].content"),
        ({"model": "demo", "input": [{"type": "message", "role": "user",
                                      "content": [{"type": "input_text", "text": s}]}]}, "input[0].content[0].text"),
    ]


POSITIONS = {RESPONSES: _responses_positions, CHAT: _chat_positions, COMPACT: _compact_positions}
POSITION_CASES = [(path, i) for path, make in POSITIONS.items() for i in range(len(make("x")))]


@FAST
@given(case=st.sampled_from(POSITION_CASES), before=filler, after=filler)
@example(case=(RESPONSES, 0), before="", after="")
@example(case=(CHAT, 1), before="héllo ", after="")
def test_a_lone_surrogate_anywhere_is_a_400_naming_it(conn: OneConnection, logs: Records, case: tuple[str, int],
                                                       before: str, after: str) -> None:
    path, index = case
    body, param = POSITIONS[path](before + SURROGATE + after)[index]
    err = check(conn, logs, path, body, param=param)
    assert "surrogate" in err["message"]


# -- malformed or foreign input items -------------------------------------------------------------------------------


def _b64(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(data).decode()


def _sealed_for(router: RouterThread, key: str) -> str:
    response = httpx.post(f"{router.base_url}/responses/compact", headers={"authorization": f"Bearer {key}"},
                          json={"model": "demo", "input": "packed"}, timeout=30.0)
    assert response.status_code == 200, response.text
    token: str = response.json()["output"][0]["encrypted_content"]
    return token


@pytest.fixture(scope="module")
def foreign_compaction(router: RouterThread) -> str:
    return _sealed_for(router, "sk-other")  # tenant t2's item, sent by t1


@pytest.fixture(scope="module")
def own_compaction(router: RouterThread) -> str:
    return _sealed_for(router, API_KEY)


def _bad_items(f: str, foreign: str, own: str) -> list[tuple[Any, str]]:
    """(an input item, the param to blame) for items the router must refuse; `f` is filler text."""
    reasoning = {"type": "reasoning", "summary": []}
    user = {"type": "message", "role": "user"}
    return [
        (dict(reasoning, encrypted_content=PREFIX + f), "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=PREFIX + _b64(b"[" * 100_000)), "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=PREFIX + _b64(b'{"p": 5}')), "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=PREFIX + _b64(b'{"p": ' + b"9" * 5000 + b"}")),
         "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=PREFIX + _b64(b'{"p": "x", "e": "\\ud800"}')),
         "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=PREFIX + _b64(b'{"p": "x", "s": "\xff"}')), "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=5), "input[0].encrypted_content"),
        (dict(reasoning, encrypted_content=["a"]), "input[0].encrypted_content"),
        (dict(reasoning, summary=[{"type": "summary_text", "text": 5}]), "input[0].summary[0].text"),
        (dict(reasoning, summary="s"), "input[0].summary"),
        ({"type": "compaction", "encrypted_content": f + "garbage"}, "input[0].encrypted_content"),
        ({"type": "compaction", "encrypted_content": foreign}, "input[0].encrypted_content"),
        ({"type": "compaction", "encrypted_content": own[: len(own) // 2]}, "input[0].encrypted_content"),
        ({"type": "compaction", "encrypted_content": own[:-2] + ("AA" if own[-2:] != "AA" else "BB")},
         "input[0].encrypted_content"),
        ({"type": "compaction", "encrypted_content": "é" + f}, "input[0].encrypted_content"),
        ({"type": "compaction", "encrypted_content": 5}, "input[0].encrypted_content"),
        ({"type": "compaction"}, "input[0].encrypted_content"),
        (dict(user, content=[{"type": "input_image", "image_url": "http://example.com/" + f}]),
         "input[0].content[0].image_url"),
        (dict(user, content=[{"type": "input_image", "image_url": "javascript:" + f}]),
         "input[0].content[0].image_url"),
        (dict(user, content=[{"type": "input_image", "image_url": 5}]), "input[0].content[0].image_url"),
        (dict(user, content=[{"type": "input_image", "image_url": {"url": "https://x"}}]),
         "input[0].content[0].image_url"),
        (dict(user, content=[{"type": "input_image"}]), "input[0].content[0].image_url"),
        (dict(user, content=[{"type": "input_text", "text": 5}]), "input[0].content[0].text"),
        (dict(user, content=[{"type": "video", "text": f}]), "input[0].content[0].type"),
        (dict(user, content=[5]), "input[0].content[0]"),
        (dict(user, content=5), "input[0].content"),
        ({"type": "message", "role": "wizard", "content": f}, "input[0].role"),
        ({"type": "message", "content": f}, "input[0].role"),
        ({"type": "function_call", "name": "f", "arguments": "{}"}, "input[0].call_id"),
        ({"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}, "input[0].call_id"),
        ({"type": "function_call", "call_id": 5, "name": "f", "arguments": "{}"}, "input[0].call_id"),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": {"a": f}}, "input[0].arguments"),
        ({"type": "function_call", "call_id": "c", "name": "f", "arguments": 5}, "input[0].arguments"),
        ({"type": "function_call", "call_id": "c", "name": "", "arguments": "{}"}, "input[0].name"),
        ({"type": "function_call_output", "call_id": "c", "output": 5}, "input[0].output"),
        ({"type": "function_call_output", "call_id": "c", "output": {"text": f}}, "input[0].output"),
        ({"type": "function_call_output", "call_id": "c"}, "input[0].output"),
        ({"type": "function_call_output", "output": f}, "input[0].call_id"),
        ({"type": "item_reference", "id": f or "x"}, "input[0]"),
        ({"type": "item_reference"}, "input[0].id"),
        # An item whose type is not an item type: the item is to blame (tests/integration/test_errors.py).
        ({"type": "web_search_call" + f}, "input[0]"),
        ({"type": 5}, "input[0]"),
        ({"type": None, "role": "user", "content": "x"}, "input[0]"),
        ({"role": "user"}, "input[0].content"),
        ({}, "input[0]"),
        (f, "input[0]"),
        (5, "input[0]"),
        (None, "input[0]"),
        ([{"role": "user", "content": f}], "input[0]"),
    ]


BAD_ITEM_COUNT = len(_bad_items("", "x", "xx"))


@FAST
@given(path=st.sampled_from([RESPONSES, COMPACT]), index=st.integers(0, BAD_ITEM_COUNT - 1), f=filler,
       first=st.booleans())
def test_malformed_or_foreign_items_are_a_400_naming_them(conn: OneConnection, logs: Records, foreign_compaction: str,
                                                          own_compaction: str, path: str, index: int, f: str,
                                                          first: bool) -> None:
    item, param = _bad_items(f, foreign_compaction, own_compaction)[index]
    good = {"type": "message", "role": "user", "content": "hello"}
    if not first:  # behind a good item: the param must name the bad one's own index
        param = param.replace("input[0]", "input[1]", 1)
    items = [item] if first else [good, item]
    check(conn, logs, path, {"model": "demo", "input": items}, param=param)


@pytest.mark.parametrize("index", range(BAD_ITEM_COUNT))
def test_every_malformed_item_explicitly(conn: OneConnection, logs: Records, foreign_compaction: str,
                                         own_compaction: str, index: int) -> None:
    item, param = _bad_items("filler", foreign_compaction, own_compaction)[index]
    check(conn, logs, RESPONSES, {"model": "demo", "input": [item], "stream": True}, param=param)


def _bad_messages(f: str) -> list[tuple[Any, str]]:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    return [
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/" + f}}]},
         "messages[0].content[0].image_url.url"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": {"url": 5}}]},
         "messages[0].content[0].image_url.url"),
        ({"role": "user", "content": [{"type": "image_url", "image_url": "https://x"}]},
         "messages[0].content[0].image_url"),
        ({"role": "user", "content": [{"type": "image_url"}]}, "messages[0].content[0].image_url"),
        ({"role": "user", "content": [{"type": "text", "text": 5}]}, "messages[0].content[0].text"),
        ({"role": "user", "content": [5]}, "messages[0].content[0]"),
        ({"role": "user", "content": 5}, "messages[0].content"),
        ({"role": "user"}, "messages[0].content"),
        ({"role": "wizard", "content": f}, "messages[0].role"),
        ({"content": f}, "messages[0].role"),
        ({"role": "assistant", "tool_calls": [dict(call, id="")]}, "messages[0].tool_calls[0].id"),
        ({"role": "assistant", "tool_calls": [dict(call, function={"name": "f", "arguments": {"a": 1}})]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"role": "assistant", "tool_calls": [dict(call, function={"name": "f"})]},
         "messages[0].tool_calls[0].function.arguments"),
        ({"role": "assistant", "tool_calls": "x"}, "messages[0].tool_calls"),
        ({"role": "assistant"}, "messages[0].content"),
        ({"role": "tool", "content": f}, "messages[0].tool_call_id"),
        ({"role": "tool", "tool_call_id": "c1", "content": 5}, "messages[0].content"),
        ({"role": "tool", "tool_call_id": 5, "content": f}, "messages[0].tool_call_id"),
        ({"role": "function", "content": f}, "messages[0].role"),
        (f, "messages[0]"),
        (5, "messages[0]"),
        (None, "messages[0]"),
        ([], "messages[0]"),
    ]


BAD_MESSAGE_COUNT = len(_bad_messages(""))


@FAST
@given(index=st.integers(0, BAD_MESSAGE_COUNT - 1), f=filler, stream=st.booleans())
def test_malformed_chat_messages_are_a_400_naming_them(conn: OneConnection, logs: Records, index: int, f: str,
                                                       stream: bool) -> None:
    message, param = _bad_messages(f)[index]
    check(conn, logs, CHAT, {"model": "demo", "messages": [message], "stream": stream}, param=param)


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "demo", "input": "x", "metadata": {"k": 5}}, "metadata.k"),
    ({"model": "demo", "input": "x", "metadata": []}, "metadata"),
    ({"model": "demo", "input": "x", "tools": "f"}, "tools"),
    ({"model": "demo", "input": "x", "tools": [5]}, "tools[0]"),
    ({"model": "demo", "input": "x", "tool_choice": 5}, "tool_choice"),
    ({"model": "demo", "input": "x", "stream": [True]}, "stream"),
    ({"model": "demo", "input": "x", "temperature": "hot"}, "temperature"),
    ({"model": "demo", "input": "x", "text": {"format": {"type": "json_schema", "schema": 5}}}, "text.format.schema"),
    ({"model": 5, "input": "x"}, "model"),
    ({"model": ["demo"], "input": "x"}, "model"),
    ({"model": "demo", "input": {"role": "user"}}, "input"),
])
def test_wrongly_typed_fields(conn: OneConnection, logs: Records, body: dict[str, Any], param: str) -> None:
    check(conn, logs, RESPONSES, body, param=param)
    if param in ("metadata.k", "metadata", "tools", "temperature", "model"):
        chat = {k: v for k, v in body.items() if k not in ("input", "tools")}
        chat["messages"] = [{"role": "user", "content": "x"}]
        if param == "tools":
            chat["tools"] = body["tools"]
        check(conn, logs, CHAT, chat, param=param)


# -- resume cursors -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def finished(router: RouterThread) -> tuple[str, int]:
    """A journaled, completed response and its last sequence number."""
    with httpx.Client(timeout=30.0, headers={"authorization": f"Bearer {API_KEY}"}) as client:
        body = client.post(f"{router.base_url}/responses", json={"model": "demo", "input": "cursor"}).json()
        assert body["status"] == "completed", body
        with client.stream("GET", f"{router.base_url}/responses/{body['id']}", params={"stream": "true"}) as r:
            stream = parse_sse(r.read())
    return body["id"], stream.events[-1]["sequence_number"]


CURSORS = st.one_of(
    st.sampled_from(["-2", "-1000", str(-10**30), str(10**30), "1.5", "abc", "", " ", "0x10", "1e3", "--1",
                     "1" * 5000, "nan", "+", "+3", "\u0663", "1_0", "3\u00a0", "\u20073"]),
    st.integers(max_value=-2).map(str),
    st.integers(min_value=10_000).map(str),
    filler.filter(lambda s: not _integer(s)),
)


def _integer(text: str) -> bool:
    """What the router reads as a sequence number: ASCII digits, a minus sign, padding of spaces and tabs."""
    return re.fullmatch(r"[ \t]*-?[0-9]+[ \t]*", text) is not None


@FAST
@given(cursor=CURSORS, as_header=st.booleans())
@example(cursor="beyond", as_header=False)
@example(cursor="beyond", as_header=True)
@example(cursor="1_0", as_header=False)
@example(cursor="\u0663", as_header=False)
@example(cursor="3\u00a0", as_header=True)
def test_bad_resume_cursors_are_a_400_naming_them(conn: OneConnection, logs: Records, finished: tuple[str, int],
                                                  cursor: str, as_header: bool) -> None:
    response_id, last = finished
    if cursor == "beyond":
        cursor = str(last + 1)
    if as_header:
        value = cursor.encode("utf-8").strip()  # a header's value, as bytes (the server reads them as latin-1)
        if any((c < 0x20 and c != 0x09) or c == 0x7F for c in value) or _integer(value.decode("latin-1")):
            return  # control characters: not a header value a client can send (RFC 9110); or a number
        kwargs: dict[str, Any] = {"headers": {"last-event-id": value}, "params": {"stream": "true"}}
        param = "Last-Event-ID"
    else:
        kwargs = {"params": {"stream": "true", "starting_after": cursor}}
        param = "starting_after"
    assert_error(conn.request("GET", f"/v1/responses/{response_id}", **kwargs), param)
    conn.assert_still_serves()
    assert logs.tracebacks() == []


def test_good_cursors_still_resume(conn: OneConnection, finished: tuple[str, int]) -> None:
    response_id, last = finished
    for cursor in (-1, 0, last - 1, last):
        response = conn.request("GET", f"/v1/responses/{response_id}",
                                params={"stream": "true", "starting_after": str(cursor)})
        assert response.status_code == 200
        events = parse_sse(response.content, first_seq=cursor + 1).events
        assert [e["sequence_number"] for e in events] == list(range(cursor + 1, last + 1))
    conn.assert_still_serves()


# -- a generation that crashes inside the router --------------------------------------------------------------------

CRASH_AFTER_SEQ = 6


@pytest.fixture
def crashing(monkeypatch: pytest.MonkeyPatch) -> None:
    """The emitter raises a plain RuntimeError a few events into any response whose metadata asks for it."""
    original = ResponseEmitter.apply

    def apply(self: ResponseEmitter, delta: Any) -> Any:
        if self.response.get("metadata", {}).get("test_crash") == "yes" and self.seq > CRASH_AFTER_SEQ:
            raise RuntimeError("injected crash below the attempt loop")
        return original(self, delta)

    monkeypatch.setattr(ResponseEmitter, "apply", apply)


def test_a_crashing_generation_ends_its_journaled_response_failed(conn: OneConnection, logs: Records,
                                                                  crashing: None) -> None:
    body = {"model": "demo", "input": "crash me", "stream": True, "metadata": {"test_crash": "yes"}}
    key = {"idempotency-key": "crash-1"}
    response = conn.post(RESPONSES, body, headers=key)
    assert response.status_code == 200, response.text
    stream = parse_sse(response.content)
    types = [e["type"] for e in stream.events]
    assert types[-2:] == ["error", "response.failed"], types
    assert stream.done, "the stream must end with [DONE]"
    assert stream.events[-1]["response"]["status"] == "failed"
    assert stream.events[-2]["error"]["code"] == "server_error"
    response_id = stream.events[0]["response"]["id"]
    last = stream.events[-1]["sequence_number"]
    conn.assert_still_serves()

    # A resume sees the same end, at once.
    resumed = conn.request("GET", f"/v1/responses/{response_id}", params={"stream": "true", "starting_after": "2"})
    assert resumed.status_code == 200
    again = parse_sse(resumed.content, first_seq=3)
    assert [e["sequence_number"] for e in again.events] == list(range(3, last + 1))
    assert again.events[-1]["type"] == "response.failed" and again.done
    # So does the stored object.
    assert conn.request("GET", f"/v1/responses/{response_id}").json()["status"] == "failed"

    # A retry with the same Idempotency-Key replays the same response (no second generation, no takeover loop).
    retry = conn.post(RESPONSES, body, headers=key)
    assert retry.status_code == 200
    replay = parse_sse(retry.content)
    assert replay.events == stream.events and replay.done
    retry_json = conn.post(RESPONSES, dict(body, stream=False), headers=key)
    assert retry_json.status_code in (200, 409), retry_json.text  # the stream flag is part of the body hash
    conn.assert_still_serves()

    crash_lines = [r for r in logs.records if r.name.startswith("unbroken") and r.levelno >= logging.ERROR]
    assert len(crash_lines) == 1, [r.getMessage() for r in crash_lines]
    assert crash_lines[0].getMessage() == "generation crashed"
    assert getattr(crash_lines[0], "response_id", None) == response_id


def test_a_crash_before_any_output_is_a_500_with_one_log_line(conn: OneConnection, logs: Records,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    original = ResponseEmitter.apply

    def apply(self: ResponseEmitter, delta: Any) -> Any:
        if self.response.get("metadata", {}).get("test_crash") == "early":
            raise RuntimeError("injected crash before output")
        return original(self, delta)

    monkeypatch.setattr(ResponseEmitter, "apply", apply)
    body = {"model": "demo", "input": "crash early", "metadata": {"test_crash": "early"}}
    for stream in (True, False):
        response = conn.post(RESPONSES, dict(body, stream=stream))
        assert response.status_code == 500, response.text
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
        conn.assert_still_serves()
    crash_lines = [r for r in logs.records if r.name.startswith("unbroken") and r.levelno >= logging.ERROR]
    assert len(crash_lines) == 2, [r.getMessage() for r in crash_lines]
