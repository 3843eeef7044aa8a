"""The FastAPI application: routes, the mapping of every failure onto the spec's error object, and the guard
(body limit, crashes). Built by an entry point (`unbroken serve`, the Lambda entry) from a config and a store."""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from unbroken.api import admin, chat, compact, demo, models, operator, responses
from unbroken.api.edge import Edge
from unbroken.api.errors import error_response
from unbroken.api.flush import FlushBeforeLastByte
from unbroken.api.guard import Guard
from unbroken.config import Config
from unbroken.durable.runtime import BackgroundLauncher, Runtime
from unbroken.errors import Failure, invalid
from unbroken.journal.store import Store
from unbroken.protocol.body import failure_from_validation

# Where a validation error's `loc` starts in FastAPI's errors (query and header parameters).
_LOC_SOURCES = ("body", "query", "header", "path", "cookie")


def create_app(config: Config, store: Store | None = None, *, launch_background: BackgroundLauncher | None = None,
               lambda_env: Mapping[str, str] | None = None, access_log: bool = False,
               demo_controls: bool = False) -> FastAPI:
    """`lambda_env` is the environment of a Lambda function behind the Web Adapter, which makes the adapter's
    context headers trusted (deadlines); None everywhere else. `access_log`: one log line per request.
    `demo_controls` adds the demo page's debug route (`unbroken serve --demo-controls` only: it is refused inside
    Lambda)."""
    if demo_controls and lambda_env:
        raise ValueError("demo controls are for a local `unbroken serve`, never for Lambda")
    runtime = Runtime(config=config, store=store, launch_background=launch_background)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        runtime.start()
        yield
        await runtime.aclose()

    app = FastAPI(title="unbroken", version="0.1.0", lifespan=lifespan,
                  description="Open Responses router whose streams do not break")
    app.state.runtime = runtime
    app.state.lambda_env = dict(lambda_env or {})
    app.state.jwt_verifier = None
    app.state.demo_controls = demo_controls
    if config.auth.jwt is not None:
        from unbroken.api.tokens import JwtVerifier  # PyJWT only when tokens are verified here

        app.state.jwt_verifier = JwtVerifier(config.auth.jwt)
    for module in (responses, compact, chat, models, demo, operator, admin):
        app.include_router(module.router)
    if demo_controls:
        app.include_router(demo.controls_router)

    @app.exception_handler(Failure)
    async def _failure(request: Request, exc: Failure) -> JSONResponse:
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [dict(e, loc=tuple(e.get("loc", ()))[1:] if tuple(e.get("loc", ()))[:1] and
                       e["loc"][0] in _LOC_SOURCES else tuple(e.get("loc", ()))) for e in exc.errors()]
        return error_response(failure_from_validation(errors))

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        if exc.status_code == 405:
            return error_response(invalid(f"Method {request.method} is not allowed on {request.url.path}.",
                                          code="method_not_allowed"), status=405)
        if exc.status_code == 404:
            return error_response(Failure("not_found", f"No route {request.method} {request.url.path}."))
        return error_response(invalid(str(exc.detail)), status=exc.status_code)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    app.add_middleware(Guard, max_body_bytes=config.server.max_body_bytes)
    if lambda_env and runtime.counters is not None:
        # Around the guard: whoever answered, the last byte waits for the counters to reach the store.
        app.add_middleware(FlushBeforeLastByte, counters=runtime.counters)
    # Outside the guard, so that its 413 and 500 answers carry the request id and CORS headers too.
    app.add_middleware(Edge, cors=config.server.cors, lambda_env=app.state.lambda_env, access_log=access_log)
    return app
