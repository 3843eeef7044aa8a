"""Everything a running router shares across requests: configuration, store, provider pool, health board and the
background tasks it owns. One per process; the FastAPI app keeps it in `app.state.runtime`."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from unbroken.config import Config, ServerSettings
from unbroken.routing.policy import HealthBoard
from unbroken.routing.pool import ProviderPool

if TYPE_CHECKING:
    from unbroken.ir import GenerationRequest
    from unbroken.journal.store import Store
    from unbroken.protocol.responses import ResponseEmitter
    from unbroken.resilience.engine import Generation

log = logging.getLogger("unbroken")


@dataclass
class Runtime:
    config: Config
    store: Store | None = None
    pool: ProviderPool = field(default_factory=ProviderPool)
    health: HealthBoard = field(default_factory=HealthBoard)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)

    @property
    def settings(self) -> ServerSettings:
        return self.config.server

    def generation(self, request: GenerationRequest, model_name: str, emitter: ResponseEmitter, *,
                   deadline: float, **options: Any) -> Generation:
        """A generation over the model's deployments as the routing policy ranks them now; `options` are
        `Generation`'s own (queued, header_hold_seconds, recovery_events, hand_off_at_deadline)."""
        from unbroken.resilience.engine import Generation

        model = self.config.model(model_name)
        return Generation(request=request, model_name=model_name,
                          candidates=self.health.rank(model) if model is not None else [], emitter=emitter,
                          pool=self.pool, health=self.health, settings=self.settings, deadline=deadline, **options)

    def spawn(self, coro: object, name: str) -> asyncio.Task[None]:
        """A task the runtime keeps alive (a bare create_task can be garbage-collected mid-flight)."""
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro, name=name)  # type: ignore[arg-type]
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def aclose(self) -> None:
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(self.tasks, timeout=10)
        await self.pool.aclose()
        if self.store is not None:
            await self.store.close()
