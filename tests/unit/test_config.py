"""Config parsing: environment expansion, keyless deployments switched off, hashed keys, and every problem reported
with its file location."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from unbroken.config import (
    PROVIDER_NAMES,
    PROVIDER_OPTIONS,
    AnthropicOptions,
    Config,
    ConfigError,
    Deployment,
    GeminiOptions,
    load_config,
    parse_config,
)

GOOD = """
api_keys:
  - key: sk-plain
    tenant: a
  - sha256: {digest}
    tenant: b
models:
  - name: demo
    deployments:
      - name: sim
        provider: simulated
        model: sim-1
  - name: real
    deployments:
      - name: openai
        provider: openai
        model: ${{MODEL_NAME:-gpt-4o-mini}}
        api_key: ${{OPENAI_API_KEY}}
        price: {{input: 0.15, output: 0.6}}
"""


def good(env: dict[str, str] | None = None) -> str:
    return GOOD.format(digest=hashlib.sha256(b"sk-hashed").hexdigest())


def test_keyless_deployment_is_off_and_its_model_not_served() -> None:
    config = parse_config(good(), env={})
    assert [m.name for m in config.served_models] == ["demo"]
    assert config.model("real") is None


def test_env_expansion_switches_a_provider_on() -> None:
    config = parse_config(good(), env={"OPENAI_API_KEY": "sk-live", "MODEL_NAME": "gpt-5"})
    dep = config.model("real").deployments[0]  # type: ignore[union-attr]
    assert dep.enabled and dep.api_key == "sk-live" and dep.model == "gpt-5"


def test_plain_and_hashed_keys_map_to_tenants() -> None:
    config = parse_config(good(), env={})
    assert config.tenant_for_key("sk-plain") == "a"
    assert config.tenant_for_key("sk-hashed") == "b"
    assert config.tenant_for_key("sk-nope") is None
    assert config.tenant_for_key("") is None


def test_every_problem_is_reported_with_its_location() -> None:
    text = """api_keys:
  - key: k
    tenant: t
models:
  - name: demo
    deployments:
      - name: a
        provider: nosuch
        model: m
      - name: b
        provider: openai
        model: m
        price: {input: -1, output: 1}
        bogus: 1
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "router.yaml", env={})
    where = [p.where for p in err.value.problems]
    messages = " | ".join(p.message for p in err.value.problems)
    assert any(w.startswith("router.yaml:8:19 models[0].deployments[0].provider") for w in where), where
    assert any("models[0].deployments[1].price.input" in w and ":13:" in w for w in where), where
    assert any("models[0].deployments[1].bogus" in w for w in where), where
    assert "unknown provider 'nosuch'" in messages


def test_yaml_syntax_error_has_a_line() -> None:
    with pytest.raises(ConfigError) as err:
        parse_config("models: [\n  - x", "bad.yaml", env={})
    assert err.value.problems[0].where.startswith("bad.yaml:")


def test_no_api_keys_needs_explicit_anonymous() -> None:
    with pytest.raises(ConfigError, match="no api_keys"):
        parse_config("models: []", env={})
    assert parse_config("allow_anonymous: true", env={}).allow_anonymous


def test_duplicate_names_are_rejected() -> None:
    text = """api_keys: [{key: k, tenant: t}]
models:
  - name: m
    deployments: [{name: d, provider: simulated, model: x}, {name: d, provider: simulated, model: y}]
"""
    with pytest.raises(ConfigError, match="unique"):
        parse_config(text, env={})


def test_example_config_is_valid_without_keys() -> None:
    root = Path(__file__).resolve().parents[2]
    config = load_config(root / "router.example.yaml", env={})
    demo = config.model("demo")
    assert demo is not None and len(demo.enabled_deployments) == 2
    assert config.tenant_for_key("sk-unbroken-dev") is not None


def test_check_config_cli_prints_problems_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("api_keys: [{key: k, tenant: t}]\nmodels:\n  - name: m\n    deployments: []\n")
    run = subprocess.run([sys.executable, "-m", "unbroken.cli", "check-config", str(bad)], capture_output=True,
                         text=True, timeout=60)
    assert run.returncode == 1
    assert f"{bad}:4:18 models[0].deployments" in run.stdout
    root = Path(__file__).resolve().parents[2]
    ok = subprocess.run([sys.executable, "-m", "unbroken.cli", "check-config", str(root / "router.example.yaml")],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "OK" in ok.stdout


def test_every_provider_name_a_config_accepts_has_an_adapter() -> None:
    from unbroken.providers import PROVIDERS, provider_class

    assert set(PROVIDERS) == PROVIDER_NAMES
    for name in PROVIDER_NAMES:
        assert provider_class(name).__name__ in PROVIDERS[name]


# -- deployment options, typed per provider ------------------------------------------------------------------------

def one_deployment(deployment: str, env: dict[str, str] | None = None) -> Config:
    """A config whose only deployment is `deployment` (YAML lines indented under `deployments:`)."""
    text = "api_keys: [{key: k, tenant: t}]\nmodels:\n  - name: m\n    deployments:\n" + deployment
    return parse_config(text, "router.yaml", env=env or {})


def problems_of(deployment: str) -> list[str]:
    with pytest.raises(ConfigError) as err:
        one_deployment(deployment)
    return [str(p) for p in err.value.problems]


def test_an_option_typo_is_an_error_naming_the_key_and_its_place() -> None:
    got = problems_of("""\
      - name: d
        provider: simulated
        model: sim-1
        options: {stall_timout_s: 5}
""")
    assert len(got) == 1
    assert got[0].startswith("router.yaml:8:19 models[0].deployments[0].options.stall_timout_s: "), got
    assert "unknown simulated option 'stall_timout_s'; did you mean stall_timeout_s?" in got[0]


def test_an_option_of_another_provider_is_an_error() -> None:
    got = problems_of("""\
      - name: d
        provider: openai
        model: gpt-4o-mini
        options:
          thinking: true
""")
    assert got and got[0].startswith("router.yaml:9:11 models[0].deployments[0].options.thinking: unknown openai "
                                     "option"), got


def test_a_wrong_type_is_an_error_at_the_value() -> None:
    got = problems_of("""\
      - name: d
        provider: simulated
        model: sim-1
        options:
          stall_timeout_s: fast
          max_retries: 1.5
          max_tokens_field: max_token
""")
    where = [g.split(": ")[0] for g in got]
    assert where == ["router.yaml:9:28 models[0].deployments[0].options.stall_timeout_s",
                     "router.yaml:10:24 models[0].deployments[0].options.max_retries",
                     "router.yaml:11:29 models[0].deployments[0].options.max_tokens_field"], got
    assert "valid number" in got[0] and "'max_completion_tokens' or 'max_tokens'" in got[2]


def test_a_missing_field_points_at_the_mapping_that_lacks_it() -> None:
    got = problems_of("""\
      - name: d
        provider: openai
""")
    assert got == ["router.yaml:5:9 models[0].deployments[0].model: model is required"]


@pytest.mark.parametrize("provider", ["openai_compatible", "azure"])
def test_a_provider_without_a_default_url_needs_base_url(provider: str) -> None:
    got = problems_of(f"""\
      - name: d
        provider: {provider}
        model: x
        api_key: k
""")
    assert len(got) == 1 and got[0].startswith("router.yaml:5:9 models[0].deployments[0]: "), got
    assert f"provider {provider} needs a base_url" in got[0]


def test_vertex_needs_base_url() -> None:
    got = problems_of("""\
      - name: d
        provider: gemini
        model: gemini-2.5-flash
        options: {vertex: true}
""")
    assert len(got) == 1 and "options.vertex needs a base_url" in got[0] and ":5:9 " in got[0], got


@pytest.mark.parametrize(("provider", "options", "message"), [
    ("bedrock", "{image_urls: true}", "image bytes only"),
    ("bedrock", "{native_json_schema: output_format}", "'output_format' is Anthropic's"),
    ("azure", "{api: chat, reasoning_summary: auto}", "reasoning_summary: not read with api: chat"),
    ("azure", "{api: responses, system_role: developer}", "system_role: not read with api: responses"),
    ("anthropic", "{thinking_budgets: {hihg: 10}}", "Input should be 'none'"),
    ("gemini", "{thinking: levels}", "Input should be 'level' or 'budget'"),
])
def test_provider_specific_values_are_checked(provider: str, options: str, message: str) -> None:
    got = problems_of(f"""\
      - name: d
        provider: {provider}
        model: x
        base_url: https://example.test
        options: {options}
""")
    assert any(message in g for g in got), got


def test_options_are_typed_with_their_defaults() -> None:
    config = one_deployment("""\
      - name: d
        provider: anthropic
        model: claude-sonnet-4-5
        options: {ttft_timeout_s: "${TTFT:-7}", native_json_schema: output_format, thinking_budgets: {high: 9000}}
""")
    opts = config.models[0].deployments[0].options_as(AnthropicOptions)
    assert opts.ttft_timeout_s == 7.0 and opts.stall_timeout_s == 30.0 and opts.max_retries == 1
    assert opts.context_window == 0 and opts.native_json_schema == "output_format"
    assert opts.thinking_budgets == {"high": 9000} and opts.anthropic_version == "2023-06-01"
    with pytest.raises(TypeError, match="not GeminiOptions"):
        config.models[0].deployments[0].options_as(GeminiOptions)


def test_every_provider_has_an_options_model_its_adapter_reads() -> None:
    from unbroken.providers import provider_class

    assert set(PROVIDER_OPTIONS) == PROVIDER_NAMES
    for name in PROVIDER_NAMES:
        dep = Deployment(name="d", provider=name, model="m", base_url="https://example.test")
        assert type(dep.options) is PROVIDER_OPTIONS[name]
        adapter = provider_class(name)(dep, httpx.AsyncClient())
        adapter.capabilities  # noqa: B018 - reads the capability options
        options = getattr(adapter, "options", None)
        assert options is None or options is dep.options


def test_switched_off_deployments_say_why_naming_the_variable_never_a_value() -> None:
    text = """api_keys: [{key: k, tenant: t}]
models:
  - name: m
    deployments:
      - {name: keyless, provider: openai, model: x, api_key: "${OPENAI_API_KEY}"}
      - {name: either, provider: openai, model: x, api_key: "${KEY_A}${KEY_B}"}
      - {name: disabled, provider: openai, model: x, api_key: "${SET_KEY}", enabled: false}
      - {name: live, provider: openai, model: x, api_key: "${SET_KEY}"}
"""
    config = parse_config(text, env={"SET_KEY": "sk-secret-value"})
    assert config.switched_off == [
        ("m", "keyless", "no key in the environment: OPENAI_API_KEY is unset or empty"),
        ("m", "either", "no key in the environment: KEY_A, KEY_B are unset or empty"),
        ("m", "disabled", "enabled: false in the config"),
    ]
    assert "sk-secret-value" not in repr(config.switched_off)
    assert config.model("m") is not None


def test_a_model_with_every_deployment_off_is_configured_but_not_served() -> None:
    config = parse_config(good(), env={})
    real = config.configured_model("real")
    assert config.model("real") is None and real is not None
    assert real.why_off == "openai: no key in the environment: OPENAI_API_KEY is unset or empty"
    assert config.configured_model("nosuch") is None
