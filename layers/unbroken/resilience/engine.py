"""The attempt loop: stream from the best deployment; on any failure classify it and retry, fail over, or continue.

Before any output the client notices nothing. After output has started, the answer is continued on the same or the
next deployment — literally (assistant prefill) where the deployment can, otherwise with a continue-instruction whose
repeated overlap is stripped — so the client sees one uninterrupted item (DESIGN: continuation). The loop emits Open
Responses events through a `ResponseEmitter`, so sequence numbers stay dense across attempts.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from unbroken.api.errors import APIError, from_provider_error
from unbroken.config import Deployment, ServerSettings
from unbroken.ir import (
    Continuation,
    Delta,
    Finish,
    FunctionCall,
    GenerationRequest,
    ImagePart,
    Item,
    Message,
    Reasoning,
    ReasoningDelta,
    ReasoningSeal,
    RefusalDelta,
    TextDelta,
    TextPart,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from unbroken.protocol.reasoning_codec import decode_reasoning
from unbroken.protocol.responses import Event, ResponseEmitter
from unbroken.providers.base import FATAL_FOR_REQUEST, RETRY_SAME_DEPLOYMENT, ProviderError
from unbroken.routing.policy import HealthBoard
from unbroken.routing.pool import ProviderPool

log = logging.getLogger("unbroken.resilience")

DEFAULT_TTFT_TIMEOUT = 60.0
DEFAULT_STALL_TIMEOUT = 30.0
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0
# How much new text to look at before deciding what a continue-instruction attempt repeated.
OVERLAP_WINDOW = 256
MIN_UNALIGNED_OVERLAP = 12


class NoOutput(Exception):
    """Every attempt failed before anything was emitted: the caller can still answer with an HTTP error."""

    def __init__(self, error: APIError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(slots=True)
class Attempt:
    deployment: str
    provider: str
    model: str
    outcome: str = "running"  # ok | <error kind>
    continuation: str | None = None  # literal | instruction
    usage: Usage = field(default_factory=Usage)
    cost: float = 0.0
    ttft: float | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "provider": self.provider, "model": self.model,
                "outcome": self.outcome, "continuation": self.continuation, "output_tokens": self.usage.output_tokens,
                "input_tokens": self.usage.input_tokens, "cost_usd": round(self.cost, 8)}


def strip_overlap(partial: str, new: str, *, final: bool) -> tuple[str, bool]:
    """Remove from the start of `new` what repeats the end of `partial`. Returns (text, decided); not decided means
    more text is needed (unless `final`). A match must be long, or sit on a word boundary, to count: a short
    coincidence like a shared letter is not an overlap."""
    if len(new) < OVERLAP_WINDOW and not final:
        return new, False
    limit = min(len(partial), len(new))
    for k in range(limit, 0, -1):
        if not partial.endswith(new[:k]):
            continue
        if k == len(partial):
            return new[k:], True  # the model started over: everything it repeats goes
        aligned = new[0].isspace() or partial[-k - 1].isspace()
        # One repeated word at a word boundary is as likely the answer's own words ("green green") as an overlap;
        # two words or a long run are not a coincidence.
        if k >= MIN_UNALIGNED_OVERLAP or (aligned and len(new[:k].split()) >= 2):
            return new[k:], True
    return new, True


def seam(partial: str, new: str) -> str:
    """Whitespace at the seam: a continuation that starts with the whitespace the partial text already ends with
    would double it. Nothing is ever inserted: a cut can fall inside a word (or a JSON string), where a guessed
    space would corrupt the answer."""
    if partial[-1:].isspace() and new[:1].isspace():
        return new.lstrip()
    return new


class Generation:
    """One response's generation across attempts. Use `run()` once; read `attempts` and `error` afterwards."""

    def __init__(
        self,
        *,
        request: GenerationRequest,
        model_name: str,
        candidates: list[Deployment],
        emitter: ResponseEmitter,
        pool: ProviderPool,
        health: HealthBoard,
        settings: ServerSettings,
        deadline: float,
        queued: bool = False,
        header_hold_seconds: float = 5.0,
        cancelled: Callable[[], bool] = lambda: False,
        recovery_events: bool = False,
        hand_off_at_deadline: bool = False,
    ) -> None:
        self.request = request
        self.model_name = model_name
        self.candidates = candidates
        self.emitter = emitter
        self.pool = pool
        self.health = health
        self.settings = settings
        self.deadline = deadline
        self.queued = queued  # a background response shows `response.queued` after `response.created`
        self.header_hold_seconds = header_hold_seconds
        self.cancelled = cancelled
        self.recovery_events = recovery_events
        # A background response outlives one Lambda invocation: at the deadline it stops without a terminal event
        # and the next invocation takes it over (worker handoff) instead of ending it incomplete.
        self.hand_off_at_deadline = hand_off_at_deadline
        self.handed_off = False
        self.attempts: list[Attempt] = []
        self.resumed_from: str | None = None  # set after an interruption, until the next attempt's first delta
        # An emitter rebuilt from a journal (takeover) has already sent its start events.
        self.started = emitter.seq > 0
        self.error: ProviderError | None = None

    # -- public --------------------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[Event]:
        """Events of the whole response, ending with a terminal event; raises `NoOutput` if nothing was emitted
        and nothing can be.

        Deployments are tried in rounds, in the policy's order: a failure moves on to the next deployment at once
        (no waiting while another one may answer); when every usable deployment has failed in this round, the
        next round starts after an exponential backoff with jitter that honours the longest Retry-After seen. A
        deployment leaves the request for good on errors that another try would not fix (auth, not found, a
        silent upstream, too small a context window) or after `max_retries` + 1 tries."""
        t0 = time.monotonic()
        excluded: set[str] = set()
        tried_this_round: set[str] = set()
        retry_after_hint = 0.0
        tries: dict[str, int] = {}
        continuation_mode: dict[str, bool] = {}  # deployment -> literal? (a prefill rejection flips it)
        request = self.request
        if _has_image_urls(request):
            # Some providers need image bytes and the router never fetches URLs: only deployments that take URLs.
            self.candidates = [d for d in self.candidates
                               if self.pool.get(self.model_name, d).capabilities.image_urls]
            if not self.candidates:
                raise NoOutput(APIError(400, "No deployment of this model accepts image URLs; send the image as a "
                                        "data URL (data:image/...;base64,...).", param="input",
                                        code="image_url_not_supported"))
        if self.emitter.seq > 0:
            # Taking over a response another process started: what it sent stands; go on from there.
            for ev in self.emitter.drop_open_tool_call():
                yield ev
            if self.emitter.open is not None and self.emitter.open.kind == "reasoning":
                for ev in self.emitter.close_open():
                    yield ev
            continued = self._continuation_base()
            if continued is None:
                async for ev in self._finish_ok():
                    yield ev
                return
            request = continued
            self.resumed_from = "takeover"
        rounds = 0
        while True:
            usable = [d for d in self.candidates if d.name not in excluded]
            fresh = [d for d in usable if d.name not in tried_this_round]
            if usable and not fresh:
                rounds += 1
                delay = max(retry_after_hint, min(BACKOFF_CAP, BACKOFF_BASE * 2 ** (rounds - 1)) *
                            random.uniform(0.5, 1.5))
                if delay >= self._remaining(t0):
                    usable = []
                else:
                    await asyncio.sleep(delay)
                    tried_this_round.clear()
                    retry_after_hint = 0.0
                    fresh = usable
            if not usable or len(self.attempts) >= self.settings.max_attempts or self._remaining(t0) <= 0:
                async for ev in self._give_up():
                    yield ev
                return
            deployment = fresh[0]
            provider = self.pool.get(self.model_name, deployment)
            literal = continuation_mode.get(deployment.name, provider.capabilities.literal_continuation)
            attempt_request = self._attempt_request(request, literal, deployment)
            attempt = Attempt(deployment.name, deployment.provider, deployment.model,
                              continuation=None if attempt_request.continuation is None
                              else ("literal" if literal else "instruction"))
            self.attempts.append(attempt)
            tries[deployment.name] = tries.get(deployment.name, 0) + 1
            tried_this_round.add(deployment.name)
            try:
                async for ev in self._stream_attempt(provider, deployment, attempt_request, attempt):
                    yield ev
                attempt.outcome = "ok"
                self.health.record_success(self.model_name, deployment.name, attempt.ttft)
                async for ev in self._finish_ok():
                    yield ev
                return
            except _Cancelled:
                attempt.outcome = "cancelled"
                for ev in self._ensure_started():
                    yield ev
                for ev in self.emitter.end_incomplete("cancelled", status="cancelled"):
                    yield ev
                return
            except _DeadlineReached:
                attempt.outcome = "deadline"
                if self.hand_off_at_deadline:
                    for ev in self.emitter.drop_open_tool_call():
                        yield ev
                    self.handed_off = True
                    return
                for ev in self._ensure_started():
                    yield ev
                for ev in self.emitter.end_incomplete("stream_deadline"):
                    yield ev
                return
            except ProviderError as err:
                attempt.outcome = err.kind
                self.error = err
                self.health.record_failure(self.model_name, deployment.name)
                log.warning("attempt failed", extra={"response_id": self.emitter.response["id"],
                                                     "deployment": deployment.name, "kind": err.kind,
                                                     "status": err.status, "mid_stream": err.mid_stream})
                if err.kind in FATAL_FOR_REQUEST and not self.emitter.has_output:
                    raise NoOutput(from_provider_error(err, attempts=len(self.attempts))) from None
                if err.kind == "content_filter":
                    # A policy refusal goes back to the client with its reason; no other deployment is asked.
                    for ev in self._ensure_started():
                        yield ev
                    for ev in self.emitter.end_incomplete("content_filter"):
                        yield ev
                    return
                if err.kind == "prefill_rejected" and continuation_mode.get(deployment.name, True):
                    continuation_mode[deployment.name] = False  # same deployment again, without the prefill
                    tried_this_round.discard(deployment.name)
                    continue
                if err.kind not in RETRY_SAME_DEPLOYMENT or tries[deployment.name] > self._max_retries(deployment):
                    excluded.add(deployment.name)
                if err.kind == "context_length":
                    # Never resend unchanged to a window that is not larger.
                    window = deployment.option("context_window", 0)
                    excluded.update(d.name for d in self.candidates if d.option("context_window", 0) <= window)
                if err.retry_after is not None:
                    if err.retry_after > self._remaining(t0):
                        excluded.add(deployment.name)
                    retry_after_hint = max(retry_after_hint, err.retry_after)
                # A held call cut in half was never shown: forget it whatever else happened.
                for ev in self.emitter.drop_open_tool_call():
                    yield ev
                if self.emitter.has_output:
                    for ev in self._interrupted(deployment, err):
                        yield ev
                    request = self._continuation_base()
                    if request is None:  # what was cut is complete as it stands (finished tool calls)
                        async for ev in self._finish_ok():
                            yield ev
                        return
                    self.resumed_from = deployment.name

    # -- attempts ------------------------------------------------------------------------------------------------

    def _remaining(self, t0: float) -> float:
        return min(self.settings.max_total_seconds - (time.monotonic() - t0), self.deadline - time.time())

    def _max_retries(self, deployment: Deployment) -> int:
        return int(deployment.option("max_retries", 1))

    def _attempt_request(self, request: GenerationRequest, literal: bool, deployment: Deployment) -> GenerationRequest:
        partial = self.emitter.open_message_text()
        if partial is None:
            return replace(request, trace_id=self.emitter.response["id"])
        return replace(request, continuation=Continuation(partial, literal), trace_id=self.emitter.response["id"],
                       items=self._portable_items(request.items, deployment))

    def _portable_items(self, items: list[Item], deployment: Deployment) -> list[Item]:
        # Reasoning is bound to the provider that produced it (signatures, encrypted content).
        return [it for it in items if not isinstance(it, Reasoning) or it.provider == deployment.provider]

    def _continuation_base(self) -> GenerationRequest | None:
        """The request a continuation attempt builds on: the original input plus every completed output item.
        None when nothing is left to generate (only complete function calls were cut short of a finish)."""
        emitter = self.emitter
        items: list[Item] = list(self.request.items)
        open_item = emitter.open.item if emitter.open is not None else None
        for out in emitter.output:
            if out is open_item:
                continue
            if out["type"] == "function_call" and out.get("status") == "completed":
                items.append(FunctionCall(out["call_id"], out["name"], out["arguments"]))
            elif out["type"] == "message" and out.get("status") == "completed":
                text = "".join(p.get("text", "") for p in out["content"] if p["type"] == "output_text")
                items.append(Message("assistant", [TextPart(text)]))
            elif out["type"] == "reasoning" and out.get("encrypted_content"):
                sealed = decode_reasoning(out["encrypted_content"])
                items.append(Reasoning(text="".join(p.get("text", "") for p in out.get("content", [])),
                                       signature=sealed.signature, encrypted_content=sealed.encrypted_content,
                                       provider=sealed.provider))
        last = emitter.output[-1] if emitter.output else None
        if emitter.open is None and last is not None and last["type"] == "function_call" \
                and last["status"] == "completed":
            return None
        return replace(self.request, items=items)

    async def _stream_attempt(self, provider: Any, deployment: Deployment, request: GenerationRequest,
                              attempt: Attempt) -> AsyncIterator[Event]:
        ttft_timeout = float(deployment.option("ttft_timeout_s", DEFAULT_TTFT_TIMEOUT))
        stall_timeout = float(deployment.option("stall_timeout_s", DEFAULT_STALL_TIMEOUT))
        started_at = time.monotonic()
        stream = provider.stream(request).__aiter__()
        cont = request.continuation
        partial = cont.text if cont is not None else ""
        overlap_pending = cont is not None and not cont.literal
        held_text = ""
        first = True
        try:
            while True:
                if self.cancelled():
                    raise _Cancelled
                limit = ttft_timeout if first else stall_timeout
                until_deadline = self.deadline - time.time()
                if until_deadline <= 0:
                    raise _DeadlineReached
                wait = max(0.0, min(limit, until_deadline))
                try:
                    if first and not self.started and self.header_hold_seconds < wait:
                        # Nothing to show yet: after a short hold the response is committed to streaming (200 +
                        # start events) so the client is not left without a byte while a slow model thinks.
                        pending = asyncio.ensure_future(stream.__anext__())
                        done, _ = await asyncio.wait({pending}, timeout=self.header_hold_seconds)
                        if not done:
                            for ev in self._ensure_started():
                                yield ev
                            limit -= self.header_hold_seconds
                        wait = max(0.0, min(limit, self.deadline - time.time()))
                        try:
                            delta = await asyncio.wait_for(pending, wait)
                        finally:
                            pending.cancel()
                    else:
                        # The per-token path: a timer handle, not a task per token (the CPU budget is here).
                        async with asyncio.timeout(wait):
                            delta = await stream.__anext__()
                except StopAsyncIteration:
                    break
                except TimeoutError:
                    if time.time() >= self.deadline:
                        raise _DeadlineReached from None
                    what = "first token" if first else "next token"
                    raise ProviderError("timeout", f"no {what} within {limit:.1f}s", mid_stream=not first) from None
                if first:
                    first = False
                    attempt.ttft = time.monotonic() - started_at
                    if self.resumed_from is not None:
                        for ev in self._resumed(deployment):
                            yield ev
                if cont is not None and isinstance(delta, ReasoningDelta | ReasoningSeal):
                    continue  # the continued message stays one item; a continuation's own reasoning is not shown
                if isinstance(delta, Usage):
                    attempt.usage = attempt.usage + delta
                    attempt.cost = deployment.price.cost(attempt.usage.input_tokens, attempt.usage.output_tokens,
                                                         attempt.usage.cached_input_tokens)
                if overlap_pending:
                    if isinstance(delta, TextDelta):
                        held_text += delta.text
                        text, decided = strip_overlap(partial, held_text, final=False)
                        if not decided:
                            continue
                        delta = TextDelta(seam(partial, text))
                        overlap_pending = False
                    elif isinstance(delta, _ENDS_OVERLAP_WINDOW):
                        # Other output (or the end) comes first: what is held is all the overlap there is.
                        for ev in self._emit(TextDelta(seam(partial, strip_overlap(partial, held_text,
                                                                                   final=True)[0]))):
                            yield ev
                        overlap_pending = False
                for ev in self._emit(delta):
                    yield ev
            if overlap_pending and held_text:
                text, _ = strip_overlap(partial, held_text, final=True)
                for ev in self._emit(TextDelta(seam(partial, text))):
                    yield ev
        finally:
            await _aclose(stream)

    def _emit(self, delta: Delta) -> list[Event]:
        events = self._ensure_started()
        return events + self.emitter.apply(delta) if events else self.emitter.apply(delta)

    def _ensure_started(self) -> list[Event]:
        if self.started:
            return []
        self.started = True
        return self.emitter.start(queued=self.queued) + self.emitter.in_progress()

    # -- endings -------------------------------------------------------------------------------------------------

    async def _finish_ok(self) -> AsyncIterator[Event]:
        for ev in self._ensure_started():
            yield ev
        self._account()
        for ev in self.emitter.complete():
            yield ev

    async def _give_up(self) -> AsyncIterator[Event]:
        self._account()
        if not self.emitter.has_output:
            if not self.started:
                raise NoOutput(from_provider_error(self.error, attempts=len(self.attempts)))
            api = from_provider_error(self.error, attempts=len(self.attempts))
            for ev in self.emitter.fail(api.code or "upstream_error", api.message):
                yield ev
            return
        # Output was sent: keep it, mark what is cut as incomplete, never pass it off as complete.
        for ev in self.emitter.drop_open_tool_call():
            yield ev
        for ev in self.emitter.end_incomplete("upstream_unavailable"):
            yield ev

    def _interrupted(self, deployment: Deployment, err: ProviderError) -> list[Event]:
        events: list[Event] = []
        events += self.emitter.drop_open_tool_call()
        if self.emitter.open is not None and self.emitter.open.kind == "reasoning":
            events += self.emitter.close_open()  # a reasoning item cut mid-way is closed cleanly
        if self.recovery_events:
            events.append(self.emitter.extension("router:stream.interrupted", deployment=deployment.name,
                                                 reason=err.kind, attempt=len(self.attempts)))
        return events

    def _resumed(self, deployment: Deployment) -> list[Event]:
        previous, self.resumed_from = self.resumed_from, None
        if not self.recovery_events:
            return []
        return [self.emitter.extension("router:stream.resumed", deployment=deployment.name, previous=previous,
                                       attempt=len(self.attempts),
                                       mode=self.attempts[-1].continuation or "retry")]

    def _account(self) -> None:
        """What the attempts cost, on the response as a `router` extension field for clients that opted in, and
        always in the log."""
        if not self.attempts:
            return
        log.info("response attempts", extra={"response_id": self.emitter.response["id"],
                                             "attempts": [a.as_dict() for a in self.attempts]})
        if self.recovery_events:
            self.emitter.response["router"] = {
                "attempts": [a.as_dict() for a in self.attempts],
                "served_by": self.attempts[-1].deployment,
                "cost_usd": round(sum(a.cost for a in self.attempts), 8),
            }


def _has_image_urls(request: GenerationRequest) -> bool:
    return any(isinstance(part, ImagePart) and not part.is_data_url
               for item in request.items if isinstance(item, Message) for part in item.content)


_ENDS_OVERLAP_WINDOW = (ToolCallStart, ToolCallDelta, RefusalDelta, Finish)


class _Cancelled(Exception):
    pass


class _DeadlineReached(Exception):
    pass


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except (Exception, asyncio.CancelledError):
            pass
