"""The demo page: `GET /` (one static HTML page) and the scripts it loads from `/demo/` — the JS client
(`client.js`, `sse.js`: copies of `clients/js/index.js` and `sse.js` made by `make demo-client`, so that they ship
inside the package and the Lambda layer) and the page's own `demo.js`. Nothing comes from elsewhere: no build step,
no CDN. The page itself calls the API like any client, with the key its user types.

`controls_router` is the "kill the producer" route, included only by `unbroken serve --demo-controls` (never on
Lambda, never by default): it stops a response's producer in this process as a crash would, so that the page's
reader takes the response over once the lease expires."""

from __future__ import annotations

from functools import cache
from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from unbroken.api.auth import authenticate
from unbroken.durable import service
from unbroken.durable.producer import crash_producer
from unbroken.durable.runtime import Runtime
from unbroken.errors import Failure

router = APIRouter(include_in_schema=False)
controls_router = APIRouter(include_in_schema=False)

SCRIPTS = ("client.js", "sse.js", "demo.js")
# The page sends the key only to its own origin and runs only its own scripts.
_PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; connect-src 'self'; style-src 'unsafe-inline'; "
                               "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'",
    "Referrer-Policy": "no-referrer",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "no-cache",
}
_CONTROLS_MARK = 'data-demo-controls="off"'


@cache
def static_text(name: str) -> str:
    """A file of `api/static/`, from the installed package (an editable install, a wheel or the Lambda layer)."""
    return (resources.files("unbroken.api") / "static" / name).read_text(encoding="utf-8")


@router.get("/")
async def demo_page(request: Request) -> Response:
    page = static_text("index.html")
    if request.app.state.demo_controls:
        page = page.replace(_CONTROLS_MARK, 'data-demo-controls="on"', 1)
    return Response(page, media_type="text/html; charset=utf-8", headers=_PAGE_HEADERS)


@router.get("/demo/{name}")
async def demo_script(name: str) -> Response:
    if name not in SCRIPTS:
        raise Failure("not_found", f"No route GET /demo/{name}.")
    return Response(static_text(name), media_type="text/javascript; charset=utf-8", headers=_PAGE_HEADERS)


@controls_router.post("/demo/responses/{response_id}/kill-producer")
async def kill_producer(request: Request, response_id: str,
                        tenant: Annotated[str, Depends(authenticate)]) -> Response:
    runtime: Runtime = request.app.state.runtime
    await service.owned_response(runtime, response_id, tenant)  # 404 unless the caller's tenant created it
    if not crash_producer(runtime, response_id):
        raise Failure("conflict", "No producer of this response runs in this process: it has finished, or another "
                      "process produces it.", code="no_local_producer")
    body: dict[str, Any] = {"id": response_id, "killed": True, "lease_seconds": runtime.settings.lease_seconds}
    return JSONResponse(body)
