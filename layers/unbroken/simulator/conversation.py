"""Reading a Chat Completions conversation: the text and role of a message, the continuation the router asked for
(a trailing prefill, or a trailing [assistant, continue-instruction] pair), and the key every attempt at one answer
shares."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from typing import Any

# The router's continue instruction (`unbroken.ir.CONTINUE_INSTRUCTION`), repeated here so that the simulator needs
# nothing of the router; tests/unit/test_simulator.py checks the two stay equal.
CONTINUE_INSTRUCTION = (
    "Your previous answer was cut off after the text above. Continue from exactly that point; "
    "do not repeat anything and do not add any preamble."
)


def text_of(message: Any) -> str:
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


def role_of(message: Any) -> str:
    return str(message.get("role") or "") if isinstance(message, dict) else ""


def split_tail(messages: Sequence[Any]) -> tuple[Sequence[Any], str | None, str]:
    """(messages that determine the answer, continuation mode, partial text). Mode is "instruction" for a trailing
    [assistant P, user CONTINUE_INSTRUCTION] pair, "prefill" for a trailing assistant message, None otherwise."""
    if (
        len(messages) >= 2
        and role_of(messages[-1]) == "user"
        and text_of(messages[-1]).strip() == CONTINUE_INSTRUCTION
        and role_of(messages[-2]) == "assistant"
    ):
        return messages[:-2], "instruction", text_of(messages[-2])
    if messages and role_of(messages[-1]) == "assistant":
        return messages[:-1], "prefill", text_of(messages[-1])
    return messages, None, ""


def input_key_of(messages: Sequence[Any]) -> str:
    """A digest of the conversation's roles and texts (tools ignored), without a trailing prefill or a trailing
    continue-instruction pair: every attempt at one answer gets the same key, hence the same full text."""
    base, _, _ = split_tail(messages)
    canonical = json.dumps([[role_of(m), text_of(m)] for m in base], ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


def count_prompt_tokens(body: dict[str, Any]) -> int:
    """A rough, deterministic count (about 4 characters a token, plus per-message framing)."""
    total = 3
    for m in body.get("messages") or []:
        total += 4 + len(text_of(m)) // 4
    if body.get("tools"):
        total += len(json.dumps(body["tools"])) // 4
    return total


def prefix_keys(messages: Sequence[Any]) -> list[tuple[str, int]]:
    """(digest, prompt tokens) of every leading run of whole messages, shortest first: what a prompt cache keys on."""
    keys: list[tuple[str, int]] = []
    digest = hashlib.sha256()
    tokens = 3
    for m in messages:
        digest.update(json.dumps([role_of(m), text_of(m)], ensure_ascii=False).encode())
        tokens += 4 + len(text_of(m)) // 4
        keys.append((digest.copy().hexdigest()[:32], tokens))
    return keys
