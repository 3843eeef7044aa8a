"""The price catalog shipped with the package (`catalog.yaml`): list prices per 1M tokens, context window and
capabilities of the major models of every provider, each with its source and date. `config.py` fills a deployment
from it by (provider, model id); the deployment's own config overrides any value.

Imports nothing of the router (it sits below `config.py`); read once per process, on first use."""

from __future__ import annotations

import datetime
import functools
import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

CATALOG_PATH = Path(__file__).with_name("catalog.yaml")

# The catalog section a deployment's provider reads. `openai_compatible` and `simulated` have none: whatever they
# serve, only the config knows its price.
PROVIDER_SECTIONS: dict[str, str] = {
    "openai": "openai",
    "openai_responses": "openai",
    "azure": "azure",
    "anthropic": "anthropic",
    "bedrock": "bedrock",
    "gemini": "gemini",
}

# Bedrock's cross-region inference profiles prefix the model id with a geography.
_GEO_PREFIX = re.compile(r"^(us|eu|apac|global|jp|au|ca|us-gov)\.")
# A trailing date or version names a snapshot of the same model: -20250929, -2024-08-06, @20240620, -v1:0, -latest.
_SNAPSHOT_SUFFIX = re.compile(r"(-v\d+(:\d+)?|:\d+)$|([-@]\d{8}|-\d{4}-\d{2}-\d{2}|-latest)$")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class CatalogPrice(_Strict):
    """USD per 1M tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)


class CatalogCapabilities(_Strict):
    tools: bool
    images: bool
    reasoning: bool
    json_schema: bool
    assistant_prefill: bool


class CatalogEntry(_Strict):
    price: CatalogPrice
    context_window: int = Field(gt=0)
    capabilities: CatalogCapabilities
    source: str = Field(pattern=r"^https://\S+$")  # the provider's pricing page
    as_of: datetime.date
    verified: bool  # read on the provider's own page (else from secondary sources: see `note`)
    note: str | None = None
    aliases: list[str] = Field(default_factory=list)


class Catalog(_Strict):
    sections: dict[str, dict[str, CatalogEntry]]

    def lookup(self, provider: str, model: str) -> CatalogEntry | None:
        """The entry of a provider's model id: exact, else without a Bedrock geography prefix, else without a
        trailing snapshot date or version (repeatedly: `-20250929-v1:0`)."""
        section = self.sections.get(PROVIDER_SECTIONS.get(provider, ""), {})
        if not section:
            return None
        name = _GEO_PREFIX.sub("", model.strip())
        for _ in range(3):
            entry = section.get(name) or next((e for e in section.values() if name in e.aliases), None)
            if entry is not None:
                return entry
            shorter = _SNAPSHOT_SUFFIX.sub("", name)
            if shorter == name:
                return None
            name = shorter
        return None


# libyaml's loader where PyYAML has it: 8 ms instead of 57 ms for the shipped file (a cold start pays it once).
_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def parse_catalog(text: str) -> Catalog:
    tree = yaml.load(text, Loader=_LOADER) or {}  # a safe loader (above)
    if not isinstance(tree, dict):
        raise ValueError("the catalog's top level must be a mapping of provider sections")
    return Catalog.model_validate({"sections": tree})


@functools.cache
def catalog() -> Catalog:
    """The shipped catalog (read and validated once per process)."""
    return parse_catalog(CATALOG_PATH.read_text(encoding="utf-8"))


def lookup(provider: str, model: str) -> CatalogEntry | None:
    """`catalog().lookup`, without reading the catalog for a provider that has no section (a config of only
    `openai_compatible` or `simulated` deployments never parses it: a cold start saves that)."""
    return catalog().lookup(provider, model) if provider in PROVIDER_SECTIONS else None
