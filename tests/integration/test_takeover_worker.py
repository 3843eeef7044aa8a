"""A streaming reader that finds a response whose producer died: with a worker launcher (AWS) it hands the takeover
to the worker Lambda (asynchronous: the generation is not bound to the reader's invocation) and follows the
journal; a launch that fails, or a worker that never claims the response, leaves the takeover to the reader's own
process; either way the reader gets the whole stream. Producer: a real `unbroken serve` killed with SIGKILL; reader:
a real server on the same SQLite journal; the "worker" is `worker.run_event`, the worker Lambda's own function, on
a runtime of its own."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
import yaml

from tests.integration.test_polling import message_text, on_loop, poll_until, polling_config, sdk
from tests.integration.test_responses_api import expected_text
from tests.support.client import TIMEOUT, headers
from tests.support.server import RouterProcess, RouterThread, config_from
from tests.support.sse import Stream, parse_sse
from unbroken import worker
from unbroken.api.app import create_app
from unbroken.durable import service
from unbroken.journal.backends import open_store
from unbroken.protocol.request import ResponsesRequest
from unbroken.simulator import SimulatedUpstream

LENGTH = 80
INPUTS = {"worker": "the worker finishes this", "failed": "the launch fails for this",
          "absent": "no worker ever claims this", "poll": "a poller's launch fails for this"}


@pytest.fixture(scope="module")
def sim() -> Iterator[Any]:
    with SimulatedUpstream.start_in_thread() as handle:
        yield handle


@pytest.fixture(scope="module")
def config(sim: Any) -> dict[str, Any]:
    return polling_config(sim.base_url, slow_length=LENGTH, tps=25)  # lease 1 s; ~3 s per answer


@pytest.fixture(scope="module")
def orphans(config: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, str]]:
    """Responses half-written by a producer that was then killed: (store URL, {case: response id})."""
    tmp = tmp_path_factory.mktemp("takeover_worker")
    path = tmp / "router.yaml"
    path.write_text(yaml.safe_dump(config))
    url = f"sqlite:///{tmp / 'journal.db'}"
    with RouterProcess(path, url) as producer:
        client = sdk(producer.base_url)
        ids = {case: client.responses.create(model="slow", input=text, background=True).id
               for case, text in INPUTS.items()}
        for rid in ids.values():
            poll_until(lambda rid=rid: client.responses.retrieve(rid).model_dump(mode="json"),  # type: ignore[misc]
                       lambda r: r["status"] == "in_progress" and len(message_text(r)) > 0)
        producer.kill()  # SIGKILL: the leases are no longer renewed, nobody generates these responses
    return url, ids


def _read(router: RouterThread, response_id: str) -> Stream:
    """A reader's whole stream from the start (GET ?stream=true)."""
    with httpx.Client(timeout=TIMEOUT) as http, http.stream(
            "GET", f"{router.base_url}/responses/{response_id}", params={"stream": "true"}, headers=headers()) as r:
        assert r.status_code == 200
        return parse_sse(r.read())


def _assert_whole(stream: Stream, case: str) -> None:
    assert [e["sequence_number"] for e in stream.events] == list(range(len(stream.events)))
    assert stream.terminal["type"] == "response.completed" and stream.done
    assert stream.text() == expected_text(INPUTS[case], length=LENGTH)
    assert message_text(stream.response) == stream.text()


async def _result(task: asyncio.Task[dict[str, Any]]) -> dict[str, Any]:
    return await asyncio.wait_for(task, 30)


def test_a_reader_hands_the_takeover_to_the_worker(config: dict[str, Any], orphans: tuple[str, dict[str, str]]
                                                    ) -> None:
    url, ids = orphans
    rid = ids["worker"]
    launched: list[tuple[str, int]] = []
    jobs: list[asyncio.Task[dict[str, Any]]] = []
    invoked: list[dict[str, Any]] = []
    with RouterThread(config, store=open_store(url)) as reader:
        # The worker Lambda: another runtime on the same journal, started by the async invoke and not awaited.
        worker_runtime = create_app(config_from(config), open_store(url)).state.runtime

        async def launch(response_id: str, epoch: int) -> None:
            launched.append((response_id, epoch))
            jobs.append(asyncio.get_running_loop().create_task(worker.run_event(
                worker_runtime, {"kind": "background", "response_id": response_id, "epoch": epoch},
                time.time() + 900, invoked.append)))

        reader.runtime.launch_background = launch
        stream = _read(reader, rid)
        assert launched == [(rid, 0)]
        # The worker produced the rest: had the reader taken it over itself, the worker's claim would be fenced.
        assert on_loop(reader, _result(jobs[0])) == {"status": "done", "response_id": rid} and invoked == []
        header = on_loop(reader, reader.runtime.store.get(rid))
        on_loop(reader, worker_runtime.aclose())
    assert header.owner_epoch == 1 and header.status == "completed"
    _assert_whole(stream, "worker")


def test_a_failed_worker_launch_falls_back_to_this_process(config: dict[str, Any], caplog: pytest.LogCaptureFixture,
                                                           orphans: tuple[str, dict[str, str]]) -> None:
    url, ids = orphans
    rid = ids["failed"]
    attempts: list[tuple[str, int]] = []

    async def launch(response_id: str, epoch: int) -> None:
        attempts.append((response_id, epoch))
        raise RuntimeError("TooManyRequestsException: Rate Exceeded")  # what a throttled Invoke raises

    with caplog.at_level(logging.ERROR, logger="unbroken.producer"), \
            RouterThread(config, store=open_store(url)) as reader:
        reader.runtime.launch_background = launch
        stream = _read(reader, rid)
        header = on_loop(reader, reader.runtime.store.get(rid))
    assert attempts == [(rid, 0)]
    assert header.owner_epoch == 1 and header.status == "completed"  # taken over once, by the reader's process
    _assert_whole(stream, "failed")
    failed = [r for r in caplog.records if r.getMessage().startswith("worker launch failed")]
    assert len(failed) == 1 and getattr(failed[0], "response_id", None) == rid


def test_a_worker_that_never_claims_leaves_the_takeover_to_the_reader(
        config: dict[str, Any], orphans: tuple[str, dict[str, str]]) -> None:
    """Queued or throttled for good: after one lease with the epoch unclaimed, the reader's process produces it
    (a worker starting later is fenced), rather than keep the reader waiting."""
    url, ids = orphans
    rid = ids["absent"]
    launched: list[tuple[str, int]] = []

    async def launch(response_id: str, epoch: int) -> None:
        launched.append((response_id, epoch))

    with RouterThread(config, store=open_store(url)) as reader:
        reader.runtime.launch_background = launch
        stream = _read(reader, rid)
        header = on_loop(reader, reader.runtime.store.get(rid))
    assert launched == [(rid, 0)]  # asked once, then taken over here
    assert header.owner_epoch == 1 and header.status == "completed"
    _assert_whole(stream, "absent")


def test_a_poll_whose_worker_launch_fails_takes_over_here(config: dict[str, Any],
                                                          orphans: tuple[str, dict[str, str]]) -> None:
    url, ids = orphans
    rid = ids["poll"]
    attempts: list[tuple[str, int]] = []

    async def launch(response_id: str, epoch: int) -> None:
        attempts.append((response_id, epoch))
        raise RuntimeError("TooManyRequestsException: Rate Exceeded")

    with RouterThread(config, store=open_store(url)) as reader:
        reader.runtime.launch_background = launch
        client = sdk(reader.base_url)
        polls = poll_until(lambda: client.responses.retrieve(rid).model_dump(mode="json"),
                           lambda r: r["status"] == "completed")
        header = on_loop(reader, reader.runtime.store.get(rid))
    assert attempts == [(rid, 0)]
    assert header.owner_epoch == 1
    assert message_text(polls[-1]) == expected_text(INPUTS["poll"], length=LENGTH)


async def test_a_failed_launch_of_a_new_background_response_still_produces_it(config: dict[str, Any]) -> None:
    """POST background=true whose worker launch fails: the client gets its id and the response is produced."""
    store = open_store("memory://")

    async def launch(response_id: str, epoch: int) -> None:
        raise RuntimeError("AccessDeniedException")

    runtime = create_app(config_from(config), store, launch_background=launch).state.runtime
    parsed = ResponsesRequest.parse({"model": "demo", "input": "produce me anyway", "background": True})
    created = await service.create_response(runtime, parsed, service.Caller("t1", time.time() + 600))
    assert isinstance(created, service.Journaled) and created.run is not None and created.run.task is not None
    await asyncio.wait_for(created.run.task, 30)
    header = await store.get(created.response_id)
    assert header is not None and header.status == "completed" and header.owner_epoch == 0
    events = await store.read_events(created.response_id)
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == expected_text("produce me anyway")
    await runtime.aclose()
