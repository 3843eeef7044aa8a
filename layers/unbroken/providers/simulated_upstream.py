"""A real HTTP server on 127.0.0.1 that speaks OpenAI Chat Completions (SSE), for the `simulated` demo model, tests,
demos and benchmarks.

The router reaches it through its ordinary OpenAI-Chat adapter over real HTTP, so everything between the router and
a real upstream (connection pooling, SSE parsing, error classification, mid-stream failures) is exercised. The answer
is a deterministic function of (seed, conversation), which is what lets tests check that a stream continued after a
fault concatenates to exactly the text a fault-free run produces.

Behaviour is controlled per request by string values in the body's `metadata` (see `Controls`): seed, pacing, length,
literal vs. continue-instruction continuation, prefill rejection and scripted faults counted per logical request.
HTTP is parsed by h11 on top of `asyncio.start_server`; nothing here imports the router.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import hashlib
import json
import logging
import math
import random
import secrets
import socket
import struct
import threading
import time
import uuid
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import h11

from unbroken.ir import CONTINUE_INSTRUCTION

__all__ = [
    "DEFAULT_LENGTH",
    "PREFILL_REJECTED_MESSAGE",
    "Controls",
    "Fault",
    "SimulatedUpstream",
    "SimulatedUpstreamThread",
    "close_shared_upstream",
    "example_for_schema",
    "input_key_of",
    "parse_faults",
    "shared_upstream",
    "simulated_tokens",
]

log = logging.getLogger("unbroken.simulated")

DEFAULT_LENGTH = 64
# Longest any fault (stall, timeout) or pacing delay holds a connection; the server's close releases it earlier.
HOLD_LIMIT_SECONDS = 300.0
# How long an idle keep-alive connection waits for its next request (httpx's own pool expiry is shorter).
KEEPALIVE_IDLE_SECONDS = 120.0
MAX_BODY_BYTES = 32 * 1024 * 1024
MAX_TRACKED_REQUEST_KEYS = 10_000
CONTEXT_WINDOW = 128_000
JSON_PIECE_CHARS = 8  # structured output / tool arguments are streamed in pieces of this many characters
TOOL_ARGUMENT_PIECE_CHARS = 12

PREFILL_REJECTED_MESSAGE = (
    "This model does not support assistant message prefill. The conversation must end with a user message."
)
MID_STREAM_ERROR_MESSAGE = "The server had an error while processing your request."

# A fixed vocabulary: the text only has to read like prose and be reproducible, not to mean anything.
_VOCAB: tuple[str, ...] = (
    "the", "a", "river", "stream", "router", "answer", "token", "quiet", "bright", "model", "server", "request",
    "morning", "evening", "window", "garden", "stone", "light", "shadow", "signal", "packet", "journey", "bridge",
    "harbor", "mountain", "valley", "forest", "cloud", "rain", "wind", "engine", "lantern", "paper", "story",
    "voice", "number", "letter", "market", "village", "city", "road", "path", "field", "ocean", "island", "north",
    "south", "east", "west", "always", "never", "often", "slowly", "quickly", "gently", "carefully", "again",
    "together", "between", "through", "under", "over", "before", "after", "during", "without", "within", "across",
    "and", "but", "or", "so", "because", "while", "when", "where", "if", "then", "is", "was", "will", "can", "may",
    "keeps", "brings", "finds", "holds", "builds", "carries", "follows", "writes", "reads", "sends", "returns",
    "waits", "listens", "remembers", "opens", "closes", "turns", "moves", "grows", "shines", "falls", "rises",
    "old", "new", "small", "large", "warm", "cold", "clear", "distant", "simple", "careful", "steady", "patient",
    "silver", "golden", "green", "blue", "red", "open", "hidden", "early", "late", "every", "each", "some", "many",
    "few", "its", "their", "our", "your", "this", "that", "these", "those", "one", "two", "three", "first", "last",
    "of", "to", "in", "on", "at", "with", "from", "by", "for", "about", "into", "near", "far", "here", "there",
)


# ---------------------------------------------------------------------------------------------------------------
# Deterministic text
# ---------------------------------------------------------------------------------------------------------------


def _rng(*parts: str) -> random.Random:
    """A PRNG seeded from strings through sha256: reproducible across processes (unlike `hash`)."""
    digest = hashlib.sha256("\x00".join(parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def simulated_tokens(seed: str, input_key: str, length: int = DEFAULT_LENGTH) -> list[str]:
    """`length` words chosen by a PRNG seeded from (seed, input_key). Every token but the first has one leading
    space and no other whitespace, so `"".join(tokens)` is the full text and token boundaries are unambiguous."""
    rng = _rng("text", seed, input_key)
    tokens: list[str] = []
    left_in_sentence = 0
    for i in range(max(0, length)):
        word = rng.choice(_VOCAB)
        if left_in_sentence == 0:
            word = word.capitalize()
            left_in_sentence = rng.randint(5, 14)
        left_in_sentence -= 1
        if i == length - 1 or left_in_sentence == 0:
            word += "?" if rng.random() < 0.1 else "."
            left_in_sentence = 0
        elif left_in_sentence > 1 and rng.random() < 0.08:
            word += ","
        tokens.append(word if i == 0 else " " + word)
    return tokens


def _text_of(message: Any) -> str:
    """The text of a Chat Completions message: a string, or the text parts of a content list."""
    if not isinstance(message, dict):
        return ""
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            str(p.get("text") or "")
            for p in content
            if isinstance(p, dict) and p.get("type") in ("text", "input_text", "output_text")
        )
    return ""


def _role_of(message: Any) -> str:
    return str(message.get("role") or "") if isinstance(message, dict) else ""


def _split_tail(messages: Sequence[Any]) -> tuple[Sequence[Any], str | None, str]:
    """(messages that determine the answer, continuation mode, partial text). Mode is "instruction" for a trailing
    [assistant P, user CONTINUE_INSTRUCTION] pair, "prefill" for a trailing assistant message, None otherwise."""
    if (
        len(messages) >= 2
        and _role_of(messages[-1]) == "user"
        and _text_of(messages[-1]).strip() == CONTINUE_INSTRUCTION
        and _role_of(messages[-2]) == "assistant"
    ):
        return messages[:-2], "instruction", _text_of(messages[-2])
    if messages and _role_of(messages[-1]) == "assistant":
        return messages[:-1], "prefill", _text_of(messages[-1])
    return messages, None, ""


def input_key_of(messages: Sequence[Any]) -> str:
    """A digest of the conversation's roles and texts (tools ignored), without a trailing prefill or a trailing
    continue-instruction pair: every attempt at one answer gets the same key, hence the same full text."""
    base, _, _ = _split_tail(messages)
    canonical = json.dumps([[_role_of(m), _text_of(m)] for m in base], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def _pieces(text: str, size: int) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


def _stream_from(tokens: list[str], offset: int) -> list[str]:
    """The tokens that make up text[offset:], the first one cut at `offset` if it falls inside a token."""
    pos = 0
    for i, tok in enumerate(tokens):
        end = pos + len(tok)
        if end > offset:
            return [tok[offset - pos :] if offset > pos else tok, *tokens[i + 1 :]]
        pos = end
    return []


def _overlap_start(tokens: list[str], partial_len: int, overlap: int = 3) -> int:
    """Offset of the first of the last `overlap` whole tokens inside text[:partial_len] (0 if there are none)."""
    starts: list[int] = []
    pos = 0
    for tok in tokens:
        if pos + len(tok) > partial_len:
            break
        starts.append(pos)
        pos += len(tok)
    if not starts:
        return 0
    return starts[max(0, len(starts) - overlap)]


# ---------------------------------------------------------------------------------------------------------------
# Example documents for JSON schemas (tool arguments, structured output)
# ---------------------------------------------------------------------------------------------------------------

_MAX_SCHEMA_DEPTH = 16


def _resolve_ref(root: Any, ref: str) -> Any:
    """Resolve a local JSON pointer (`#/$defs/X`, `#/definitions/X`, any `#/...`); unknown refs become `{}`."""
    if not ref.startswith("#"):
        return {}
    node = root
    for raw in ref[1:].split("/"):
        if not raw:
            continue
        part = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            return {}
    return node


def _merge_all_of(schema: dict[str, Any], root: Any) -> dict[str, Any]:
    merged: dict[str, Any] = {k: v for k, v in schema.items() if k != "allOf"}
    for sub in schema.get("allOf") or []:
        if isinstance(sub, dict) and "$ref" in sub:
            sub = _resolve_ref(root, sub["$ref"])
        if not isinstance(sub, dict):
            continue
        for key, value in sub.items():
            if key == "properties" and isinstance(value, dict):
                merged["properties"] = {**(merged.get("properties") or {}), **value}
            elif key == "required" and isinstance(value, list):
                merged["required"] = list(dict.fromkeys([*(merged.get("required") or []), *value]))
            else:
                merged.setdefault(key, value)
    return merged


def _infer_type(schema: dict[str, Any]) -> str:
    declared = schema.get("type")
    if isinstance(declared, str):
        return declared
    if isinstance(declared, list) and declared:
        non_null = [t for t in declared if t != "null"]
        return str(non_null[0] if non_null else declared[0])
    if any(k in schema for k in ("properties", "required", "additionalProperties", "minProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf")):
        return "number"
    return "string"


def _words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(_VOCAB) for _ in range(count))


def _example_string(schema: dict[str, Any], rng: random.Random) -> str:
    fmt = schema.get("format")
    if fmt == "date-time":
        value = f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)}T{rng.randint(10, 23)}:00:00Z"
    elif fmt == "date":
        value = f"2025-0{rng.randint(1, 9)}-{rng.randint(10, 28)}"
    elif fmt == "time":
        value = f"{rng.randint(10, 23)}:{rng.randint(10, 59)}:00"
    elif fmt == "email":
        value = f"{rng.choice(_VOCAB)}@example.com"
    elif fmt in ("uri", "url", "uri-reference", "iri"):
        value = f"https://example.com/{rng.choice(_VOCAB)}"
    elif fmt == "uuid":
        value = str(uuid.UUID(int=rng.getrandbits(128), version=4))
    elif fmt == "ipv4":
        value = f"192.0.2.{rng.randint(1, 254)}"
    else:
        value = _words(rng, rng.randint(1, 4))
    min_len = schema.get("minLength")
    max_len = schema.get("maxLength")
    if isinstance(min_len, int):
        while len(value) < min_len:
            value += " " + rng.choice(_VOCAB)
    if isinstance(max_len, int) and len(value) > max_len:
        value = value[:max_len]
        if isinstance(min_len, int) and len(value) < min_len:  # contradictory bounds: satisfy the maximum
            value = value.ljust(min(min_len, max_len), "x")
    return value


def _bounds(schema: dict[str, Any]) -> tuple[float | None, bool, float | None, bool]:
    """(low, low exclusive, high, high exclusive) from draft-4 (boolean) or draft-6+ (numeric) exclusives."""
    lo, hi = schema.get("minimum"), schema.get("maximum")
    lo_x = hi_x = False
    ex_lo, ex_hi = schema.get("exclusiveMinimum"), schema.get("exclusiveMaximum")
    if ex_lo is True:
        lo_x = True
    elif isinstance(ex_lo, int | float) and not isinstance(ex_lo, bool) and (lo is None or ex_lo >= lo):
        lo, lo_x = ex_lo, True
    if ex_hi is True:
        hi_x = True
    elif isinstance(ex_hi, int | float) and not isinstance(ex_hi, bool) and (hi is None or ex_hi <= hi):
        hi, hi_x = ex_hi, True
    lo = lo if isinstance(lo, int | float) and not isinstance(lo, bool) else None
    hi = hi if isinstance(hi, int | float) and not isinstance(hi, bool) else None
    return lo, lo_x, hi, hi_x


def _example_integer(schema: dict[str, Any], rng: random.Random) -> int:
    lo, lo_x, hi, hi_x = _bounds(schema)
    low = None if lo is None else (math.floor(lo) + 1 if lo_x else math.ceil(lo))
    high = None if hi is None else (math.ceil(hi) - 1 if hi_x else math.floor(hi))
    if low is None and high is None:
        low, high = 0, 100
    elif low is None:
        assert high is not None
        low = high - 100
    elif high is None:
        high = low + 100
    if low > high:
        return low
    step = schema.get("multipleOf")
    if isinstance(step, int) and not isinstance(step, bool) and step > 0:
        k_lo, k_hi = math.ceil(low / step), math.floor(high / step)
        if k_lo <= k_hi:
            return rng.randint(k_lo, k_hi) * step
    return rng.randint(low, high)


def _example_number(schema: dict[str, Any], rng: random.Random) -> float | int:
    lo, lo_x, hi, hi_x = _bounds(schema)
    if lo is None and hi is None:
        lo, hi = 0.0, 100.0
    elif lo is None:
        assert hi is not None
        lo = hi - 100.0
    elif hi is None:
        hi = lo + 100.0
    assert lo is not None and hi is not None
    step = schema.get("multipleOf")
    if isinstance(step, int | float) and not isinstance(step, bool) and step > 0:
        # Integers are the values whose quotient by a decimal step survives float division in validators.
        for candidate in range(math.ceil(lo), math.floor(hi) + 1):
            if (candidate / step).is_integer() and not (lo_x and candidate == lo) and not (hi_x and candidate == hi):
                return candidate
    if hi <= lo:
        return lo
    value = lo + (hi - lo) * rng.uniform(0.1, 0.9)
    rounded = round(value, 2)
    return rounded if lo < rounded < hi else value


def example_for_schema(schema: Any, rng: random.Random, *, root: Any = None, _depth: int = 0) -> Any:
    """A deterministic (for a given `rng` state) example document valid for a JSON schema, for the subset tools and
    structured outputs use: object (all properties, required ones always), string (enum/const, formats,
    min/maxLength), integer/number (bounds, multipleOf), boolean, null, array (1-2 items, min/maxItems,
    prefixItems), anyOf/oneOf (the first branch), allOf (merged) and local `$ref`s. `pattern` is not honoured."""
    if root is None:
        root = schema
    if schema is None or schema is True or schema == {}:
        return {} if _depth == 0 else rng.choice(_VOCAB)  # a tool without parameters takes an empty object
    if not isinstance(schema, dict):
        return None
    if _depth > _MAX_SCHEMA_DEPTH:
        return None
    if isinstance(schema.get("$ref"), str):
        return example_for_schema(_resolve_ref(root, schema["$ref"]), rng, root=root, _depth=_depth + 1)
    if "const" in schema:
        return copy.deepcopy(schema["const"])
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return copy.deepcopy(rng.choice(enum))
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if isinstance(branches, list) and branches:
            return example_for_schema(branches[0], rng, root=root, _depth=_depth + 1)
    if isinstance(schema.get("allOf"), list):
        return example_for_schema(_merge_all_of(schema, root), rng, root=root, _depth=_depth + 1)

    kind = _infer_type(schema)
    if kind == "object":
        props = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
        required = [r for r in schema.get("required") or [] if isinstance(r, str)]
        deep = _depth > _MAX_SCHEMA_DEPTH // 2  # recursive schemas: stop adding optional properties
        out: dict[str, Any] = {}
        for name, sub in props.items():
            if not deep or name in required:
                out[name] = example_for_schema(sub, rng, root=root, _depth=_depth + 1)
        extra = schema.get("additionalProperties")
        extra_schema = extra if isinstance(extra, dict) else {}
        for name in required:
            if name not in out:
                out[name] = example_for_schema(extra_schema or {"type": "string"}, rng, root=root, _depth=_depth + 1)
        min_props = schema.get("minProperties")
        if isinstance(min_props, int) and extra is not False:
            while len(out) < min_props:
                out[f"extra_{len(out)}"] = example_for_schema(
                    extra_schema or {"type": "string"}, rng, root=root, _depth=_depth + 1
                )
        return out
    if kind == "array":
        min_items = schema.get("minItems") if isinstance(schema.get("minItems"), int) else 0
        max_items = schema.get("maxItems") if isinstance(schema.get("maxItems"), int) else None
        count = max(rng.randint(1, 2), min_items)
        if max_items is not None:
            count = min(count, max_items)
        prefix = schema.get("prefixItems")
        items = schema.get("items")
        if isinstance(items, list):  # draft 4-7 tuple form
            prefix, items = items, schema.get("additionalItems")
        prefix = prefix if isinstance(prefix, list) else []
        item_schema = items if isinstance(items, dict) else {"type": "string"}
        values: list[Any] = []
        for i in range(count):
            sub = prefix[i] if i < len(prefix) else item_schema
            value = example_for_schema(sub, rng, root=root, _depth=_depth + 1)
            if schema.get("uniqueItems"):
                for _ in range(8):  # a few redraws; a small enum may not have enough distinct values
                    if value not in values:
                        break
                    value = example_for_schema(sub, rng, root=root, _depth=_depth + 1)
                if value in values and len(values) >= min_items:
                    break
            values.append(value)
        return values
    if kind == "string":
        return _example_string(schema, rng)
    if kind == "integer":
        return _example_integer(schema, rng)
    if kind == "number":
        return _example_number(schema, rng)
    if kind == "boolean":
        return rng.random() < 0.5
    if kind == "null":
        return None
    return rng.choice(_VOCAB)


_JSON_OBJECT_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "confidence": {"type": "number", "minimum": 0, "maximum": 1}},
    "required": ["answer", "confidence"],
}


# ---------------------------------------------------------------------------------------------------------------
# Controls and faults
# ---------------------------------------------------------------------------------------------------------------

_CHUNK_FAULTS = frozenset({"error", "cut", "reset", "stall", "malformed", "content_filter"})
_PLAIN_FAULTS = frozenset({"no_done", "context_length", "auth", "timeout", "quota", "none"})


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted failure. `after` is the number of content chunks sent first (chunk faults); `status` and
    `retry_after` belong to `http`."""

    kind: str
    after: int = 0
    status: int | None = None
    retry_after: str | None = None


def parse_faults(spec: str) -> tuple[Fault, ...]:
    """Parse `sim_fault`: comma-separated `http:CODE[:SECONDS]`, `error:N`, `cut:N`, `reset:N`, `stall:N`,
    `malformed:N`, `content_filter:N`, `no_done`, `context_length`, `auth`, `quota`, `timeout`, `none`."""
    faults: list[Fault] = []
    for raw in spec.split(","):
        item = raw.strip()
        if not item:
            continue
        name, _, rest = item.partition(":")
        if name == "http":
            code_text, _, retry_after = rest.partition(":")
            status = int(code_text)
            if not 400 <= status <= 599:
                raise ValueError(f"http fault status must be 4xx or 5xx, got {status}")
            if retry_after and not float(retry_after) >= 0:
                raise ValueError("retry-after must be a non-negative number of seconds")
            faults.append(Fault("http", status=status, retry_after=retry_after or None))
        elif name in _CHUNK_FAULTS:
            after = int(rest) if rest else 0
            if after < 0:
                raise ValueError(f"{name}: chunk count must be >= 0")
            faults.append(Fault(name, after=after))
        elif name in _PLAIN_FAULTS and not rest:
            faults.append(Fault(name))
        else:
            raise ValueError(f"unknown fault {item!r}")
    return tuple(faults)


class _ApiError(Exception):
    """An error answered as an OpenAI-style JSON body before any stream starts."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = list(headers)


def _meta_number(meta: dict[str, Any], key: str, default: float, low: float, high: float) -> float:
    if key not in meta:
        return default
    try:
        value = float(meta[key])
    except (TypeError, ValueError):
        raise _ApiError(400, f"metadata.{key} must be a number", param=f"metadata.{key}") from None
    if not low <= value <= high:
        raise _ApiError(400, f"metadata.{key} must be between {low:g} and {high:g}", param=f"metadata.{key}")
    return value


def _meta_bool(meta: dict[str, Any], key: str, default: bool) -> bool:
    if key not in meta:
        return default
    value = str(meta[key]).strip().lower()
    if value in ("true", "1", "yes", "on"):
        return True
    if value in ("false", "0", "no", "off", ""):
        return False
    raise _ApiError(400, f"metadata.{key} must be true or false", param=f"metadata.{key}")


@dataclass(frozen=True, slots=True)
class Controls:
    """The per-request knobs, from the request body's `metadata` (all values are strings there)."""

    seed: str = "0"
    ttft_seconds: float = 0.0
    tokens_per_second: float = 0.0
    length: int = DEFAULT_LENGTH
    literal_continuation: bool = True
    reject_prefill: bool = False
    parallel_tools: bool = False
    request_key: str | None = None
    faults: tuple[Fault, ...] = ()
    fault_attempts: int = 1

    @classmethod
    def from_metadata(cls, metadata: Any) -> Controls:
        meta = metadata if isinstance(metadata, dict) else {}
        try:
            faults = parse_faults(str(meta.get("sim_fault") or ""))
        except ValueError as exc:
            raise _ApiError(400, f"metadata.sim_fault: {exc}", param="metadata.sim_fault") from None
        return cls(
            seed=str(meta.get("sim_seed", "0")),
            ttft_seconds=_meta_number(meta, "sim_ttft_ms", 0.0, 0.0, HOLD_LIMIT_SECONDS * 1000) / 1000.0,
            tokens_per_second=_meta_number(meta, "sim_tps", 0.0, 0.0, 1e9),
            length=int(_meta_number(meta, "sim_length", DEFAULT_LENGTH, 0, 1_000_000)),
            literal_continuation=_meta_bool(meta, "sim_literal_continuation", True),
            reject_prefill=_meta_bool(meta, "sim_reject_prefill", False),
            parallel_tools=_meta_bool(meta, "sim_parallel_tools", False),
            request_key=str(meta["sim_request"]) if meta.get("sim_request") else None,
            faults=faults,
            fault_attempts=int(_meta_number(meta, "sim_fault_attempts", 1, 0, 1_000_000)),
        )


def _http_fault_error(fault: Fault, model: str) -> _ApiError:
    status = fault.status or 500
    headers: list[tuple[str, str]] = []
    if status == 429 or fault.retry_after is not None:
        # OpenAI sends both; clients prefer the millisecond form.
        seconds = fault.retry_after or "0"
        headers = [("retry-after", seconds), ("retry-after-ms", str(round(float(seconds) * 1000)))]
    if status == 429:
        return _ApiError(429, f"Rate limit reached for {model} (simulated). Please try again later.",
                         "rate_limit_exceeded", code="rate_limit_exceeded", headers=headers)
    if status == 401:
        return _auth_error()
    if status == 403:
        return _ApiError(403, "You are not allowed to use this model (simulated).", "permission_error",
                         headers=headers)
    if status == 404:
        return _ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                         code="model_not_found", headers=headers)
    if status == 503:
        return _ApiError(503, "The server is overloaded or not ready yet.", "server_error", headers=headers)
    if status >= 500:
        return _ApiError(status, "The server had an error while processing your request. Sorry about that!",
                         "server_error", headers=headers)
    return _ApiError(status, f"Simulated HTTP {status}.", headers=headers)


def _auth_error() -> _ApiError:
    return _ApiError(401, "Incorrect API key provided: sk-sim***. You can find your API key at "
                     "https://platform.openai.com/account/api-keys.", code="invalid_api_key")


# ---------------------------------------------------------------------------------------------------------------
# What one request answers
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _ToolCall:
    index: int
    call_id: str
    name: str
    arguments: str


@dataclass(slots=True)
class _Plan:
    pieces: list[str] = field(default_factory=list)  # content chunks, in order
    tool_calls: list[_ToolCall] = field(default_factory=list)
    finish_reason: str = "stop"
    prompt_tokens: int = 0


def _prompt_tokens(body: dict[str, Any]) -> int:
    """A rough, deterministic count (about 4 characters a token, plus per-message framing)."""
    total = 3
    for m in body.get("messages") or []:
        total += 4 + len(_text_of(m)) // 4
    if body.get("tools"):
        total += len(json.dumps(body["tools"])) // 4
    return total


def _tool_functions(body: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for tool in body.get("tools") or []:
        if isinstance(tool, dict) and tool.get("type", "function") == "function":
            fn = tool.get("function")
            if isinstance(fn, dict) and isinstance(fn.get("name"), str):
                out.append(fn)
    return out


def _plan(body: dict[str, Any], controls: Controls) -> _Plan:
    messages: list[Any] = body["messages"]
    _, mode, partial = _split_tail(messages)
    if mode == "prefill" and controls.reject_prefill:
        raise _ApiError(400, PREFILL_REJECTED_MESSAGE, param="messages")
    key = input_key_of(messages)
    plan = _Plan(prompt_tokens=_prompt_tokens(body))

    functions = _tool_functions(body)
    choice = body.get("tool_choice")
    forced: str | None = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        forced = fn.get("name") if isinstance(fn, dict) else None
        if forced is not None and not any(f["name"] == forced for f in functions):
            raise _ApiError(400, f"Invalid value for 'tool_choice': no function named {forced!r} in 'tools'.",
                            param="tool_choice")
    wants_call = bool(functions) and (choice == "required" or forced is not None)
    if wants_call and mode is None and _role_of(messages[-1]) != "tool":
        if forced is not None:
            chosen = [f for f in functions if f["name"] == forced]
        elif controls.parallel_tools and body.get("parallel_tool_calls") is not False:
            chosen = functions
        else:
            chosen = functions[:1]
        for index, fn in enumerate(chosen):
            rng = _rng("tool", controls.seed, key, fn["name"], str(index))
            params = fn.get("parameters")
            arguments = json.dumps(example_for_schema(params, rng, root=params))
            digest = hashlib.sha256(f"{controls.seed}\x00{key}\x00{index}\x00{fn['name']}".encode()).hexdigest()
            plan.tool_calls.append(_ToolCall(index, f"call_{digest[:24]}", fn["name"], arguments))
        plan.finish_reason = "tool_calls"
        return plan

    fmt = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") in ("json_schema", "json_object"):
        spec = fmt.get("json_schema") if isinstance(fmt.get("json_schema"), dict) else {}
        schema = spec.get("schema") if fmt["type"] == "json_schema" else _JSON_OBJECT_SCHEMA
        document = json.dumps(example_for_schema(schema, _rng("json", controls.seed, key), root=schema))
        tokens = _pieces(document, JSON_PIECE_CHARS)
    else:
        tokens = simulated_tokens(controls.seed, key, controls.length)

    full = "".join(tokens)
    out = tokens
    if mode is not None and partial and full.startswith(partial):
        if mode == "instruction" and not controls.literal_continuation:
            out = _stream_from(tokens, _overlap_start(tokens, len(partial)))  # repeats a little, like a real model
        elif mode == "instruction" or controls.literal_continuation:
            out = _stream_from(tokens, len(partial))
        # else: a trailing assistant message on a model without prefill restarts the answer (OpenAI behaviour).

    cap = body.get("max_completion_tokens") or body.get("max_tokens")
    if isinstance(cap, int) and len(out) > cap:
        out = out[:cap]
        plan.finish_reason = "length"
    plan.pieces = out
    return plan


def _validate_body(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise _ApiError(400, "We could not parse the JSON body of your request. (HINT: This likely means you "
                        "aren't using your HTTP library correctly. The OpenAI API expects a JSON payload.)") from None
    if not isinstance(body, dict):
        raise _ApiError(400, "The request body must be a JSON object.")
    if not isinstance(body.get("model"), str) or not body["model"]:
        raise _ApiError(400, "you must provide a model parameter", param="model")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages or not all(isinstance(m, dict) for m in messages):
        raise _ApiError(400, "'messages' must be a non-empty array of message objects.", param="messages")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
            raise _ApiError(400, f"Invalid '{key}': expected an integer >= 1.", param=key)
    return body


# ---------------------------------------------------------------------------------------------------------------
# HTTP plumbing
# ---------------------------------------------------------------------------------------------------------------


class _ConnectionAborted(Exception):
    """Raised inside a response after the server dropped the connection on purpose (cut, reset, stall end)."""


class _Exchange:
    """One request/response on a connection: writes h11 events, each in a single socket write."""

    def __init__(self, conn: h11.Connection, writer: asyncio.StreamWriter, request_id: str) -> None:
        self.conn = conn
        self.writer = writer
        self.request_id = request_id
        self.keep_alive = True
        self.aborted = False

    async def _send(self, event: h11.Event) -> None:
        data = self.conn.send(event)
        if data:
            self.writer.write(data)
            await self.writer.drain()

    async def start(self, status: int, headers: Sequence[tuple[str, str]]) -> None:
        all_headers = [*headers, ("x-request-id", self.request_id), ("server", "unbroken-simulated")]
        await self._send(h11.Response(status_code=status, headers=[(k.encode(), v.encode()) for k, v in all_headers]))

    async def data(self, payload: bytes) -> None:
        await self._send(h11.Data(data=payload))

    async def end(self) -> None:
        await self._send(h11.EndOfMessage())

    async def json(self, status: int, obj: Any, headers: Sequence[tuple[str, str]] = ()) -> None:
        payload = json.dumps(obj).encode()
        await self.start(status, [("content-type", "application/json"), ("content-length", str(len(payload))),
                                  *headers])
        await self.data(payload)
        await self.end()

    def abort(self, *, reset: bool = False) -> None:
        """Drop the connection now. `reset` makes the kernel send a TCP RST (SO_LINGER 0) instead of a FIN."""
        self.aborted = True
        self.keep_alive = False
        transport = self.writer.transport
        if reset:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        transport.abort()


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


class SimulatedUpstream:
    """An OpenAI Chat Completions server on `host` (loopback): `await start()`, use `base_url`, `await close()`.

    `received` keeps the most recent request bodies (bounded) for assertions; `attempts(key)` tells how many
    requests carried a given `sim_request` key; `connections_accepted` counts TCP connections (keep-alive checks)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, *, models: Sequence[str] = ("simulated",)) -> None:
        self.host = host
        self.port = port
        self.models = tuple(models)
        self.received: deque[dict[str, Any]] = deque(maxlen=256)
        self.connections_accepted = 0
        self._attempts: OrderedDict[str, int] = OrderedDict()
        self._server: asyncio.Server | None = None
        self._sock: socket.socket | None = None
        self._closing: asyncio.Event | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle ------------------------------------------------------------------------------------------

    @property
    def base_url(self) -> str:
        if self._server is None:
            raise RuntimeError("SimulatedUpstream is not started")
        return f"http://{self.host}:{self.port}/v1"

    async def start(self) -> None:
        if self._server is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._closing = asyncio.Event()
        # Own the listening socket so it can be released even after its event loop has gone (shared instance).
        # proto=IPPROTO_TCP: asyncio only turns Nagle off for sockets that say they are TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        sock.listen(512)
        sock.setblocking(False)
        self._sock = sock
        self._server = await asyncio.start_server(self._on_connection, sock=sock, limit=256 * 1024)
        self.port = sock.getsockname()[1]

    async def close(self) -> None:
        if self._server is None:
            return
        assert self._closing is not None
        self._closing.set()
        self._server.close()
        for task in list(self._connections):
            task.cancel()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5.0)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._server.wait_closed(), 5.0)
        self._server = None

    def _release_orphaned(self) -> None:
        """Close the listening socket of an instance whose event loop is closed (nothing else can)."""
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
        self._server = None

    async def __aenter__(self) -> SimulatedUpstream:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @classmethod
    def start_in_thread(cls, host: str = "127.0.0.1", port: int = 0, *,
                        models: Sequence[str] = ("simulated",)) -> SimulatedUpstreamThread:
        """Start a server on its own event loop in a daemon thread, for synchronous tests and benchmarks."""
        return SimulatedUpstreamThread(cls(host, port, models=models))

    def attempts(self, request_key: str) -> int:
        return self._attempts.get(request_key, 0)

    def reset_attempts(self) -> None:
        self._attempts.clear()

    # -- connections ----------------------------------------------------------------------------------------

    async def _on_connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        self.connections_accepted += 1
        # A zero high-water mark makes drain() wait until every byte is in the kernel: real back-pressure, and a
        # `cut` fault aborts only after the chunks before it have left the process.
        writer.transport.set_write_buffer_limits(high=0)
        # No Nagle: a frame must leave at once, not wait for the client's delayed ACK of the previous one (40 ms).
        sock = writer.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        aborted = False
        try:
            while self._closing is not None and not self._closing.is_set():
                got = await self._read_request(conn, reader, writer)
                if got is None:
                    break
                ex = _Exchange(conn, writer, f"req_sim_{secrets.token_hex(8)}")
                await self._serve(ex, reader, got[0], got[1])
                aborted = ex.aborted
                if not ex.keep_alive or conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
        except (ConnectionError, h11.LocalProtocolError, asyncio.CancelledError):
            pass  # the client went away, or the server is closing: nothing to answer
        except Exception:  # a bug here must not take the server down
            log.exception("simulated upstream: connection handler failed")
        finally:
            self._connections.discard(task)
            if not aborted:
                writer.close()

    async def _read_request(
        self, conn: h11.Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> tuple[h11.Request, bytes] | None:
        request: h11.Request | None = None
        body = bytearray()
        while True:
            try:
                event = conn.next_event()
            except h11.RemoteProtocolError as exc:
                if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                    with contextlib.suppress(Exception):
                        ex = _Exchange(conn, writer, "req_sim_bad")
                        await ex.json(exc.error_status_hint, _ApiError(exc.error_status_hint, "Malformed HTTP "
                                      "request.").body, [("connection", "close")])
                return None
            if event is h11.NEED_DATA:
                if conn.they_are_waiting_for_100_continue:
                    writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
                try:
                    async with asyncio.timeout(KEEPALIVE_IDLE_SECONDS):
                        data = await reader.read(65536)
                except (TimeoutError, ConnectionError):
                    return None
                conn.receive_data(data)  # b"" tells h11 the peer closed
                continue
            if isinstance(event, h11.Request):
                request = event
            elif isinstance(event, h11.Data):
                body += event.data
                if len(body) > MAX_BODY_BYTES:
                    ex = _Exchange(conn, writer, "req_sim_big")
                    await ex.json(413, _ApiError(413, "Request body too large.").body, [("connection", "close")])
                    return None
            elif isinstance(event, h11.EndOfMessage):
                assert request is not None
                return request, bytes(body)
            else:  # ConnectionClosed or PAUSED
                return None

    async def _serve(self, ex: _Exchange, reader: asyncio.StreamReader, request: h11.Request, body: bytes) -> None:
        """Answer one request while watching the socket: a client that leaves cancels the answer at once, even
        while it sleeps (pacing) or holds (stall, timeout), so nothing lingers."""
        respond = asyncio.create_task(self._respond(ex, request, body))
        watch: asyncio.Task[bytes] | None = asyncio.create_task(reader.read(65536))
        try:
            while True:
                waiting = {respond} if watch is None else {respond, watch}
                done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if respond in done:
                    break
                assert watch is not None
                try:
                    data = watch.result()
                except ConnectionError:
                    data = b""
                if not data:  # the client is gone
                    ex.keep_alive = False
                    respond.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await respond
                    return
                ex.conn.receive_data(data)  # a pipelined request: h11 keeps it for the next cycle
                watch = None
            respond.result()
        except _ConnectionAborted:
            pass
        finally:
            for task in (respond, watch):
                if task is not None and not task.done():
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task
            # The watcher may have read the client's next request (or its EOF) just as the answer ended.
            if watch is not None and watch.done() and not watch.cancelled():
                data = watch.result() if watch.exception() is None else b""
                if data:
                    ex.conn.receive_data(data)
                else:
                    ex.keep_alive = False

    async def _respond(self, ex: _Exchange, request: h11.Request, raw: bytes) -> None:
        path = request.target.split(b"?", 1)[0].rstrip(b"/")
        method = request.method
        try:
            if path in (b"/v1/chat/completions", b"/chat/completions"):
                if method != b"POST":
                    raise _ApiError(405, "Method not allowed; use POST.")
                await self._chat(ex, raw)
            elif path in (b"/v1/models", b"/models"):
                if method != b"GET":
                    raise _ApiError(405, "Method not allowed; use GET.")
                await ex.json(200, {"object": "list", "data": [
                    {"id": m, "object": "model", "created": 0, "owned_by": "unbroken-simulated"} for m in self.models
                ]})
            else:
                raise _ApiError(404, f"Unknown path {path.decode('latin-1')!r}.", code="unknown_url")
        except _ApiError as err:
            await ex.json(err.status, err.body, err.headers)
        except (_ConnectionAborted, ConnectionError, asyncio.CancelledError):
            raise
        except Exception:
            log.exception("simulated upstream: request handler failed")
            if ex.conn.our_state is h11.SEND_RESPONSE:
                await ex.json(500, _ApiError(500, "Simulated upstream bug.", "server_error").body)
            else:
                ex.abort()

    # -- chat completions -----------------------------------------------------------------------------------

    def _count_attempt(self, key: str) -> int:
        count = self._attempts.pop(key, 0) + 1
        self._attempts[key] = count
        while len(self._attempts) > MAX_TRACKED_REQUEST_KEYS:
            self._attempts.popitem(last=False)
        return count

    def _fault_for(self, controls: Controls) -> Fault | None:
        """The fault of this attempt: the n-th of a comma list, or the single fault for the first
        `sim_fault_attempts` attempts of a `sim_request` key; without a key, the (first) fault every time."""
        attempt = self._count_attempt(controls.request_key) if controls.request_key else None
        faults = controls.faults
        if not faults:
            return None
        if attempt is None:
            fault = faults[0]
        elif len(faults) > 1:
            fault = faults[attempt - 1] if attempt <= len(faults) else None
        else:
            fault = faults[0] if attempt <= controls.fault_attempts else None
        if fault is not None and fault.kind == "none":
            return None
        if fault is not None:
            log.debug("simulated upstream: fault %s (attempt %s)", fault.kind, attempt)
        return fault

    async def _hold(self) -> None:
        """Stay silent until the server closes (the client leaving cancels us), at most HOLD_LIMIT_SECONDS."""
        assert self._closing is not None
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), HOLD_LIMIT_SECONDS)

    async def _chat(self, ex: _Exchange, raw: bytes) -> None:
        body = _validate_body(raw)
        self.received.append(body)
        controls = Controls.from_metadata(body.get("metadata"))
        fault = self._fault_for(controls)
        model = body["model"]
        if fault is not None:
            if fault.kind == "http":
                raise _http_fault_error(fault, model)
            if fault.kind == "auth":
                raise _auth_error()
            if fault.kind == "quota":
                raise _ApiError(429, "You exceeded your current quota, please check your plan and billing details.",
                                "insufficient_quota", code="insufficient_quota")
            if fault.kind == "context_length":
                used = CONTEXT_WINDOW + _prompt_tokens(body)
                raise _ApiError(400, f"This model's maximum context length is {CONTEXT_WINDOW} tokens. However, "
                                f"your messages resulted in {used} tokens. Please reduce the length of the messages.",
                                param="messages", code="context_length_exceeded")
            if fault.kind == "timeout":
                await self._hold()
                ex.abort()
                raise _ConnectionAborted
        plan = _plan(body, controls)
        if body.get("stream") is True:
            await self._stream(ex, body, plan, controls, fault)
        else:
            await self._complete(ex, body, plan, controls, fault)

    async def _stream(self, ex: _Exchange, body: dict[str, Any], plan: _Plan, controls: Controls,
                      fault: Fault | None) -> None:
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
            def header(call: _ToolCall) -> dict[str, Any]:
                return {"index": call.index, "id": call.call_id, "type": "function",
                        "function": {"name": call.name, "arguments": ""}}

            first = json.dumps({"role": "assistant", "content": None, "tool_calls": [header(plan.tool_calls[0])]})
            deltas = []
            for call in plan.tool_calls:
                if call.index > 0:
                    deltas.append(json.dumps({"tool_calls": [header(call)]}))
                deltas.extend(json.dumps({"tool_calls": [{"index": call.index, "function": {"arguments": piece}}]})
                              for piece in _pieces(call.arguments, TOOL_ARGUMENT_PIECE_CHARS))
        else:
            first = '{"role":"assistant","content":""}'
            deltas = [f'{{"content":{json.dumps(piece)}}}' for piece in plan.pieces]
        await ex.data(frame(first))

        stop_after = fault.after if fault is not None and fault.kind in _CHUNK_FAULTS else None
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
                raise _ConnectionAborted
            if fault.kind == "stall":
                await self._hold()
                ex.abort()
                raise _ConnectionAborted
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
            usage = json.dumps(_usage(plan.prompt_tokens, sent), separators=(",", ":"))
            envelope = head[: head.index(',"choices"')]
            await ex.data(f'data: {envelope},"choices":[],"usage":{usage}}}\n\n'.encode())
        if fault is None or fault.kind != "no_done":
            await ex.data(b"data: [DONE]\n\n")
        await ex.end()

    async def _complete(self, ex: _Exchange, body: dict[str, Any], plan: _Plan, controls: Controls,
                        fault: Fault | None) -> None:
        pieces = plan.pieces
        finish = plan.finish_reason
        if fault is not None:
            if fault.kind in ("cut", "reset"):
                ex.abort(reset=fault.kind == "reset")
                raise _ConnectionAborted
            if fault.kind == "stall":
                await self._hold()
                ex.abort()
                raise _ConnectionAborted
            if fault.kind == "error":
                raise _ApiError(500, MID_STREAM_ERROR_MESSAGE, "server_error")
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
            "usage": _usage(plan.prompt_tokens, completion_tokens),
        })


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
        "prompt_tokens_details": {"cached_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0},
    }


# ---------------------------------------------------------------------------------------------------------------
# Running it: in a thread, shared per event loop, or standalone
# ---------------------------------------------------------------------------------------------------------------


class SimulatedUpstreamThread:
    """A `SimulatedUpstream` serving from its own event loop in a daemon thread. `stop()` is idempotent."""

    def __init__(self, upstream: SimulatedUpstream, start_timeout: float = 10.0) -> None:
        self.upstream = upstream
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="simulated-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(start_timeout):
            raise RuntimeError("simulated upstream did not start in time")
        if self._error is not None:
            raise RuntimeError("simulated upstream failed to start") from self._error

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self.upstream.start())
        except BaseException as exc:
            self._error = exc
            self._ready.set()
            self._loop.close()
            return
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for t in pending:
                t.cancel()
            if pending:
                self._loop.run_until_complete(asyncio.wait(pending, timeout=5.0))
            self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    @property
    def base_url(self) -> str:
        return self.upstream.base_url

    @property
    def port(self) -> int:
        return self.upstream.port

    def stop(self, timeout: float = 10.0) -> None:
        if self._loop.is_closed() or not self._thread.is_alive():
            return
        future = asyncio.run_coroutine_threadsafe(self.upstream.close(), self._loop)
        with contextlib.suppress(Exception):
            future.result(timeout)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout)

    def __enter__(self) -> SimulatedUpstreamThread:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


_shared: dict[asyncio.AbstractEventLoop, tuple[SimulatedUpstream, asyncio.Future[None]]] = {}


async def shared_upstream() -> SimulatedUpstream:
    """The process's simulated upstream for the running event loop, started on first use."""
    loop = asyncio.get_running_loop()
    for other in [lp for lp in _shared if lp.is_closed()]:  # e.g. one loop per test: free their sockets
        _shared.pop(other)[0]._release_orphaned()
    entry = _shared.get(loop)
    if entry is None:
        sim = SimulatedUpstream()
        entry = (sim, asyncio.ensure_future(sim.start()))
        _shared[loop] = entry  # registered before awaiting, so concurrent first callers share one start
    try:
        await asyncio.shield(entry[1])
    except BaseException:
        if entry[1].done() and entry[1].exception() is not None and _shared.get(loop) is entry:
            del _shared[loop]  # a failed start is retried by the next caller
        raise
    return entry[0]


async def close_shared_upstream() -> None:
    """Close the running loop's shared instance, if any (for an app's shutdown hook)."""
    entry = _shared.pop(asyncio.get_running_loop(), None)
    if entry is not None:
        with contextlib.suppress(Exception):
            await entry[1]
        await entry[0].close()


def main(argv: Sequence[str] | None = None) -> None:
    """`python -m unbroken.providers.simulated_upstream --port 8765`: serve until interrupted."""
    parser = argparse.ArgumentParser(description="Simulated OpenAI Chat Completions upstream")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args(argv)

    async def serve() -> None:
        async with SimulatedUpstream(args.host, args.port) as sim:
            print(f"simulated upstream on {sim.base_url}", flush=True)
            await asyncio.Event().wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve())


if __name__ == "__main__":
    main()
