"""Token counts estimated from a request, where no upstream has counted them: routing needs them before any attempt
(the expected cost of *this* request) and accounting after a cut attempt whose upstream never reported usage.

About 4 characters a token, the rule of thumb OpenAI documents for English text, plus the chat framing (3 tokens a
request, 4 a message). Images and encrypted reasoning are not estimated (README "Usage and cost")."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

from unbroken.ir import FunctionCall, FunctionCallOutput, GenerationRequest, Item, Message, Reasoning, TextPart

CHARS_PER_TOKEN = 4
REQUEST_FRAMING_TOKENS = 3
MESSAGE_FRAMING_TOKENS = 4
# The prompt prefix that identifies a conversation for cache affinity (`prefix_key`): a prompt shorter than this is
# not cached by the providers (OpenAI caches from 1,024 tokens, Anthropic from 1,024 or 2,048) and gets no key.
PREFIX_CHARS = 4096


def estimate_output_tokens(chars: int) -> int:
    """Tokens of `chars` characters of streamed output (rounded up: any output is at least one token)."""
    return -(-chars // CHARS_PER_TOKEN)


def _item_chars(item: Item) -> int:
    if isinstance(item, Message):
        return sum(len(p.text) for p in item.content if isinstance(p, TextPart))
    if isinstance(item, FunctionCall):
        return len(item.name) + len(item.arguments)
    if isinstance(item, FunctionCallOutput):
        return len(item.output)
    if isinstance(item, Reasoning):
        return len(item.text) + sum(len(s) for s in item.summary)
    return 0


def estimate_input_tokens(request: GenerationRequest) -> int:
    """Tokens of what a request sends: its instructions, items, tool definitions and continuation."""
    texts: list[int] = [len(request.instructions)] if request.instructions else []
    texts.extend(_item_chars(item) for item in request.items)
    if request.continuation is not None:
        texts.append(len(request.continuation.text))
    tools = sum(len(t.name) + len(t.description or "") + len(repr(t.parameters or {})) for t in request.tools)
    return (REQUEST_FRAMING_TOKENS + sum(MESSAGE_FRAMING_TOKENS + n // CHARS_PER_TOKEN for n in texts)
            + tools // CHARS_PER_TOKEN)


def prefix_tokens(request: GenerationRequest, items: int) -> int:
    """Tokens of the start of a request's prompt: its instructions, tool definitions and first `items` items (what a
    continuation shares with the request before it, which sent those)."""
    head = GenerationRequest(model=request.model, items=request.items[:items], instructions=request.instructions,
                             tools=request.tools)
    return estimate_input_tokens(head)


def prefix_key(request: GenerationRequest) -> str | None:
    """A digest of the first PREFIX_CHARS characters of the prompt as a provider caches it (instructions, tools,
    then the items in order), None for a prompt shorter than that. Two requests with the same key share at least
    that prefix."""
    parts: list[str] = []
    size = 0
    for text in _prompt_texts(request):
        parts.append(text)
        size += len(text)
        if size >= PREFIX_CHARS:
            return hashlib.sha256("\x1e".join(parts)[:PREFIX_CHARS].encode()).hexdigest()[:32]
    return None


def _prompt_texts(request: GenerationRequest) -> Iterator[str]:
    # A generator: `prefix_key` stops at PREFIX_CHARS, so a long conversation's later items are never copied.
    yield request.instructions or ""
    for t in request.tools:
        yield f"{t.name}\x1f{t.description or ''}\x1f{t.parameters!r}"
    for item in request.items:
        if isinstance(item, Message):
            yield item.role + "\x1f" + "".join(p.text for p in item.content if isinstance(p, TextPart))
        elif isinstance(item, FunctionCall):
            yield f"call\x1f{item.name}\x1f{item.arguments}"
        elif isinstance(item, FunctionCallOutput):
            yield f"output\x1f{item.output}"
