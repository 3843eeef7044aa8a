"""Config parsing: environment expansion, keyless deployments switched off, hashed keys, and every problem reported
with its file location."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest

from unbroken.config import ConfigError, load_config, parse_config

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
    from unbroken.config import PROVIDER_NAMES
    from unbroken.providers import PROVIDERS, provider_class

    assert set(PROVIDERS) == PROVIDER_NAMES
    for name in PROVIDER_NAMES:
        assert provider_class(name).__name__ in PROVIDERS[name]
