"""template.yaml's optional Cognito authorizer for browsers: with CognitoUserPoolArn set, every /v1 method but the
preflight is behind a COGNITO_USER_POOLS authorizer of that pool and the gateway gets auth.gateway_tenant_claim;
with it empty (the default) the API is what it was. The translated template is evaluated for each parameter value
as CloudFormation would (its Conditions and Fn::If), offline."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

from tests.sam._template import api_integrations, raw_template, translate, translated
from unbroken.app import config_overrides

POOL = "arn:aws:cognito-idp:eu-west-1:123456789012:userpool/eu-west-1_AbC123xyz"
NO_VALUE = {"Ref": "AWS::NoValue"}
# The method keys API Gateway's OpenAPI import knows.
METHOD_KEYS = {"get", "put", "post", "delete", "options", "head", "patch", "x-amazon-apigateway-any-method"}


def _condition(expr: Any, params: dict[str, Any], conditions: dict[str, Any]) -> bool:
    """A CloudFormation condition's value (the functions template.yaml's conditions use)."""
    if isinstance(expr, dict):
        ((fn, arg),) = expr.items()
        if fn == "Fn::Not":
            return not _condition(arg[0], params, conditions)
        if fn == "Fn::Equals":
            return bool(_value(arg[0], params, conditions) == _value(arg[1], params, conditions))
        if fn == "Fn::Or":
            return any(_condition(a, params, conditions) for a in arg)
        if fn == "Condition":
            return _condition(conditions[arg], params, conditions)
    raise AssertionError(f"condition not understood: {expr!r}")


def _value(expr: Any, params: dict[str, Any], conditions: dict[str, Any]) -> Any:
    if isinstance(expr, dict) and "Ref" in expr:
        return params[expr["Ref"]]
    if isinstance(expr, dict) and "Fn::Join" in expr:
        sep, items = expr["Fn::Join"]
        return sep.join(_value(items, params, conditions))
    return expr


def deployed(cfn: dict[str, Any], **overrides: Any) -> tuple[dict[str, Any], dict[str, Any]]:
    """(the translated template with every Fn::If resolved and AWS::NoValue removed, the parameter values) for
    these parameter overrides on top of the defaults."""
    params = {name: p.get("Default") for name, p in cfn["Parameters"].items()} | overrides
    truth = {name: _condition(expr, params, cfn["Conditions"]) for name, expr in cfn["Conditions"].items()}

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            if set(node) == {"Fn::If"}:
                cond, then, otherwise = node["Fn::If"]
                return walk(then if truth[cond] else otherwise)
            out = {k: walk(v) for k, v in node.items()}
            return {k: v for k, v in out.items() if v != NO_VALUE}
        if isinstance(node, list):
            return [walk(v) for v in node if walk(v) != NO_VALUE]
        return node

    return walk(copy.deepcopy(cfn)), params


def _body(cfn: dict[str, Any]) -> dict[str, Any]:
    (api,) = [r for r in cfn["Resources"].values() if r["Type"] == "AWS::ApiGateway::RestApi"]
    body: dict[str, Any] = api["Properties"]["Body"]
    return body


def _gateway_env(cfn: dict[str, Any]) -> dict[str, Any]:
    env: dict[str, Any] = cfn["Resources"]["GatewayFunction"]["Properties"]["Environment"]["Variables"]
    return env


def _secured(body: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {(path, method): op.get("security") for path, ops in body["paths"].items() for method, op in ops.items()}


def test_the_parameters_are_optional_and_validated() -> None:
    params = raw_template()["Parameters"]
    pool = params["CognitoUserPoolArn"]
    assert pool["Type"] == "String" and pool["Default"] == ""
    for good in ("", POOL, "arn:aws-us-gov:cognito-idp:us-gov-west-1:123456789012:userpool/us-gov-west-1_Ab1"):
        assert re.fullmatch(pool["AllowedPattern"], good), good
    for bad in ("eu-west-1_AbC123xyz", "arn:aws:cognito-idp:eu-west-1:123456789012:userpool/",
                "arn:aws:iam::123456789012:role/x"):
        assert not re.fullmatch(pool["AllowedPattern"], bad), bad
    claim = params["GatewayTenantClaim"]
    assert claim["Default"] == "sub"
    for good in ("sub", "custom:tenant", "cognito:groups", "email"):
        assert re.fullmatch(claim["AllowedPattern"], good), good
    assert not re.fullmatch(claim["AllowedPattern"], "")
    groups = raw_template()["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    grouped = {p for g in groups for p in g["Parameters"]}
    assert {"CognitoUserPoolArn", "GatewayTenantClaim"} <= grouped


def test_by_default_there_is_no_authorizer() -> None:
    cfn, _ = deployed(translated())
    body = _body(cfn)
    # The admin API's routes are IAM's whatever the parameters (tests/sam/test_template.py); no other has any.
    secured = {k: v for k, v in _secured(body).items() if not k[0].startswith("/admin/")}
    assert all(security is None for security in secured.values()), secured
    assert set(body.get("components", {}).get("securitySchemes", {})) == {"AWS_IAM"}
    assert "x-amazon-apigateway-gateway-responses" not in body
    assert "UNBROKEN_GATEWAY_TENANT_CLAIM" not in _gateway_env(cfn)
    assert "auth" not in config_overrides({k: str(v) for k, v in _gateway_env(cfn).items() if isinstance(v, str)})


def test_with_a_user_pool_every_v1_method_but_the_preflight_is_behind_the_authorizer() -> None:
    cfn, params = deployed(translated(), CognitoUserPoolArn=POOL)
    body = _body(cfn)
    secured = _secured(body)
    for method in ("get", "post", "delete"):
        assert secured[("/v1/{proxy+}", method)] == [{"CognitoUserPool": []}], method
    # A browser's preflight carries no token; the demo page and its scripts load before anyone signs in.
    for route in (("/v1/{proxy+}", "options"), ("/", "get"), ("/demo/{proxy+}", "get")):
        assert secured[route] is None, route
    scheme = body["components"]["securitySchemes"]["CognitoUserPool"]
    assert scheme["x-amazon-apigateway-authtype"] == "cognito_user_pools"
    assert (scheme["type"], scheme["in"], scheme["name"]) == ("apiKey", "header", "Authorization")
    authorizer = scheme["x-amazon-apigateway-authorizer"]
    assert authorizer["type"] == "cognito_user_pools"
    assert [_value(a, params, {}) for a in authorizer["providerARNs"]] == [POOL]
    # The authorizer did not change where the methods go: the same streaming integrations as without it.
    plain, _ = deployed(translated())
    assert api_integrations(cfn) == api_integrations(plain)


def test_with_a_user_pool_the_gateway_takes_the_tenant_from_the_verified_claims() -> None:
    for overrides, claim in (({}, "sub"), ({"GatewayTenantClaim": "custom:tenant"}, "custom:tenant")):
        cfn, params = deployed(translated(), CognitoUserPoolArn=POOL, **overrides)
        env = _gateway_env(cfn)
        value = _value(env["UNBROKEN_GATEWAY_TENANT_CLAIM"], params, {})
        assert value == claim
        # What the gateway makes of it (unbroken.app.config_overrides; tests/sam/test_gateway_claims.py serves it).
        assert config_overrides({"UNBROKEN_GATEWAY_TENANT_CLAIM": value}) == {"auth": {"gateway_tenant_claim": claim}}
        worker_env = cfn["Resources"]["WorkerFunction"]["Properties"]["Environment"]["Variables"]
        assert "UNBROKEN_GATEWAY_TENANT_CLAIM" not in worker_env  # the worker serves no HTTP request


def test_a_refused_token_gets_the_spec_error_object_readable_by_a_browser() -> None:
    cfn, _ = deployed(translated(), CognitoUserPoolArn=POOL)
    unauthorized = _body(cfn)["x-amazon-apigateway-gateway-responses"]["UNAUTHORIZED"]
    assert unauthorized["statusCode"] == "401"
    assert unauthorized["responseParameters"] == {"gatewayresponse.header.Access-Control-Allow-Origin": "'*'"}
    template = unauthorized["responseTemplates"]["application/json"]
    # API Gateway puts the message in as a JSON string literal.
    error = json.loads(template.replace("$context.error.messageString", json.dumps("Unauthorized")))
    assert error == {"error": {"type": "invalid_request_error", "code": "invalid_token", "message": "Unauthorized",
                               "param": None}}


def _method_keys(cfn: dict[str, Any]) -> set[str]:
    return {method for path, ops in _body(cfn)["paths"].items() for method in ops}


def test_every_method_key_is_one_api_gateway_knows() -> None:
    """The API merges event methods into its DefinitionBody (MergeDefinitions), where SAM keys an `ANY` event as
    "any", a method API Gateway's import does not know: such an event must fail here, not on AWS."""
    assert _method_keys(translated()) <= METHOD_KEYS
    tpl = copy.deepcopy(raw_template())
    tpl["Resources"]["GatewayFunction"]["Properties"]["Events"]["Anything"] = {"Type": "Api", "Properties": {
        "RestApiId": {"Ref": "Api"}, "Path": "/other/{proxy+}", "Method": "ANY",
        "ResponseTransferMode": "RESPONSE_STREAM", "TimeoutInMillis": 900000}}
    assert not _method_keys(translate(tpl)) <= METHOD_KEYS  # the trap is real, and this check sees it
