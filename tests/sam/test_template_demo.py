"""The stack serves the demo page: `GET /` and `GET /demo/{proxy+}` reach the streaming gateway (API Gateway may
invoke it for them), every file the page loads falls under those routes and is served by the app under them, the
demo controls' POST route is not routed, and the stack outputs the page's URL."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.sam._template import api_integrations, resources_of_type, translated
from tests.support.client import TIMEOUT
from tests.support.server import RouterThread, base_config, sim_model
from unbroken.api.demo import SCRIPTS, static_text

DEMO_ROUTES = {("/", "get"), ("/demo/{proxy+}", "get")}


def _template_route(path: str) -> tuple[str, str] | None:
    """The template's GET route a request path falls under (exact, or a greedy `{proxy+}` prefix)."""
    for route, method in {(p, m) for p, m, _ in api_integrations(translated()) if m == "get"}:
        if route == path or (route.endswith("/{proxy+}") and path.startswith(route[: -len("{proxy+}")])
                             and len(path) > len(route) - len("{proxy+}")):
            return route, method
    return None


def _loaded_files() -> set[str]:
    """Every path (from the stage root) the page loads: its <script src> and each script's relative imports."""
    page = static_text("index.html")
    found = {src for src in re.findall(r'<script[^>]*\ssrc="([^"]+)"', page)}
    assert found, "the page loads no script?"
    files = set()
    pending = list(found)
    while pending:
        path = pending.pop()
        assert not path.startswith(("/", "http:", "https:")), f"{path}: the page's URLs must be relative"
        files.add("/" + path)
        directory = path.rsplit("/", 1)[0]
        for imported in re.findall(r'from\s+"\./([^"]+)"', static_text(path.rsplit("/", 1)[-1])):
            if f"{directory}/{imported}" not in files:
                pending.append(f"{directory}/{imported}")
    return files


def test_the_page_and_its_scripts_reach_the_streaming_gateway() -> None:
    routes = {(p, m) for p, m, _ in api_integrations(translated())}
    assert routes >= DEMO_ROUTES
    # Only GET: the demo controls (POST /demo/responses/{id}/kill-producer) never exist on Lambda.
    assert not {(p, m) for p, m in routes if p.startswith("/demo") and m != "get"}
    perms = resources_of_type(translated(), "AWS::Lambda::Permission")
    arns = {p["Properties"]["SourceArn"]["Fn::Sub"][0] for p in perms.values()
            if p["Properties"]["FunctionName"] == {"Ref": "GatewayFunction"}}
    assert any(arn.endswith("/GET/") for arn in arns), arns  # the stage root
    assert any(arn.endswith("/GET/demo/*") for arn in arns), arns


def test_every_file_the_page_loads_is_routed() -> None:
    files = _loaded_files()
    assert files == {f"/demo/{name}" for name in SCRIPTS}
    for path in {"/", *files}:
        assert _template_route(path) in DEMO_ROUTES, path


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    with RouterThread(base_config(sim_model("demo", deployments=1))) as server:
        yield server


def test_the_app_serves_what_the_routes_send_it(router: RouterThread) -> None:
    root = router.base_url.removesuffix("/v1")
    with httpx.Client(timeout=TIMEOUT) as http:
        for path in ("/", *sorted(_loaded_files())):
            r = http.get(root + path)
            assert r.status_code == 200, (path, r.status_code)
            kind = "text/html" if path == "/" else "text/javascript"
            assert r.headers["content-type"].startswith(kind), path
        assert http.get(root + "/demo/nothing.js").status_code == 404  # the greedy route reaches the app's 404


def test_the_stack_outputs_the_page_url() -> None:
    outputs: dict[str, Any] = translated()["Outputs"]
    url = outputs["DemoUrl"]["Value"]["Fn::Sub"]
    # The trailing slash: the page resolves "v1" and "demo/..." against its own URL.
    assert url == "https://${Api}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}/"
    assert outputs["ApiUrl"]["Value"]["Fn::Sub"] == url + "v1"
