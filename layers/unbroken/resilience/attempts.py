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
import contextlib
import itertools
import logging
import math
import random
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from unbroken import logs
from unbroken.config import Deployment, HedgeSettings, ServerSettings
from unbroken.errors import Failure, invalid
from unbroken.ir import (
    Delta,
    GenerationRequest,
    ImagePart,
    Message,
    ReasoningDelta,
    ReasoningSeal,
    RefusalDelta,
    TextDelta,
    ToolCallDelta,
    ToolCallStart,
    Usage,
)
from unbroken.protocol.responses import Event, ResponseEmitter
from unbroken.providers.base import Provider, ProviderError
from unbroken.resilience.continuation import OverlapFilter, attempt_request, continuation_base
from unbroken.resilience.outcome import failure_for, judge
from unbroken.routing.affinity import AffinityMemory
from unbroken.routing.health import HealthBoard
from unbroken.routing.policy import Ranking, WaitDecision
from unbroken.routing.pool import ProviderPool
from unbroken.routing.tokens import estimate_input_tokens, estimate_output_tokens

log = logging.getLogger("unbroken.resilience")

BACKOFF_BASE = 0.25
BACKOFF_CAP = 8.0
# Failures after which the policy may choose to wait for the same deployment (with a 429's Retry-After as well).
TRANSIENT_5XX = frozenset({"server_error", "overloaded"})
# An upstream whose data is already buffered never suspends the loop: without a turn now and then, the journal
# would commit and the client be written to only at the end of a fast stream. After the first delta at once, then
# at most this often.
YIELD_EVERY_S = 0.005


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
    explain: bool = False  # `router.routing`: how the deployments were ranked and why (X-Unbroken-Explain)
    # Spend (h-keys): called once per owner with this owner's attempts, settled (see `Generation._charge`).
    on_report: Callable[[Sequence[Attempt]], None] | None = None


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
    """Where a generation may go: the model's deployments in the policy's order and the adapters behind them.
    `ranking` is how the policy ranked them (None: as given, moving on at once after a failure); `affinity`
    remembers which deployment served a long prompt prefix."""

    model: str
    candidates: tuple[Deployment, ...]
    pool: ProviderPool
    health: HealthBoard
    ranking: Ranking | None = None
    affinity: AffinityMemory | None = None

    def provider(self, deployment: Deployment) -> Provider:
        return self.pool.get(self.model, deployment)

    def served(self, deployment: Deployment, attempt: Attempt) -> None:
        """The answer came from `deployment`: its next turn may find the prompt in that deployment's cache."""
        ranking = self.ranking
        # No prefix key: a short prompt, or the model's cache_affinity is off (`RequestProfile.of`).
        if self.affinity is None or ranking is None or ranking.profile.prefix_key is None:
            return
        self.affinity.remember(ranking.profile.prefix_key, deployment.name,
                               attempt.usage.input_tokens or ranking.profile.input_tokens,
                               ranking.routing.affinity_ttl_s)


# -- accounting -------------------------------------------------------------------------------------------------
# An upstream reports usage at the end of its stream, so an attempt that was cut (or taken over) never hears it.
# What it sent and streamed is then estimated (`routing/tokens.py`, README "Usage and cost"). Such an attempt says
# `usage_estimated: true`.


def delta_chars(delta: Delta) -> int:
    """Characters of model output a delta carries (what an estimate of its tokens counts)."""
    if isinstance(delta, TextDelta | RefusalDelta | ReasoningDelta):
        return len(delta.text)
    if isinstance(delta, ToolCallDelta):
        return len(delta.arguments)
    if isinstance(delta, ToolCallStart):
        return len(delta.name)
    return 0


@dataclass(slots=True)
class Attempt:
    deployment: str
    provider: str
    model: str
    outcome: str = "running"  # ok | <error kind>
    continuation: str | None = None  # literal | instruction
    usage: Usage = field(default_factory=Usage)  # reported by the upstream, then completed by `settle`
    cost: float = 0.0
    ttft: float | None = None
    first_token_at: float | None = None  # time.monotonic() of the first token (the live tokens/s start there)
    output_chars: int = 0  # characters of output streamed (before the seam strips a repeated overlap)
    usage_estimated: bool = False

    def settle(self, deployment: Deployment, sent: GenerationRequest) -> None:
        """The attempt is over: what the upstream did not report is estimated, and the cost follows. An attempt
        that streamed nothing and reported nothing (an HTTP error, a silent upstream) counts nothing."""
        usage = self.usage
        if self.ttft is not None or usage.input_tokens or usage.output_tokens:
            input_tokens, output_tokens = usage.input_tokens, usage.output_tokens
            if not input_tokens:
                input_tokens = estimate_input_tokens(sent)
                self.usage_estimated = True
            if not output_tokens and self.output_chars:
                output_tokens = estimate_output_tokens(self.output_chars)
                self.usage_estimated = True
            self.usage = Usage(input_tokens, output_tokens, usage.cached_input_tokens, usage.reasoning_tokens)
        self.cost = deployment.price.cost(self.usage.input_tokens, self.usage.output_tokens,
                                          self.usage.cached_input_tokens)

    def as_dict(self) -> dict[str, Any]:
        return {"deployment": self.deployment, "provider": self.provider, "model": self.model,
                "outcome": self.outcome, "continuation": self.continuation,
                "input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens,
                "cached_input_tokens": self.usage.cached_input_tokens,
                "reasoning_tokens": self.usage.reasoning_tokens, "output_chars": self.output_chars,
                "usage_estimated": self.usage_estimated, "cost_usd": round(self.cost, 8),
                "ttft_ms": None if self.ttft is None else round(self.ttft * 1000, 1)}


def unrecorded_attempt(request: GenerationRequest, deployment: Deployment, output_chars: int) -> dict[str, Any]:
    """An earlier owner's work the journal shows but nobody recorded (its process died mid-attempt): estimated from
    the request and the output journaled after the last recorded accounting, priced at `deployment`."""
    attempt = Attempt(deployment.name, deployment.provider, deployment.model, outcome="taken_over",
                      output_chars=output_chars, usage_estimated=True)
    attempt.ttft = 0.0 if output_chars else None  # it streamed: its input counts
    attempt.settle(deployment, request)
    out = attempt.as_dict()
    out["ttft_ms"] = None
    return out


def usage_of(attempt: dict[str, Any]) -> Usage:
    return Usage(int(attempt.get("input_tokens") or 0), int(attempt.get("output_tokens") or 0),
                 int(attempt.get("cached_input_tokens") or 0), int(attempt.get("reasoning_tokens") or 0))


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
    # The policy chose to wait for a failed deployment rather than move on: it is retried after this many seconds.
    waiting: tuple[Deployment, float] | None = None

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
        """After a context-length error: never resend unchanged to a window that is not larger. Deployments whose
        window is unknown stay (they may be larger); the failed one leaves."""
        self.excluded.add(deployment.name)
        window = deployment.window
        if window is not None:
            self.excluded.update(d.name for d in self.candidates if d.window is not None and d.window <= window)

    def next_after(self, deployment: Deployment) -> Deployment | None:
        """The deployment the loop would move on to now (the next ranked one not yet tried this round)."""
        return next((d for d in self.fresh() if d.name != deployment.name), None)


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
        self._taken_over = emitter.seq > 0
        self._t0 = 0.0
        self._ttft: float | None = None  # seconds from run() to this owner's first output
        self._done_at: float | None = None
        self._hedge_counted = False  # this request counts in its model's hedge budget
        self.decisions: list[dict[str, Any]] = []  # wait-or-move decisions, for the explanation
        self._charged = False  # this owner's attempts went to `options.on_report`

    # -- public --------------------------------------------------------------------------------------------------

    async def run(self) -> AsyncGenerator[Event, None]:
        """Events of the whole response, ending with a terminal event (or, at a handoff, with none); raises
        `NoOutput` if nothing was emitted and nothing can be. A deployment leaves the request for good on errors
        that another try would not fix (auth, not found, a silent upstream, too small a context window) or after
        `max_retries` + 1 tries. One log line and one metrics blob tell how it went, whichever way it ends."""
        self._t0 = time.monotonic()
        try:
            # Each level closes the one below however it is left (`aclosing`), so closing this generator closes
            # the upstream stream at once, not when asyncio's finalizer gets to the generators in between.
            async with contextlib.aclosing(self._run()) as events:
                async for ev in events:
                    yield ev
        finally:
            self._report()

    async def _run(self) -> AsyncGenerator[Event, None]:
        ranking = self.route.ranking
        if ranking is not None and ranking.refusal is not None:
            raise NoOutput(ranking.refusal)  # the constraints left no deployment for this request
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
            race = self._hedge_plan(rounds, deployment, provider, sent, attempt)
            primed: tuple[AsyncIterator[Delta], float] | None = None
            try:
                if race is not None:
                    # The first attempt races a hedge once its first token is late; the winner goes on as the
                    # attempt, the loser was closed before anything of it was emitted.
                    async with contextlib.aclosing(self._race(race, rounds)) as raced:
                        async for ev in raced:
                            yield ev
                    winner, primed = race.handover()
                    deployment, provider, sent, attempt = (winner.deployment, winner.provider, winner.sent,
                                                           winner.attempt)
                async with contextlib.aclosing(self._stream_attempt(
                        provider, deployment, sent, attempt, stream=None if primed is None else primed[0],
                        started_at=None if primed is None else primed[1])) as streamed:
                    async for ev in streamed:
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
                self._wait_or_move(rounds, deployment, err)
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
            usage = attempt.usage
            self.route.health.record_success(
                self.route.model, deployment.name, attempt.ttft, output_tokens=usage.output_tokens,
                output_seconds=None if attempt.first_token_at is None else time.monotonic() - attempt.first_token_at,
                input_tokens=usage.input_tokens, cached_input_tokens=usage.cached_input_tokens)
            self.route.served(deployment, attempt)
            break
        # The last attempt finished, or what was cut is complete as it stands (finished tool calls).
        async for ev in self._finish_ok():
            yield ev

    # -- choosing the next attempt -------------------------------------------------------------------------------

    async def _next(self, rounds: _Rounds) -> Deployment | None:
        """The deployment to try next: the one the policy chose to wait for (after its wait), else the next fresh
        one, after a round's backoff if every usable one has failed in this round; None when nothing is left to
        try within the request's bounds."""
        if rounds.waiting is not None:
            deployment, delay = rounds.waiting
            rounds.waiting = None
            if (deployment.name not in rounds.excluded and len(self.attempts) < self.settings.max_attempts
                    and delay < self._remaining()):
                await asyncio.sleep(delay)
                return deployment
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

    def _wait_or_move(self, rounds: _Rounds, deployment: Deployment, err: ProviderError) -> None:
        """A 429 with a Retry-After, or a transient 5xx, on a deployment that may be tried again: the policy says
        whether to retry it after its hint (the Retry-After, else the first backoff) or move on to the next ranked
        one at once. Without a ranking, or with nothing else to move to, the rounds decide as before."""
        ranking = self.route.ranking
        if ranking is None or deployment.name in rounds.excluded:
            return
        if err.kind == "rate_limited" and err.retry_after is not None:
            hint = err.retry_after
        elif err.kind in TRANSIENT_5XX:
            hint = err.retry_after if err.retry_after is not None else BACKOFF_BASE
        else:
            return
        alternative = rounds.next_after(deployment)
        if alternative is None:
            return
        decision = ranking.wait_or_move(deployment, hint, alternative)
        if decision.wait and hint >= self._remaining():
            decision = WaitDecision(False, f"{decision.reason}, but the request has no time left for it")
        self.decisions.append({"after": err.kind, "deployment": deployment.name, "wait_s": round(hint, 3),
                               "action": "wait" if decision.wait else "move",
                               "next": deployment.name if decision.wait else alternative.name,
                               "reason": decision.reason})
        log.info("wait or move", extra={"response_id": self.emitter.response["id"], "model": self.route.model,
                                        **self.decisions[-1]})
        if decision.wait:
            rounds.waiting = (deployment, hint)

    @property
    def current_deployment(self) -> str | None:
        """The deployment of the attempt running (or the last one): the `X-Unbroken-Deployment` of a stream."""
        return self.attempts[-1].deployment if self.attempts else None

    def _remaining(self) -> float:
        return min(self.settings.max_total_seconds - (time.monotonic() - self._t0),
                   self.control.deadline - time.time())

    def _max_retries(self, deployment: Deployment) -> int:
        return deployment.options.max_retries

    def _record_failure(self, deployment: Deployment, attempt: Attempt, err: ProviderError) -> None:
        attempt.outcome = err.kind
        self.error = err
        self.route.health.record_failure(self.route.model, deployment.name, err.kind)
        log.warning("attempt failed", extra={"response_id": self.emitter.response["id"], "model": self.route.model,
                                             "deployment": deployment.name, "attempt": len(self.attempts),
                                             "kind": err.kind, "status": err.status, "mid_stream": err.mid_stream,
                                             "ttft_ms": None if attempt.ttft is None else round(attempt.ttft * 1000, 1),
                                             "input_tokens": attempt.usage.input_tokens,
                                             "output_tokens": attempt.usage.output_tokens,
                                             "usage_estimated": attempt.usage_estimated,
                                             "cost_usd": round(attempt.cost, 8)})

    # -- hedged first token --------------------------------------------------------------------------------------

    def _hedge_plan(self, rounds: _Rounds, deployment: Deployment, provider: Provider, sent: GenerationRequest,
                    attempt: Attempt) -> _Race | None:
        """A race for the response's first attempt, if it may be hedged: hedging is on, nothing was sent or
        output yet (no takeover, no continuation), the request is hedgeable and another deployment is next. The
        hedge itself starts only if the first token is late and the model's hedge budget allows it then."""
        hedge = self.settings.hedge
        if (not hedge.enabled or len(self.attempts) != 1 or self._taken_over or self.emitter.has_output
                or sent.continuation is not None or not hedgeable(self.request)):
            return None
        self.route.health.hedge_budget(self.route.model).note_request()
        self._hedge_counted = True
        nxt = next((d for d in rounds.fresh() if d.name != deployment.name), None)
        if nxt is None or self.settings.max_attempts < 2:
            return None
        started_at = time.monotonic()
        stream = provider.stream(sent).__aiter__()
        primary = _Racer(deployment, provider, sent, attempt, stream, started_at,
                         asyncio.ensure_future(stream.__anext__()))
        return _Race(primary, nxt, hedge_threshold(hedge, self.route.health.ttft_p95(self.route.model,
                                                                                       deployment.name)))

    async def _race(self, race: _Race, rounds: _Rounds) -> AsyncGenerator[Event, None]:
        """Wait for the first of the racers' first items. The header hold, the hedge timer and each racer's TTFT
        timeout are independent timers. A racer that fails while another runs drops out (its failure recorded);
        the last one left wins whatever its first item is (a delta, the end, an error or a timeout: the attempt's
        stream then raises it). At a cancel or the deadline the race stops and the attempt's loop ends it."""
        control = self.control
        racers = race.racers
        hold_at = race.primary.started_at + self.options.header_hold_seconds if not self._started else math.inf
        hedge_at = race.primary.started_at + race.threshold
        announce = False  # a hedge.started still to send (the response had not started when the hedge did)
        winner: _Racer | None = None
        while winner is None:
            if control.cancelled() or control.deadline <= time.time():
                break
            limits = [r.started_at + r.deployment.options.ttft_timeout_s for r in racers]
            wait = min(hold_at, hedge_at, *limits) - time.monotonic()
            wait = max(0.0, min(wait, control.deadline - time.time()))
            await asyncio.wait({r.pending for r in racers}, timeout=wait, return_when=asyncio.FIRST_COMPLETED)
            for racer in list(racers):  # the primary first: it wins a tie
                if not racer.pending.done():
                    continue
                exc = racer.pending.exception()
                if exc is None or not isinstance(exc, ProviderError) or len(racers) == 1:
                    winner = racer
                    break
                racers.remove(racer)  # failed before the other's first token: the other races on alone
                await self._drop_racer(racer, exc)
            if winner is not None:
                break
            now = time.monotonic()
            if now >= hold_at:
                hold_at = math.inf
                for ev in self._ensure_started():
                    yield ev
                if announce:
                    announce = False
                    yield self._hedge_started(race)
            if now >= hedge_at:
                hedge_at = math.inf
                if self._start_hedge(race, rounds):
                    if self._started:
                        yield self._hedge_started(race)
                    else:
                        announce = True
            for racer in list(racers):
                timeout = racer.deployment.options.ttft_timeout_s
                if now < racer.started_at + timeout:
                    continue
                err = ProviderError("timeout", f"no first token within {timeout:.1f}s")
                if len(racers) > 1:
                    racers.remove(racer)
                    await self._drop_racer(racer, err)
                else:
                    await _stop(racer.pending)
                    racer.pending = asyncio.get_running_loop().create_future()
                    racer.pending.set_exception(err)
        if winner is None:  # cancelled or at the deadline: the attempt's loop ends it, on the primary if it runs
            winner = race.primary if race.primary in racers else racers[0]
        race.winner = winner
        for loser in [r for r in racers if r is not winner]:
            await self._lose(loser)
        # The winner's attempt is the last one: the one that served (logs, `served_by`).
        self.attempts.remove(winner.attempt)
        self.attempts.append(winner.attempt)
        race.stream = _Primed(winner.pending, winner.stream)
        if race.hedge is not None and winner.pending.done() and winner.pending.exception() is None:
            if self.options.recovery_events:
                events = self._ensure_started()
                if announce:
                    events.append(self._hedge_started(race))
                loser = race.hedge if winner is race.primary else race.primary
                events.append(self.emitter.extension(
                    "router:hedge.won", deployment=winner.deployment.name, lost=loser.deployment.name,
                    ttft_ms=round((time.monotonic() - winner.started_at) * 1000, 1)))
                for ev in events:
                    yield ev

    def _start_hedge(self, race: _Race, rounds: _Rounds) -> bool:
        hedge = self.settings.hedge
        if not self.route.health.hedge_budget(self.route.model).allows(hedge.max_share, hedge.max_cost_share):
            return False
        deployment = race.next
        provider = self.route.provider(deployment)
        sent = attempt_request(self.request, self.emitter, literal=provider.capabilities.literal_continuation,
                               provider=deployment.provider)
        attempt = Attempt(deployment.name, deployment.provider, deployment.model)
        stream = provider.stream(sent).__aiter__()
        self.route.health.hedge_budget(self.route.model).hedged += 1.0
        self.attempts.append(attempt)
        rounds.tried(deployment)
        race.hedge = _Racer(deployment, provider, sent, attempt, stream, time.monotonic(),
                            asyncio.ensure_future(stream.__anext__()))
        race.racers.append(race.hedge)
        return True

    def _hedge_started(self, race: _Race) -> Event:
        assert race.hedge is not None
        return self.emitter.extension("router:hedge.started", deployment=race.hedge.deployment.name,
                                      primary=race.primary.deployment.name,
                                      after_ms=round(race.threshold * 1000, 1))

    async def _drop_racer(self, racer: _Racer, err: BaseException) -> None:
        """A racer failed before anything of it was used: recorded as a failed attempt, its stream closed."""
        await _stop(racer.pending)
        await _aclose(racer.stream)
        racer.attempt.settle(racer.deployment, racer.sent)
        if isinstance(err, ProviderError):
            self._record_failure(racer.deployment, racer.attempt, err)

    async def _lose(self, racer: _Racer) -> None:
        """The racer that lost: closed before any of its output reached the client. Its input was sent, so it is
        charged (estimated); its output is what it streamed before the close (a first delta of a tie), unshown."""
        pending = racer.pending
        if pending.done() and not pending.cancelled() and pending.exception() is None:
            racer.attempt.output_chars += delta_chars(pending.result())
        await _stop(pending)
        await _aclose(racer.stream)
        attempt = racer.attempt
        attempt.outcome = "hedge_lost"
        if not attempt.usage.input_tokens:
            attempt.usage = Usage(estimate_input_tokens(racer.sent), attempt.usage.output_tokens)
            attempt.usage_estimated = True
        attempt.settle(racer.deployment, racer.sent)

    # -- one attempt ---------------------------------------------------------------------------------------------

    async def _stream_attempt(self, provider: Provider, deployment: Deployment, request: GenerationRequest,
                              attempt: Attempt, *, stream: AsyncIterator[Delta] | None = None,
                              started_at: float | None = None) -> AsyncGenerator[Event, None]:
        """One attempt's stream into the emitter. A hedge race hands over the winner's `stream` (its first item
        already fetched) and when it started."""
        ttft_timeout = deployment.options.ttft_timeout_s
        stall_timeout = deployment.options.stall_timeout_s
        started_at = time.monotonic() if started_at is None else started_at
        stream = provider.stream(request).__aiter__() if stream is None else stream
        continued = request.continuation is not None
        seam = OverlapFilter(request.continuation)
        control = self.control
        first = True
        next_turn = 0.0  # the first delta gets a loop turn at once
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
                    now = time.monotonic()
                    attempt.ttft = now - started_at
                    attempt.first_token_at = now
                    if self._ttft is None:
                        self._ttft = now - self._t0
                    if self._resumed_from is not None:
                        for ev in self._resumed(deployment):
                            yield ev
                if isinstance(delta, Usage):
                    attempt.usage = attempt.usage + delta
                else:
                    attempt.output_chars += delta_chars(delta)  # for an estimate, if no usage comes (a cut)
                if continued and isinstance(delta, ReasoningDelta | ReasoningSeal):
                    continue  # the continued message stays one item; a continuation's own reasoning is not shown
                for out in seam.feed(delta):
                    for ev in self._emit(out):
                        yield ev
                if (now := time.monotonic()) >= next_turn:
                    next_turn = now + YIELD_EVERY_S
                    await asyncio.sleep(0)
            for out in seam.close():
                for ev in self._emit(out):
                    yield ev
        finally:
            attempt.settle(deployment, request)
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
        events = self._ensure_started()
        self._account()
        return events + self.emitter.end_incomplete(reason, status=status)

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

    def accounting(self) -> dict[str, Any]:
        """The `router` extension field (README "Usage and cost"): every attempt of every owner so far, what they
        cost and who served the answer. `journaled_through` is the last sequence number it covers, so that a later
        owner estimates only what was streamed after it."""
        attempts = [*self.emitter.previous_attempts, *(a.as_dict() for a in self.attempts)]
        served = next((a["deployment"] for a in reversed(attempts) if a["outcome"] == "ok"), None)
        out = {
            "served_by": served or (attempts[-1]["deployment"] if attempts else None),
            "cost_usd": round(sum(a["cost_usd"] for a in attempts), 8),
            "usage_estimated": any(a["usage_estimated"] for a in attempts),
            "attempts": attempts,
            "journaled_through": self.emitter.seq - 1,
        }
        if self.options.explain and self.route.ranking is not None:
            out["routing"] = {**self.route.ranking.explain(), "decisions": list(self.decisions)}
        return out

    def total_usage(self) -> Usage:
        total = Usage()
        for a in self.emitter.previous_attempts:
            total = total + usage_of(a)
        for attempt in self.attempts:
            total = total + attempt.usage
        return total

    def _account(self) -> None:
        """Before the terminal event: the response's `usage` is the sum over every attempt of every owner, and its
        `router` field says what each cost (always there: an extension field the spec's response object allows)."""
        if self._done_at is None:
            self._done_at = time.monotonic()
        self.emitter.usage = self.total_usage()
        router = self.accounting()
        del router["journaled_through"]
        self.emitter.response["router"] = router
        self._charge()  # before the terminal event: a caller that has seen it finds its spend counted

    def _charge(self) -> None:
        """Spend (h-keys): this owner's attempts to `options.on_report`, once, as soon as they are final: at the
        accounting before the terminal event, else (a handoff, nothing produced) when the run ends."""
        if self.options.on_report is not None and not self._charged:
            self._charged = True
            self.options.on_report(self.attempts)

    def _report(self) -> None:
        """Once per owner, however the run ended: one log line (and one EMF blob, if metrics are on) with this
        owner's attempts. The numbers are this owner's own, so owners of one response add up."""
        if self._done_at is None:
            self._done_at = time.monotonic()
        attempts = self.attempts
        served = attempts[-1].deployment if attempts else None
        output_tokens = sum(a.usage.output_tokens for a in attempts)
        streaming = self._done_at - self._t0 - self._ttft if self._ttft is not None else 0.0
        cost = sum(a.cost for a in attempts)
        raced = [a for a in attempts if a.outcome != "hedge_lost"]
        failovers = sum(1 for a, b in itertools.pairwise(raced) if a.deployment != b.deployment)
        hedges = len(attempts) - len(raced)
        if self._hedge_counted:
            budget = self.route.health.hedge_budget(self.route.model)
            budget.cost += cost
            budget.hedge_cost += sum(a.cost for a in attempts if a.outcome == "hedge_lost")
        continuations = sum(1 for a in attempts if a.continuation is not None)
        ttft_ms = None if self._ttft is None else round(self._ttft * 1000, 1)
        tps = round(output_tokens / streaming, 1) if output_tokens and streaming > 0 else None
        log.info("response attempts", extra={
            "response_id": self.emitter.response["id"], "model": self.route.model, "deployment": served,
            "status": self.emitter.response.get("status"), "attempts": [a.as_dict() for a in attempts],
            "attempt_count": len(attempts), "ttft_ms": ttft_ms,
            "input_tokens": sum(a.usage.input_tokens for a in attempts), "output_tokens": output_tokens,
            "output_tokens_per_s": tps, "cost_usd": round(cost, 8), "failovers": failovers,
            "continuations": continuations, "hedges": hedges, "taken_over": self._taken_over,
            "usage_estimated": any(a.usage_estimated for a in attempts),
            "routing": None if self.route.ranking is None else {**self.route.ranking.summary(),
                                                                "decisions": self.decisions}})
        logs.emit_metrics({"model": self.route.model, "deployment": served or "none"}, {
            "Requests": 0 if self._taken_over else 1, "TimeToFirstToken": ttft_ms, "OutputTokensPerSecond": tps,
            "InputTokens": sum(a.usage.input_tokens for a in attempts), "OutputTokens": output_tokens,
            "CostUSD": cost, "Failovers": failovers, "Continuations": continuations,
            "Takeovers": 1 if self._taken_over else 0})
        self._charge()


def hedgeable(request: GenerationRequest) -> bool:
    """May this request be hedged? A hedge costs only tokens when every tool runs on the client: the IR has only
    function tools today, so every request is. A hosted tool (one the upstream runs: search, code) would return
    False here."""
    del request  # nothing in the IR today makes a request unhedgeable
    return True


def hedge_threshold(hedge: HedgeSettings, p95: float | None) -> float:
    """Seconds without a first token before the hedge starts: the deployment's live p95 TTFT within the configured
    floor and ceiling, the ceiling while no p95 is known."""
    floor, ceiling = hedge.floor_ms / 1000.0, hedge.ceiling_ms / 1000.0
    return ceiling if p95 is None else min(ceiling, max(floor, p95))


@dataclass(slots=True)
class _Racer:
    """One stream of a hedge race and its first item being fetched."""

    deployment: Deployment
    provider: Provider
    sent: GenerationRequest
    attempt: Attempt
    stream: AsyncIterator[Delta]
    started_at: float
    pending: asyncio.Future[Delta]


@dataclass(slots=True)
class _Race:
    primary: _Racer
    next: Deployment  # the hedge's deployment, if the hedge starts
    threshold: float
    hedge: _Racer | None = None
    racers: list[_Racer] = field(default_factory=list)
    winner: _Racer | None = None
    stream: AsyncIterator[Delta] | None = None

    def __post_init__(self) -> None:
        self.racers.append(self.primary)

    def handover(self) -> tuple[_Racer, tuple[AsyncIterator[Delta], float]]:
        """After the race: the winner, its primed stream and when it started."""
        assert self.winner is not None and self.stream is not None
        return self.winner, (self.stream, self.winner.started_at)


class _Primed:
    """A racer's stream handed to the attempt: its first item is the race's pending fetch, then the stream."""

    def __init__(self, pending: asyncio.Future[Delta], stream: AsyncIterator[Delta]) -> None:
        self._pending: asyncio.Future[Delta] | None = pending
        self._stream = stream

    def __aiter__(self) -> _Primed:
        return self

    async def __anext__(self) -> Delta:
        pending, self._pending = self._pending, None
        if pending is not None:
            return await pending
        return await self._stream.__anext__()

    async def aclose(self) -> None:
        if self._pending is not None:
            await _stop(self._pending)
        await _aclose(self._stream)


async def _stop(pending: asyncio.Future[Any]) -> None:
    """Cancel a fetch and let it unwind (a cancelled `__anext__` finishes its generator), whatever it raises."""
    pending.cancel()
    try:
        await pending
    except asyncio.CancelledError:
        _reraise_if_cancelled()
    except Exception:
        pass


def _reraise_if_cancelled() -> None:
    """Inside `except CancelledError` while stopping something: the stop's own cancellation is expected, but when
    this task is being cancelled too (shutdown, a client gone) it must go on being cancelled, not swallow it."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def _has_image_urls(request: GenerationRequest) -> bool:
    return any(isinstance(part, ImagePart) and not part.is_data_url
               for item in request.items if isinstance(item, Message) for part in item.content)


async def _aclose(stream: Any) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        try:
            await aclose()
        except asyncio.CancelledError:
            _reraise_if_cancelled()
        except Exception:
            pass
