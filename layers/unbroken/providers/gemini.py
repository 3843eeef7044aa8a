"""Google Gemini as an upstream: `POST .../models/{model}:streamGenerateContent?alt=sse` (Gemini API with
`x-goog-api-key`, or Vertex AI with a Bearer token when `options.vertex` is set).

Gemini continues a trailing `model` turn literally, so continuation is a prefill. Each SSE `data:` is a whole
`GenerateContentResponse`; there is no terminator line, so a stream that ends without a `finishReason` is truncated.
"""

from __future__ import annotations

import json
import logging
import mimetypes
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

from unbroken.config import GeminiOptions
from unbroken.ir import (
    CONTINUE_INSTRUCTION,
    Delta,
    Finish,
    FinishReason,
    FunctionCall,
    FunctionCallOutput,
    GenerationRequest,
    ImagePart,
    Message,
    Reasoning,
    ReasoningDelta,
    ReasoningSeal,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    UpstreamModel,
    Usage,
)
from unbroken.providers._http import open_sse, parse_json
from unbroken.providers.base import Capabilities, ErrorKind, Provider, ProviderError, error_from_status

log = logging.getLogger("unbroken.providers.gemini")

DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com"
# Google's documented sentinel for a function call whose thought signature is unknown (history written by another
# provider); Gemini 3 rejects a current-turn function call without any signature.
SKIP_SIGNATURE = "skip_thought_signature_validator"

_CONTENT_FILTER = {"SAFETY", "RECITATION", "BLOCKLIST", "PROHIBITED_CONTENT", "SPII", "IMAGE_SAFETY", "LANGUAGE",
                   "IMAGE_PROHIBITED_CONTENT", "IMAGE_RECITATION"}
# The model produced a call the API could not accept: a failed generation, worth another attempt.
_FAILED = {"MALFORMED_FUNCTION_CALL", "UNEXPECTED_TOOL_CALL", "TOO_MANY_TOOL_CALLS"}
_STATUS_KIND: dict[str, ErrorKind] = {
    "UNAVAILABLE": "overloaded",
    "RESOURCE_EXHAUSTED": "rate_limited",
    "INTERNAL": "server_error",
    "UNKNOWN": "server_error",
    "DEADLINE_EXCEEDED": "timeout",
    "INVALID_ARGUMENT": "bad_request",
    "FAILED_PRECONDITION": "bad_request",
    "PERMISSION_DENIED": "auth",
    "UNAUTHENTICATED": "auth",
    "NOT_FOUND": "not_found",
}
_TOKEN_LIMIT = re.compile(r"input token count|tokens? (allowed|limit)|maximum number of tokens|context (window|length)",
                          re.IGNORECASE)
# reasoning_effort → thinkingLevel (Gemini 3) and thinkingBudget (Gemini 2.x); `options.reasoning_map` overrides.
_LEVELS = {"none": "minimal", "minimal": "minimal", "low": "low", "medium": "medium", "high": "high",
           "xhigh": "high"}
_BUDGETS = {"none": 0, "minimal": 512, "low": 1024, "medium": 8192, "high": 24576, "xhigh": 32768}
# JSON Schema keywords the OpenAPI-subset `parameters` / `responseSchema` fields reject (options.schema_fields:
# "openapi"); the default fields `parametersJsonSchema` / `responseJsonSchema` take JSON Schema as is.
_OPENAPI_DROP = {"additionalProperties", "$schema", "$id", "strict", "$defs", "definitions", "$ref", "const"}
_JSON_PATH = re.compile(r"\.([^.\[\]]+)|\[(\d+)\]|\['((?:[^'\\]|\\.)*)'\]|\[\"((?:[^\"\\]|\\.)*)\"\]")


def _google_error(body: Any) -> dict[str, Any] | None:
    if isinstance(body, list) and body:
        body = body[0]  # the non-SSE endpoint wraps everything in an array
    err = body.get("error") if isinstance(body, dict) else None
    return err if isinstance(err, dict) else None


def _retry_delay(err: dict[str, Any]) -> float | None:
    """`RetryInfo.retryDelay` ("34.4s") from a google.rpc error's details: Gemini sends no retry-after header."""
    for detail in err.get("details") or []:
        if isinstance(detail, dict) and str(detail.get("@type", "")).endswith("google.rpc.RetryInfo"):
            raw = str(detail.get("retryDelay") or "").strip()
            try:
                return max(0.0, float(raw.removesuffix("s")))
            except ValueError:
                return None
    return None


def _classify(err: dict[str, Any], http_status: int | None, *, mid_stream: bool) -> ProviderError:
    status = str(err.get("status") or "")
    message = str(err.get("message") or "upstream error")
    code = err.get("code")
    num = http_status if http_status is not None else (code if isinstance(code, int) else None)
    kind: ErrorKind | None = _STATUS_KIND.get(status)
    if kind is None:
        kind = error_from_status(num, message).kind if num is not None else "server_error"
    if kind == "bad_request" and _TOKEN_LIMIT.search(message):
        kind = "context_length"
    return ProviderError(kind, message, status=num, retry_after=_retry_delay(err), code=status or None,
                         mid_stream=mid_stream)


def refine_http_error(status: int, body: Any, err: ProviderError) -> ProviderError | None:
    google = _google_error(body)
    if google is None:
        return None
    refined = _classify(google, status, mid_stream=False)
    if refined.retry_after is None:
        refined.retry_after = err.retry_after
    return refined


def _parse_json_path(path: str) -> list[str | int]:
    if not path.startswith("$"):
        raise ProviderError("malformed", "streamed function argument with an unknown path form", mid_stream=True)
    segs: list[str | int] = []
    pos = 1
    while pos < len(path):
        m = _JSON_PATH.match(path, pos)
        if m is None:
            raise ProviderError("malformed", "streamed function argument with an unknown path form",
                                mid_stream=True)
        if m.group(2) is not None:
            segs.append(int(m.group(2)))
        else:
            segs.append(next(g for g in (m.group(1), m.group(3), m.group(4)) if g is not None))
        pos = m.end()
    if not segs:
        raise ProviderError("malformed", "streamed function argument without a path", mid_stream=True)
    return segs


class _ArgsWriter:
    """Turns Vertex's streamed `partialArgs` (scalar pieces addressed by JSON path, in document order, strings
    possibly split over pieces with `willContinue`) into pieces of one JSON document, so arguments stream as text
    like every other provider's."""

    def __init__(self) -> None:
        self.started = False
        self.path: list[str | int] = []  # path of the innermost open container below the root object
        self.kinds: list[str] = []  # "{" / "[" per open container, root first
        self.counts: list[int] = []  # members written per open container
        self.open_string: list[str | int] | None = None

    def _member(self, seg: str | int) -> str:
        out = "," if self.counts[-1] else ""
        self.counts[-1] += 1
        if self.kinds[-1] == "{":
            out += json.dumps(str(seg), ensure_ascii=False) + ":"
        return out

    def feed(self, arg: dict[str, Any]) -> str:
        segs = _parse_json_path(str(arg.get("jsonPath") or ""))
        is_string = "stringValue" in arg
        if is_string:
            value: Any = str(arg.get("stringValue") or "")
        elif "numberValue" in arg:
            value = arg["numberValue"]
        elif "boolValue" in arg:
            value = bool(arg["boolValue"])
        else:
            value = None  # nullValue
        more = bool(arg.get("willContinue"))
        out: list[str] = []
        if not self.started:
            self.started, self.kinds, self.counts = True, ["{"], [0]
            out.append("{")
        if self.open_string is not None:
            if is_string and segs == self.open_string:
                out.append(json.dumps(value, ensure_ascii=False)[1:-1])
                if not more:
                    out.append('"')
                    self.open_string = None
                return "".join(out)
            out.append('"')
            self.open_string = None
        parent = segs[:-1]
        common = 0
        while common < min(len(self.path), len(parent)) and self.path[common] == parent[common]:
            common += 1
        while len(self.path) > common:
            out.append("}" if self.kinds.pop() == "{" else "]")
            self.counts.pop()
            self.path.pop()
        for i in range(common, len(parent)):
            out.append(self._member(parent[i]))
            opener = "[" if isinstance(segs[i + 1], int) else "{"
            out.append(opener)
            self.kinds.append(opener)
            self.counts.append(0)
            self.path.append(parent[i])
        out.append(self._member(segs[-1]))
        if is_string:
            out.append('"' + json.dumps(value, ensure_ascii=False)[1:-1])
            if more:
                self.open_string = segs
            else:
                out.append('"')
        else:
            out.append(json.dumps(value))
        return "".join(out)

    def close(self) -> str:
        if not self.started:
            return "{}"
        out = '"' if self.open_string is not None else ""
        self.open_string = None
        out += "".join("}" if k == "{" else "]" for k in reversed(self.kinds))
        self.kinds, self.counts, self.path = [], [], []
        return out


def _openapi_schema(schema: Any) -> Any:
    if isinstance(schema, dict):
        return {k: _openapi_schema(v) for k, v in schema.items() if k not in _OPENAPI_DROP}
    if isinstance(schema, list):
        return [_openapi_schema(v) for v in schema]
    return schema


class GeminiProvider(Provider):
    name = "gemini"
    reasoning_provider = "gemini"

    default_capabilities = Capabilities(literal_continuation=True, image_urls=False, native_json_schema=True)

    # -- request -------------------------------------------------------------------------------------------------

    @property
    def options(self) -> GeminiOptions:
        return self.deployment.options_as(GeminiOptions)

    @property
    def _model(self) -> str:
        return self.deployment.model.removeprefix("models/")

    def url(self) -> str:
        opts = self.options
        if opts.vertex:
            # base_url names the publisher: https://{region}-aiplatform.googleapis.com/v1/projects/{p}/locations/
            # {region}/publishers/google
            if not self.deployment.base_url:
                raise ProviderError("bad_request", f"deployment {self.deployment.name}: vertex needs a base_url")
            prefix = self.deployment.base_url.rstrip("/")
        else:
            base = (self.deployment.base_url or DEFAULT_BASE_URL).rstrip("/")
            prefix = f"{base}/{opts.api_version}"
        return f"{prefix}/models/{self._model}:streamGenerateContent"

    def headers(self) -> dict[str, str]:
        headers = {"content-type": "application/json", "accept": "text/event-stream"}
        if self.deployment.api_key:
            if self.options.vertex or self.options.auth == "bearer":
                headers["authorization"] = f"Bearer {self.deployment.api_key}"
            else:
                headers["x-goog-api-key"] = self.deployment.api_key
        return headers

    def _needs_signatures(self) -> bool:
        opt = self.options.signature_fallback
        if opt is not None:
            return opt
        m = re.search(r"gemini-(\d+)", self._model)
        return m is not None and int(m.group(1)) >= 3

    def _dropped(self, field: str) -> None:
        """A request field Gemini has no equivalent for. Names the field, never its value (may hold user data)."""
        log.warning("request field %s dropped: not supported by gemini (deployment %s)", field,
                    self.deployment.name)

    def _image(self, part: ImagePart) -> dict[str, Any]:
        if part.detail not in ("auto", ""):
            self._dropped("input_image.detail")
        if part.is_data_url:
            head, sep, data = part.url[5:].partition(";base64,")
            if not sep:
                raise ProviderError("bad_request", "image data URLs must be base64-encoded")
            return {"inlineData": {"mimeType": head or "application/octet-stream", "data": data}}
        if not self.capabilities.image_urls:
            raise ProviderError("bad_request", f"deployment {self.deployment.name} (gemini) accepts images only as "
                                "data URLs; the router does not fetch image URLs (set options.image_urls for a "
                                "Gemini endpoint that can read them)")
        file_data: dict[str, Any] = {"fileUri": part.url}
        mime, _ = mimetypes.guess_type(urlsplit(part.url).path)
        if mime:
            file_data["mimeType"] = mime
        return {"fileData": file_data}

    def build_contents(self, request: GenerationRequest) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(contents, systemInstruction parts). Consecutive items of one role share one content, so parallel
        calls and their results stay together as Gemini expects."""
        system: list[dict[str, Any]] = []
        if request.instructions:
            system.append({"text": request.instructions})
        contents: list[dict[str, Any]] = []
        names = {i.call_id: i.name for i in request.items if isinstance(i, FunctionCall)}
        pending_signature: str | None = None

        def add(role: str, part: dict[str, Any]) -> None:
            nonlocal pending_signature
            if role == "model" and pending_signature is not None:
                # A signature seals the part that followed it in the upstream's answer.
                part = {**part, "thoughtSignature": pending_signature}
                pending_signature = None
            elif role != "model":
                flush_signature()
            if contents and contents[-1]["role"] == role:
                contents[-1]["parts"].append(part)
            else:
                contents.append({"role": role, "parts": [part]})

        def flush_signature() -> None:
            nonlocal pending_signature
            if pending_signature is not None:
                sig, pending_signature = pending_signature, None
                add("model", {"text": "", "thoughtSignature": sig})

        for item in request.items:
            if isinstance(item, Message):
                if item.role in ("system", "developer"):
                    system.extend({"text": p.text} for p in item.content if not isinstance(p, ImagePart))
                    continue
                role = "model" if item.role == "assistant" else "user"
                for p in item.content:
                    add(role, self._image(p) if isinstance(p, ImagePart) else {"text": p.text})
            elif isinstance(item, FunctionCall):
                try:
                    args = json.loads(item.arguments) if item.arguments.strip() else {}
                except ValueError:
                    # A call cut by max_tokens: keep the history sendable.
                    self._dropped("function_call.arguments (not JSON; sent as {})")
                    args = {}
                if not isinstance(args, dict):
                    args = {"value": args}
                add("model", {"functionCall": {"name": item.name, "args": args}})
            elif isinstance(item, FunctionCallOutput):
                name = names.get(item.call_id)
                if name is None:
                    raise ProviderError("bad_request", f"function_call_output {item.call_id!r} has no matching "
                                        "function_call in the input; Gemini needs the function's name")
                add("user", {"functionResponse": {"name": name, "response": {"output": item.output}}})
            elif isinstance(item, Reasoning):
                if item.provider != self.reasoning_provider:
                    continue  # foreign reasoning: its signatures mean nothing here
                text = item.text or "".join(item.summary)
                if text:
                    part: dict[str, Any] = {"text": text, "thought": True}
                    if item.signature:
                        part["thoughtSignature"] = item.signature
                    flush_signature()
                    add("model", part)
                elif item.signature:
                    flush_signature()
                    pending_signature = item.signature
        cont = request.continuation
        if cont is not None and cont.text:
            add("model", {"text": cont.text})
            if not cont.literal:
                add("user", {"text": CONTINUE_INSTRUCTION})
        flush_signature()
        if self._needs_signatures():
            for content in contents:
                calls = [p for p in content["parts"] if "functionCall" in p]
                if content["role"] == "model" and calls and not any("thoughtSignature" in p for p in calls):
                    calls[0]["thoughtSignature"] = SKIP_SIGNATURE
        return contents, system

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        opts = self.options
        contents, system = self.build_contents(request)
        body: dict[str, Any] = {"contents": contents}
        if system:
            body["systemInstruction"] = {"parts": system}
        openapi = opts.schema_fields == "openapi"
        tc = request.tool_choice
        if request.tools:
            decls = []
            for t in request.tools:
                if tc.allowed is not None and t.name not in tc.allowed:
                    continue  # allowedFunctionNames only works with mode ANY: restrict the declarations instead
                decl: dict[str, Any] = {"name": t.name}
                if t.description:
                    decl["description"] = t.description
                if t.parameters:
                    if openapi:
                        decl["parameters"] = _openapi_schema(t.parameters)
                    else:
                        decl["parametersJsonSchema"] = t.parameters
                decls.append(decl)
            body["tools"] = [{"functionDeclarations": decls}]
            config: dict[str, Any] = {"mode": "AUTO"}
            if tc.name:
                config = {"mode": "ANY", "allowedFunctionNames": [tc.name]}
            elif tc.mode == "required":
                config = {"mode": "ANY"}
                if tc.allowed is not None:
                    config["allowedFunctionNames"] = list(tc.allowed)
            elif tc.mode == "none":
                config = {"mode": "NONE"}
            if opts.stream_function_call_arguments:
                config["streamFunctionCallArguments"] = True
            body["toolConfig"] = {"functionCallingConfig": config}
            if request.parallel_tool_calls is False:
                self._dropped("parallel_tool_calls")
            if any(t.strict for t in request.tools):
                self._dropped("tools[].strict")
        gen: dict[str, Any] = {}
        if request.max_output_tokens is not None:
            gen["maxOutputTokens"] = request.max_output_tokens
        if request.temperature is not None:
            gen["temperature"] = request.temperature
        if request.top_p is not None:
            gen["topP"] = request.top_p
        if request.text_format is not None:
            gen["responseMimeType"] = "application/json"
            if openapi:
                gen["responseSchema"] = _openapi_schema(request.text_format.schema)
            else:
                gen["responseJsonSchema"] = request.text_format.schema
        if request.reasoning_effort:
            gen["thinkingConfig"] = self._thinking(request.reasoning_effort)
        if gen:
            body["generationConfig"] = gen
        body.update(opts.extra_body)
        return body

    def _thinking(self, effort: str) -> dict[str, Any]:
        opts = self.options
        custom: dict[str, int | str] = {str(k): v for k, v in opts.reasoning_map.items()}
        style = opts.thinking or ("budget" if re.search(r"gemini-[12]\b|gemini-[12]\.", self._model)
                                         else "level")
        config: dict[str, Any] = {"includeThoughts": effort != "none"}
        if style == "budget":
            config["thinkingBudget"] = int(custom.get(effort, _BUDGETS.get(effort, -1)))
        else:
            config["thinkingLevel"] = str(custom.get(effort, _LEVELS.get(effort, "high")))
        return config

    # -- stream --------------------------------------------------------------------------------------------------

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        body = self.build_body(request)
        async with open_sse(self.http, "POST", self.url(), headers=self.headers(), json_body=body,
                            params={"alt": "sse"}, refine=refine_http_error) as events:
            async for delta in self.parse_stream(events):
                yield delta

    async def parse_stream(self, events: AsyncIterator[Any]) -> AsyncIterator[Delta]:
        finish: Finish | None = None
        usage: Usage | None = None
        model_reported = False
        n_calls = 0
        open_call: tuple[int, _ArgsWriter] | None = None  # a Vertex call whose arguments are still streaming
        warned: set[str] = set()
        try:
            async for event in events:
                data = event.data
                if not data or not data.strip():
                    continue
                chunk = parse_json(data)
                if isinstance(chunk, list) and len(chunk) == 1:
                    chunk = chunk[0]
                if not isinstance(chunk, dict):
                    raise ProviderError("malformed", "upstream chunk is not a JSON object", mid_stream=True)
                if "error" in chunk:
                    err = chunk["error"] if isinstance(chunk["error"], dict) else {"message": str(chunk["error"])}
                    raise _classify(err, None, mid_stream=True)
                if chunk.get("modelVersion") and not model_reported:
                    model_reported = True
                    yield UpstreamModel(str(chunk["modelVersion"]))
                meta = chunk.get("usageMetadata")
                if isinstance(meta, dict) and ("promptTokenCount" in meta or "candidatesTokenCount" in meta):
                    usage = _usage(meta)  # cumulative: the last one wins
                candidates = chunk.get("candidates") or []
                if not candidates:
                    block = (chunk.get("promptFeedback") or {}).get("blockReason")
                    if block:
                        finish = Finish("content_filter", raw=str(block))
                    continue
                cand = candidates[0]
                for part in (cand.get("content") or {}).get("parts") or []:
                    signature = part.get("thoughtSignature")
                    fc = part.get("functionCall")
                    if isinstance(fc, dict):
                        continues_open = open_call is not None and not fc.get("name")
                        if open_call is not None and not continues_open:
                            yield ToolCallDelta(open_call[0], open_call[1].close())
                            open_call = None
                        if signature:
                            yield ReasoningSeal(self.reasoning_provider, signature=str(signature))
                        if continues_open:
                            assert open_call is not None
                            index, writer = open_call
                        elif fc.get("name"):
                            index, writer = n_calls, _ArgsWriter()
                            n_calls += 1
                            yield ToolCallStart(index, str(fc.get("id") or f"call_{uuid.uuid4().hex[:24]}"),
                                                str(fc["name"]))
                        else:
                            continue  # an empty end-of-call marker with no call open
                        for arg in fc.get("partialArgs") or []:
                            piece = writer.feed(arg)
                            if piece:
                                yield ToolCallDelta(index, piece)
                        if fc.get("willContinue"):
                            open_call = (index, writer)
                        elif writer.started:
                            yield ToolCallDelta(index, writer.close())
                            open_call = None
                        else:
                            args = fc.get("args")
                            yield ToolCallDelta(index, json.dumps(args if isinstance(args, dict) else {},
                                                                  ensure_ascii=False, separators=(",", ":")))
                            open_call = None
                        continue
                    text = part.get("text")
                    if isinstance(text, str):
                        if text:
                            yield ReasoningDelta(text, summary=True) if part.get("thought") else TextDelta(text)
                    else:
                        other = next((k for k in part if k not in ("thought", "thoughtSignature")), None)
                        if other is not None and other not in warned:
                            warned.add(other)
                            log.warning("ignored unsupported part type %s (deployment %s)", other,
                                        self.deployment.name)
                    if signature:
                        yield ReasoningSeal(self.reasoning_provider, signature=str(signature))
                reason = cand.get("finishReason")
                if reason and reason != "FINISH_REASON_UNSPECIFIED":
                    if open_call is not None:
                        yield ToolCallDelta(open_call[0], open_call[1].close())
                        open_call = None
                    if reason in _FAILED:
                        raise ProviderError("server_error", f"upstream generation failed: {reason}",
                                            code=str(reason), mid_stream=True)
                    finish = _finish(str(reason), n_calls > 0)
        except ProviderError as exc:
            # The answer was complete; only the trailing close of the connection went wrong.
            if finish is None or exc.kind not in ("connection", "timeout"):
                raise
        if finish is None:
            raise ProviderError("truncated", "upstream stream ended without a finishReason", mid_stream=True)
        if usage is not None:
            yield usage
        yield finish


def _usage(meta: dict[str, Any]) -> Usage:
    thoughts = int(meta.get("thoughtsTokenCount") or 0)
    return Usage(
        input_tokens=int(meta.get("promptTokenCount") or 0),
        # Thinking tokens are billed as output; Responses counts them inside output_tokens.
        output_tokens=int(meta.get("candidatesTokenCount") or 0) + thoughts,
        cached_input_tokens=int(meta.get("cachedContentTokenCount") or 0),
        reasoning_tokens=thoughts,
    )


def _finish(reason: str, made_calls: bool) -> Finish:
    mapped: FinishReason
    if reason == "STOP":
        mapped = "tool_calls" if made_calls else "stop"
    elif reason == "MAX_TOKENS":
        mapped = "length"
    elif reason in _CONTENT_FILTER:
        mapped = "content_filter"
    else:
        log.warning("unknown finishReason %s treated as stop", reason)
        mapped = "tool_calls" if made_calls else "stop"
    return Finish(mapped, raw=reason)
