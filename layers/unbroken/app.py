"""The FastAPI application: routes, error handlers, body-size limit, and construction from a config or from the
environment (Lambda)."""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from unbroken.api.errors import APIError
from unbroken.config import Config
from unbroken.runtime import Runtime

log = logging.getLogger("unbroken")


def _error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def _validation_param(loc: tuple[Any, ...]) -> str:
    from unbroken.api.request import _param_path

    parts = loc[1:] if loc and loc[0] == "body" else loc
    return _param_path(tuple(parts))


def create_app(config: Config, store: Any = None) -> FastAPI:
    runtime = Runtime(config=config, store=store)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        yield
        await runtime.aclose()

    app = FastAPI(title="unbroken", version="0.1.0", lifespan=lifespan,
                  description="Open Responses router whose streams do not break")
    app.state.runtime = runtime

    from unbroken.api import chat, compact, models, responses

    app.include_router(responses.router)
    app.include_router(compact.router)
    app.include_router(chat.router)
    app.include_router(models.router)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        from unbroken.api.request import most_specific

        first = most_specific(errors) if errors else {"loc": ("body",), "msg": "invalid request", "type": ""}
        if first.get("type") == "json_invalid":
            return _error_response(APIError(400, "The request body is not valid JSON.", param="body"))
        param = _validation_param(tuple(first.get("loc", ())))
        if first.get("type") == "missing" and param == "body":
            return _error_response(APIError(400, "The request body must be a JSON object.", param="body"))
        msg = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
        return _error_response(APIError(400, f"Invalid value for '{param}': {msg}.", param=param))

    @app.exception_handler(404)
    async def _not_found(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(404, f"No route {request.method} {request.url.path}.", code="not_found"))

    @app.exception_handler(405)
    async def _not_allowed(request: Request, exc: Exception) -> JSONResponse:
        return _error_response(APIError(405, f"Method {request.method} is not allowed on {request.url.path}.",
                                        code="method_not_allowed", type_="invalid_request_error"))

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception) -> JSONResponse:
        # Never a traceback to the caller; the log has it (without the request body).
        log.error("unhandled error on %s %s: %s", request.method, request.url.path, type(exc).__name__,
                  exc_info=exc)
        return _error_response(APIError(500, "The router failed on this request.", code="server_error"))

    limit = config.server.max_body_bytes

    @app.middleware("http")
    async def _body_limit(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        length = request.headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > limit
            except ValueError:
                return _error_response(APIError(400, "Invalid Content-Length header.", param="content-length"))
            if too_big:
                return _error_response(APIError(413, f"The request body is larger than {limit} bytes."))
        elif request.method in ("POST", "PUT", "PATCH"):
            # Chunked upload: count while reading; the body is cached on the request for the route.
            size = 0
            chunks = []
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    return _error_response(APIError(413, f"The request body is larger than {limit} bytes."))
                chunks.append(chunk)
            request._body = b"".join(chunks)
        return await call_next(request)

    @app.get("/healthz", include_in_schema=False)
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app


def app_from_env() -> FastAPI:
    """The app as Lambda runs it: config from UNBROKEN_CONFIG (a file) or UNBROKEN_CONFIG_SSM (a parameter),
    provider secrets from UNBROKEN_SECRETS (Secrets Manager ARNs), store from UNBROKEN_STORE."""
    from unbroken.config import load_config, parse_config
    from unbroken.journal.store import open_store

    secrets = [a for a in os.environ.get("UNBROKEN_SECRETS", "").split(",") if a.strip()]
    if secrets:
        from unbroken.aws import load_secrets_into_env

        load_secrets_into_env(secrets)
    ssm_name = os.environ.get("UNBROKEN_CONFIG_SSM")
    if ssm_name:
        from unbroken.aws import read_config_text_from_ssm

        config = parse_config(read_config_text_from_ssm(ssm_name), f"ssm:{ssm_name}")
    else:
        config = load_config(os.environ.get("UNBROKEN_CONFIG", "router.yaml"))
    store_url = os.environ.get("UNBROKEN_STORE")
    return create_app(config, open_store(store_url) if store_url else None)


class _LazyApp:
    """ASGI app built on first use, so importing this module (and uvicorn's readiness) stays cheap."""

    def __init__(self) -> None:
        self._app: FastAPI | None = None

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if self._app is None:
            self._app = app_from_env()
        await self._app(scope, receive, send)


lambda_app = _LazyApp()
