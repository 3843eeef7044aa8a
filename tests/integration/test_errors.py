"""Every error is the spec's error object with the right status, never a traceback (real server, real upstream)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.support.client import post_json, post_stream
from tests.support.server import RouterThread, base_config, sim_model


@pytest.fixture(scope="module")
def router() -> Iterator[RouterThread]:
    config = base_config(sim_model("demo"), sim_model("flaky", deployments=2), max_body_bytes=4096)
    with RouterThread(config) as server:
        yield server


def assert_error(response: httpx.Response, status: int, *, param: str | None = None, code: str | None = None
                 ) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"}
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert isinstance(err["message"], str) and err["message"]
    assert "Traceback" not in response.text
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    return err


@pytest.mark.parametrize(("body", "param"), [
    ({"model": "demo", "input": 5}, "input"),
    ({"model": "demo", "input": [{"type": "message", "role": "wizard", "content": "x"}]}, "input[0].role"),
    ({"model": "demo", "input": "x", "temperature": 9}, "temperature"),
    ({"model": "demo", "input": "x", "max_output_tokens": 1}, "max_output_tokens"),
    ({"model": "demo", "input": "x", "tools": [{"type": "function"}]}, "tools[0].name"),
    ({"model": "demo", "input": "x", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"model": "demo", "input": "x", "text": {"format": {"type": "yaml"}}}, "text.format.type"),
    ({"input": "x"}, "model"),
    ({"model": "demo"}, "input"),
    ({"model": "demo", "input": [{"type": "input_image", "image_url": "ftp://x"}]}, "input[0]"),
    ({"model": "demo", "input": [{"role": "user", "content": [{"type": "input_image", "image_url": "ftp://x"}]}]},
     "input[0].content[0].image_url"),
])
def test_invalid_body_is_400_with_param(router: RouterThread, body: dict[str, Any], param: str) -> None:
    err = assert_error(post_json(router.base_url, "/responses", body), 400)
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error"


def test_malformed_json_is_400(router: RouterThread) -> None:
    assert_error(post_json(router.base_url, "/responses", None, content=b'{"model": "demo", '), 400, param="body")
    assert_error(post_json(router.base_url, "/responses", None, content=b'[1, 2]'), 400)


def test_unknown_model_is_404_model_not_found(router: RouterThread) -> None:
    assert_error(post_json(router.base_url, "/responses", {"model": "gpt-17", "input": "x"}), 404,
                 param="model", code="model_not_found")


@pytest.mark.parametrize("authorization", [None, "Bearer sk-wrong", "Basic c2stdGVzdA==", "Bearer sk-tes"])
def test_missing_or_wrong_key_is_401(router: RouterThread, authorization: str | None) -> None:
    extra = {"authorization": authorization} if authorization is not None else {}
    response = post_json(router.base_url, "/responses", {"model": "demo", "input": "x"}, key=None,
                         extra_headers=extra)
    assert_error(response, 401)


def test_body_over_the_limit_is_413(router: RouterThread) -> None:
    assert_error(post_json(router.base_url, "/responses", {"model": "demo", "input": "x" * 5000}), 413)


def test_chunked_body_over_the_limit_is_413(router: RouterThread) -> None:
    def chunks() -> Iterator[bytes]:
        yield b'{"model": "demo", "input": "'
        for _ in range(10):
            yield b"y" * 1000
        yield b'"}'

    with httpx.Client() as client:
        response = client.post(f"{router.base_url}/responses", content=chunks(),
                               headers={"authorization": "Bearer sk-test", "content-type": "application/json"})
    assert_error(response, 413)


def test_upstream_429_everywhere_is_passed_on_with_retry_after(router: RouterThread) -> None:
    body = {"model": "flaky", "input": "x", "metadata": {"sim_fault": "http:429:1", "sim_fault_attempts": "99"}}
    response = post_json(router.base_url, "/responses", body)
    assert_error(response, 429, code="rate_limit_exceeded")
    assert response.headers["retry-after"] == "1"
    streamed, _ = post_stream(router.base_url, body)
    assert_error(streamed, 429)


@pytest.mark.parametrize(("fault", "status"), [("http:503", 503), ("http:500", 502)])
def test_upstream_failure_everywhere_is_502_or_503(router: RouterThread, fault: str, status: int) -> None:
    body = {"model": "flaky", "input": "x", "metadata": {"sim_fault": fault, "sim_fault_attempts": "99"}}
    assert_error(post_json(router.base_url, "/responses", body), status)
    streamed, _ = post_stream(router.base_url, body)
    assert_error(streamed, status)


def test_unknown_route_and_method_are_error_objects(router: RouterThread) -> None:
    with httpx.Client() as client:
        assert_error(client.get(f"{router.base_url}/nothing-here"), 404)
        assert_error(client.put(f"{router.base_url}/models"), 405)
