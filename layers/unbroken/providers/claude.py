"""Claude's request rules, written once for the two adapters that carry Claude: `anthropic` (Messages API) and
`bedrock` (Converse). Each adapter keeps its own wire format; this module decides, over the IR, what Claude accepts
(providers.md §5, §6, §9):

- one system prompt; turns strictly alternate user / assistant, and the tool results open the user turn that
  answers the calls; no empty text blocks; images in user turns only;
- signed reasoning goes back only to the provider that signed it; unsigned or foreign reasoning is dropped;
- a cut answer continues by assistant prefill where the deployment can (`Continuation.literal`, from the
  `literal_continuation` capability: false for Claude 4.6+, which rejects prefill), else with the continue
  instruction; a JSON document emulated by a forced tool cannot be prefilled and is generated again;
- `text.format` json_schema without native support is a tool whose input is the document;
- extended thinking is off with a prefill (the prefilled turn keeps no thinking), with a forced tool choice, and
  when the last tool-calling turn does not open with its signed thinking; with thinking on, the budget fits under
  max_tokens and temperature / top_p are left to the upstream;
- usage counts cache reads and writes apart from the input tokens.

Content blocks stay the adapter's: `content_blocks` and `Turns` are given the adapter's block writers and ask it
what kind each block is. The turn envelope `{"role": ..., "content": [block, ...]}` is the same on both wires.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any, Literal

from unbroken.config import ClaudeOptions
from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Continuation,
    Finish,
    FinishReason,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    Message,
    Reasoning,
    TextPart,
    Usage,
)
from unbroken.providers._shared import (
    DEFAULT_MAX_TOKENS,
    PrefixSkip,
    WhitespaceJoin,
    fit_thinking,
    json_tool_name,
    json_tool_schema,
    log,
    split_prefill,
    thinking_budget,
    warn_dropped,
)

# What an adapter's content block is, as far as the turn rules care.
BlockKind = Literal["text", "tool_call", "tool_result", "reasoning", "other"]
Block = dict[str, Any]

JSON_TOOL_DESCRIPTION = "Respond with this JSON document."


# ---------------------------------------------------------------------------------------------------------------
# Messages
# ---------------------------------------------------------------------------------------------------------------


def system_texts(request: GenerationRequest) -> list[str]:
    """Claude has one system prompt: the instructions, then the text of every system / developer message, in
    order. Their images cannot go anywhere."""
    texts = [request.instructions] if request.instructions else []
    for item in request.items:
        if isinstance(item, Message) and item.role in ("system", "developer"):
            if item.text():
                texts.append(item.text())
            if any(isinstance(p, ImagePart) for p in item.content):
                warn_dropped("input_image", "images in system messages are not supported")
    return texts


def content_blocks(msg: Message, *, text: Callable[[str], Block],
                   image: Callable[[ImagePart], Block]) -> list[Block]:
    """A user or assistant message's parts as blocks. Empty text blocks are rejected, so left out; images are
    accepted in user turns only, and without a detail setting."""
    blocks: list[Block] = []
    for part in msg.content:
        if isinstance(part, TextPart):
            if part.text:
                blocks.append(text(part.text))
        elif msg.role == "user":
            if part.detail != "auto":
                warn_dropped("input_image.detail", "Claude has no image detail setting")
            blocks.append(image(part))
        else:
            warn_dropped("input_image", "images are accepted in user turns only")
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# Reasoning
# ---------------------------------------------------------------------------------------------------------------


def reasoning_form(item: Reasoning, provider: str) -> Literal["signed", "redacted"] | None:
    """How a reasoning item goes back to `provider`: as signed thinking, as redacted (encrypted) thinking, or not at
    all. Signatures are bound to the provider that made them; text without a signature is never accepted back."""
    if item.provider != provider:
        return None
    if item.signature:
        return "signed"
    if item.encrypted_content:
        return "redacted"
    return None


# ---------------------------------------------------------------------------------------------------------------
# Continuation
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Resume:
    """How a cut answer is continued.

    mode: `prefill` (the conversation ends with the assistant text, continued literally), `instruction` (the
        assistant text, then a user turn asking to continue), `regenerate` (nothing is added: the JSON tool's input
        is written again from the start and the part already sent is skipped).
    text: the assistant text to end with, trailing whitespace stripped (Claude 400s on it); "" = none.
    join / skip: the stream-side bookkeeping for prefill / regenerate."""

    mode: Literal["prefill", "instruction", "regenerate"]
    text: str = ""
    join: WhitespaceJoin | None = None
    skip: PrefixSkip | None = None

    @property
    def prefill(self) -> bool:
        return self.mode == "prefill"


def resume(continuation: Continuation, *, json_tool: bool) -> Resume:
    if json_tool:
        # A tool input cannot be prefilled: the document is generated again and the sent part skipped.
        return Resume("regenerate", skip=PrefixSkip(continuation.text))
    kept, stripped = split_prefill(continuation)
    if continuation.literal:
        # The client already has the stripped whitespace; the join drops it if the model writes it again.
        return Resume("prefill", kept, join=WhitespaceJoin(stripped if kept else ""))
    return Resume("instruction", kept)


# ---------------------------------------------------------------------------------------------------------------
# Turns
# ---------------------------------------------------------------------------------------------------------------


class Turns:
    """Builds strictly alternating turns: consecutive blocks of one role are merged into one turn.

    `kind` says what one of the adapter's blocks is; `text` writes a text block."""

    def __init__(self, kind: Callable[[Block], BlockKind], text: Callable[[str], Block]) -> None:
        self.kind = kind
        self.text = text
        self.messages: list[dict[str, Any]] = []

    def add(self, role: str, blocks: list[Block]) -> None:
        if not blocks:
            return
        if self.messages and self.messages[-1]["role"] == role:
            self.messages[-1]["content"].extend(blocks)
        else:
            self.messages.append({"role": role, "content": list(blocks)})

    def continue_answer(self, plan: Resume) -> None:
        """End the conversation the way `plan` says."""
        if plan.prefill:
            # Prefill and thinking exclude each other: the prefilled turn keeps no reasoning blocks.
            self._drop_last_assistant_reasoning()
        if plan.text:
            self.add("assistant", [self.text(plan.text)])
        if plan.mode == "instruction":
            self.add("user", [self.text(CONTINUE_INSTRUCTION)])

    def _drop_last_assistant_reasoning(self) -> None:
        if self.messages and self.messages[-1]["role"] == "assistant":
            kept = [b for b in self.messages[-1]["content"] if self.kind(b) != "reasoning"]
            if kept:
                self.messages[-1]["content"] = kept
            else:
                self.messages.pop()

    def unsigned_tool_turn(self) -> bool:
        """The last assistant turn calls a tool but does not open with a reasoning block: with thinking on, Claude
        requires it to start with its signed thinking, which history from another provider does not have."""
        last = next((m for m in reversed(self.messages) if m["role"] == "assistant"), None)
        if last is None or not any(self.kind(b) == "tool_call" for b in last["content"]):
            return False
        return self.kind(last["content"][0]) != "reasoning"

    def finish(self) -> list[dict[str, Any]]:
        for msg in self.messages:
            if msg["role"] == "user":
                # tool results must open the user turn that answers the tool-calling turn (a stable sort).
                msg["content"].sort(key=lambda b: self.kind(b) != "tool_result")
        return self.messages


# ---------------------------------------------------------------------------------------------------------------
# Tools and the JSON document tool
# ---------------------------------------------------------------------------------------------------------------

ToolMode = Literal["auto", "any", "none", "tool"]


@dataclass(frozen=True, slots=True)
class ToolPlan:
    """The tools to offer and the choice, before the wire format.

    tools: the caller's tools on offer (`tool_choice.allowed` applied).
    mode: auto | any (some tool must be called) | none | tool (`name` must be called); None = no tool on offer.
    json_tool: the name of the tool whose input is the JSON document (`text.format` emulated), or None. Its
        input is streamed back as text. Offered after `tools` when `json_offered`; a caller that forces one of its
        own tools gets no JSON tool offered."""

    tools: tuple[FunctionTool, ...] = ()
    mode: ToolMode | None = None
    name: str | None = None
    json_tool: str | None = None
    json_offered: bool = False
    json_schema: dict[str, Any] | None = None
    json_description: str = JSON_TOOL_DESCRIPTION

    @property
    def forced(self) -> bool:
        return self.mode in ("any", "tool")


def tool_plan(request: GenerationRequest, *, native_json: bool) -> ToolPlan:
    choice = request.tool_choice
    tools = tuple(t for t in request.tools if choice.allowed is None or t.name in choice.allowed)
    mode: ToolMode | None = None
    if tools:
        if choice.name:
            mode = "tool"
        elif choice.mode == "required":
            mode = "any"
        elif choice.mode == "none":
            mode = "none"
        else:
            mode = "auto"
    plan = ToolPlan(tools, mode, choice.name if mode == "tool" else None)
    fmt = request.text_format
    if fmt is None or native_json:
        return plan
    name = json_tool_name(fmt)
    plan = replace(plan, json_tool=name, json_schema=json_tool_schema(fmt),
                   json_description=fmt.description or JSON_TOOL_DESCRIPTION)
    if mode is None or mode == "none":
        return replace(plan, tools=(), mode="tool", name=name, json_offered=True)
    if mode in ("auto", "any"):
        # The model must answer through a tool: one of the caller's or the JSON one.
        return replace(plan, mode="any", json_offered=True)
    return plan  # the caller forces one of its own tools: no JSON tool on offer


# ---------------------------------------------------------------------------------------------------------------
# Length, thinking and sampling
# ---------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Sampling:
    """What to send for length, extended thinking and sampling; None = leave out."""

    max_tokens: int | None
    thinking_budget: int | None = None
    temperature: float | None = None
    top_p: float | None = None


def sampling(request: GenerationRequest, options: ClaudeOptions, *, prefill: bool, forced_tool: bool,
             unsigned_tool_turn: bool, default_max_tokens: int | None) -> Sampling:
    """Thinking comes from `reasoning_effort` when the deployment enables it (`thinking` option) and the request
    allows it. max_tokens: the request's, else the `max_tokens` option, else `default_max_tokens` (None: leave it
    to the upstream); with thinking the default grows by the budget and a caller's value bounds the budget."""
    budget = thinking_budget(request.reasoning_effort, options.thinking_budgets) if options.thinking else None
    if budget is not None and prefill:
        warn_dropped("reasoning.effort", "extended thinking cannot be combined with assistant prefill")
        budget = None
    if budget is not None and forced_tool:
        warn_dropped("reasoning.effort", "extended thinking cannot be combined with a forced tool choice")
        budget = None
    if budget is not None and unsigned_tool_turn:
        warn_dropped("reasoning.effort", "the last tool-calling turn carries no thinking block of this provider")
        budget = None
    if request.reasoning_effort and request.reasoning_effort != "none" and not options.thinking:
        log.debug("reasoning effort ignored: thinking is not enabled for this deployment")

    max_tokens: int | None
    if budget is not None:
        budget, max_tokens = fit_thinking(budget, request.max_output_tokens,
                                          options.max_tokens or DEFAULT_MAX_TOKENS)
    else:
        max_tokens = request.max_output_tokens or options.max_tokens or default_max_tokens

    if budget is not None:
        # With thinking, temperature must stay 1 and top_p >= 0.95: leave both to the upstream.
        if request.temperature is not None:
            warn_dropped("temperature", "not adjustable with extended thinking")
        if request.top_p is not None:
            warn_dropped("top_p", "not adjustable with extended thinking")
        return Sampling(max_tokens, budget)
    return Sampling(max_tokens, None, request.temperature, request.top_p)


# ---------------------------------------------------------------------------------------------------------------
# Usage and finish
# ---------------------------------------------------------------------------------------------------------------


def finish(reason: FinishReason, raw: str | None, *, tool_calls: int) -> Finish:
    """A tool_use stop where only the JSON document tool was called is, to the client, a message that ended."""
    if reason == "tool_calls" and tool_calls == 0:
        reason = "stop"
    return Finish(reason, raw=raw)


def usage(input_tokens: int, output_tokens: int, cache_read: int, cache_write: int) -> Usage:
    """Claude reports cache reads and writes apart from `input_tokens`; the IR counts them as input."""
    return Usage(input_tokens=input_tokens + cache_read + cache_write, output_tokens=output_tokens,
                 cached_input_tokens=cache_read)
