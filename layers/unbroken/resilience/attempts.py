"""The attempt loop: stream from the best deployment; on any failure ask `outcome.judge` and retry, fail over, or
continue (`continuation`).

Before any output the client notices nothing. After output has started, the answer is continued on the same or the
next deployment, so the client sees one uninterrupted item (DESIGN: continuation). The loop emits Open Responses
events through a `ResponseEmitter`, so sequence numbers stay dense across attempts.

Everything the loop needs comes in through its constructor: the request, the `Route` (ranked deployments and the
adapters behind them), the emitter, its `GenerationOptions`, and a `RunControl` whose owner can shorten the deadline
or cancel while the loop runs. Nothing outside assigns the loop's fields; its results are read after `run()`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from unbroken.config import Deployment, ServerSettings
from unbroken.errors import Failure, invalid
from unbroken.ir import (
    Delta,
    GenerationRequest,
    ImagePart,
    Message,
    ReasoningDelta,
    ReasoningSeal,
    Usage,
)
from unbroken.protocol.responses import Event, ResponseEmitter
from unbroken.providers.base import Provider, ProviderError
from unbroken.resilience.continuation import OverlapFilter, attempt_request, continuation_base
from unbroken.resilience.outcome import failure_for, judge
from unbroken.routing.policy import HealthBoard
from unbroken.routing.pool import ProviderPool

log = logging.getLogger("unbroken.resilience")

DEFAULT_TTFT_TIMEOUT = 60.0
DEFAULT_STALL_TIMEOUT = 30.0
BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0


class NoOutput(Exception):
    """Every attempt failed before anything was emitted: the caller can still answer with an error of its own."""

    def __init__(self, failure: Failure) -> None:
        super().__init__(failure.message)
        self.failure = failure


@dataclass(frozen=True, slots=True)
class GenerationOptions:
    """How one generation behaves, fixed when it is built."""

    queued: bool = False  # a background response shows `response.queued` after `response.created`
    # How long a stream waits for its first output before it commits to streaming (200 + start events).
    header_hold_seconds: float = math.inf
    recovery_events: bool = False  # `router:` events and the `router` field, for clients that opted in
    # A background response outlives one Lambda invocation: at the deadline it stops without a terminal event and
    # the next invocation takes it over (worker handoff) instead of ending it incomplete.
    hand_off_at_deadline: bool = False


def _never() -> bool:
    return False


@dataclass(slots=True)
class RunControl:
    """What the owner of a running generation may change: the deadline (a client that leaves shortens it),
    cancellation, and whether a generation built to hand off at its deadline still does (a client that leaves
    before it gets the response ended within the detached cap instead). The loop reads it before every token."""

    deadline: float
    cancelled: Callable[[], bool] = _never
    hand_off: bool = True

    def shorten_to(self, deadline: float) -> None:
        self.deadline = min(self.deadline, deadline)


@dataclass(frozen=True, slots=True)
class Route:
    """Where a generation may go: the model's deployments in the policy's order and the adapters behind them."""

    model: str
    candidates: tuple[Deployment, ...]
    pool: ProviderPool
    health: HealthBoard

    def provider(self, deployment: Deployment) -> Provider:
        return self.pool.get(self.model, deployment)


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


@dataclass(slots=True)
class _Rounds:
    """Which deployment goes next. Deployments are tried in rounds, in the policy's order: a failure moves on to
    the next one at once (no waiting while another may answer); when every usable one has failed in this round,
    the next round starts after an exponential backoff with jitter that honours the longest Retry-After seen."""

    candidates: tuple[Deployment, ...]
    excluded: set[str] = field(default_factory=set)
    tried_this_round: set[str] = field(default_factory=set)
    tries: dict[str, int] = field(default_factory=dict)
    retry_after_hint: float = 0.0
    rounds: int = 0

    def usable(self) -> list[Deployment]:
        return [d for d in self.candidates if d.name not in self.excluded]

    def fresh(self) -> list[Deployment]:
        return [d for d in self.usable() if d.name not in self.tried_this_round]

    def backoff(self) -> float:
        self.rounds += 1
        backoff = min(BACKOFF_CAP, BACKOFF_BASE * 2.0 ** (self.rounds - 1)) * random.uniform(0.5, 1.5)
        return max(self.retry_after_hint, backoff)

    def new_round(self) -> None:
        self.tried_this_round.clear()
        self.retry_after_hint = 0.0

    def tried(self, deployment: Deployment) -> None:
        self.tries[deployment.name] = self.tries.get(deployment.name, 0) + 1
        self.tried_this_round.add(deployment.name)

    def exclude_smaller_windows(self, deployment: Deployment) -> None:
        # Never resend unchanged to a window that is not larger.
        window = deployment.option("context_window", 0)
        self.excluded.update(d.name for d in self.candidates if d.option("context_window", 0) <= window)


class _Cancelled(Exception):
    pass


class _DeadlineReached(Exception):
    pass


class Generation:
    """One response's generation across attempts. Use `run()` once; read `attempts`, `error` and `handed_off`
    afterwards."""

    def __init__(self, request: GenerationRequest, route: Route, emitter: ResponseEmitter, settings: ServerSettings,
                 options: GenerationOptions, control: RunControl) -> None:
        self.request = request
        self.route = route
        self.emitter = emitter
        self.settings = settings
        self.options = options
        self.control = control
        # Results, read after run().
        self.attempts: list[Attempt] = []
        self.error: ProviderError | None = None
        self.handed_off = False
        self._candidates = route.candidates
        self._resumed_from: str | None = None  # set after an interruption, until the next attempt's first delta
        # An emitter rebuilt from a journal (takeover) has already sent its start events.
        self._started = emitter.seq > 0
        self._t0 = 0.0

    # -- public --------------------------------------------------------------------------------------------------

    async def run(self) -> AsyncIterator[Event]:
        """Events of the whole response, ending with a terminal event (or, at a handoff, with none); raises
        `NoOutput` if nothing was emitted and nothing can be. A deployment leaves the request for good on errors
        that another try would not fix (auth, not found, a silent upstream, too small a context window) or after
        `max_retries` + 1 tries."""
        self._t0 = time.monotonic()
        if _has_image_urls(self.request):
            # Some providers need image bytes and the router never fetches URLs: only deployments that take URLs.
            self._candidates = tuple(d for d in self._candidates if self.route.provider(d).capabilities.image_urls)
            if not self._candidates:
                raise NoOutput(invalid("No deployment of this model accepts image URLs; send the "
                                       "image as a data URL (data:image/...;base64,...).", param="input",
                                       code="image_url_not_supported"))
        request: GenerationRequest | None = self.request
        if self.emitter.seq > 0:
            # Taking over a response another process started: what it sent stands; go on from there.
            for ev in self._close_cut_items():
                yield ev
            request = continuation_base(self.request, self.emitter)
            self._resumed_from = "takeover"
        rounds = _Rounds(self._candidates)
        literal_ok: dict[str, bool] = {}  # deployment -> may it continue literally? (a prefill rejection flips it)
        while request is not None:
            deployment = await self._next(rounds)
            if deployment is None:
                async for ev in self._give_up():
                    yield ev
                return
            provider = self.route.provider(deployment)
            literal = literal_ok.get(deployment.name, provider.capabilities.literal_continuation)
            sent = attempt_request(request, self.emitter, literal=literal, provider=deployment.provider)
            attempt = Attempt(deployment.name, deployment.provider, deployment.model,
                              continuation=None if sent.continuation is None
                              else ("literal" if literal else "instruction"))
            self.attempts.append(attempt)
            rounds.tried(deployment)
            try:
                async for ev in self._stream_attempt(provider, deployment, sent, attempt):
                    yield ev
            except _Cancelled:
                attempt.outcome = "cancelled"
                for ev in self._end_incomplete("cancelled", status="cancelled"):
                    yield ev
                return
            except _DeadlineReached:
                attempt.outcome = "deadline"
                for ev in self._at_deadline():
                    yield ev
                return
            except ProviderError as err:
                self._record_failure(deployment, attempt, err)
                verdict = judge(err, output_started=self.emitter.has_output,
                                prefill_in_use=literal_ok.get(deployment.name, True))
                if verdict.action == "give_up":
                    raise NoOutput(failure_for(err, attempts=len(self.attempts))) from None
                if verdict.action == "refuse":
                    # A policy refusal goes back to the client with its reason; no other deployment is asked.
                    for ev in self._end_incomplete("content_filter"):
                        yield ev
                    return
                if verdict.action == "drop_prefill":
                    literal_ok[deployment.name] = False  # same deployment again, without the prefill
                    rounds.tried_this_round.discard(deployment.name)
                    continue
                if not verdict.retry_here or rounds.tries[deployment.name] > self._max_retries(deployment):
                    rounds.excluded.add(deployment.name)
                if verdict.needs_larger_window:
                    rounds.exclude_smaller_windows(deployment)
                if err.retry_after is not None:
                    if err.retry_after > self._remaining():
                        rounds.excluded.add(deployment.name)  # its hint is not ours to wait for
                    else:
                        rounds.retry_after_hint = max(rounds.retry_after_hint, err.retry_after)
                # A held call cut in half was never shown: forget it whatever else happened.
                for ev in self.emitter.drop_open_tool_call():
                    yield ev
                if self.emitter.has_output:
                    for ev in self._interrupted(deployment, err):
                        yield ev
                    request = continuation_base(self.request, self.emitter)
                    self._resumed_from = deployment.name
                continue
            attempt.outcome = "ok"
            self.route.health.record_success(self.route.model, deployment.name, attempt.ttft)
            break
        # The last attempt finished, or what was cut is complete as it stands (finished tool calls).
        async for ev in self._finish_ok():
            yield ev

    # -- choosing the next attempt -------------------------------------------------------------------------------

    async def _next(self, rounds: _Rounds) -> Deployment | None:
        """The deployment to try next, after a round's backoff if every usable one has failed in this round; None
        when nothing is left to try within the request's bounds."""
        usable = rounds.usable()
        fresh = rounds.fresh()
        if usable and not fresh:
            delay = rounds.backoff()
            if delay >= self._remaining():
                return None
            await asyncio.sleep(delay)
            rounds.new_round()
            fresh = usable
        if not usable or len(self.attempts) >= self.settings.max_attempts or self._remaining() <= 0:
            return None
        return fresh[0]

    def _remaining(self) -> float:
        return min(self.settings.max_total_seconds - (time.monotonic() - self._t0),
                   self.control.deadline - time.time())

    def _max_retries(self, deployment: Deployment) -> int:
        return int(deployment.option("max_retries", 1))

    def _record_failure(self, deployment: Deployment, attempt: Attempt, err: ProviderError) -> None:
        attempt.outcome = err.kind
        self.error = err
        self.route.health.record_failure(self.route.model, deployment.name)
        log.warning("attempt failed", extra={"response_id": self.emitter.response["id"],
                                             "deployment": deployment.name, "kind": err.kind,
                                             "status": err.status, "mid_stream": err.mid_stream})

    # -- one attempt ---------------------------------------------------------------------------------------------

    async def _stream_attempt(self, provider: Provider, deployment: Deployment, request: GenerationRequest,
                              attempt: Attempt) -> AsyncIterator[Event]:
        ttft_timeout = float(deployment.option("ttft_timeout_s", DEFAULT_TTFT_TIMEOUT))
        stall_timeout = float(deployment.option("stall_timeout_s", DEFAULT_STALL_TIMEOUT))
        started_at = time.monotonic()
        stream = provider.stream(request).__aiter__()
        continued = request.continuation is not None
        seam = OverlapFilter(request.continuation)
        control = self.control
        first = True
        try:
            while True:
                if control.cancelled():
                    raise _Cancelled
                limit = ttft_timeout if first else stall_timeout
                until_deadline = control.deadline - time.time()
                if until_deadline <= 0:
                    raise _DeadlineReached
                wait = max(0.0, min(limit, until_deadline))
                try:
                    if first and not self._started and self.options.header_hold_seconds < wait:
                        # Nothing to show yet: after a short hold the response is committed to streaming (200 +
                        # start events) so the client is not left without a byte while a slow model thinks.
                        hold = self.options.header_hold_seconds
                        pending = asyncio.ensure_future(stream.__anext__())
                        try:
                            done, _ = await asyncio.wait({pending}, timeout=hold)
                            if not done:
                                for ev in self._ensure_started():
                                    yield ev
                                limit -= hold
                            wait = max(0.0, min(limit, control.deadline - time.time()))
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
                    if time.time() >= control.deadline:
                        raise _DeadlineReached from None
                    what = "first token" if first else "next token"
                    raise ProviderError("timeout", f"no {what} within {limit:.1f}s", mid_stream=not first) from None
                if first:
                    first = False
                    attempt.ttft = time.monotonic() - started_at
                    if self._resumed_from is not None:
                        for ev in self._resumed(deployment):
                            yield ev
                if continued and isinstance(delta, ReasoningDelta | ReasoningSeal):
                    continue  # the continued message stays one item; a continuation's own reasoning is not shown
                if isinstance(delta, Usage):
                    attempt.usage = attempt.usage + delta
                    attempt.cost = deployment.price.cost(attempt.usage.input_tokens, attempt.usage.output_tokens,
                                                         attempt.usage.cached_input_tokens)
                for out in seam.feed(delta):
                    for ev in self._emit(out):
                        yield ev
            for out in seam.close():
                for ev in self._emit(out):
                    yield ev
        finally:
            await _aclose(stream)

    def _emit(self, delta: Delta) -> list[Event]:
        events = self._ensure_started()
        return events + self.emitter.apply(delta) if events else self.emitter.apply(delta)

    def _ensure_started(self) -> list[Event]:
        if self._started:
            return []
        self._started = True
        return self.emitter.start(queued=self.options.queued) + self.emitter.in_progress()

    # -- endings -------------------------------------------------------------------------------------------------

    def _close_cut_items(self) -> list[Event]:
        """Before continuing a taken-over response: a held tool call cut in half is forgotten, a reasoning item
        cut mid-way is closed cleanly."""
        events = self.emitter.drop_open_tool_call()
        if self.emitter.open is not None and self.emitter.open.kind == "reasoning":
            events += self.emitter.close_open()
        return events

    async def _finish_ok(self) -> AsyncIterator[Event]:
        for ev in self._ensure_started():
            yield ev
        self._account()
        for ev in self.emitter.complete():
            yield ev

    def _end_incomplete(self, reason: str, *, status: str = "incomplete") -> list[Event]:
        return self._ensure_started() + self.emitter.end_incomplete(reason, status=status)

    def _at_deadline(self) -> list[Event]:
        if self.options.hand_off_at_deadline and self.control.hand_off:
            # The start events still go out, so that a stream that showed nothing yet has an id to resume from.
            self.handed_off = True
            return self._ensure_started() + self.emitter.drop_open_tool_call()
        return self._end_incomplete("stream_deadline")

    async def _give_up(self) -> AsyncIterator[Event]:
        self._account()
        if not self.emitter.has_output:
            failure = failure_for(self.error, attempts=len(self.attempts))
            if not self._started:
                raise NoOutput(failure)
            for ev in self.emitter.fail(failure.code or "upstream_error", failure.message):
                yield ev
            return
        # Output was sent: keep it, mark what is cut as incomplete, never pass it off as complete.
        for ev in self.emitter.drop_open_tool_call():
            yield ev
        for ev in self.emitter.end_incomplete("upstream_unavailable"):
            yield ev

    def _interrupted(self, deployment: Deployment, err: ProviderError) -> list[Event]:
        events = self._close_cut_items()
        if self.options.recovery_events:
            events.append(self.emitter.extension("router:stream.interrupted", deployment=deployment.name,
                                                 reason=err.kind, attempt=len(self.attempts)))
        return events

    def _resumed(self, deployment: Deployment) -> list[Event]:
        previous, self._resumed_from = self._resumed_from, None
        if not self.options.recovery_events:
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
        if self.options.recovery_events:
            self.emitter.response["router"] = {
                "attempts": [a.as_dict() for a in self.attempts],
                "served_by": self.attempts[-1].deployment,
                "cost_usd": round(sum(a.cost for a in self.attempts), 8),
            }


def _has_image_urls(request: GenerationRequest) -> bool:
    return any(isinstance(part, ImagePart) and not part.is_data_url
               for item in request.items if isinstance(item, Message) for part in item.content)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except (Exception, asyncio.CancelledError):
            pass
