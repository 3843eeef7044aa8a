"""Errors answered as an OpenAI-style JSON body before any stream starts, and the canned errors of the scripted
faults, worded and shaped as OpenAI words and shapes them."""

from __future__ import annotations

from collections.abc import Sequence

from unbroken.simulator.faults import Fault

CONTEXT_WINDOW = 128_000
MID_STREAM_ERROR_MESSAGE = "The server had an error while processing your request."


class ApiError(Exception):
    """An error answered as an OpenAI-style JSON body before any stream starts."""

    def __init__(
        self,
        status: int,
        message: str,
        type_: str = "invalid_request_error",
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Sequence[tuple[str, str]] = (),
    ) -> None:
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
        self.headers = list(headers)


def http_fault_error(fault: Fault, model: str) -> ApiError:
    status = fault.status or 500
    headers: list[tuple[str, str]] = []
    if status == 429 or fault.retry_after is not None:
        # OpenAI sends both; clients prefer the millisecond form.
        seconds = fault.retry_after or "0"
        headers = [("retry-after", seconds), ("retry-after-ms", str(round(float(seconds) * 1000)))]
    if status == 429:
        return ApiError(429, f"Rate limit reached for {model} (simulated). Please try again later.",
                        "rate_limit_exceeded", code="rate_limit_exceeded", headers=headers)
    if status == 401:
        return auth_error()
    if status == 403:
        return ApiError(403, "You are not allowed to use this model (simulated).", "permission_error",
                        headers=headers)
    if status == 404:
        return ApiError(404, f"The model `{model}` does not exist or you do not have access to it.",
                        code="model_not_found", headers=headers)
    if status == 503:
        return ApiError(503, "The server is overloaded or not ready yet.", "server_error", headers=headers)
    if status >= 500:
        return ApiError(status, "The server had an error while processing your request. Sorry about that!",
                        "server_error", headers=headers)
    return ApiError(status, f"Simulated HTTP {status}.", headers=headers)


def auth_error() -> ApiError:
    return ApiError(401, "Incorrect API key provided: sk-sim***. You can find your API key at "
                    "https://platform.openai.com/account/api-keys.", code="invalid_api_key")


def quota_error() -> ApiError:
    return ApiError(429, "You exceeded your current quota, please check your plan and billing details.",
                    "insufficient_quota", code="insufficient_quota")


def context_length_error(prompt_tokens: int) -> ApiError:
    used = CONTEXT_WINDOW + prompt_tokens
    return ApiError(400, f"This model's maximum context length is {CONTEXT_WINDOW} tokens. However, "
                    f"your messages resulted in {used} tokens. Please reduce the length of the messages.",
                    param="messages", code="context_length_exceeded")
