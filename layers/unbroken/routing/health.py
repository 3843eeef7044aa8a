"""What the router knows of each deployment's live behaviour: circuit breaker, time to first token, throughput, error
and rate-limit rates, cache hits; and each model's hedge budget.

The attempt loop reports every attempt (`record_success`, `record_failure`); routing and the operator health
endpoint read `view()` (a `LiveView`, the one shape they see). Neither call waits on anything.

With a store (`share()`), every instance sees every instance's attempts: each adds its attempts to time windows in
the store's counters (`runtime.counters`: one write per instance and key every flush, 2 s), and `run()` (a task of
the runtime, every `server.health.refresh_seconds`) reads every instance's windows back through
`runtime.counter_reader`, off the request path. The circuit breaker is a store record every instance shares
(`routing/circuit.py`); `run()` writes this instance's transitions and claims the half-open probe. Windows and
records are re-read together once the reader's cache age (5 s) has passed, at a refresh tick (1 s): one
BatchGetItem and one Query per instance every 5-6 s on DynamoDB. How stale another instance's view can be: flush
2 s + a read every 5 s at a 1 s tick = 8 s (a circuit change: written at the next tick, 1 s, then read within 6 s:
7 s), within the 10 s stated in README "Deployment health". Without a store all of it stays in the process. The
hedge budget (`HedgeBudget`) is per process either way: it bounds this instance's own hedging."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace

from unbroken.config import HealthSettings
from unbroken.journal.counters import FLUSH_SECONDS, CounterBatcher, CounterReader
from unbroken.journal.store import AlreadyExists, Fenced, Store, StoreError
from unbroken.routing.circuit import CLOSED, OPEN, PROBING, RECORD_KIND, Circuit, record_name
from unbroken.routing.stats import (
    EMPTY,
    REQUEST_FAULTS,
    Estimates,
    attempt_fields,
    combine,
    merge,
    window_key,
    window_start,
)

log = logging.getLogger("unbroken")

# The hedge budget of a model decays by this per request: its shares are over roughly the last 100 requests.
HEDGE_DECAY = 0.99
# Circuit records outlive any open period; one nobody touched for a week is gone (a closed circuit reads the same).
CIRCUIT_RECORD_SECONDS = 7 * 86400.0
# A window stops growing this long after it ended: every instance has flushed into it (flush interval 2 s, and a
# slow or failed flush or two).
FINAL_AFTER_SECONDS = 3 * FLUSH_SECONDS
# How long after a refresh the figures count as current (README: at most 10 s stale); the operator endpoint says it.
STALENESS_BOUND_SECONDS = 10.0


@dataclass(slots=True)
class HedgeBudget:
    """How much of a model's recent traffic was hedged: decayed counts of requests and hedges, and decayed spend
    of all attempts and of the hedges that lost."""

    requests: float = 0.0
    hedged: float = 0.0
    cost: float = 0.0
    hedge_cost: float = 0.0

    def note_request(self) -> None:
        self.requests = self.requests * HEDGE_DECAY + 1.0
        self.hedged *= HEDGE_DECAY
        self.cost *= HEDGE_DECAY
        self.hedge_cost *= HEDGE_DECAY

    def allows(self, max_share: float, max_cost_share: float) -> bool:
        """May the request being served be hedged? (`requests` already counts it.)"""
        if self.hedged >= max_share * self.requests:
            return False
        return self.cost <= 0 or self.hedge_cost < max_cost_share * self.cost


@dataclass(frozen=True, slots=True)
class LiveView:
    """One deployment's live state as routing sees it. None: not enough observations to say."""

    circuit: str  # closed | open | half_open
    ttft_p50: float | None  # seconds
    ttft_p95: float | None
    tokens_per_s: float | None  # output tokens per second after the first token
    error_rate: float | None  # share of recent attempts that failed (any kind)
    rate_limit_rate: float | None  # share of recent attempts refused with 429 / quota
    cache_hit_rate: float | None  # share of recent input tokens read from the provider's prompt cache
    mean_input_tokens: float | None
    mean_output_tokens: float | None
    samples: float  # (decayed) number of attempts behind the figures
    circuit_reason: str = ""  # why it opened, while it is not closed
    probe_in_flight: bool = False  # half-open here, and a request of this instance is the probe (circuit: open)
    circuit_changed_at: float | None = None  # epoch seconds of the last circuit change
    last_attempt_window: float | None = None  # start (epoch seconds) of the newest stats window with an attempt


@dataclass(slots=True)
class DeploymentHealth:
    model: str
    deployment: str
    instance: str  # the board's instance id (who holds a probe)
    shared: bool  # the circuit is a store record: a half-open probe must be claimed
    consecutive_failures: int = 0  # seen by this instance
    circuit: Circuit = field(default_factory=Circuit)
    pending: bool = False  # `circuit` was changed here and is not written yet (`version` is what it was based on)
    # Stats windows by start: this process's (no store), or the last read of every instance's plus what this one
    # added since.
    windows: dict[float, dict[str, float]] = field(default_factory=dict)
    changes: int = 0  # bumped when `windows` change: the cached estimates are recomputed
    _stamp: tuple[int, int] = (-1, 0)
    _estimates: Estimates = EMPTY

    probe_until: float = 0.0  # a request of this instance is the half-open probe, until its outcome or this time

    def circuit_seen(self, now: float) -> str:
        """closed | open | half_open, the breaker's state here (a probe in flight or not)."""
        return self.circuit.seen_by(self.instance, now, claims_implicitly=not self.shared)

    def circuit_for_routing(self, now: float) -> str:
        """As `circuit_seen`, but open while the probe is in flight: one request probes, not every one."""
        seen = self.circuit_seen(now)
        return "open" if seen == "half_open" and now < self.probe_until else seen


class HealthBoard:
    def __init__(self, clock: Callable[[], float] = time.time, settings: HealthSettings | None = None) -> None:
        self._now = clock  # epoch seconds: windows and circuit records are compared across instances
        self.settings = settings or HealthSettings()
        self.instance = uuid.uuid4().hex[:12]
        self._health: dict[tuple[str, str], DeploymentHealth] = {}
        self._hedges: dict[str, HedgeBudget] = {}
        self._store: Store | None = None
        self._counters: CounterBatcher | None = None
        self._reader: CounterReader | None = None
        self._read_at = float("-inf")  # the last read of the shared windows and circuit records
        self._final: dict[str, dict[str, float] | None] = {}  # windows read after they stopped growing, by key
        self.refreshed_at: float | None = None  # the last refresh from the store that succeeded (epoch seconds)

    # -- set-up (the runtime) --------------------------------------------------------------------------------------

    def configure(self, settings: HealthSettings, deployments: Iterable[tuple[str, str]] = ()) -> None:
        """The thresholds, and the (model, deployment) pairs a refresh reads even before they serve anything."""
        self.settings = settings
        for model, deployment in deployments:
            self.of(model, deployment)

    def share(self, store: Store, counters: CounterBatcher, reader: CounterReader) -> None:
        """Share stats and circuits with every instance on `store`; `run()` must then run beside the requests."""
        self._store, self._counters, self._reader = store, counters, reader
        for h in self._health.values():
            h.shared = True

    @property
    def shared(self) -> bool:
        return self._store is not None

    def of(self, model: str, deployment: str) -> DeploymentHealth:
        key = (model, deployment)
        health = self._health.get(key)
        if health is None:
            health = self._health[key] = DeploymentHealth(model, deployment, self.instance, self.shared)
        return health

    # -- what the attempt loop reports ---------------------------------------------------------------------------

    def record_success(
        self,
        model: str,
        deployment: str,
        ttft: float | None,
        *,
        output_tokens: int = 0,
        output_seconds: float | None = None,
        input_tokens: int = 0,
        cached_input_tokens: int = 0,
    ) -> None:
        """An attempt that finished well: its first-token time, and the tokens it streamed in `output_seconds`
        after its first token. A success closes the circuit (on every instance, once written)."""
        h = self.of(model, deployment)
        now = self._now()
        self._count(h, now, attempt_fields(failure_kind=None, ttft=ttft, output_tokens=output_tokens,
                                           output_seconds=output_seconds, input_tokens=input_tokens,
                                           cached_input_tokens=cached_input_tokens))
        h.consecutive_failures = 0
        h.probe_until = 0.0
        if h.circuit.state != CLOSED:
            self._change(h, Circuit(CLOSED, reason="an attempt succeeded", changed_at=now,
                                    version=h.circuit.version))
            log.info("circuit closed", extra={"model": model, "deployment": deployment})

    def record_failure(self, model: str, deployment: str, kind: str = "") -> None:
        """An attempt that failed; `kind` is its ErrorKind value (`rate_limited` and `quota` count toward the
        rate-limit rate)."""
        h = self.of(model, deployment)
        now = self._now()
        self._count(h, now, attempt_fields(failure_kind=kind or "unknown"))
        h.probe_until = 0.0
        if kind in REQUEST_FAULTS:
            return  # the request's fault: the run of consecutive failures stays as it was (and the probe is free)
        h.consecutive_failures += 1
        seen = h.circuit_seen(now)
        if seen == "half_open":
            self._open(h, now, f"the half-open probe failed ({kind or 'error'})")
        elif seen == "closed":
            if h.consecutive_failures >= self.settings.failures_to_open:
                self._open(h, now, f"{h.consecutive_failures} consecutive failures (last: {kind or 'error'})")
            else:
                self._open_on_failure_share(h, now)

    # -- what routing and operators read -------------------------------------------------------------------------

    def view(self, model: str, deployment: str) -> LiveView:
        h = self.of(model, deployment)
        now = self._now()
        est = self._estimates_of(h, now)
        circuit = h.circuit_for_routing(now)
        return LiveView(
            circuit=circuit,
            ttft_p50=est.ttft_p50,
            ttft_p95=est.ttft_p95,
            tokens_per_s=est.tokens_per_s,
            error_rate=est.error_rate,
            rate_limit_rate=est.rate_limit_rate,
            cache_hit_rate=est.cache_hit_rate,
            mean_input_tokens=est.mean_input_tokens,
            mean_output_tokens=est.mean_output_tokens,
            samples=est.samples,
            circuit_reason="" if circuit == "closed" else h.circuit.reason,
            probe_in_flight=circuit != h.circuit_seen(now),
            circuit_changed_at=h.circuit.changed_at or None,
            last_attempt_window=est.last_window,
        )

    def admit(self, model: str, deployment: str) -> None:
        """A request is about to start on `deployment`, the head of its ranking (the runtime calls this). If the
        circuit is half-open here, that request is the probe: rankings see the circuit open until its outcome is
        reported, or `probe_seconds` pass (it never reached the deployment)."""
        h = self.of(model, deployment)
        now = self._now()
        if h.circuit_for_routing(now) == "half_open":
            h.probe_until = now + self.settings.probe_seconds

    def ttft_p95(self, model: str, deployment: str) -> float | None:
        """The deployment's live p95 time to first token (seconds), None until enough first tokens were seen."""
        return self._estimates_of(self.of(model, deployment), self._now()).ttft_p95

    def hedge_budget(self, model: str) -> HedgeBudget:
        budget = self._hedges.get(model)
        if budget is None:
            budget = self._hedges[model] = HedgeBudget()
        return budget

    # -- sharing through the store (the runtime runs `run()`) ----------------------------------------------------

    async def run(self) -> None:
        """Refresh every `refresh_seconds` until cancelled."""
        while True:  # ends by cancellation
            await asyncio.sleep(self.settings.refresh_seconds)
            try:
                await self.refresh()
            except Exception:  # a bad record must not stop the refreshes for the life of the process
                log.exception("health refresh crashed")

    async def refresh(self) -> None:
        """Once the counter cache's age has passed: read every instance's recent windows and the circuit records
        (two store requests, whatever the traffic). Every time: write this instance's circuit changes and claim
        probes that are due. In between, this instance's own attempts go straight into its windows. A store error
        leaves the last figures in place (logged); the next refresh tries again."""
        if self._store is None or self._reader is None:
            return
        now = self._now()
        entries = list(self._health.values())
        try:
            if now - self._read_at >= self._reader.max_age:
                await self._read_windows(entries, now)
                await self._read_circuits()
                self._read_at = now
            for h in entries:
                await self._settle_circuit(h, self._now())
        except StoreError as exc:
            log.warning("health refresh failed", extra={"error": str(exc)})
            return
        self.refreshed_at = now

    async def observe(self, deployments: Iterable[tuple[str, str]]) -> None:
        """For a process that routes nothing and runs no refresh loop (the admin function behind Mangum): read every
        instance's windows and circuit records for these (model, deployment) pairs now, and write nothing: no
        circuit change, no probe claim."""
        if self._store is None or self._reader is None:
            return
        now = self._now()
        entries = [self.of(model, deployment) for model, deployment in deployments]
        try:
            await self._read_windows(entries, now)
            await self._read_circuits()
        except StoreError as exc:
            log.warning("health read failed", extra={"error": str(exc)})
            return
        self._read_at = self.refreshed_at = now

    async def _read_windows(self, entries: list[DeploymentHealth], now: float) -> None:
        assert self._reader is not None
        width = self.settings.window_seconds
        current = window_start(now, width)
        starts = [current - i * width for i in range(self.settings.windows)]
        # A window nobody adds to any more (ended a flush interval and more ago) is read once and kept: a read asks
        # for the one or two windows per deployment that may still grow, not all of them.
        final_before = now - width - FINAL_AFTER_SECONDS
        wanted = {window_key(h.model, h.deployment, s): s for h in entries for s in starts}
        keys = [k for k in wanted if k not in self._final]
        for key in keys:
            self._reader.forget(key)  # all of them in one request, rather than each when its cache entry ages
        got = await self._reader.read(keys) if keys else {}
        for key in keys:
            if wanted[key] <= final_before:
                self._final[key] = got.get(key)
        self._final = {k: v for k, v in self._final.items() if k in wanted}
        for h in entries:
            windows: dict[float, dict[str, float]] = {}
            for s in starts:
                key = window_key(h.model, h.deployment, s)
                fields = self._final[key] if key in self._final else got.get(key)
                if fields:
                    windows[s] = dict(fields)
            h.windows = windows
            h.changes += 1

    async def _read_circuits(self) -> None:
        assert self._store is not None
        records = {r.name: r for r in await self._store.list_records(RECORD_KIND)}
        for h in self._health.values():
            if h.pending:
                continue  # this instance's own decision goes first; the write is a compare-and-set anyway
            record = records.get(record_name(h.model, h.deployment))
            if record is None:
                if h.circuit.version:
                    self._adopt(h, Circuit())  # removed or expired: closed
            elif record.version >= h.circuit.version:
                self._adopt(h, Circuit.from_record(record))

    async def _settle_circuit(self, h: DeploymentHealth, now: float) -> None:
        if not h.pending and h.circuit_seen(now) == "closed":
            self._open_on_failure_share(h, now)  # every instance's failures are in the windows now
        if h.pending:
            await self._put(h, h.circuit, now)
        elif h.circuit.claimable(now):
            claim = replace(h.circuit, state=PROBING, until=now + self.settings.probe_seconds, owner=self.instance,
                            changed_at=now)
            if await self._put(h, claim, now):
                log.info("circuit probe claimed", extra={"model": h.model, "deployment": h.deployment})

    async def _put(self, h: DeploymentHealth, circuit: Circuit, now: float, *, retry: bool = True) -> bool:
        """Write `circuit` over the version it was based on; True if written. Lost to another instance: adopt
        what it wrote, except that a success closes whatever changed meanwhile (tried once more)."""
        assert self._store is not None
        base = h.circuit
        name = record_name(h.model, h.deployment)
        try:
            version = await self._store.put_record(RECORD_KIND, name, circuit.data(),
                                                   expected_version=circuit.version,
                                                   expires_at=now + CIRCUIT_RECORD_SECONDS)
        except (Fenced, AlreadyExists):
            record = await self._store.get_record(RECORD_KIND, name)
            latest = Circuit() if record is None else Circuit.from_record(record)
            if retry and circuit.state == CLOSED and latest.state != CLOSED:
                return await self._put(h, replace(circuit, version=latest.version), now, retry=False)
            if h.circuit is base:
                self._adopt(h, latest)
                h.pending = False
            else:  # decided again meanwhile: keep that decision, written over the latest version next time
                h.circuit = replace(h.circuit, version=latest.version)
            return False
        if h.circuit is base:
            h.circuit, h.pending = replace(circuit, version=version), False
        else:
            h.circuit = replace(h.circuit, version=version)
        return True

    # -- internals -----------------------------------------------------------------------------------------------

    def _count(self, h: DeploymentHealth, now: float, fields: dict[str, float]) -> None:
        width = self.settings.window_seconds
        start = window_start(now, width)
        merge(h.windows.setdefault(start, {}), fields)
        oldest = start - (self.settings.windows - 1) * width
        for old in [s for s in h.windows if s < oldest]:
            del h.windows[old]
        h.changes += 1
        if self._counters is not None:
            self._counters.add(window_key(h.model, h.deployment, start), fields,
                               expires_at=start + (self.settings.windows + 1) * width)

    def _estimates_of(self, h: DeploymentHealth, now: float) -> Estimates:
        """Recomputed when the windows changed or a second passed (the decay moves on), else cached."""
        stamp = (h.changes, int(now))
        if h._stamp != stamp:
            h._estimates = combine(h.windows.items(), now=now, width=self.settings.window_seconds,
                                   half_life=self.settings.half_life_seconds)
            h._stamp = stamp
        return h._estimates

    def _open(self, h: DeploymentHealth, now: float, reason: str) -> None:
        self._change(h, Circuit(OPEN, until=now + self.settings.open_seconds, reason=reason, changed_at=now,
                                version=h.circuit.version))
        log.warning("circuit opened", extra={"model": h.model, "deployment": h.deployment, "reason": reason})

    def _open_on_failure_share(self, h: DeploymentHealth, now: float) -> None:
        """Open when the windows since the circuit last changed (every instance's, once read) hold enough
        failures that are a large enough share of the attempts."""
        since = h.circuit.changed_at
        recent = combine(((s, f) for s, f in h.windows.items() if s >= since), now=now,
                         width=self.settings.window_seconds, half_life=self.settings.half_life_seconds)
        if (recent.failures >= self.settings.min_failures
                and recent.failures >= self.settings.failure_share * recent.attempts):
            self._open(h, now, f"{recent.failures:g} of {recent.attempts:g} recent attempts failed")

    @staticmethod
    def _adopt(h: DeploymentHealth, circuit: Circuit) -> None:
        """Take another instance's circuit state. Closed there: this instance's run of failures is over too."""
        if circuit.state == CLOSED and h.circuit.state != CLOSED:
            h.consecutive_failures = 0
        h.circuit = circuit

    def _change(self, h: DeploymentHealth, circuit: Circuit) -> None:
        h.circuit = circuit
        h.pending = h.shared
