"""unbroken.aws against moto's in-process AWS: secrets become environment variables (explicit env wins, values are
never logged), the router YAML comes out of an SSM SecureString."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import boto3
import pytest
from moto import mock_aws

from unbroken.aws import SecretsError, load_secrets_into_env, read_config_text_from_ssm

REGION = "us-east-1"


@pytest.fixture
def aws(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("AWS_DEFAULT_REGION", REGION)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    with mock_aws():
        yield


def _secret(name: str, value: str, region: str = REGION) -> str:
    return boto3.client("secretsmanager", region_name=region).create_secret(Name=name, SecretString=value)["ARN"]


def test_json_and_plain_secrets_become_variables(aws: None, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    json_arn = _secret(
        "unbroken/providers", json.dumps({"OPENAI_API_KEY": "sk-json-1", "ANTHROPIC_API_KEY": "sk-ant-2"})
    )
    plain_arn = _secret("prod/unbroken/gemini-api-key", "g-plain-3")
    env: dict[str, str] = {}
    caplog.clear()  # only what loading logs counts (creating the secrets above logs their bodies, by botocore)

    names = load_secrets_into_env([json_arn, plain_arn], env=env)

    assert names == ["OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY"]
    assert env == {"OPENAI_API_KEY": "sk-json-1", "ANTHROPIC_API_KEY": "sk-ant-2", "GEMINI_API_KEY": "g-plain-3"}
    logged = caplog.text + " ".join(str(r.__dict__) for r in caplog.records)
    assert "GetSecretValue" in logged  # botocore's DEBUG logging was on, and still no value got through
    for value in env.values():
        assert value not in logged


def test_explicit_environment_wins(aws: None) -> None:
    arn = _secret("both", json.dumps({"OPENAI_API_KEY": "from-secret", "GROQ_API_KEY": "gq"}))
    env = {"OPENAI_API_KEY": "from-env"}
    assert load_secrets_into_env([arn], env=env) == ["GROQ_API_KEY"]
    assert env["OPENAI_API_KEY"] == "from-env"


def test_defaults_to_os_environ(aws: None, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("UNBROKEN_TEST_SECRET_VAR", raising=False)
    arn = _secret("s", json.dumps({"UNBROKEN_TEST_SECRET_VAR": "v"}))
    try:
        assert load_secrets_into_env([arn]) == ["UNBROKEN_TEST_SECRET_VAR"]
        import os

        assert os.environ["UNBROKEN_TEST_SECRET_VAR"] == "v"
    finally:
        monkeypatch.delenv("UNBROKEN_TEST_SECRET_VAR", raising=False)


def test_bad_fields_are_skipped_and_scalars_stringified(aws: None) -> None:
    arn = _secret("mixed", json.dumps({"GOOD": "x", "not-a-name": "y", "NESTED": {"a": 1}, "PORT": 8000, "NONE": None}))
    env: dict[str, str] = {}
    assert load_secrets_into_env([arn], env=env) == ["GOOD", "PORT"]
    assert env == {"GOOD": "x", "PORT": "8000"}


def test_secret_in_another_region(aws: None) -> None:
    arn = _secret("eu/openai-key", "k-eu", region="eu-west-1")
    assert ":eu-west-1:" in arn
    env: dict[str, str] = {}
    assert load_secrets_into_env([arn], env=env) == ["OPENAI_KEY"]


def test_empty_list_needs_no_aws(monkeypatch: pytest.MonkeyPatch) -> None:
    env: dict[str, str] = {}
    assert load_secrets_into_env(["", "  "], env=env) == [] and env == {}


def test_unreadable_secret_fails_after_loading_the_rest(aws: None) -> None:
    good = _secret("good", json.dumps({"A_KEY": "a-value"}))
    missing = f"arn:aws:secretsmanager:{REGION}:123456789012:secret:does-not-exist-AbCdEf"
    env: dict[str, str] = {}
    with pytest.raises(SecretsError) as err:
        load_secrets_into_env([missing, good], env=env)
    assert "does-not-exist" in str(err.value) and "ResourceNotFoundException" in str(err.value)
    assert "a-value" not in str(err.value)
    assert env == {"A_KEY": "a-value"}


def test_config_text_from_ssm_securestring(aws: None) -> None:
    yaml_text = "models:\n  - name: fast\n    deployments: []\n"
    ssm = boto3.client("ssm", region_name=REGION)
    ssm.put_parameter(Name="/unbroken/router", Value=yaml_text, Type="SecureString")
    assert read_config_text_from_ssm("/unbroken/router") == yaml_text
    ssm.put_parameter(Name="/unbroken/plain", Value="a: 1\n", Type="String")
    assert read_config_text_from_ssm("/unbroken/plain") == "a: 1\n"
