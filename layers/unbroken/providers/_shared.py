"""Small pieces the Anthropic and Bedrock adapters share: thinking budgets, the JSON-schema-as-forced-tool trick,
function-call arguments, and the whitespace bookkeeping of a literal continuation (assistant prefill)."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from unbroken.config import Effort
from unbroken.ir import Continuation, JsonSchemaFormat
from unbroken.providers.base import ProviderError

log = logging.getLogger("unbroken.providers")

# reasoning_effort -> thinking budget_tokens (Anthropic's minimum is 1024). Overridable per deployment with the
# `thinking_budgets` option.
THINKING_BUDGETS: dict[str, int] = {"minimal": 1024, "low": 2048, "medium": 8192, "high": 16384, "xhigh": 32768}
MIN_THINKING_BUDGET = 1024
DEFAULT_MAX_TOKENS = 4096


def thinking_budget(effort: str | None, overrides: Mapping[Effort, int]) -> int | None:
    """The budget for a reasoning effort, or None when the request asks for no reasoning."""
    if not effort or effort == "none":
        return None
    budgets = {**THINKING_BUDGETS, **{str(k): v for k, v in overrides.items()}}
    return int(budgets.get(effort, budgets["medium"]))


def fit_thinking(budget: int | None, max_tokens: int | None, default_max: int) -> tuple[int | None, int]:
    """(budget or None, max_tokens) such that budget < max_tokens, as Claude requires. A caller-set max_tokens is
    kept and the budget shrunk to fit (dropped below the minimum); a default one grows to leave room for both."""
    if budget is None:
        return None, max_tokens or default_max
    if max_tokens is None:
        return budget, default_max + budget
    budget = min(budget, max_tokens - 1)
    if budget < MIN_THINKING_BUDGET:
        warn_dropped("reasoning.effort", "max_output_tokens leaves no room for a thinking budget")
        return None, max_tokens
    return budget, max_tokens


def warn_dropped(field: str, why: str) -> None:
    """A request field the upstream cannot honour. Names the field, never its value (may hold user data)."""
    log.warning("request field %s dropped: %s", field, why)


_TOOL_NAME_BAD = re.compile(r"[^a-zA-Z0-9_-]")


def json_tool_name(fmt: JsonSchemaFormat) -> str:
    """A tool name (^[a-zA-Z0-9_-]{1,64}$) derived from the schema's name."""
    return (_TOOL_NAME_BAD.sub("_", fmt.name) or "json_output")[:64]


def json_tool_schema(fmt: JsonSchemaFormat) -> dict[str, Any]:
    """Tool input schemas must describe an object; other roots cannot be streamed back as the bare document."""
    if fmt.schema.get("type", "object") != "object":
        raise ProviderError("bad_request", "text.format json_schema must have an object at its root on this "
                                           "deployment (it is emulated with a forced tool call)")
    return fmt.schema


def parse_arguments(arguments: str) -> dict[str, Any]:
    """A function call's JSON arguments as the object the upstream wants. A cut or non-object document (a call cut
    by max_tokens) becomes {} so the history stays sendable."""
    try:
        value = json.loads(arguments) if arguments.strip() else {}
    except ValueError:
        value = None
    if not isinstance(value, dict):
        warn_dropped("function_call.arguments", "not a JSON object; sent as {}")
        return {}
    return value


def split_prefill(continuation: Continuation) -> tuple[str, str]:
    """(text to prefill, trailing whitespace the client already saw but the upstream must not get)."""
    kept = continuation.text.rstrip()
    return kept, continuation.text[len(kept):]


class WhitespaceJoin:
    """Joins a literal continuation onto text that was sent with its trailing whitespace stripped.

    The client already saw `stripped`; the model continues from the stripped text and usually starts by
    re-emitting that whitespace. Drop the common prefix of the new text and `stripped` (so nothing is doubled);
    whatever differs is forwarded as is, so a continuation that does not start with the whitespace still reads
    correctly after what the client has."""

    __slots__ = ("pending",)

    def __init__(self, stripped: str) -> None:
        self.pending = stripped

    def __call__(self, text: str) -> str:
        if not self.pending:
            return text
        n = 0
        limit = min(len(text), len(self.pending))
        while n < limit and text[n] == self.pending[n]:
            n += 1
        if n == len(text):
            # The whole delta is (part of) the whitespace the client already has; keep matching on the next.
            self.pending = self.pending[n:]
            return ""
        self.pending = ""
        return text[n:]


class PrefixSkip:
    """For a continuation the upstream cannot prefill (JSON streamed through a forced tool): the model writes the
    document again from the start; drop what the client already has and forward the rest. If the new document
    departs from the old one, the continuation cannot be joined."""

    __slots__ = ("pending",)

    def __init__(self, already_sent: str) -> None:
        self.pending = already_sent

    def __call__(self, text: str) -> str:
        if not self.pending:
            return text
        n = min(len(text), len(self.pending))
        if text[:n] != self.pending[:n]:
            raise ProviderError("malformed", "regenerated JSON departs from the text already sent", mid_stream=True)
        self.pending = self.pending[n:]
        return text[n:]
