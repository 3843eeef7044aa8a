"""AWS Bedrock ConverseStream adapter (boto3 `bedrock-runtime`).

botocore reads the event stream with blocking socket reads, so each stream runs in a worker thread that hands
parsed events to the event loop through a bounded hand-off; the loop never blocks on Bedrock. A consumer that stops
early (or is cancelled) shuts the socket down, which ends the thread's read at once.

boto3/botocore are imported on first use only (cold start), and the client is created in the worker thread on the
first stream (loading the service model takes tens of milliseconds).

Options (`config.BedrockOptions`): region (if deployment.region is unset), profile, aws_access_key_id /
aws_secret_access_key / aws_session_token, read_timeout (900), connect_timeout (10), botocore_max_attempts (1: the
router's attempt loop does the retrying), max_tokens, thinking (bool), thinking_budgets, literal_continuation
(default false), native_json_schema, additional_model_request_fields (merged as is), guardrail_config.
`deployment.api_key` set = a Bedrock API key, sent as a bearer token instead of SigV4 signing.
See docs/providers/bedrock.md.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import threading
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from unbroken.config import BedrockOptions, Deployment
from unbroken.ir import (
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
    Usage,
)
from unbroken.providers import claude
from unbroken.providers._shared import PrefixSkip, WhitespaceJoin, log, parse_arguments, warn_dropped
from unbroken.providers.base import (
    Capabilities,
    ErrorKind,
    Provider,
    ProviderError,
    error_from_status,
    parse_retry_after,
    request_written,
)

if TYPE_CHECKING:
    import httpx

PROVIDER = "bedrock"

# Events in flight between the worker thread and the consumer: enough to ride out scheduling hiccups, small enough
# that a slow consumer slows the socket reads (backpressure) instead of buffering a whole answer.
QUEUE_DEPTH = 64

# providers.md §9. malformed_* stop reasons are failures, raised instead of mapped.
STOP_REASONS: dict[str, FinishReason] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "tool_use": "tool_calls",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "content_filtered": "content_filter",
    "guardrail_intervened": "content_filter",
}

# Modelled errors before the stream (PascalCase) ...
CLIENT_ERRORS: dict[str, ErrorKind] = {
    "ThrottlingException": "rate_limited",
    "ServiceQuotaExceededException": "rate_limited",
    "ServiceUnavailableException": "overloaded",
    "ModelNotReadyException": "overloaded",
    "ValidationException": "bad_request",
    "AccessDeniedException": "auth",
    "UnrecognizedClientException": "auth",
    "InvalidSignatureException": "auth",
    "ExpiredTokenException": "auth",
    "ResourceNotFoundException": "not_found",
    "InternalServerException": "server_error",
    "ModelErrorException": "server_error",
    "ModelStreamErrorException": "server_error",
    "ModelTimeoutException": "timeout",
}
# ... and exception frames inside the stream (camelCase union member names).
STREAM_ERRORS: dict[str, ErrorKind] = {
    "throttlingException": "rate_limited",
    "serviceUnavailableException": "overloaded",
    "internalServerException": "server_error",
    "modelStreamErrorException": "server_error",
    "validationException": "bad_request",
    "modelTimeoutException": "timeout",
}

# "too many tokens" is deliberately absent: Bedrock's throttling messages use it.
_CONTEXT_MARKERS = ("too long", "context length", "context window", "maximum context", "input length")
_IMAGE_FORMATS = {"image/png": "png", "image/jpeg": "jpeg", "image/jpg": "jpeg", "image/gif": "gif",
                  "image/webp": "webp"}


def _refine(kind: ErrorKind, message: str) -> ErrorKind:
    """A ValidationException's message says more than its code."""
    if kind != "bad_request":
        return kind
    low = message.lower()
    if "prefill" in low:
        return "prefill_rejected"
    if any(m in low for m in _CONTEXT_MARKERS):
        return "context_length"
    if "model identifier is invalid" in low:
        return "not_found"  # this deployment's model id: another deployment may well work
    return kind


def classify(exc: BaseException, *, mid_stream: bool) -> ProviderError:
    """Any exception out of boto3 / botocore / urllib3 -> ProviderError."""
    import urllib3.exceptions
    from botocore import exceptions as bex
    from botocore.eventstream import ParserError

    if isinstance(exc, ProviderError):
        return exc
    if isinstance(exc, bex.EventStreamError):
        err = exc.response.get("Error", {})
        code, message = str(err.get("Code") or ""), str(err.get("Message") or "stream exception")
        kind = _refine(STREAM_ERRORS.get(code, "server_error"), message)
        return ProviderError(kind, message, code=code or None, mid_stream=True)
    if isinstance(exc, bex.ClientError):
        err = exc.response.get("Error", {})
        meta = exc.response.get("ResponseMetadata", {})
        code, message = str(err.get("Code") or ""), str(err.get("Message") or "upstream error")
        status = meta.get("HTTPStatusCode")
        retry_after = parse_retry_after(meta.get("HTTPHeaders") or {})
        if code in CLIENT_ERRORS:
            kind = CLIENT_ERRORS[code]
        else:
            kind = error_from_status(int(status or 500), message).kind
        return ProviderError(_refine(kind, message), message, status=status, retry_after=retry_after,
                             code=code or None, mid_stream=mid_stream)
    if isinstance(exc, ParserError):
        return ProviderError("malformed", f"broken event-stream frame: {type(exc).__name__}", mid_stream=True)
    if isinstance(exc, (bex.NoCredentialsError, bex.PartialCredentialsError, bex.NoRegionError)):
        return ProviderError("auth", f"Bedrock client is not configured: {type(exc).__name__}")
    if isinstance(exc, bex.ParamValidationError):
        return ProviderError("bad_request", str(exc))
    timeouts = (bex.ReadTimeoutError, bex.ConnectTimeoutError, urllib3.exceptions.TimeoutError, TimeoutError)
    if isinstance(exc, timeouts):
        return ProviderError("timeout", f"Bedrock timed out: {type(exc).__name__}", mid_stream=mid_stream)
    if isinstance(exc, (bex.ConnectionError, bex.HTTPClientError, urllib3.exceptions.HTTPError, OSError)):
        return ProviderError("connection", f"Bedrock connection failed: {type(exc).__name__}",
                             mid_stream=mid_stream)
    log.warning("unexpected error from the Bedrock client: %s", type(exc).__name__)
    return ProviderError("server_error", f"unexpected Bedrock client error: {type(exc).__name__}",
                         mid_stream=mid_stream)


def make_client(deployment: Deployment) -> Any:
    """A bedrock-runtime client: region, endpoint and credentials from the deployment, minimal botocore retries."""
    import boto3
    import botocore
    from botocore.config import Config

    opts = deployment.options_as(BedrockOptions)
    region = (deployment.region or opts.region or os.environ.get("AWS_REGION")
              or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    config: dict[str, Any] = {
        "read_timeout": opts.read_timeout,
        "connect_timeout": opts.connect_timeout,
        # total_max_attempts 1 = no botocore retry at all (its `max_attempts: 1` would still retry once).
        "retries": {"total_max_attempts": opts.botocore_max_attempts, "mode": "standard"},
        "max_pool_connections": opts.max_pool_connections,
    }
    if deployment.api_key:
        config["signature_version"] = botocore.UNSIGNED  # the bearer token replaces SigV4
    session = boto3.session.Session(
        profile_name=opts.profile,
        aws_access_key_id=opts.aws_access_key_id,
        aws_secret_access_key=opts.aws_secret_access_key,
        aws_session_token=opts.aws_session_token,
    )
    client = session.client("bedrock-runtime", region_name=region, endpoint_url=deployment.base_url or None,
                            config=Config(**config))
    if deployment.api_key:
        token = deployment.api_key

        def _bearer(request: Any, **_: Any) -> None:
            # Per-client bearer auth: botocore's own support reads one process-wide environment variable.
            request.headers["Authorization"] = f"Bearer {token}"

        client.meta.events.register("request-created.bedrock-runtime", _bearer)
    return client


# ---------------------------------------------------------------------------------------------------------------
# Request
# ---------------------------------------------------------------------------------------------------------------


@dataclass(slots=True)
class _Plan:
    params: dict[str, Any] = field(default_factory=dict)  # converse_stream keyword arguments
    json_tool: str | None = None
    join: WhitespaceJoin | None = None
    skip: PrefixSkip | None = None


def _image_block(part: ImagePart) -> dict[str, Any]:
    if not part.is_data_url:
        raise ProviderError("bad_request", "Bedrock needs image bytes: send images as data URLs (the router does "
                                           "not fetch image URLs)")
    try:
        media_type, raw = part.data()
    except ValueError:
        raise ProviderError("bad_request", "image data URLs must be base64 encoded") from None
    fmt = _IMAGE_FORMATS.get(media_type.lower())
    if fmt is None:
        raise ProviderError("bad_request", "Bedrock accepts png, jpeg, gif and webp images")
    return {"image": {"format": fmt, "source": {"bytes": raw}}}


_BLOCK_KINDS: dict[str, claude.BlockKind] = {"text": "text", "toolUse": "tool_call", "toolResult": "tool_result",
                                            "reasoningContent": "reasoning"}


def _block_kind(block: dict[str, Any]) -> claude.BlockKind:
    # A Converse content block is a union: exactly one member key.
    return next((_BLOCK_KINDS[k] for k in block if k in _BLOCK_KINDS), "other")


def _text_block(text: str) -> dict[str, Any]:
    return {"text": text}


def build_params(deployment: Deployment, request: GenerationRequest) -> _Plan:
    opts = deployment.options_as(BedrockOptions)
    plan = _Plan()
    params: dict[str, Any] = {"modelId": deployment.model}
    plan.params = params

    turns = claude.Turns(_block_kind, _text_block)
    tool_names: list[str] = []  # names used by toolUse blocks in the history
    for item in request.items:
        if isinstance(item, Message):
            if item.role not in ("system", "developer"):  # those go into the system prompt
                turns.add(item.role, claude.content_blocks(item, text=_text_block, image=_image_block))
        elif isinstance(item, FunctionCall):
            tool_names.append(item.name)
            turns.add("assistant", [{"toolUse": {"toolUseId": item.call_id, "name": item.name,
                                                 "input": parse_arguments(item.arguments)}}])
        elif isinstance(item, FunctionCallOutput):
            turns.add("user", [{"toolResult": {"toolUseId": item.call_id, "content": [{"text": item.output}]}}])
        elif isinstance(item, Reasoning):
            form = claude.reasoning_form(item, PROVIDER)
            if form == "signed":
                turns.add("assistant", [{"reasoningContent": {"reasoningText": {"text": item.text,
                                                                                "signature": item.signature}}}])
            elif form == "redacted":
                try:
                    redacted = base64.b64decode(item.encrypted_content or "")
                except ValueError:
                    warn_dropped("reasoning.encrypted_content", "not base64")
                    continue
                turns.add("assistant", [{"reasoningContent": {"redactedContent": redacted}}])

    # Tools, tool choice, structured output.
    fmt = request.text_format
    tp = claude.tool_plan(request, native_json=bool(opts.native_json_schema))
    plan.json_tool = tp.json_tool
    if any(t.strict for t in request.tools):
        warn_dropped("tools[].strict", "not sent to Converse")
    tools = [
        {"toolSpec": {"name": t.name, **({"description": t.description} if t.description else {}),
                      "inputSchema": {"json": t.parameters or {"type": "object", "properties": {}}}}}
        for t in tp.tools
    ]
    if tp.json_offered and tp.json_tool is not None:
        tools.append({"toolSpec": {"name": tp.json_tool, "description": tp.json_description,
                                   "inputSchema": {"json": tp.json_schema}}})
    tool_choice: dict[str, Any] | None = None  # None: auto, the default
    if tp.mode == "tool":
        tool_choice = {"tool": {"name": tp.name}}
    elif tp.mode == "any":
        tool_choice = {"any": {}}
    elif tp.mode == "none":
        if tool_names or any(isinstance(i, FunctionCallOutput) for i in request.items):
            # Converse has no "none" and needs toolConfig whenever the history holds tool blocks.
            warn_dropped("tool_choice", "Bedrock has no 'none'; tools are offered with 'auto'")
        else:
            tools = []
    if fmt is not None and opts.native_json_schema:
        schema = {"schema": json.dumps(fmt.schema), "name": fmt.name}
        if fmt.description:
            schema["description"] = fmt.description
        params["outputConfig"] = {"textFormat": {"type": "json_schema", "structure": {"jsonSchema": schema}}}
    if not tools and tool_names:
        # History with tool calls but no tool list: Converse insists on a toolConfig naming them.
        tools = [{"toolSpec": {"name": n, "inputSchema": {"json": {"type": "object", "properties": {}}}}}
                 for n in dict.fromkeys(tool_names)]
    if tools:
        params["toolConfig"] = {"tools": tools, **({"toolChoice": tool_choice} if tool_choice else {})}
    if request.parallel_tool_calls is False:
        warn_dropped("parallel_tool_calls", "Converse has no switch for it")

    # Continuation.
    if request.continuation is not None:
        resume = claude.resume(request.continuation, json_tool=plan.json_tool is not None)
        turns.continue_answer(resume)
        plan.join, plan.skip = resume.join, resume.skip

    params["messages"] = turns.finish()
    system = claude.system_texts(request)
    if system:
        params["system"] = [{"text": t} for t in system]

    # Inference settings and (Claude) extended thinking.
    settings = claude.sampling(request, opts, prefill=plan.join is not None, forced_tool=tp.forced,
                               unsigned_tool_turn=turns.unsigned_tool_turn(), default_max_tokens=None)
    inference: dict[str, Any] = {}
    extra: dict[str, Any] = dict(opts.additional_model_request_fields)
    if settings.max_tokens is not None:
        inference["maxTokens"] = settings.max_tokens
    if settings.temperature is not None:
        inference["temperature"] = settings.temperature
    if settings.top_p is not None:
        inference["topP"] = settings.top_p
    if settings.thinking_budget is not None:
        extra["thinking"] = {"type": "enabled", "budget_tokens": settings.thinking_budget}
    if inference:
        params["inferenceConfig"] = inference
    if extra:
        params["additionalModelRequestFields"] = extra
    if opts.guardrail_config:
        params["guardrailConfig"] = opts.guardrail_config
    return plan


# ---------------------------------------------------------------------------------------------------------------
# The worker thread
# ---------------------------------------------------------------------------------------------------------------


class _Pump:
    """Runs `converse_stream` and its blocking iteration in a daemon thread.

    Hand-off: the thread takes a slot of `slots` (a semaphore of QUEUE_DEPTH) per item and posts it onto an asyncio
    queue with call_soon_threadsafe; the consumer frees the slot when it takes the item. `stop()` wakes a waiting
    thread (frees every slot) and shuts the socket down so a blocked read returns immediately."""

    def __init__(self, client: Any, params: dict[str, Any], loop: asyncio.AbstractEventLoop) -> None:
        self.client = client  # a callable returning the (lazily created) boto3 client
        self.params = params
        self.loop = loop
        self.queue: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        self.slots = threading.Semaphore(QUEUE_DEPTH)
        self.cancelled = threading.Event()
        self.done = threading.Event()
        self.lock = threading.Lock()
        self.event_stream: Any = None
        self.thread = threading.Thread(target=self._run, name="unbroken-bedrock-stream", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _put(self, kind: str, value: Any) -> bool:
        self.slots.acquire()  # backpressure; stop() releases every slot
        if self.cancelled.is_set():
            return False
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))
        except RuntimeError:  # the loop is closed: nobody is listening any more
            return False
        return True

    def _run(self) -> None:
        stream = None
        try:
            response = self.client().converse_stream(**self.params)
            stream = response["stream"]
            with self.lock:
                self.event_stream = stream
                if self.cancelled.is_set():
                    return
            for event in stream:
                if not self._put("event", event):
                    return
            self.done.set()
            self._put("end", None)
        except BaseException as exc:  # every failure crosses over as a ProviderError
            self.done.set()
            if not self.cancelled.is_set():
                self._put("error", classify(exc, mid_stream=stream is not None))
        finally:
            if stream is not None:
                try:
                    stream.close()
                except Exception:  # closing a broken stream can fail; nothing left to do
                    pass

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        while True:
            kind, value = await self.queue.get()
            self.slots.release()
            if kind == "event":
                yield value
            elif kind == "error":
                raise value
            else:
                return

    def stop(self) -> None:
        if self.cancelled.is_set():
            return
        self.cancelled.set()
        self.slots.release(QUEUE_DEPTH + 1)
        if self.done.is_set():
            return
        with self.lock:
            stream = self.event_stream
        if stream is None:
            return  # still connecting: the thread sees `cancelled` once converse_stream returns
        # botocore's EventStream.close() only closes the file object, which does not wake a thread blocked in
        # recv(); urllib3's shutdown() (SHUT_RD on the socket) does.
        raw = getattr(stream, "_raw_stream", None)
        try:
            raw.shutdown()  # type: ignore[union-attr]
        except Exception:
            try:
                stream.close()
            except Exception:
                pass


# ---------------------------------------------------------------------------------------------------------------
# Provider
# ---------------------------------------------------------------------------------------------------------------


class BedrockProvider(Provider):
    name: ClassVar[str] = PROVIDER

    def __init__(self, deployment: Deployment, http: httpx.AsyncClient) -> None:
        super().__init__(deployment, http)
        self._client: Any = None
        self._client_lock = threading.Lock()
        # Live worker threads, for tests and for aclose().
        self.workers: weakref.WeakSet[threading.Thread] = weakref.WeakSet()
        self._pumps: weakref.WeakSet[_Pump] = weakref.WeakSet()

    @property
    def capabilities(self) -> Capabilities:
        # Not the option-driven default: Converse takes image bytes only, whatever a deployment says.
        return Capabilities(
            literal_continuation=bool(self.deployment.options.literal_continuation),
            image_urls=False,
            native_json_schema=bool(self.deployment.options.native_json_schema),
        )

    def client(self) -> Any:
        """The boto3 client, created on first use (in the worker thread: it is slow to build)."""
        with self._client_lock:
            if self._client is None:
                self._client = make_client(self.deployment)
            return self._client

    def build(self, request: GenerationRequest) -> _Plan:
        return build_params(self.deployment, request)

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        plan = self.build(request)
        pump = _Pump(self.client, plan.params, asyncio.get_running_loop())
        self._pumps.add(pump)
        self.workers.add(pump.thread)
        pump.start()
        request_written()  # boto3 sends it from the pump's thread: nothing on this loop is in its way
        try:
            async for delta in parse_events(pump.events(), plan):
                yield delta
        finally:
            pump.stop()

    async def aclose(self) -> None:
        for pump in list(self._pumps):
            pump.stop()


async def parse_events(events: AsyncIterator[dict[str, Any]], plan: _Plan | None = None) -> AsyncIterator[Delta]:
    """Converse stream events -> deltas, ending with Usage then Finish.

    Healthy order: messageStart, content blocks, messageStop, metadata (accepted in either order of the last
    two). Without messageStop the answer is `truncated`; a failure after messageStop loses only the usage."""
    plan = plan or _Plan()
    content_seen = False
    tool_index: dict[int, int] = {}  # contentBlockIndex -> tool call index
    json_blocks: set[int] = set()
    real_tool_calls = 0
    finish: Finish | None = None
    usage: Usage | None = None

    def malformed(what: str) -> ProviderError:
        return ProviderError("malformed", f"unexpected Bedrock event: {what}", mid_stream=True)

    try:
        async for event in events:
            if "contentBlockDelta" in event:  # the hot path first
                body = event["contentBlockDelta"]
                index, delta = body.get("contentBlockIndex"), body.get("delta")
                if not isinstance(index, int) or not isinstance(delta, dict):
                    raise malformed("contentBlockDelta without an index and a delta")
                content_seen = True
                if "text" in delta:
                    piece = delta["text"]
                    if plan.join is not None and piece:
                        piece = plan.join(piece)
                    if piece:
                        yield TextDelta(piece)
                elif "toolUse" in delta:
                    piece = (delta["toolUse"] or {}).get("input") or ""
                    if index in tool_index:
                        if piece:
                            yield ToolCallDelta(tool_index[index], piece)
                    elif index in json_blocks:
                        if plan.skip is not None:
                            piece = plan.skip(piece)
                        if piece:
                            yield TextDelta(piece)
                    else:
                        raise malformed("toolUse input for a block that did not start as a tool call")
                elif "reasoningContent" in delta:
                    rc = delta["reasoningContent"] or {}
                    if rc.get("text"):
                        yield ReasoningDelta(rc["text"])
                    if rc.get("signature"):
                        yield ReasoningSeal(PROVIDER, signature=rc["signature"])
                    if rc.get("redactedContent"):
                        # botocore decodes the blob; keep it as base64 text, as it travels on the wire.
                        yield ReasoningSeal(PROVIDER,
                                            encrypted_content=base64.b64encode(rc["redactedContent"]).decode())
                # citations, images and future delta kinds: nothing the IR carries
            elif "contentBlockStart" in event:
                body = event["contentBlockStart"]
                index = body.get("contentBlockIndex")
                tool = (body.get("start") or {}).get("toolUse")
                if not isinstance(index, int):
                    raise malformed("contentBlockStart without an index")
                content_seen = True
                if tool:
                    name = str(tool.get("name") or "")
                    if plan.json_tool is not None and name == plan.json_tool:
                        json_blocks.add(index)
                    else:
                        tool_index[index] = real_tool_calls
                        real_tool_calls += 1
                        yield ToolCallStart(tool_index[index], str(tool.get("toolUseId") or ""), name)
            elif "contentBlockStop" in event:
                continue
            elif "messageStart" in event:
                if content_seen or finish is not None:
                    raise malformed("a second messageStart inside an open message")
            elif "messageStop" in event:
                reason = event["messageStop"].get("stopReason")
                if isinstance(reason, str) and reason.startswith("malformed"):
                    raise ProviderError("server_error", f"the model produced unusable output ({reason})",
                                        code=reason, mid_stream=True)
                finish = claude.finish(STOP_REASONS.get(reason or "", "stop"), reason, tool_calls=real_tool_calls)
            elif "metadata" in event:
                u = event["metadata"].get("usage") or {}
                usage = claude.usage(int(u.get("inputTokens") or 0), int(u.get("outputTokens") or 0),
                                     int(u.get("cacheReadInputTokens") or 0), int(u.get("cacheWriteInputTokens") or 0))
    except ProviderError as exc:
        if finish is None:
            raise
        # The answer is complete (messageStop came); only the usage may be lost.
        log.warning("Bedrock stream failed after messageStop (%s); answer kept", exc.kind)
    if finish is None:
        raise ProviderError("truncated", "Bedrock stream ended before messageStop", mid_stream=True)
    if usage is not None:
        yield usage
    yield finish
