"""An in-process fake provider for unit tests of the attempt loop, in the spirit of httpx's `MockTransport`: no
sockets, no wire format, just a script.

Each deployment gets a `FakeProvider` with a list of attempts; each attempt is a list of steps played in order:

- an IR `Delta` is yielded as it is;
- `Fail(kind, ...)` raises `ProviderError(kind, ...)`;
- `Do(fn)` calls `fn()` (flip a cancel flag, move a deadline) and goes on;
- `HANG` waits until the consumer gives up on the stream (cancelled, or its own timeout);
- `Wait(event)` waits until the test (or another script's `Do`) sets the `asyncio.Event`: a first token that comes
  late, exactly when the test says, with no sleep;
- `WRITTEN` says the request is out (`request_written()`, as an HTTP adapter does once its request is written);
  an attempt without one says so as it starts;
- the end of the list ends the stream.

Every `GenerationRequest` an adapter is sent is recorded (`provider.requests`, and in order over all deployments in
`pool.calls`), so a test can assert what a continuation sent. `FakePool` is a `ProviderPool` that hands these out
instead of building real adapters.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from unbroken.config import Deployment
from unbroken.ir import Delta, Finish, GenerationRequest, TextDelta
from unbroken.providers.base import Capabilities, ErrorKind, Provider, ProviderError, request_written
from unbroken.routing.pool import ProviderPool


@dataclass(frozen=True, slots=True)
class Fail:
    """Raise `ProviderError(kind, message, retry_after=..., status=...)` at this point of the attempt."""

    kind: ErrorKind
    message: str = "scripted failure"
    retry_after: float | None = None
    status: int | None = None


@dataclass(frozen=True, slots=True)
class Do:
    """Run `fn()` at this point of the attempt (between two deltas), then go on."""

    fn: Callable[[], Any]


@dataclass(frozen=True, slots=True)
class Wait:
    """Wait here until `event` is set (or the consumer gives up on the stream), then go on."""

    event: asyncio.Event


class _Hang:
    def __repr__(self) -> str:
        return "HANG"


HANG = _Hang()


class _Written:
    def __repr__(self) -> str:
        return "WRITTEN"


WRITTEN = _Written()

Step = Delta | Fail | Do | Wait | _Hang | _Written


def text_attempt(*chunks: str, finish: str = "stop") -> list[Step]:
    """An attempt that streams `chunks` as text deltas and finishes."""
    return [*(TextDelta(c) for c in chunks), Finish(finish)]  # type: ignore[arg-type]


class UnexpectedAttempt(AssertionError):
    """The loop called a deployment more often than its script allows."""


class FakeProvider(Provider):
    name = "fake"

    def __init__(self, deployment: Deployment, attempts: Sequence[Sequence[Step]] = (), *,
                 capabilities: Capabilities | None = None) -> None:
        super().__init__(deployment, None)  # type: ignore[arg-type]
        self.script: list[list[Step]] = [list(a) for a in attempts]
        self._capabilities = capabilities or Capabilities()
        self.requests: list[GenerationRequest] = []
        self.closed_streams = 0
        self.pool: FakePool | None = None

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        # Recorded at call time, deep-copied: what was sent, not what it later became.
        sent = copy.deepcopy(request)
        self.requests.append(sent)
        if self.pool is not None:
            self.pool.calls.append((self.deployment.name, sent))
        if not self.script:
            raise UnexpectedAttempt(f"{self.deployment.name}: no scripted attempt left "
                                    f"(attempt {len(self.requests)})")
        return self._play(self.script.pop(0))

    async def _play(self, steps: list[Step]) -> AsyncIterator[Delta]:
        if WRITTEN not in steps:
            request_written()
        try:
            for step in steps:
                if step is WRITTEN:
                    request_written()
                    continue
                if isinstance(step, Fail):
                    raise ProviderError(step.kind, step.message, retry_after=step.retry_after, status=step.status)
                if isinstance(step, Do):
                    step.fn()
                elif isinstance(step, Wait):
                    await step.event.wait()
                elif isinstance(step, _Hang):
                    await asyncio.Event().wait()  # until the consumer cancels or times out
                else:
                    yield step
        finally:
            self.closed_streams += 1


class FakePool(ProviderPool):
    """A pool pre-filled with fakes, one per deployment name."""

    def __init__(self, *providers: FakeProvider) -> None:
        super().__init__(None)
        self.providers: dict[str, FakeProvider] = {}
        self.calls: list[tuple[str, GenerationRequest]] = []
        for provider in providers:
            self.add(provider)

    def add(self, provider: FakeProvider) -> FakeProvider:
        provider.pool = self
        self.providers[provider.deployment.name] = provider
        return provider

    def get(self, model: str, deployment: Deployment) -> Provider:
        return self.providers[deployment.name]

    @property
    def called(self) -> list[str]:
        """Deployment names in the order they were sent a request."""
        return [name for name, _ in self.calls]

    async def aclose(self) -> None:
        self.providers.clear()
