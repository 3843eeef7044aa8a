"""template.yaml's browser access: the CorsAllowOrigins parameter reaches the gateway as UNBROKEN_CORS_ALLOW_ORIGINS
(read by unbroken.app.config_overrides), and OPTIONS has a streaming method of its own that reaches the gateway."""

from __future__ import annotations

import re

from tests.sam._template import api_integrations, raw_template, translated
from unbroken.app import config_overrides


def test_cors_parameter_is_optional_and_validated() -> None:
    param = raw_template()["Parameters"]["CorsAllowOrigins"]
    assert param["Type"] == "String" and param["Default"] == ""
    pattern = param["AllowedPattern"]
    for good in ("", "*", "https://app.example.com", "https://app.example.com,http://localhost:5173"):
        assert re.fullmatch(pattern, good), good
    for bad in ("https://app.example.com/", "app.example.com", "https://a.example.com,"):
        assert not re.fullmatch(pattern, bad), bad
    groups = raw_template()["Metadata"]["AWS::CloudFormation::Interface"]["ParameterGroups"]
    assert any("CorsAllowOrigins" in g["Parameters"] for g in groups)


def test_cors_parameter_reaches_the_gateway_and_overrides_the_config() -> None:
    env = translated()["Resources"]["GatewayFunction"]["Properties"]["Environment"]["Variables"]
    assert env["UNBROKEN_CORS_ALLOW_ORIGINS"] == {"Ref": "CorsAllowOrigins"}
    assert config_overrides({"UNBROKEN_CORS_ALLOW_ORIGINS": "https://a.example.com,http://localhost:5173"}) == {
        "server": {"cors": {"allow_origins": ["https://a.example.com", "http://localhost:5173"]}}}
    assert config_overrides({"UNBROKEN_CORS_ALLOW_ORIGINS": ""}) == {}


def test_preflights_reach_the_gateway_through_their_own_streaming_method() -> None:
    routes = {(p, m): integ for p, m, integ in api_integrations(translated())}
    options = routes[("/v1/{proxy+}", "options")]
    assert options == routes[("/v1/{proxy+}", "post")]  # same streaming integration
    body = next(r for r in translated()["Resources"].values() if r["Type"] == "AWS::ApiGateway::RestApi")
    op = body["Properties"]["Body"]["paths"]["/v1/{proxy+}"]["options"]
    assert not op.get("security")  # no authorizer or API key in front of a preflight
