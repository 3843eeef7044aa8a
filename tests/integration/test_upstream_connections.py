"""The router keeps its upstream connections alive: requests one after another to one upstream, streamed or not,
journaled or not, go over one TCP connection (in production: no new TLS handshake before each first token), and a
kept connection the upstream closed costs no stream. A real router (uvicorn on 127.0.0.1) in front of upstreams that
count the connections they accept."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from tests.fakes.upstream import FakeUpstream, ReceivedRequest, Script, sse
from tests.support.client import post_json, post_stream
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.journal.sqlite import SQLiteStore
from unbroken.simulator import shared_upstream

BOUND = 10.0


def _connections(router: RouterThread) -> int:
    assert router.loop is not None
    sim = asyncio.run_coroutine_threadsafe(shared_upstream(), router.loop).result(BOUND)
    return sim.connections_accepted


@pytest.mark.parametrize("store", [True, False], ids=["journaled", "unjournaled"])
def test_requests_in_a_row_share_one_upstream_connection(tmp_path: Path, store: bool) -> None:
    with RouterThread(base_config(sim_model(deployments=1, length=8)), SQLiteStore(tmp_path / "r.db")) as router:
        for _ in range(3):
            response, stream = post_stream(router.base_url, {"model": "demo", "input": "hi", "store": store})
            assert response.status_code == 200 and stream.terminal["type"] == "response.completed"
        answer = post_json(router.base_url, "/responses", {"model": "demo", "input": "hi", "store": store})
        assert answer.status_code == 200 and answer.json()["status"] == "completed"
        assert _connections(router) == 1


def test_an_upstream_that_closes_its_kept_connection_still_answers_every_stream() -> None:
    """Kept connections can go stale: an upstream that closes each one after its answer (as a server's idle
    timeout does, with no `Connection: close` to warn) still answers every stream in full, on a new connection."""
    chunk = {"id": "c1", "object": "chat.completion.chunk", "model": "m",
             "choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]}
    frames = [sse(chunk), sse({**chunk, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}),
              sse("[DONE]")]

    def answer(_: ReceivedRequest) -> Script:
        return Script(200, {"content-type": "text/event-stream"}, frames, close_after=True)

    with FakeUpstream(answer) as fake:
        model = {"name": "demo", "deployments": [{"name": "up", "provider": "openai_compatible", "model": "m",
                                                  "base_url": fake.base_url}]}
        with RouterThread(base_config(model)) as router:
            for _ in range(3):
                response, stream = post_stream(router.base_url, {"model": "demo", "input": "hi", "store": False})
                assert response.status_code == 200 and stream.terminal["type"] == "response.completed"
                assert stream.output_text() == "Hi"
        assert fake.connections == len(fake.requests) == 3
