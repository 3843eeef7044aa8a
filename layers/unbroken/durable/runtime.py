"""Everything a running router shares across requests: configuration, store, provider pool, health board, the
background tasks it owns and how background responses are launched. One per process, built by the entry point."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import Any

from unbroken.config import Config, PolicyName, ServerSettings
from unbroken.durable import spend
from unbroken.durable.keys import Accounts
from unbroken.ir import GenerationRequest
from unbroken.journal.counters import CounterBatcher, CounterReader
from unbroken.journal.store import Store
from unbroken.protocol.responses import ResponseEmitter
from unbroken.resilience.attempts import Generation, GenerationOptions, Route, RunControl
from unbroken.routing.affinity import AffinityMemory, Predecessor
from unbroken.routing.health import HealthBoard
from unbroken.routing.policy import plan
from unbroken.routing.pool import ProviderPool
from unbroken.routing.profile import RequestProfile

log = logging.getLogger("unbroken")

# Starts a background response elsewhere (on AWS: an asynchronous invocation of the worker Lambda). Given the
# response id and the epoch to take over from; None means "produce it in this process".
BackgroundLauncher = Callable[[str, int], Awaitable[None]]


@dataclass
class Runtime:
    config: Config
    store: Store | None = None
    pool: ProviderPool = field(default_factory=ProviderPool)
    health: HealthBoard = field(default_factory=HealthBoard)
    launch_background: BackgroundLauncher | None = None
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    # Shared counters (spend, rate limits, routing stats): batched writes, cached reads. None without a store.
    counters: CounterBatcher | None = None
    counter_reader: CounterReader | None = None
    # Which deployment served each long prompt prefix lately (cache affinity), in this process.
    affinity: AffinityMemory = field(default_factory=AffinityMemory)
    # API keys and tenants in the store, through the per-process lookup cache. None without a store.
    accounts: Accounts | None = None

    def __post_init__(self) -> None:
        if self.store is not None and self.counters is None:
            self.counters = CounterBatcher(self.store)
            self.counter_reader = CounterReader(self.store, self.counters)
        if self.store is not None and self.accounts is None:
            auth = self.config.auth
            self.accounts = Accounts.over(self.store, max_age=auth.key_cache_seconds,
                                          max_entries=auth.key_cache_entries)
        self.health.configure(self.config.server.health,
                              [(m.name, d.name) for m in self.config.models for d in m.enabled_deployments])
        if self.counters is not None and self.counter_reader is not None and self.store is not None:
            self.health.share(self.store, self.counters, self.counter_reader)

    def start(self) -> None:
        """Start what runs beside the requests (on the running loop): the counter flusher and the refresh of the
        shared deployment health."""
        if self.counters is not None:
            self.spawn(self.counters.run(), "counter-flush")
        if self.health.shared:
            self.spawn(self.health.run(), "health-refresh")

    @property
    def settings(self) -> ServerSettings:
        return self.config.server

    def route(self, model_name: str, request: GenerationRequest, *, response_id: str = "",
              policy: PolicyName | None = None, predecessor: Predecessor | None = None) -> Route:
        """The model's deployments as its routing policy (or the request's `policy`) ranks them for this request
        now. A continuation's `predecessor` (from previous_response_id) wins over one remembered by prompt
        prefix."""
        model = self.config.model(model_name)
        if model is None:
            return Route(model_name, (), self.pool, self.health)
        profile = RequestProfile.of(request, cache_affinity=model.routing.cache_affinity)
        if predecessor is None and profile.prefix_key is not None:
            predecessor = self.affinity.recall(profile.prefix_key, profile.input_tokens)
        ranking = plan(model, self.health, profile, policy=policy, response_id=response_id, predecessor=predecessor)
        if ranking.candidates:
            # A half-open circuit: this request is the probe.
            self.health.admit(model_name, ranking.candidates[0].name)
        return Route(model_name, ranking.candidates, self.pool, self.health, ranking, self.affinity)

    def generation(self, request: GenerationRequest, model_name: str, emitter: ResponseEmitter,
                   options: GenerationOptions, control: RunControl, *, policy: PolicyName | None = None,
                   predecessor: Predecessor | None = None, account: spend.Account | None = None) -> Generation:
        """`account`: who the attempts are charged to (spend counters), once this owner has finished them."""
        if account is not None and self.counters is not None:
            options = replace(options, on_report=spend.reporter(self.counters, account, model_name))
        route = self.route(model_name, request, response_id=str(emitter.response.get("id", "")), policy=policy,
                           predecessor=predecessor)
        return Generation(request, route, emitter, self.settings, options, control)

    def spawn(self, coro: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A task the runtime keeps alive (a bare create_task can be garbage-collected mid-flight)."""
        task = asyncio.get_running_loop().create_task(coro, name=name)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def aclose(self) -> None:
        if self.counters is not None:
            await self.counters.flush()  # before the tasks stop: what this instance counted reaches the store
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        if self.accounts is not None:  # background record reads: done before their store closes
            try:
                await asyncio.wait_for(self.accounts.settle(), timeout=10)
            except TimeoutError:
                log.warning("background record reads still in flight at shutdown")
        await self.pool.aclose()
        if self.store is not None:
            await self.store.close()
