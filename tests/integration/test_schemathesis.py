"""Property-based requests generated from the app's own OpenAPI (schemathesis, bounded examples, fixed seed)
against the real server: whatever the body, the router never answers 5xx and every error is the spec's error
object."""

from __future__ import annotations

import hypothesis
import schemathesis

from tests.support.server import API_KEY, RouterThread, base_config, sim_model

EXAMPLES_PER_OPERATION = 40


def test_no_server_errors_for_generated_requests() -> None:
    with RouterThread(base_config(sim_model("demo", length=8))) as router:
        schema = schemathesis.openapi.from_url(f"{router.base_url[:-3]}/openapi.json")
        operations = [result.ok() for result in schema.get_all_operations()]
        assert {op.path for op in operations} >= {"/v1/responses", "/v1/models"}
        seen: dict[int, int] = {}
        for operation in operations:

            @hypothesis.given(case=operation.as_strategy())
            @hypothesis.settings(max_examples=EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                                 database=None, suppress_health_check=list(hypothesis.HealthCheck))
            def check(case: schemathesis.Case) -> None:
                case.headers = {**(case.headers or {}), "Authorization": f"Bearer {API_KEY}"}
                response = case.call(timeout=30)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, f"{case.method} {case.path}: {response.text[:500]}"
                if response.status_code >= 400:
                    body = response.json()
                    assert set(body) == {"error"}, body
                    assert {"message", "type", "param", "code"} <= set(body["error"])

            check()
        assert sum(seen.values()) >= len(operations)
