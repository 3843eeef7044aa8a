"""The demo page in a real browser (Debian's chromium driven by Playwright) against real `unbroken serve` processes:
an uncut answer, a connection the network cuts mid-stream (a TCP proxy between browser and router), a router
SIGKILLed mid-stream (a second router on the same SQLite store takes over behind the same proxy port), the page's
"drop my connection" and "kill the producer" buttons. Every time the page must end `completed` with the text of an
uncut run of the prompt — equal text, so no word is lost or repeated at a seam. Screenshots: tests/artifacts/."""

from __future__ import annotations

import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.browser.proxy import EventStreamCuttingProxy
from tests.integration.test_responses_api import expected_text
from tests.support.paths import REPO_ROOT
from tests.support.server import API_KEY, RouterProcess, base_config, sim_model

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO_ROOT / "tests" / "artifacts"
PROMPT = "Tell me a story"
LENGTH = 80  # words, at 40 a second: two seconds of streaming to cut into
STEP_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.timeout(240),
    pytest.mark.skipif(not CHROMIUM.exists(), reason="no /usr/bin/chromium (apt-get install chromium; .ci/run does)"),
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        # launch() starts from a fresh, temporary user-data dir every time.
        chromium = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture(scope="module")
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="unbroken-browser-"))
    config = base_config(sim_model("demo", deployments=2, length=LENGTH, tps=40), lease_seconds=1.0,
                         heartbeat_seconds=1.0)
    (path / "router.yaml").write_text(yaml.safe_dump(config))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def router(workdir: Path) -> Iterator[RouterProcess]:
    with RouterProcess(workdir / "router.yaml", f"sqlite:///{workdir / 'demo.db'}",
                       extra_args=["--demo-controls"]) as process:
        yield process


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(STEP_MS)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    yield page
    context.close()
    assert not errors, f"the page threw: {errors}"


def origin(base_url: str) -> str:
    return base_url.removesuffix("/v1")


def port_of(process: RouterProcess) -> int:
    return int(process.base_url.rsplit(":", 1)[1].split("/", 1)[0])


def open_page(page: Any, url: str) -> None:
    page.goto(f"{url}/")
    page.wait_for_selector("body[data-ready='true']")
    page.fill("#key", API_KEY)
    page.dispatch_event("#key", "change")
    page.wait_for_selector("#model option[value='demo']", state="attached")
    page.select_option("#model", "demo")
    page.select_option("#policy", "cheapest")
    page.fill("#prompt", PROMPT)


def start(page: Any) -> None:
    page.click("#send")
    page.wait_for_selector("body[data-state='streaming']")


def wait_for_words(page: Any, n: int) -> None:
    # Polled from here: the page's CSP (no eval) also holds for Playwright's string predicates.
    deadline = time.monotonic() + STEP_MS / 1000
    while len((page.text_content("#output") or "").split()) < n:
        assert time.monotonic() < deadline, f"fewer than {n} words in time"
        page.wait_for_timeout(50)


def finish(page: Any, name: str) -> str:
    """Wait for the end of the answer, screenshot the page, check what it shows and return the answer."""
    page.wait_for_selector("body:not([data-state='streaming'])", state="attached")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / f"demo-{name}.png"), full_page=True)
    state = page.get_attribute("body", "data-state")
    log = page.inner_text("#log")
    assert state == "completed", f"ended {state}: {log}"
    text: str = page.text_content("#output") or ""
    assert text == expected_text(PROMPT, length=LENGTH), log  # the uncut run's text: nothing lost, nothing repeated
    assert len(text.split()) == LENGTH
    assert page.text_content("#served-by") in ("sim-0", "sim-1")
    assert (page.text_content("#cost") or "").startswith("$")
    # The key lives in sessionStorage only: not in the URL, not in localStorage.
    assert API_KEY not in page.url
    assert page.evaluate("sessionStorage.getItem('unbroken.demo.apiKey')") == API_KEY
    assert page.evaluate("localStorage.length") == 0
    return text


def reconnects(page: Any) -> int:
    return int(page.text_content("#reconnects") or "0")


def test_an_uncut_answer(page: Any, router: RouterProcess) -> None:
    open_page(page, origin(router.base_url))
    assert page.is_visible("#kill")  # served with --demo-controls
    start(page)
    finish(page, "uncut")
    assert reconnects(page) == 0
    assert "response.completed" in page.inner_text("#log")


def test_a_connection_cut_mid_stream_is_resumed(page: Any, router: RouterProcess) -> None:
    with EventStreamCuttingProxy(port_of(router), cut_after=6000) as proxy:  # about a third of the stream
        open_page(page, origin(proxy.base_url))
        start(page)
        finish(page, "cut-connection")
        assert proxy.cuts == 1
    assert reconnects(page) >= 1
    resumed_after = re.search(r"connection lost .* resuming after event #(\d+)", page.inner_text("#log"))
    assert resumed_after is not None and int(resumed_after.group(1)) > 10  # cut mid-text, not before it


def test_a_killed_router_process_is_taken_over_by_another(page: Any, workdir: Path) -> None:
    config, store = workdir / "router.yaml", f"sqlite:///{workdir / 'shared.db'}"
    with RouterProcess(config, store) as first, RouterProcess(config, store) as second, \
            EventStreamCuttingProxy(port_of(first)) as proxy:
        open_page(page, origin(proxy.base_url))
        start(page)
        wait_for_words(page, 20)
        proxy.target_port = port_of(second)  # new connections (the page's resume) reach the second router
        first.kill()  # SIGKILL mid-stream: no terminal event, the lease is no longer renewed
        finish(page, "killed-process")
    assert reconnects(page) >= 1


def test_the_drop_my_connection_button(page: Any, router: RouterProcess) -> None:
    open_page(page, origin(router.base_url))
    start(page)
    wait_for_words(page, 15)
    page.click("#drop")
    finish(page, "dropped")
    assert reconnects(page) >= 1
    assert "dropping the connection" in page.inner_text("#log")


def test_the_kill_the_producer_button(page: Any, router: RouterProcess) -> None:
    open_page(page, origin(router.base_url))
    start(page)
    wait_for_words(page, 15)
    page.click("#kill")
    page.wait_for_selector("#log li:has-text('producer killed')")
    finish(page, "killed-producer")
