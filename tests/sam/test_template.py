"""template.yaml as CloudFormation will see it: streaming integrations, the gateway's adapter set-up, the worker's
async config, the journal table, least-privilege IAM, outputs; and cfn-lint has nothing to say."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from tests.sam._template import ROOT, TEMPLATE, api_integrations, raw_template, resources_of_type, translate, translated

STREAM_URI_PART = "/2021-11-15/functions/${GatewayFunction.Arn}/response-streaming-invocations"


def _uri(integration: dict[str, Any]) -> str:
    uri = integration["uri"]
    return uri["Fn::Sub"] if isinstance(uri, dict) else uri


def _function(cfn: dict[str, Any], logical_id: str) -> dict[str, Any]:
    res = cfn["Resources"][logical_id]
    assert res["Type"] == "AWS::Lambda::Function"
    return res["Properties"]


def _env(cfn: dict[str, Any], logical_id: str) -> dict[str, Any]:
    return _function(cfn, logical_id)["Environment"]["Variables"]


def _layer_subs(layers: list[Any]) -> list[str]:
    """Every string a layer entry can resolve to (through Fn::If / Fn::Sub / Ref)."""
    out: list[str] = []

    def walk(node: Any) -> None:
        if isinstance(node, str):
            out.append(node)
        elif isinstance(node, dict):
            for v in node.values():
                walk(v)
        elif isinstance(node, list):
            for v in node:
                walk(v)

    walk(layers)
    return out


# --- API Gateway ------------------------------------------------------------------------------------------------


def test_every_api_integration_streams_from_the_gateway() -> None:
    """Every public route; the admin API (its own buffered, IAM-authorised function) is checked below."""
    integrations = [i for i in api_integrations(translated()) if not i[0].startswith("/admin/")]
    assert integrations, "no API Gateway integration found"
    for path, method, integ in integrations:
        assert integ["type"] == "aws_proxy", (path, method)
        assert integ.get("responseTransferMode") == "STREAM", (path, method, integ)
        assert _uri(integ).endswith(STREAM_URI_PART), (path, method, _uri(integ))
        assert integ["timeoutInMillis"] == 900000, (path, method)


def test_public_paths_all_reach_the_streaming_route() -> None:
    """Every method the app serves under /v1 is routed to a streaming integration (one greedy route per method);
    a route with a new method fails here until the template has an event for it."""
    from tests.support.server import base_config, config_from
    from unbroken.api.app import create_app

    routes = {(p, m) for p, m, _ in api_integrations(translated())}
    app = create_app(config_from(base_config()))
    served = {m for path, ops in app.openapi()["paths"].items() if path.startswith("/v1/") for m in ops}
    assert served == {"get", "post", "delete"}
    for method in served | {"options"}:
        assert ("/v1/{proxy+}", method) in routes, method


def test_the_stream_gotcha_is_caught() -> None:
    """`ResponseTransferMode: STREAM` (instead of RESPONSE_STREAM) translates without complaint into a buffered
    integration; the assertions above must notice."""
    tpl = copy.deepcopy(raw_template())
    for res in tpl["Resources"].values():
        for event in res.get("Properties", {}).get("Events", {}).values():
            if event["Type"] == "Api":
                event["Properties"]["ResponseTransferMode"] = "STREAM"
    integ = api_integrations(translate(tpl))
    assert integ and all("responseTransferMode" not in i for _, _, i in integ)
    assert all("/2015-03-31/" in _uri(i) for _, _, i in integ)


def test_api_is_regional_rest_with_a_single_stage() -> None:
    cfn = translated()
    (api,) = resources_of_type(cfn, "AWS::ApiGateway::RestApi").values()
    assert api["Properties"]["EndpointConfiguration"]["Types"] == ["REGIONAL"]
    stages = resources_of_type(cfn, "AWS::ApiGateway::Stage")
    assert len(stages) == 1  # OpenApiVersion 3 keeps SAM from adding its extra "Stage" stage
    (stage,) = stages.values()
    assert stage["Properties"]["StageName"] == {"Ref": "StageName"}
    assert raw_template()["Parameters"]["StageName"]["Default"] != "v1"  # avoid https://.../v1/v1/responses


def test_api_gateway_may_invoke_the_gateway() -> None:
    perms = resources_of_type(translated(), "AWS::Lambda::Permission")
    assert any(
        p["Properties"]["FunctionName"] == {"Ref": "GatewayFunction"}
        and p["Properties"]["Principal"] == "apigateway.amazonaws.com"
        and p["Properties"]["Action"] == "lambda:InvokeFunction"
        for p in perms.values()
    )


# --- functions --------------------------------------------------------------------------------------------------


def test_gateway_runs_uvicorn_behind_the_web_adapter_in_stream_mode() -> None:
    cfn = translated()
    fn = _function(cfn, "GatewayFunction")
    assert fn["Runtime"] == "python3.13"
    assert fn["Handler"] == "run.sh"
    assert fn["Timeout"] == 900
    assert fn["MemorySize"] == {"Ref": "MemorySize"}
    assert raw_template()["Parameters"]["MemorySize"]["Default"] == 512  # from the cost figures (README)
    assert raw_template()["Parameters"]["Architecture"]["Default"] == "arm64"
    env = _env(cfn, "GatewayFunction")
    assert env["AWS_LAMBDA_EXEC_WRAPPER"] == "/opt/bootstrap"
    assert env["AWS_LWA_INVOKE_MODE"] == "response_stream"
    assert env["AWS_LWA_PORT"] != "8080" and env["AWS_LWA_PORT"].isdigit()
    assert env["AWS_LWA_READINESS_CHECK_PATH"] == "/healthz"
    layers = _layer_subs(fn["Layers"])
    assert "arn:${AWS::Partition}:lambda:${AWS::Region}:753240598075:layer:LambdaAdapterLayerX86:26" in layers
    assert "arn:${AWS::Partition}:lambda:${AWS::Region}:753240598075:layer:LambdaAdapterLayerArm64:26" in layers
    assert fn["Architectures"] == [{"Ref": "Architecture"}]
    assert raw_template()["Parameters"]["Architecture"]["AllowedValues"] == ["x86_64", "arm64"]


def test_both_functions_get_the_router_environment_and_the_unbroken_layer() -> None:
    cfn = translated()
    layer_ids = set(resources_of_type(cfn, "AWS::Lambda::LayerVersion"))
    assert len(layer_ids) == 2  # one per architecture, each built for its own target
    for logical_id in ("GatewayFunction", "WorkerFunction"):
        env = _env(cfn, logical_id)
        for name in (
            "UNBROKEN_STORE",
            "UNBROKEN_CONFIG",
            "UNBROKEN_CONFIG_SSM",
            "UNBROKEN_SECRETS",
            "UNBROKEN_WORKER_FUNCTION",
            "UNBROKEN_RETENTION_HOURS",
            "UNBROKEN_LOG_LEVEL",
        ):
            assert name in env, (logical_id, name)
        assert env["UNBROKEN_STORE"] == {"Fn::Sub": "dynamodb://${JournalTable}?region=${AWS::Region}"}
        assert env["UNBROKEN_WORKER_FUNCTION"] == {"Fn::Sub": "${AWS::StackName}-worker"}
        refs = {s for s in _layer_subs(_function(cfn, logical_id)["Layers"]) if s in layer_ids}
        assert refs == layer_ids, logical_id
        fn = _function(cfn, logical_id)
        assert fn["Runtime"] == "python3.13" and fn["Timeout"] == 900


def test_layers_are_built_from_layers_dir_for_python313() -> None:
    raw = raw_template()["Resources"]
    arches = set()
    for logical_id in ("UnbrokenLayerX86", "UnbrokenLayerArm64"):
        res = raw[logical_id]
        assert res["Type"] == "AWS::Serverless::LayerVersion"
        assert res["Properties"]["ContentUri"] == "layers/"
        assert res["Properties"]["CompatibleRuntimes"] == ["python3.13"]
        assert res["Metadata"]["BuildMethod"] == "python3.13"
        assert res["Properties"]["CompatibleArchitectures"] == [res["Metadata"]["BuildArchitecture"]]
        arches.add(res["Metadata"]["BuildArchitecture"])
    assert arches == {"x86_64", "arm64"}
    reqs = (ROOT / "layers" / "requirements.txt").read_text(encoding="utf-8").lower()
    names = {line.split("#")[0].strip().split(">")[0].split("=")[0].split("<")[0] for line in reqs.splitlines()}
    names.discard("")
    needed = {"fastapi", "uvicorn", "httpx", "httpx-sse", "pydantic", "pyyaml", "mangum", "aws-lambda-powertools"}
    assert names >= needed
    assert "boto3" not in names and "botocore" not in names


def test_worker_is_async_without_lambda_retries() -> None:
    cfn = translated()
    fn = _function(cfn, "WorkerFunction")
    assert fn["Handler"] == "handler.handler"
    assert fn["FunctionName"] == {"Fn::Sub": "${AWS::StackName}-worker"}
    (cfg,) = resources_of_type(cfn, "AWS::Lambda::EventInvokeConfig").values()
    props = cfg["Properties"]
    assert props["FunctionName"] == {"Ref": "WorkerFunction"}
    assert props["MaximumRetryAttempts"] == 0
    assert 60 <= props["MaximumEventAgeInSeconds"] <= 21600


def _admin_operations(cfn: dict[str, Any]) -> dict[str, dict[str, Any]]:
    (api,) = resources_of_type(cfn, "AWS::ApiGateway::RestApi").values()
    operations: dict[str, dict[str, Any]] = api["Properties"]["Body"]["paths"]["/admin/{proxy+}"]
    return operations


def test_the_admin_api_is_a_buffered_function_behind_an_iam_authorised_route() -> None:
    cfn = translated()
    functions = resources_of_type(cfn, "AWS::Lambda::Function")
    assert set(functions) == {"GatewayFunction", "WorkerFunction", "AdminFunction"}
    fn = _function(cfn, "AdminFunction")
    assert fn["Handler"] == "handler.handler" and fn["Runtime"] == "python3.13"
    assert "AWS_LAMBDA_EXEC_WRAPPER" not in fn["Environment"]["Variables"]  # Mangum, not the Web Adapter
    assert fn["Environment"]["Variables"]["UNBROKEN_SECRETS"] == ""  # no provider keys loaded
    operations = _admin_operations(cfn)
    assert set(operations) == {"get", "post", "patch"}  # every method the admin API serves
    (api,) = resources_of_type(cfn, "AWS::ApiGateway::RestApi").values()
    # The scheme the routes name is defined (SigV4), whatever the Cognito parameter makes of the rest.
    scheme = api["Properties"]["Body"]["components"]["securitySchemes"]["AWS_IAM"]
    assert scheme == {"type": "apiKey", "name": "Authorization", "in": "header",
                      "x-amazon-apigateway-authtype": "awsSigv4"}
    for operation in operations.values():
        # IAM-authorised: API Gateway verifies the SigV4 signature (execute-api:Invoke) before the function runs.
        assert operation["security"] == [{"AWS_IAM": []}]
        # Buffered, not a streaming route, invoked under the function's resource policy (not caller credentials).
        integ = operation["x-amazon-apigateway-integration"]
        assert integ["type"] == "aws_proxy" and "responseTransferMode" not in integ and "credentials" not in integ
        assert _uri(integ).endswith("/2015-03-31/functions/${AdminFunction.Arn}/invocations")
    # No other route reaches the admin function, and the admin route reaches nothing else.
    for path, _, other in api_integrations(cfn):
        assert ("AdminFunction" in _uri(other)) == path.startswith("/admin/"), path
    perms = [p["Properties"] for p in resources_of_type(cfn, "AWS::Lambda::Permission").values()
             if p["Properties"]["FunctionName"] == {"Ref": "AdminFunction"}]
    assert perms and all(p["Principal"] == "apigateway.amazonaws.com" for p in perms)
    assert "/admin/v1" in translated()["Outputs"]["AdminUrl"]["Value"]["Fn::Sub"]


def test_the_admin_function_has_only_the_table_access_it_needs() -> None:
    cfn = translated()
    role = cfn["Resources"]["AdminFunctionRole"]["Properties"]
    assert role["ManagedPolicyArns"] == ["arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
                                         {"Ref": "AdminAccessPolicy"}]
    assert not role.get("Policies")
    statements = cfn["Resources"]["AdminAccessPolicy"]["Properties"]["PolicyDocument"]["Statement"]
    plain = [st for st in statements if "Fn::If" not in st]
    conditional = [st["Fn::If"] for st in statements if "Fn::If" in st]
    (table,) = plain
    # Records: GetItem, Query (list), UpdateItem (compare-and-set puts); counters: BatchGetItem. Nothing else.
    assert sorted(table["Action"]) == ["dynamodb:BatchGetItem", "dynamodb:GetItem", "dynamodb:Query",
                                       "dynamodb:UpdateItem"]
    assert table["Resource"] == {"Fn::GetAtt": ["JournalTable", "Arn"]}
    ((cond, config, otherwise),) = conditional
    assert cond == "HasConfigParameter" and otherwise == {"Ref": "AWS::NoValue"}
    assert config["Action"] == "ssm:GetParameter"
    # What the store calls for the admin API's reads and writes is within those actions.
    import inspect

    from unbroken.journal.dynamodb import DynamoDBStore

    used = set()
    for name in ("get_record", "put_record", "list_records", "get_counters"):
        source = inspect.getsource(getattr(DynamoDBStore, name))
        used |= {op for op in ("GetItem", "BatchGetItem", "UpdateItem", "PutItem", "DeleteItem", "_query", "Scan")
                 if f'"{op}"' in source or f"self.{op}(" in source}
    assert used == {"GetItem", "BatchGetItem", "UpdateItem", "_query"}


# --- data and IAM -----------------------------------------------------------------------------------------------


def test_journal_table_keys_billing_and_ttl() -> None:
    (table,) = resources_of_type(translated(), "AWS::DynamoDB::Table").values()
    props = table["Properties"]
    assert props["BillingMode"] == "PAY_PER_REQUEST"
    attrs = {(a["AttributeName"], a["AttributeType"]) for a in props["AttributeDefinitions"]}
    assert attrs == {("pk", "S"), ("sk", "N")}
    assert {(k["AttributeName"], k["KeyType"]) for k in props["KeySchema"]} == {("pk", "HASH"), ("sk", "RANGE")}
    assert props["TimeToLiveSpecification"] == {"AttributeName": "expires_at", "Enabled": True}
    pitr = props["PointInTimeRecoverySpecification"]["PointInTimeRecoveryEnabled"]
    assert pitr == {"Fn::If": ["PitrOn", True, False]}


def _statements(cfn: dict[str, Any]) -> dict[str, Any]:
    policy = cfn["Resources"]["RouterAccessPolicy"]
    out = {}
    for st in policy["Properties"]["PolicyDocument"]["Statement"]:
        if "Fn::If" in st:
            cond, then, otherwise = st["Fn::If"]
            assert otherwise == {"Ref": "AWS::NoValue"}
            out[then["Sid"]] = (cond, then)
        else:
            out[st["Sid"]] = (None, st)
    return out


def test_iam_is_least_privilege() -> None:
    cfn = translated()
    sts = _statements(cfn)
    assert set(sts) == {"Journal", "Worker", "ProviderSecrets", "RouterConfig", "BedrockModels"}

    _, journal = sts["Journal"]
    assert "dynamodb:Scan" not in journal["Action"] and not any("*" in a for a in journal["Action"])
    assert journal["Resource"][0] == {"Fn::GetAtt": ["JournalTable", "Arn"]}

    _, worker = sts["Worker"]
    assert worker["Action"] == "lambda:InvokeFunction"
    assert worker["Resource"]["Fn::Sub"].endswith(":function:${AWS::StackName}-worker")

    cond, secrets = sts["ProviderSecrets"]
    assert cond == "HasSecrets"
    assert secrets["Action"] == "secretsmanager:GetSecretValue"
    assert secrets["Resource"] == {"Ref": "ProviderSecretArns"}

    cond, ssm = sts["RouterConfig"]
    assert cond == "HasConfigParameter"
    assert ssm["Action"] == "ssm:GetParameter"
    assert ssm["Resource"]["Fn::Sub"].endswith(":parameter${ConfigParameterName}")

    # Bedrock: only the streaming action ConverseStream is authorised by, only on the models the stack was given,
    # and nothing at all by default.
    cond, bedrock = sts["BedrockModels"]
    assert cond == "HasBedrock"
    assert bedrock["Action"] == "bedrock:InvokeModelWithResponseStream"
    assert bedrock["Resource"] == {"Ref": "BedrockModelArns"}
    params = raw_template()["Parameters"]
    assert params["BedrockModelArns"]["Type"] == "CommaDelimitedList" and params["BedrockModelArns"]["Default"] == ""
    assert raw_template()["Conditions"]["HasBedrock"] == {"Fn::Not": [{"Fn::Equals": [
        {"Fn::Join": ["", {"Ref": "BedrockModelArns"}]}, ""]}]}

    # Both roles carry exactly this policy plus basic logging, nothing broader.
    for role_id in ("GatewayFunctionRole", "WorkerFunctionRole"):
        role = cfn["Resources"][role_id]["Properties"]
        assert role["ManagedPolicyArns"] == [
            "arn:aws:iam::aws:policy/service-role/AWSLambdaBasicExecutionRole",
            {"Ref": "RouterAccessPolicy"},
        ]
        assert not role.get("Policies")


def test_empty_lists_and_optional_settings_have_conditions() -> None:
    conditions = raw_template()["Conditions"]
    for name in ("HasSecrets", "HasConfigParameter", "HasConfigPath", "IsArm64", "PitrOn"):
        assert name in conditions
    params = raw_template()["Parameters"]
    assert params["ProviderSecretArns"]["Type"] == "CommaDelimitedList"
    assert params["ProviderSecretArns"]["Default"] == ""
    for name in ("ConfigParameterName", "ConfigPath", "RetentionHours", "Architecture", "MemorySize", "LogLevel"):
        assert name in params


def test_reserved_concurrency_is_a_parameter_unset_by_default() -> None:
    params, conditions = raw_template()["Parameters"], raw_template()["Conditions"]
    cfn = translated()
    for function, param, cond in (("GatewayFunction", "GatewayReservedConcurrency", "GatewayReserved"),
                                  ("WorkerFunction", "WorkerReservedConcurrency", "WorkerReserved")):
        assert params[param]["Type"] == "Number" and params[param]["Default"] == -1
        assert conditions[cond] == {"Fn::Not": [{"Fn::Equals": [{"Ref": param}, -1]}]}
        assert _function(cfn, function)["ReservedConcurrentExecutions"] == {
            "Fn::If": [cond, {"Ref": param}, {"Ref": "AWS::NoValue"}]}


def test_alarms_cover_errors_throttles_and_the_timeout_for_both_functions() -> None:
    from unbroken.api.identity import DEFAULT_SAFETY_MARGIN_SECONDS
    from unbroken.worker import HANDOFF_MARGIN_SECONDS

    cfn = translated()
    timeout_ms = _function(cfn, "GatewayFunction")["Timeout"] * 1000
    alarms = resources_of_type(cfn, "AWS::CloudWatch::Alarm")
    seen = set()
    for alarm in alarms.values():
        assert alarm["Condition"] == "HasAlarms"
        props = alarm["Properties"]
        assert props["Namespace"] == "AWS/Lambda" and props["TreatMissingData"] == "notBreaching"
        assert props["AlarmActions"] == [{"Ref": "AlarmTopicArn"}]
        (dim,) = props["Dimensions"]
        assert dim["Name"] == "FunctionName"
        function = dim["Value"]["Ref"]
        seen.add((function, props["MetricName"]))
        if props["MetricName"] == "Duration":
            # Past the point where the router has ended the stream (gateway) or handed on (worker), short of the
            # timeout: a healthy invocation never raises it, one that ran into the timeout does.
            margin = DEFAULT_SAFETY_MARGIN_SECONDS if function == "GatewayFunction" else HANDOFF_MARGIN_SECONDS
            assert props["Statistic"] == "Maximum"
            assert timeout_ms - margin * 1000 < props["Threshold"] < timeout_ms, props
        elif props["MetricName"] == "Errors":
            assert props["Threshold"] == {"Ref": "AlarmErrorThreshold"}
    assert seen == {(f, m) for f in ("GatewayFunction", "WorkerFunction") for m in ("Errors", "Throttles", "Duration")}
    assert raw_template()["Parameters"]["AlarmTopicArn"]["Default"] == ""
    assert raw_template()["Conditions"]["HasAlarms"] == {"Fn::Not": [{"Fn::Equals": [{"Ref": "AlarmTopicArn"}, ""]}]}


def test_outputs() -> None:
    outputs = translated()["Outputs"]
    assert outputs["ApiUrl"]["Value"] == {
        "Fn::Sub": "https://${Api}.execute-api.${AWS::Region}.${AWS::URLSuffix}/${StageName}/v1"
    }
    assert outputs["TableName"]["Value"] == {"Ref": "JournalTable"}
    assert outputs["WorkerFunctionName"]["Value"] == {"Ref": "WorkerFunction"}


# --- lint -------------------------------------------------------------------------------------------------------


def _cfn_lint() -> list[str]:
    sibling = Path(sys.executable).with_name("cfn-lint")
    exe = str(sibling) if sibling.exists() else shutil.which("cfn-lint")
    if exe is None:
        pytest.fail("cfn-lint is not installed (it is a dev dependency)")
    return [exe]


def test_cfn_lint_reports_nothing(tmp_path: Path) -> None:
    env = {**os.environ, "AWS_DEFAULT_REGION": "us-east-1"}
    res = subprocess.run([*_cfn_lint(), str(TEMPLATE)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert res.stdout.strip() == ""
    # The translated template too: what CloudFormation deploys after the transform.
    out = tmp_path / "translated.json"
    out.write_text(json.dumps(translated()), encoding="utf-8")
    res = subprocess.run([*_cfn_lint(), str(out)], capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
