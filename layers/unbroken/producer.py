"""Running one response's generation into the journal, from any process.

`ResponseRun` owns a generation task: it feeds every event the attempt loop emits to a `JournalWriter` (group commit,
fenced by the owner epoch), so clients — followers of the journal, in this process or another — only ever see
committed events. The first outcome (output started, or nothing could be produced) is signalled separately, so the
POST handler can still answer a request that failed before any output with an HTTP error.

`take_over` rebuilds a response whose producer died (its lease expired) and continues it with a new epoch.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from unbroken.api.errors import APIError
from unbroken.journal.store import Fenced, ResponseHeader, StoreError
from unbroken.journal.writer import JournalWriter
from unbroken.protocol.responses import TERMINAL_EVENT_TYPES, ResponseEmitter, restore_emitter
from unbroken.resilience.engine import Generation, NoOutput

if TYPE_CHECKING:
    from unbroken.runtime import Runtime

log = logging.getLogger("unbroken.producer")



@dataclass
class RunOutcome:
    """What the POST handler waits for: output started (error None) or an HTTP error (nothing was produced)."""

    error: APIError | None = None


class ResponseRun:
    def __init__(self, runtime: Runtime, response_id: str, epoch: int, generation: Generation) -> None:
        self.runtime = runtime
        self.response_id = response_id
        self.epoch = epoch
        self.generation = generation
        self.first: asyncio.Future[RunOutcome] = asyncio.get_running_loop().create_future()
        self.task: asyncio.Task[None] | None = None
        self.store_error: BaseException | None = None
        self.last_committed = -1

    def start(self) -> ResponseRun:
        self.task = self.runtime.spawn(self._run(), name=f"produce {self.response_id}")
        return self

    def _signal(self, outcome: RunOutcome) -> None:
        if not self.first.done():
            self.first.set_result(outcome)

    def detach(self) -> None:
        """The client went away: finish into the journal, but within the detached cap."""
        cap = self.runtime.settings.detached_cap_seconds
        self.generation.deadline = min(self.generation.deadline, time.time() + cap)

    async def _run(self) -> None:
        settings = self.runtime.settings
        assert self.runtime.store is not None
        writer = JournalWriter(self.runtime.store, self.response_id, self.epoch,
                               batch_bytes=settings.journal_batch_bytes, batch_ms=settings.journal_batch_ms,
                               lease_seconds=settings.lease_seconds)
        self.generation.cancelled = lambda: writer.cancel_requested
        emitter = self.generation.emitter
        try:
            async for event in self.generation.run():
                self._signal(RunOutcome())
                if event["type"] in TERMINAL_EVENT_TYPES:
                    await writer.finish(event, status=emitter.response["status"], response=emitter.snapshot())
                    return
                await writer.emit(event)
                if event["type"] == "response.output_item.done":
                    await writer.boundary()
            await writer.flush()  # a handoff: the next owner continues from what is committed
        except NoOutput as exc:
            self._signal(RunOutcome(exc.error))
            failed = dict(emitter.response, status="failed", error={"code": exc.error.code or "upstream_error",
                                                                   "message": exc.error.message})
            try:
                await writer.set_status("failed", failed)
            except StoreError:
                pass
        except Fenced:
            log.warning("producer fenced: another process owns the response", extra={"response_id": self.response_id})
        except StoreError as exc:
            # Nothing that is not durable goes out: followers of this run end with an error event of their own.
            self.store_error = exc
            log.error("journal unavailable", extra={"response_id": self.response_id, "error": type(exc).__name__})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a crashed producer must still be visible to its followers
            self.store_error = exc
            log.exception("producer crashed", extra={"response_id": self.response_id})
        finally:
            self._signal(RunOutcome(APIError(500, "The router failed before producing any output.")))
            await writer.aclose()


def stored_request(body: dict[str, Any], input_items: list[dict[str, Any]]) -> dict[str, Any]:
    """What the journal keeps of a request: the body as validated, with `input` resolved to the full context
    (previous response included), enough to continue generation in another process."""
    return {**body, "input": input_items}


def request_input_items(raw_input: Any) -> list[dict[str, Any]]:
    if raw_input is None:
        return []
    if isinstance(raw_input, str):
        return [{"type": "message", "role": "user", "content": raw_input}]
    return list(raw_input)


def output_as_input(output: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A stored response's output items as input items of a follow-up request (`previous_response_id`)."""
    items = []
    for item in output:
        if item["type"] == "reasoning":
            items.append({k: v for k, v in item.items() if k in ("type", "id", "summary", "encrypted_content")})
        elif item["type"] in ("message", "function_call", "function_call_output"):
            items.append({k: v for k, v in item.items() if k != "status"})
    return items


def header_is_stale(header: ResponseHeader, now: float) -> bool:
    """A non-terminal response whose producer stopped renewing its lease: nobody is generating it."""
    return not header.terminal and header.lease_expires_at < now


async def take_over(runtime: Runtime, response_id: str, expected_epoch: int, *,
                    deadline: float | None = None, hand_off_at_deadline: bool = False) -> ResponseRun | None:
    """Become the producer of a response: bump the epoch (conditional), rebuild the partial output from the journal
    and continue it — a dead producer's response, a background response a worker starts, or a handoff from an
    invocation that ran out of time. None if another process got there first or it finished meanwhile."""
    from unbroken.api.compact import expand_compaction_for
    from unbroken.api.request import CreateResponseBody, generation_request, items_from_input, response_skeleton

    store = runtime.store
    assert store is not None
    now = time.time()
    try:
        epoch = await store.take_over(response_id, expected_epoch, now + runtime.settings.lease_seconds)
    except Fenced:
        return None
    header = await store.get(response_id)
    if header is None:
        return None
    events = await store.read_events(response_id, -1)
    settings = runtime.settings
    body = CreateResponseBody.model_validate(header.request)
    if events:
        emitter = restore_emitter(events, hold_tool_arguments=settings.hold_tool_arguments)
    else:  # nothing was produced yet (a queued background response): start it as its creator would have
        skeleton = response_skeleton(body, response_id, body.model or "")
        skeleton["created_at"] = int(header.created_at)
        emitter = ResponseEmitter(skeleton, hold_tool_arguments=settings.hold_tool_arguments)
    items = items_from_input(body.input, expand_compaction=expand_compaction_for(header.tenant, runtime))
    generation = runtime.generation(
        generation_request(body, items), body.model or "", emitter,
        deadline=deadline if deadline is not None else now + settings.stream_deadline_seconds,
        queued=header.background, header_hold_seconds=float("inf"),
        recovery_events=bool(header.request.get("_recovery_events")), hand_off_at_deadline=hand_off_at_deadline,
    )
    log.warning("taking over response", extra={"response_id": response_id, "epoch": epoch,
                                               "events": len(events)})
    return ResponseRun(runtime, response_id, epoch, generation).start()


def failure_events(last_seq: int, message: str) -> list[dict[str, Any]]:
    """Events that close a stream whose journal cannot be written: not durable, but never a cut body."""
    return [
        {"type": "error", "sequence_number": last_seq + 1,
         "error": {"type": "server_error", "code": "journal_unavailable", "message": message, "param": None}},
    ]


async def journal_events(runtime: Runtime, response_id: str, after: int, run: ResponseRun | None = None
                         ) -> AsyncIterator[dict[str, Any]]:
    """The response's committed events after `after`, live until the terminal one, from any process. When the
    producer's lease has expired (it was killed, or its invocation ended) this follower takes the response over."""
    from unbroken.journal.feed import LOCAL_FEEDS, follow

    store = runtime.store
    assert store is not None
    last = after
    while True:
        try:
            async for event in follow(store, response_id, last, max_wait=runtime.settings.lease_seconds):
                last = event["sequence_number"]
                yield event
                if event["type"] in TERMINAL_EVENT_TYPES:
                    return
            return
        except TimeoutError:
            pass
        if run is not None and run.store_error is not None:
            raise run.store_error
        header = await store.get(response_id, snapshots=False)
        if header is None or header.terminal:
            continue  # follow ends at once for a finished response (or raises NotFound)
        if header_is_stale(header, time.time()) and not LOCAL_FEEDS.has_writer(response_id):
            run = await take_over(runtime, response_id, header.owner_epoch) or run
