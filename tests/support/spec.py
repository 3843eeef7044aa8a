"""The oracle: validate what the router emits against the Open Responses OpenAPI document (jsonschema, Draft
2020-12). Every streaming test runs its events through `validate_event`, every response through
`validate_response`."""

from __future__ import annotations

import json
from functools import cache
from typing import Any

from jsonschema import Draft202012Validator
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

from tests.support.paths import SPEC_PATH


@cache
def _spec() -> dict[str, Any]:
    return json.loads(SPEC_PATH.read_text())


@cache
def _registry() -> Registry:
    return Registry().with_resource("urn:openresponses", Resource(contents=_spec(), specification=DRAFT202012))


@cache
def validator(schema_name: str) -> Draft202012Validator:
    if schema_name not in _spec()["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name} in the spec")
    ref = {"$ref": f"urn:openresponses#/components/schemas/{schema_name}"}
    return Draft202012Validator(ref, registry=_registry())


@cache
def event_schemas() -> dict[str, str]:
    """event type -> schema name, read from the spec (24 standard events)."""
    out = {}
    for name, schema in _spec()["components"]["schemas"].items():
        if name.endswith("StreamingEvent"):
            for t in schema["properties"]["type"].get("enum", []):
                out[t] = name
    return out


def _check(schema_name: str, obj: Any) -> None:
    errors = sorted(validator(schema_name).iter_errors(obj), key=lambda e: list(e.absolute_path))
    if errors:
        details = "; ".join(f"{'/'.join(map(str, e.absolute_path)) or '(root)'}: {e.message[:300]}"
                            for e in errors[:5])
        raise AssertionError(f"{schema_name} invalid: {details}")


def validate_event(event: dict[str, Any], *, allow_extensions: bool = False) -> None:
    etype = event.get("type")
    if isinstance(etype, str) and etype.startswith("router:"):
        assert allow_extensions, f"extension event {etype} sent to a client that did not opt in"
        assert isinstance(event.get("sequence_number"), int), "extension events carry sequence_number"
        return
    schema = event_schemas().get(str(etype))
    assert schema is not None, f"unknown event type {etype!r}"
    _check(schema, event)


def validate_response(response: dict[str, Any]) -> None:
    _check("ResponseResource", response)
    required = _spec()["components"]["schemas"]["ResponseResource"]["required"]
    missing = [k for k in required if k not in response]
    assert not missing, f"response lacks required keys {missing}"


def validate_item(item: dict[str, Any]) -> None:
    """An item as the API lists it (`GET /v1/responses/{id}/input_items`): the spec's `ItemField`."""
    _check("ItemField", item)
