"""Offline SAM translation of template.yaml (aws-stack.md §5): no AWS call, no credentials."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / "template.yaml"


class _NoManagedPolicies:
    """The translator looks managed policy names up in IAM; the template names none it must resolve."""

    def load(self) -> dict[str, str]:
        return {}


@functools.cache
def raw_template() -> dict[str, Any]:
    from samtranslator.yaml_helper import yaml_parse

    return yaml_parse(TEMPLATE.read_text(encoding="utf-8"))


def translate(template: dict[str, Any] | None = None) -> dict[str, Any]:
    """The CloudFormation SAM would deploy. Local CodeUri/ContentUri become S3 URIs, as `sam package` makes them."""
    from samtranslator.translator.transform import transform

    tpl = copy.deepcopy(raw_template() if template is None else template)
    for res in tpl["Resources"].values():
        props = res.get("Properties", {})
        for key in ("CodeUri", "ContentUri"):
            if isinstance(props.get(key), str) and not props[key].startswith("s3://"):
                props[key] = "s3://unbroken-artifacts/" + props[key].strip("/").replace("/", "-") + ".zip"
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    return transform(tpl, {}, _NoManagedPolicies())


@functools.cache
def translated() -> dict[str, Any]:
    return translate()


def resources_of_type(cfn: dict[str, Any], type_: str) -> dict[str, dict[str, Any]]:
    return {k: v for k, v in cfn["Resources"].items() if v["Type"] == type_}


def api_integrations(cfn: dict[str, Any]) -> list[tuple[str, str, dict[str, Any]]]:
    """(path, method, x-amazon-apigateway-integration) for every operation of every REST API in the template."""
    out = []
    for api in resources_of_type(cfn, "AWS::ApiGateway::RestApi").values():
        for path, ops in api["Properties"]["Body"]["paths"].items():
            for method, op in ops.items():
                if isinstance(op, dict) and "x-amazon-apigateway-integration" in op:
                    out.append((path, method, op["x-amazon-apigateway-integration"]))
    return out
