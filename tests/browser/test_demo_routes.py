"""The demo page's routes without a browser: the page and its scripts come from the package (the JS client's copy
equals clients/js), the debug route exists only with demo controls, is authenticated and tenant-bound, and a
producer it kills leaves its response to a reader's takeover (which completes it with the uncut text)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.test_responses_api import expected_text
from tests.support.client import TIMEOUT, headers, post_json
from tests.support.paths import REPO_ROOT
from tests.support.server import RouterThread, base_config, config_from, sim_model
from tests.support.sse import parse_sse
from unbroken.api.app import create_app
from unbroken.api.demo import SCRIPTS, static_text
from unbroken.journal.memory import MemoryStore

COPIES = {"client.js": "index.js", "sse.js": "sse.js"}


def _config(**server: Any) -> dict[str, Any]:
    return base_config(sim_model("demo", deployments=1, length=60, tps=40), lease_seconds=0.5, **server)


@pytest.fixture(scope="module")
def plain() -> Iterator[RouterThread]:
    with RouterThread(_config(), store=MemoryStore()) as server:
        yield server


@pytest.fixture(scope="module")
def controlled() -> Iterator[RouterThread]:
    config = config_from(_config())
    router = RouterThread(config)
    # RouterThread builds its app without demo controls: serve one with them, as `serve --demo-controls` does.
    router.app = create_app(config, MemoryStore(), demo_controls=True)
    router.server.config.app = router.app
    with router as server:
        yield server


def root_of(router: RouterThread) -> str:
    return router.base_url.removesuffix("/v1")


@pytest.mark.parametrize("name", sorted(COPIES))
def test_the_served_client_is_a_copy_of_clients_js(name: str) -> None:
    source = (REPO_ROOT / "clients" / "js" / COPIES[name]).read_text(encoding="utf-8")
    assert static_text(name) == source, f"api/static/{name} differs from clients/js/{COPIES[name]}: make demo-client"


def test_the_page_and_its_scripts_are_served_by_the_router(plain: RouterThread) -> None:
    with httpx.Client(timeout=TIMEOUT) as client:
        page = client.get(f"{root_of(plain)}/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "script-src 'self'" in page.headers["content-security-policy"]
        assert 'src="demo/demo.js"' in page.text and 'data-demo-controls="off"' in page.text
        assert "http://" not in page.text and "https://" not in page.text  # nothing from elsewhere
        for name in SCRIPTS:
            script = client.get(f"{root_of(plain)}/demo/{name}")
            assert script.status_code == 200, name
            assert script.headers["content-type"].startswith("text/javascript"), name
            assert script.text == static_text(name)
        missing = client.get(f"{root_of(plain)}/demo/index.js")
        assert missing.status_code == 404 and missing.json()["error"]["type"] == "invalid_request_error"
        # Without --demo-controls there is no kill route at all.
        kill = client.post(f"{root_of(plain)}/demo/responses/resp_x/kill-producer", headers=headers())
        assert kill.status_code == 404


def test_demo_controls_are_refused_inside_lambda() -> None:
    with pytest.raises(ValueError, match="never for Lambda"):
        create_app(config_from(_config()), None, demo_controls=True,
                   lambda_env={"AWS_LAMBDA_FUNCTION_NAME": "gateway"})


def test_the_kill_route_is_authenticated_and_tenant_bound(controlled: RouterThread) -> None:
    page = httpx.get(f"{root_of(controlled)}/", timeout=TIMEOUT)
    assert 'data-demo-controls="on"' in page.text
    created = post_json(controlled.base_url, "/responses", {"model": "demo", "input": "done already"})
    assert created.status_code == 200
    url = f"{root_of(controlled)}/demo/responses/{created.json()['id']}/kill-producer"
    with httpx.Client(timeout=TIMEOUT) as client:
        assert client.post(url).status_code == 401
        assert client.post(url, headers=headers("sk-other")).status_code == 404  # another tenant's response
        finished = client.post(url, headers=headers())
        assert finished.status_code == 409 and finished.json()["error"]["code"] == "no_local_producer"


def test_a_killed_producer_is_taken_over_by_its_reader(controlled: RouterThread,
                                                      caplog: pytest.LogCaptureFixture) -> None:
    prompt = "kill me softly"
    body = {"model": "demo", "input": prompt, "stream": True}
    killed: dict[str, Any] = {}
    with httpx.Client(timeout=TIMEOUT) as client, client.stream(
            "POST", f"{controlled.base_url}/responses", json=body, headers=headers()) as r:
        raw = b""
        for chunk in r.iter_bytes():
            raw += chunk
            if not killed and raw.count(b"response.output_text.delta") >= 10:
                first = json.loads(raw.split(b"\n\n", 1)[0].split(b"data: ", 1)[1])
                answer = client.post(f"{root_of(controlled)}/demo/responses/{first['response']['id']}"
                                     "/kill-producer", headers=headers())
                assert answer.status_code == 200, answer.text
                killed = answer.json()
        events = parse_sse(raw).events
    # The killed producer wrote no terminal event: only a takeover (by this stream's reader) can have finished it.
    assert killed["killed"] is True and killed["lease_seconds"] == 0.5
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    assert events[-1]["type"] == "response.completed"
    text = "".join(e["delta"] for e in events if e["type"] == "response.output_text.delta")
    assert text == expected_text(prompt, length=60)
    assert any(r.getMessage() == "taking over response" for r in caplog.records)

