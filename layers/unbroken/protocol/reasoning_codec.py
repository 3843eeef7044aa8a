"""Provider-bound reasoning material travels to the client inside a reasoning item's `encrypted_content`.

The spec gives reasoning items one opaque, round-trippable field; providers bind reasoning with a signature
(Anthropic, Bedrock, Gemini) or their own encrypted blob (OpenAI). The router wraps both, tagged with the provider,
so that it can send the material back to the same provider and drop it for any other (DESIGN: continuation)."""

from __future__ import annotations

import base64
import json

from unbroken.ir import Reasoning, ReasoningSeal

PREFIX = "ubr1:"


def encode_reasoning(seal: ReasoningSeal, previous: str | None = None) -> str:
    data: dict[str, str] = {}
    if previous:
        old = decode_reasoning(previous)
        if old.provider == seal.provider:
            data.update({k: v for k, v in (("s", old.signature), ("e", old.encrypted_content)) if v})
    data["p"] = seal.provider
    if seal.signature:
        data["s"] = data.get("s", "") + seal.signature
    if seal.encrypted_content:
        data["e"] = seal.encrypted_content
    raw = json.dumps(data, separators=(",", ":")).encode()
    return PREFIX + base64.urlsafe_b64encode(raw).decode()


class MalformedReasoning(ValueError):
    """A value that carries the router's prefix but is not what the router wrote (edited, cut or forged)."""


def decode_reasoning(value: str) -> Reasoning:
    """The provider-bound parts of an `encrypted_content` value. A value the router did not wrap is taken as
    OpenAI Responses' own encrypted content (the only provider that hands those out)."""
    if not value.startswith(PREFIX):
        return Reasoning(encrypted_content=value, provider="openai_responses")
    try:
        data = json.loads(base64.urlsafe_b64decode(value[len(PREFIX):].encode()))
    except (ValueError, TypeError, RecursionError):  # RecursionError: a payload nested thousands deep
        raise MalformedReasoning("not valid base64 JSON") from None
    if not isinstance(data, dict) or not all(_text(data.get(k, "")) for k in ("p", "s", "e")):
        raise MalformedReasoning("not the router's reasoning envelope")
    return Reasoning(provider=data.get("p"), signature=data.get("s"), encrypted_content=data.get("e"))


def _text(value: object) -> bool:
    """A string that can go to an upstream: no lone surrogate (`\\ud800` escapes in the JSON of the envelope)."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True
