"""The price catalog shipped with the package (unbroken/catalog.yaml): every entry sourced and dated, looked up by
provider and model id, filling what a deployment's config leaves unset; check-config names unpriced deployments."""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from tests.support.paths import REPO_ROOT
from unbroken import cli
from unbroken.catalog import CATALOG_PATH, PROVIDER_SECTIONS, catalog, parse_catalog
from unbroken.config import PROVIDER_NAMES, Deployment, ModelCapabilities, Price


def test_the_catalog_covers_every_provider_with_sourced_dated_entries() -> None:
    shipped = catalog()
    assert set(shipped.sections) == {"openai", "azure", "anthropic", "bedrock", "gemini"}
    assert set(PROVIDER_SECTIONS) <= PROVIDER_NAMES
    for section, entries in shipped.sections.items():
        assert len(entries) >= 4, section
        for name, entry in entries.items():
            assert str(entry.source).startswith("https://"), name
            assert entry.as_of.year >= 2026, name
            assert entry.verified or entry.note, f"{name}: an unverified entry says where its figures came from"
    bedrock = shipped.sections["bedrock"]
    for family in ("anthropic.", "amazon.nova", "meta.llama", "mistral."):
        assert any(name.startswith(family) for name in bedrock), family


def test_lookup_by_provider_and_model_id_ignores_snapshot_suffixes_and_geography_prefixes() -> None:
    shipped = catalog()
    sonnet = shipped.lookup("bedrock", "us.anthropic.claude-sonnet-4-5-20250929-v1:0")
    assert sonnet is shipped.sections["bedrock"]["anthropic.claude-sonnet-4-5"]
    assert shipped.lookup("anthropic", "claude-sonnet-4-5-20250929") is shipped.sections["anthropic"][
        "claude-sonnet-4-5"]
    assert shipped.lookup("anthropic", "claude-sonnet-4-0") is shipped.sections["anthropic"]["claude-sonnet-4"]
    assert shipped.lookup("openai", "gpt-4o-2024-08-06") is shipped.sections["openai"]["gpt-4o"]
    assert shipped.lookup("openai_responses", "gpt-4o") is shipped.sections["openai"]["gpt-4o"]
    assert shipped.lookup("bedrock", "amazon.nova-pro-v1:0") is shipped.sections["bedrock"]["amazon.nova-pro"]
    # Another model is never priced as its neighbour, and providers without a catalog have none.
    assert shipped.lookup("openai", "gpt-5-pro") is None
    assert shipped.lookup("openai_compatible", "gpt-4o") is None and shipped.lookup("simulated", "sim-1") is None


def test_a_deployment_gets_price_window_and_capabilities_from_the_catalog_and_config_overrides_any_key() -> None:
    d = Deployment(name="a", provider="anthropic", model="claude-sonnet-4-5")
    assert d.price_known and d.price == Price(input=3.0, output=15.0, cached_input=0.30, cache_write=3.75)
    assert d.context_window == 200_000 and d.window == 200_000
    assert d.capabilities == ModelCapabilities(tools=True, images=True, reasoning=True, json_schema=True,
                                               assistant_prefill=True)
    custom = Deployment.model_validate({"name": "a", "provider": "anthropic", "model": "claude-sonnet-4-5",
                                        "price": {"output": 12.0}, "context_window": 1_000_000,
                                        "capabilities": {"images": False}})
    assert custom.price == Price(input=3.0, output=12.0, cached_input=0.30, cache_write=3.75)
    assert custom.context_window == 1_000_000
    assert custom.capabilities.images is False and custom.capabilities.tools is True
    # The older option spelling of the window still wins.
    legacy = Deployment.model_validate({"name": "a", "provider": "anthropic", "model": "claude-sonnet-4-5",
                                        "options": {"context_window": 8000}})
    assert legacy.window == 8000


def test_azure_deployments_name_their_catalog_model() -> None:
    d = Deployment.model_validate({"name": "az", "provider": "azure", "model": "my-prod-deployment",
                                   "base_url": "https://x.openai.azure.com", "catalog_model": "gpt-4o-mini"})
    assert d.price.input == 0.15 and d.context_window == 128_000
    anonymous = Deployment.model_validate({"name": "az", "provider": "azure", "model": "my-prod-deployment",
                                           "base_url": "https://x.openai.azure.com"})
    assert not anonymous.price_known and anonymous.window is None and anonymous.capabilities == ModelCapabilities()


def test_an_explicit_price_of_zero_is_known_and_a_partial_price_without_a_catalog_entry_is_an_error() -> None:
    assert Deployment(name="s", provider="simulated", model="sim", price=Price(input=0, output=0)).price_known
    with pytest.raises(ValueError, match="input"):
        Deployment.model_validate({"name": "s", "provider": "simulated", "model": "sim", "price": {"output": 1}})


def test_the_catalog_is_strict() -> None:
    with pytest.raises(ValueError, match="extra"):
        parse_catalog("openai:\n  m:\n    price: {input: 1, output: 1, cheap: 2}\n    context_window: 1\n"
                      "    capabilities: {tools: true, images: true, reasoning: true, json_schema: true,"
                      " assistant_prefill: true}\n    source: https://x.example\n    as_of: 2026-01-01\n"
                      "    verified: true\n")


def test_the_catalog_ships_in_the_package_and_the_lambda_layer() -> None:
    pyproject = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    assert "catalog.yaml" in pyproject["tool"]["setuptools"]["package-data"]["unbroken"]
    # The layer is built from layers/ (template.yaml ContentUri), where the package and its data live.
    assert CATALOG_PATH == REPO_ROOT / "layers" / "unbroken" / "catalog.yaml" and CATALOG_PATH.is_file()


def test_check_config_warns_about_a_deployment_with_no_known_price(tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("allow_anonymous: true\nmodels:\n  - name: m\n    deployments:\n"
                      "      - {name: local, provider: openai_compatible, model: llama-3, base_url: http://h/v1}\n"
                      "      - {name: known, provider: openai, model: gpt-4o-mini}\n", encoding="utf-8")
    assert cli.main(["check-config", str(config)]) == 0
    out = capsys.readouterr().out.splitlines()
    warnings = [line for line in out if line.startswith("  warning:")]
    assert len(warnings) == 1 and warnings[0].startswith("  warning: local: no known price (openai_compatible "
                                                         "model llama-3 is not in the price catalog")
