"""Claude's request rules (providers/claude.py), table by table, and the same tables through both adapters that
carry Claude (Anthropic Messages and Bedrock Converse), read back from the bodies they would send.

No HTTP here: the rules are pure, and `AnthropicProvider.build` / `bedrock.build_params` only build the request.
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from unbroken.config import ClaudeOptions, Deployment
from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Continuation,
    Finish,
    FunctionCall,
    FunctionCallOutput,
    FunctionTool,
    GenerationRequest,
    ImagePart,
    JsonSchemaFormat,
    Message,
    Reasoning,
    TextPart,
    ToolChoice,
    Usage,
)
from unbroken.providers import claude
from unbroken.providers.anthropic import AnthropicProvider
from unbroken.providers.base import ProviderError
from unbroken.providers.bedrock import BedrockProvider, build_params


def user(text: str) -> Message:
    return Message("user", [TextPart(text)])


def request(**kw: Any) -> GenerationRequest:
    return GenerationRequest(model="claude", items=kw.pop("items", [user("Hi")]), **kw)


# A block shape of our own: the rules must not care what the wire looks like.
def kind(block: dict[str, Any]) -> claude.BlockKind:
    return block["k"]


def text(t: str) -> dict[str, Any]:
    return {"k": "text", "t": t}


def image(part: ImagePart) -> dict[str, Any]:
    return {"k": "other", "url": part.url}


def turns(*messages: tuple[str, list[str]]) -> claude.Turns:
    """Turns from (role, [block kind, ...]) rows."""
    t = claude.Turns(kind, text)
    for role, kinds in messages:
        t.add(role, [{"k": k, "t": f"{k}{i}"} for i, k in enumerate(kinds)])
    return t


def shape(t: claude.Turns) -> list[tuple[str, list[str]]]:
    return [(m["role"], [b["k"] for b in m["content"]]) for m in t.messages]


# ---------------------------------------------------------------------------------------------------------------
# continuation: prefill, instruction or regenerate
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("literal", "json_tool", "seen", "mode", "sent"),
    [
        (True, False, "The answer is  ", "prefill", "The answer is"),  # trailing whitespace never sent
        (True, False, "No trailing", "prefill", "No trailing"),
        (True, False, "   ", "prefill", ""),  # nothing but whitespace: no assistant turn at all
        (False, False, "The answer is ", "instruction", "The answer is"),
        (False, False, "", "instruction", ""),
        (True, True, '{"a": ', "regenerate", ""),  # a tool input cannot be prefilled
        (False, True, '{"a": ', "regenerate", ""),
    ],
)
def test_resume(literal: bool, json_tool: bool, seen: str, mode: str, sent: str) -> None:
    r = claude.resume(Continuation(seen, literal=literal), json_tool=json_tool)
    assert (r.mode, r.text, r.prefill) == (mode, sent, mode == "prefill")
    assert (r.join is not None, r.skip is not None) == (mode == "prefill", mode == "regenerate")


@pytest.mark.parametrize(
    ("seen", "deltas", "forwarded"),
    [
        ("The answer is  ", [" ", " 42."], "42."),  # the model writes the whitespace again: not doubled
        ("The answer is ", ["42."], "42."),
        ("Para.\n\n", ["\n", "Next."], "Next."),
        ("Word ", ["\n\nNext"], "\n\nNext"),
        ("   ", ["x"], "x"),  # nothing was prefilled: nothing to join
    ],
)
def test_prefill_join(seen: str, deltas: list[str], forwarded: str) -> None:
    r = claude.resume(Continuation(seen, literal=True), json_tool=False)
    assert r.join is not None
    assert "".join(r.join(d) for d in deltas) == forwarded


def test_regenerate_skips_what_was_sent() -> None:
    r = claude.resume(Continuation('{"a": 1, ', literal=True), json_tool=True)
    assert r.skip is not None
    assert [r.skip(p) for p in ['{"a"', ': 1, "b', '": 2}']] == ["", '"b', '": 2}']
    r = claude.resume(Continuation('{"a": 1', literal=False), json_tool=True)
    assert r.skip is not None
    with pytest.raises(ProviderError) as exc:
        r.skip('{"b"')
    assert exc.value.kind == "malformed"


@pytest.mark.parametrize(
    ("before", "literal", "json_tool", "after"),
    [
        # prefill: the cut answer's own reasoning blocks leave the turn; the text ends the conversation
        ([("user", ["text"]), ("assistant", ["reasoning", "reasoning"])], True, False,
         [("user", ["text"]), ("assistant", ["text"])]),
        ([("user", ["text"]), ("assistant", ["reasoning", "tool_call"]), ("user", ["tool_result"])], True, False,
         [("user", ["text"]), ("assistant", ["reasoning", "tool_call"]), ("user", ["tool_result"]),
          ("assistant", ["text"])]),
        # instruction: the reasoning stays; the text, then the user's continue instruction
        ([("user", ["text"]), ("assistant", ["reasoning"])], False, False,
         [("user", ["text"]), ("assistant", ["reasoning", "text"]), ("user", ["text"])]),
        # regenerate: nothing is added
        ([("user", ["text"]), ("assistant", ["reasoning"])], True, True,
         [("user", ["text"]), ("assistant", ["reasoning"])]),
    ],
)
def test_continue_answer(before: list[tuple[str, list[str]]], literal: bool, json_tool: bool,
                         after: list[tuple[str, list[str]]]) -> None:
    t = turns(*before)
    t.continue_answer(claude.resume(Continuation("Half way ", literal=literal), json_tool=json_tool))
    assert shape(t) == after
    if not json_tool:
        tail = [b["t"] for m in t.messages[-2:] for b in m["content"] if b["k"] == "text"]
        assert tail[-1] == ("Half way" if literal else CONTINUE_INSTRUCTION)


# ---------------------------------------------------------------------------------------------------------------
# turns
# ---------------------------------------------------------------------------------------------------------------


def test_turns_alternate_and_tool_results_open_the_user_turn() -> None:
    t = turns(("user", ["text"]), ("assistant", ["text"]), ("assistant", ["tool_call", "tool_call"]),
              ("user", ["text"]), ("user", ["tool_result", "tool_result"]))
    t.add("user", [])  # empty: nothing
    t.finish()
    assert shape(t) == [("user", ["text"]), ("assistant", ["text", "tool_call", "tool_call"]),
                        ("user", ["tool_result", "tool_result", "text"])]
    # The sort is stable: results keep their order.
    assert [b["t"] for b in t.messages[-1]["content"]] == ["tool_result0", "tool_result1", "text0"]


@pytest.mark.parametrize(
    ("messages", "unsigned"),
    [
        ([("user", ["text"])], False),
        ([("user", ["text"]), ("assistant", ["text"])], False),  # no tool call
        ([("user", ["text"]), ("assistant", ["tool_call"]), ("user", ["tool_result"])], True),
        ([("user", ["text"]), ("assistant", ["text", "tool_call"]), ("user", ["tool_result"])], True),
        ([("user", ["text"]), ("assistant", ["reasoning", "tool_call"]), ("user", ["tool_result"])], False),
        # only the last assistant turn counts
        ([("user", ["text"]), ("assistant", ["tool_call"]), ("user", ["tool_result"]),
          ("assistant", ["reasoning", "tool_call"]), ("user", ["tool_result"])], False),
        ([("user", ["text"]), ("assistant", ["reasoning", "tool_call"]), ("user", ["tool_result"]),
          ("assistant", ["tool_call"]), ("user", ["tool_result"])], True),
    ],
)
def test_unsigned_tool_turn(messages: list[tuple[str, list[str]]], unsigned: bool) -> None:
    assert turns(*messages).unsigned_tool_turn() is unsigned


def test_system_texts_and_content_blocks(caplog: pytest.LogCaptureFixture) -> None:
    req = request(instructions="Be brief.", items=[
        Message("developer", [TextPart("French.")]), user("Hi"),
        Message("system", [TextPart("No emojis."), ImagePart("https://x/sys.png")]), Message("system", []),
    ])
    with caplog.at_level("WARNING", logger="unbroken.providers"):
        assert claude.system_texts(req) == ["Be brief.", "French.", "No emojis."]
    assert "input_image" in caplog.text
    msg = Message("user", [TextPart(""), TextPart("What?"), ImagePart("https://x/a.png", detail="high")])
    assert claude.content_blocks(msg, text=text, image=image) == [{"k": "text", "t": "What?"},
                                                                  {"k": "other", "url": "https://x/a.png"}]
    assert "input_image.detail" in caplog.text
    # Images in assistant turns go nowhere.
    msg = Message("assistant", [TextPart("Here"), ImagePart("https://x/a.png")])
    assert claude.content_blocks(msg, text=text, image=image) == [{"k": "text", "t": "Here"}]


# ---------------------------------------------------------------------------------------------------------------
# reasoning: which items go back
# ---------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("item", "anthropic", "bedrock"),
    [
        (Reasoning(text="t", signature="sig", provider="anthropic"), "signed", None),
        (Reasoning(text="t", signature="sig", provider="bedrock"), None, "signed"),
        (Reasoning(encrypted_content="RED==", provider="anthropic"), "redacted", None),
        (Reasoning(text="t", signature="sig", encrypted_content="RED==", provider="bedrock"), None, "signed"),
        (Reasoning(text="unsigned", provider="anthropic"), None, None),  # Claude rejects unsigned thinking
        (Reasoning(text="t", summary=["s"], provider="bedrock"), None, None),
        (Reasoning(text="t", encrypted_content="gAAAA", provider="openai_responses"), None, None),  # foreign
        (Reasoning(text="t", signature="sig", provider="gemini"), None, None),
        (Reasoning(text="t", signature="sig"), None, None),  # nobody's
    ],
)
def test_reasoning_form(item: Reasoning, anthropic: str | None, bedrock: str | None) -> None:
    assert claude.reasoning_form(item, "anthropic") == anthropic
    assert claude.reasoning_form(item, "bedrock") == bedrock


# ---------------------------------------------------------------------------------------------------------------
# tools and the JSON document tool
# ---------------------------------------------------------------------------------------------------------------

TOOLS = [FunctionTool("get_weather", "Weather", {"type": "object"}), FunctionTool("get_time")]
DOC = JsonSchemaFormat("my.doc", {"type": "object", "properties": {"a": {"type": "string"}}}, "The document")


@pytest.mark.parametrize(
    ("tools", "choice", "fmt", "want"),
    [
        ([], ToolChoice(), None, ([], None, None, None, False)),
        (TOOLS, ToolChoice(), None, (["get_weather", "get_time"], "auto", None, None, False)),
        (TOOLS, ToolChoice("required"), None, (["get_weather", "get_time"], "any", None, None, False)),
        (TOOLS, ToolChoice("none"), None, (["get_weather", "get_time"], "none", None, None, False)),
        (TOOLS, ToolChoice(name="get_time"), None, (["get_weather", "get_time"], "tool", "get_time", None, False)),
        (TOOLS, ToolChoice("required", allowed=["get_time"]), None, (["get_time"], "any", None, None, False)),
        (TOOLS, ToolChoice(allowed=[]), None, ([], None, None, None, False)),
        # the JSON document alone: forced to its tool
        ([], ToolChoice(), DOC, ([], "tool", "my_doc", "my_doc", True)),
        (TOOLS, ToolChoice("none"), DOC, ([], "tool", "my_doc", "my_doc", True)),
        # with the caller's tools: some tool must be called, the caller's or the document's
        (TOOLS, ToolChoice(), DOC, (["get_weather", "get_time"], "any", None, "my_doc", True)),
        (TOOLS, ToolChoice("required"), DOC, (["get_weather", "get_time"], "any", None, "my_doc", True)),
        # the caller forces its own tool: the document tool is not offered (but its name is kept for the stream)
        (TOOLS, ToolChoice(name="get_time"), DOC, (["get_weather", "get_time"], "tool", "get_time", "my_doc", False)),
    ],
)
def test_tool_plan(tools: list[FunctionTool], choice: ToolChoice, fmt: JsonSchemaFormat | None,
                   want: tuple[list[str], str | None, str | None, str | None, bool]) -> None:
    tp = claude.tool_plan(request(tools=tools, tool_choice=choice, text_format=fmt), native_json=False)
    assert ([t.name for t in tp.tools], tp.mode, tp.name, tp.json_tool, tp.json_offered) == want
    assert tp.forced is (tp.mode in ("any", "tool"))
    if tp.json_tool:
        assert tp.json_schema == DOC.schema and tp.json_description == "The document"


def test_tool_plan_native_json_and_bad_root() -> None:
    tp = claude.tool_plan(request(text_format=DOC), native_json=True)
    assert (tp.mode, tp.json_tool, tp.forced) == (None, None, False)
    assert claude.tool_plan(request(text_format=JsonSchemaFormat("d", {"type": "object"})),
                            native_json=False).json_description == claude.JSON_TOOL_DESCRIPTION
    with pytest.raises(ProviderError) as exc:
        claude.tool_plan(request(text_format=JsonSchemaFormat("list", {"type": "array"})), native_json=False)
    assert exc.value.kind == "bad_request"


# ---------------------------------------------------------------------------------------------------------------
# length, thinking and sampling
# ---------------------------------------------------------------------------------------------------------------

NO_BLOCKER = {"prefill": False, "forced_tool": False, "unsigned_tool_turn": False}


@pytest.mark.parametrize(
    ("options", "req", "blockers", "default", "want"),
    [
        # no thinking: sampling goes through, max_tokens = request's, else option, else the adapter's default
        ({}, {"temperature": 0.2, "top_p": 0.9}, {}, 4096, claude.Sampling(4096, None, 0.2, 0.9)),
        ({}, {"max_output_tokens": 300}, {}, 4096, claude.Sampling(300)),
        ({"max_tokens": 1234}, {}, {}, 4096, claude.Sampling(1234)),
        ({"max_tokens": 1234}, {"max_output_tokens": 300}, {}, None, claude.Sampling(300)),
        ({}, {}, {}, None, claude.Sampling(None)),  # Converse: leave it to the upstream
        # reasoning effort, but thinking is not enabled for the deployment
        ({}, {"reasoning_effort": "high", "temperature": 0.5}, {}, 4096, claude.Sampling(4096, None, 0.5)),
        # thinking on: budget from the effort, default max_tokens grows by it, temperature / top_p left out
        ({"thinking": True}, {"reasoning_effort": "low", "temperature": 0.3, "top_p": 0.5}, {}, 4096,
         claude.Sampling(4096 + 2048, 2048)),
        ({"thinking": True}, {"reasoning_effort": "medium"}, {}, None, claude.Sampling(4096 + 8192, 8192)),
        ({"thinking": True, "max_tokens": 1000}, {"reasoning_effort": "low"}, {}, None,
         claude.Sampling(1000 + 2048, 2048)),
        ({"thinking": True, "thinking_budgets": {"low": 3000}}, {"reasoning_effort": "low"}, {}, 4096,
         claude.Sampling(4096 + 3000, 3000)),
        ({"thinking": True}, {"reasoning_effort": "none", "temperature": 0.3}, {}, 4096,
         claude.Sampling(4096, None, 0.3)),
        ({"thinking": True}, {"temperature": 0.3}, {}, 4096, claude.Sampling(4096, None, 0.3)),  # no effort
        # a caller's max_output_tokens bounds the budget; too little room drops thinking
        ({"thinking": True}, {"reasoning_effort": "high", "max_output_tokens": 2000}, {}, 4096,
         claude.Sampling(2000, 1999)),
        ({"thinking": True}, {"reasoning_effort": "high", "max_output_tokens": 900, "temperature": 0.1}, {}, 4096,
         claude.Sampling(900, None, 0.1)),
        # what switches thinking off: a prefill, a forced tool, an unsigned last tool-calling turn
        ({"thinking": True}, {"reasoning_effort": "high", "temperature": 0.3}, {"prefill": True}, 4096,
         claude.Sampling(4096, None, 0.3)),
        ({"thinking": True}, {"reasoning_effort": "high"}, {"forced_tool": True}, 4096, claude.Sampling(4096)),
        ({"thinking": True}, {"reasoning_effort": "high"}, {"unsigned_tool_turn": True}, None,
         claude.Sampling(None)),
    ],
)
def test_sampling(options: dict[str, Any], req: dict[str, Any], blockers: dict[str, bool], default: int | None,
                  want: claude.Sampling) -> None:
    got = claude.sampling(request(**req), ClaudeOptions(**options), **{**NO_BLOCKER, **blockers},
                          default_max_tokens=default)
    assert got == want


def test_sampling_warns_by_field_name(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="unbroken.providers"):
        claude.sampling(request(reasoning_effort="low", temperature=0.3, top_p=0.2), ClaudeOptions(thinking=True),
                        **NO_BLOCKER, default_max_tokens=4096)
        claude.sampling(request(reasoning_effort="low"), ClaudeOptions(thinking=True),
                        **{**NO_BLOCKER, "prefill": True}, default_max_tokens=4096)
    fields = [r.args[0] for r in caplog.records]  # type: ignore[index]
    assert fields == ["temperature", "top_p", "reasoning.effort"]


# ---------------------------------------------------------------------------------------------------------------
# usage and finish
# ---------------------------------------------------------------------------------------------------------------


def test_usage_counts_cache_as_input() -> None:
    assert claude.usage(10, 2, 100, 50) == Usage(input_tokens=160, output_tokens=2, cached_input_tokens=100)


@pytest.mark.parametrize(("reason", "calls", "want"), [("tool_calls", 0, "stop"), ("tool_calls", 1, "tool_calls"),
                                                       ("length", 0, "length"), ("stop", 2, "stop")])
def test_finish(reason: Any, calls: int, want: str) -> None:
    assert claude.finish(reason, "raw", tool_calls=calls) == Finish(want, raw="raw")  # type: ignore[arg-type]


# ---------------------------------------------------------------------------------------------------------------
# the same rules through both adapters
# ---------------------------------------------------------------------------------------------------------------


def deployment(provider: str, model: str, **options: Any) -> Deployment:
    return Deployment(name=f"{provider}-claude", provider=provider, model=model, base_url="http://127.0.0.1:9",
                      api_key="k", options=options)


def literal_capability(dep: Deployment) -> bool:
    cls = AnthropicProvider if dep.provider == "anthropic" else BedrockProvider
    return cls(dep, httpx.AsyncClient()).capabilities.literal_continuation


def body(dep: Deployment, req: GenerationRequest) -> dict[str, Any]:
    if dep.provider == "anthropic":
        return AnthropicProvider(dep, httpx.AsyncClient()).build(req).body
    return build_params(dep, req).params


def texts(message: dict[str, Any]) -> list[str]:
    return [b["text"] for b in message["content"] if "text" in b and b.get("type", "text") == "text"]


def thinking(dep: Deployment, b: dict[str, Any]) -> dict[str, Any] | None:
    if dep.provider == "anthropic":
        return b.get("thinking")
    return (b.get("additionalModelRequestFields") or {}).get("thinking")


MODELS = {"anthropic": ("claude-sonnet-4-5", "claude-opus-4-6"),
          "bedrock": ("us.anthropic.claude-sonnet-4-5-20250929-v1:0", "us.anthropic.claude-opus-4-6-v1")}


# The model id decides nothing by itself: prefill or instruction follows the deployment's `literal_continuation`
# (default true on Anthropic, false on Bedrock). Claude 4.6+ deployments are configured with it false; one left at
# the default is sent a prefill, and its 400 (`prefill_rejected`) makes the attempt loop retry with the instruction.
@pytest.mark.parametrize("provider", ["anthropic", "bedrock"])
@pytest.mark.parametrize("newer", [False, True], ids=["4.5", "4.6"])
@pytest.mark.parametrize(
    ("literal_option", "thinking_on", "json_doc", "anthropic_mode", "bedrock_mode", "thinks"),
    [
        (None, False, False, "prefill", "instruction", False),
        (None, True, False, "prefill", "instruction", None),  # thinking only where there is no prefill
        (True, False, False, "prefill", "prefill", False),
        (True, True, False, "prefill", "prefill", False),  # prefill wins; thinking off for this request
        (False, False, False, "instruction", "instruction", False),
        (False, True, False, "instruction", "instruction", True),
        (True, True, True, "regenerate", "regenerate", False),  # the document tool is forced: no thinking
        (False, False, True, "regenerate", "regenerate", False),
    ],
)
def test_continuation_through_both_adapters(provider: str, newer: bool, literal_option: bool | None,
                                            thinking_on: bool, json_doc: bool, anthropic_mode: str,
                                            bedrock_mode: str, thinks: bool | None) -> None:
    options: dict[str, Any] = {"thinking": thinking_on}
    if literal_option is not None:
        options["literal_continuation"] = literal_option
    dep = deployment(provider, MODELS[provider][newer], **options)
    history = [user("Tell me"), Reasoning(text="hm", signature="sig", provider=provider)]
    cont = Continuation("Once upon ", literal=literal_capability(dep))
    req = request(items=history, continuation=cont, reasoning_effort="low",
                  text_format=DOC if json_doc else None)
    b = body(dep, req)
    mode = anthropic_mode if provider == "anthropic" else bedrock_mode
    last = b["messages"][-1]
    if mode == "prefill":
        assert last["role"] == "assistant" and texts(last) == ["Once upon"]
        assert len(last["content"]) == 1  # the turn's own thinking is gone
    elif mode == "instruction":
        assert last["role"] == "user" and texts(last) == [CONTINUE_INSTRUCTION]
        assert texts(b["messages"][-2]) == ["Once upon"]
    else:
        assert last["role"] == "assistant" and texts(last) == []  # nothing added: the document is rewritten
    want_thinking = (mode != "prefill") if thinks is None else thinks
    assert (thinking(dep, b) is not None) is (want_thinking and thinking_on)


@pytest.mark.parametrize("provider", ["anthropic", "bedrock"])
def test_reasoning_kept_through_both_adapters(provider: str) -> None:
    items = [user("Hi"),
             Reasoning(text="mine", signature="sig-mine", provider=provider),
             Reasoning(text="other", signature="sig-other", provider="bedrock" if provider == "anthropic"
                       else "anthropic"),
             Reasoning(text="unsigned", provider=provider),
             Reasoning(encrypted_content="gAAAA", provider="openai_responses"),
             Message("assistant", [TextPart("Hello")]), user("Again")]
    content = body(deployment(provider, MODELS[provider][0]), request(items=items))["messages"][1]["content"]
    assert len(content) == 2 and texts({"content": content}) == ["Hello"]
    assert "sig-mine" in repr(content[0]) and "sig-other" not in repr(content)


@pytest.mark.parametrize("provider", ["anthropic", "bedrock"])
@pytest.mark.parametrize(
    ("req", "thinks", "sampled"),
    [
        ({"reasoning_effort": "low", "temperature": 0.3, "top_p": 0.9}, True, False),
        ({"temperature": 0.3, "top_p": 0.9}, False, True),
        ({"reasoning_effort": "low", "temperature": 0.3, "top_p": 0.9, "tools": TOOLS,
          "tool_choice": ToolChoice("required")}, False, True),
        ({"reasoning_effort": "low", "temperature": 0.3, "top_p": 0.9, "tools": TOOLS,
          "items": [user("t?"), FunctionCall("c1", "get_time", "{}"), FunctionCallOutput("c1", "noon")]}, False, True),
    ],
)
def test_sampling_through_both_adapters(provider: str, req: dict[str, Any], thinks: bool, sampled: bool) -> None:
    dep = deployment(provider, MODELS[provider][0], thinking=True)
    b = body(dep, request(**req))
    assert (thinking(dep, b) is not None) is thinks
    if provider == "anthropic":
        got = {k: b[k] for k in ("temperature", "top_p") if k in b}
    else:
        got = {k: v for k, v in b.get("inferenceConfig", {}).items() if k in ("temperature", "topP")}
    assert bool(got) is sampled and len(got) in (0, 2)
