"""The router's configuration: a YAML file with `${VAR}` / `${VAR:-default}` expanded from the environment.

A deployment whose `api_key` expands to nothing is switched off (so the example config serves only what has keys);
a model with no deployment left is not served. `load_config` raises `ConfigError` listing every problem with its
file location.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, TypeVar, cast

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PlainValidator,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from unbroken.catalog import lookup as catalog_entry

# The `provider` values a deployment may name; `unbroken.providers.PROVIDERS` maps each to its adapter (a test keeps
# the two in step). Listed here so that reading a config never imports an adapter.
PROVIDER_NAMES = frozenset({"openai", "openai_compatible", "simulated", "anthropic", "bedrock", "azure", "gemini",
                            "openai_responses"})

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """USD per 1M tokens. `cached_input`: input read from the provider's prompt cache (None: billed as input);
    `cache_write`: input written to it, where the provider bills writes apart (Anthropic, Bedrock's Claude)."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)
    cache_write: float | None = Field(default=None, ge=0)

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        cached_rate = self.cached_input if self.cached_input is not None else self.input
        uncached = max(0, input_tokens - cached_input_tokens)
        return (uncached * self.input + cached_input_tokens * cached_rate + output_tokens * self.output) / 1e6


CapabilityName = Literal["tools", "images", "reasoning", "json_schema", "assistant_prefill"]


class ModelCapabilities(_Strict):
    """What a deployment's model can be sent, as routing sees it (None: unknown, which no request is refused for).
    Filled from the catalog; the config overrides each flag. The adapter's own wire-level flags (literal
    continuation, image URLs, native JSON schema) are `providers.base.Capabilities`."""

    tools: bool | None = None
    images: bool | None = None
    reasoning: bool | None = None
    json_schema: bool | None = None
    assistant_prefill: bool | None = None

    def lacks(self, need: CapabilityName) -> bool:
        """Known not to have it."""
        return getattr(self, need) is False


# ---------------------------------------------------------------------------------------------------------------
# Deployment options, typed per provider
# ---------------------------------------------------------------------------------------------------------------
# A deployment's `options` are validated by the model of its provider (`PROVIDER_OPTIONS`), so a typo is an error
# naming the key and a wrong type an error naming the value, both with their line in the file. The models live here
# and not next to the adapters because reading a config must never import an adapter (config is the bottom
# layer): what they hold is only each adapter's knobs and their defaults, documented in README "Configuration" and
# in docs/providers/. An adapter reads its own model with `deployment.options_as(TheOptions)`.

Effort = Literal["none", "minimal", "low", "medium", "high", "xhigh"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _json_schema_mode(value: Any) -> bool | Literal["output_format"] | None:
    if value is None or isinstance(value, bool) or value == "output_format":
        return cast("bool | Literal['output_format'] | None", value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError("must be true or false (or 'output_format': Anthropic's older beta field)")


class ProviderOptions(_Options):
    """Options every provider has: the attempt loop's limits for this deployment and the capability overrides
    (None = the adapter's default)."""

    # The first token must come within this long, then every next one within stall_timeout_s; else the attempt
    # fails (`timeout`) and the answer moves on (continued when output had started).
    ttft_timeout_s: float = Field(default=60.0, gt=0)
    stall_timeout_s: float = Field(default=30.0, gt=0)
    # Extra tries on this deployment for retryable errors before the request moves on.
    max_retries: int = Field(default=1, ge=0, le=20)
    # Tokens; after a context-length error only deployments with a larger window are tried. 0 = unknown.
    context_window: int = Field(default=0, ge=0)
    literal_continuation: bool | None = None
    image_urls: bool | None = None
    native_json_schema: Annotated[bool | Literal["output_format"] | None, PlainValidator(_json_schema_mode)] = None
    # Only Anthropic knows the older `output_format` field.
    output_format_field: ClassVar[bool] = False

    @field_validator("native_json_schema")
    @classmethod
    def _output_format_known(cls, value: bool | str | None) -> bool | str | None:
        if value == "output_format" and not cls.output_format_field:
            raise ValueError("must be true or false ('output_format' is Anthropic's)")
        return value


class OpenAIChatOptions(ProviderOptions):
    """`openai` (and the base of `openai_compatible`, `simulated`, Azure's chat): Chat Completions."""

    system_role: Literal["system", "developer"] = "system"
    max_tokens_field: Literal["max_completion_tokens", "max_tokens"] = "max_completion_tokens"
    reasoning_effort: bool = True  # send `reasoning_effort` when the request has one
    continuation_body: dict[str, Any] = Field(default_factory=dict)  # merged into literal continuations
    extra_body: dict[str, Any] = Field(default_factory=dict)  # merged into every request


class OpenAICompatibleOptions(OpenAIChatOptions):
    prefix_flag: bool = False  # DeepSeek: mark a literal continuation's assistant message with `prefix: true`


class SimulatedOptions(OpenAIChatOptions):
    """The built-in simulator's controls (its `sim_*` metadata); unset = the simulator's default."""

    seed: int | None = None
    ttft_ms: float | None = Field(default=None, ge=0)
    tps: float | None = Field(default=None, ge=0)
    length: int | None = Field(default=None, ge=0)
    fault: str | None = None
    fault_attempts: int | None = Field(default=None, ge=0)
    reject_prefill: bool | None = None
    parallel_tools: bool | None = None
    fail_rate: float | None = Field(default=None, ge=0, le=1)
    prompt_cache: bool | None = None


class OpenAIResponsesOptions(ProviderOptions):
    """`openai_responses` (and Azure's Responses style)."""

    reasoning_summary: str = "auto"
    include_reasoning: bool = False
    extra_body: dict[str, Any] = Field(default_factory=dict)


# Azure's keys that only one of its two wire protocols reads.
_AZURE_CHAT_ONLY = frozenset(OpenAIChatOptions.model_fields) - frozenset(OpenAIResponsesOptions.model_fields)
_AZURE_RESPONSES_ONLY = frozenset(OpenAIResponsesOptions.model_fields) - frozenset(OpenAIChatOptions.model_fields)


class AzureOptions(OpenAIChatOptions, OpenAIResponsesOptions):
    """`azure`: the chat or the Responses adapter's options, plus where and how to call Azure."""

    api: Literal["chat", "responses"] = "chat"
    api_style: Literal["v1", "classic"] = "v1"
    api_version: str | None = None
    auth: Literal["api-key", "bearer"] = "api-key"

    @model_validator(mode="after")
    def _keys_of_the_api(self) -> AzureOptions:
        foreign = sorted(self.model_fields_set & (_AZURE_RESPONSES_ONLY if self.api == "chat" else _AZURE_CHAT_ONLY))
        if foreign:
            raise ValueError(f"{', '.join(foreign)}: not read with api: {self.api}")
        return self


class ClaudeOptions(ProviderOptions):
    """What Anthropic and Bedrock share: length and extended thinking."""

    max_tokens: int | None = Field(default=None, gt=0)
    thinking: bool = False  # map reasoning.effort to extended thinking
    thinking_budgets: dict[Effort, int] = Field(default_factory=dict)  # {effort: budget_tokens} overrides


class AnthropicOptions(ClaudeOptions):
    anthropic_version: str = "2023-06-01"
    beta: str | list[str] | None = None  # the `anthropic-beta` header
    # native_json_schema true: `output_config.format`; "output_format": the older beta field; false: a forced tool.
    output_format_field: ClassVar[bool] = True


class BedrockOptions(ClaudeOptions):
    region: str | None = None  # when the deployment's `region` is unset
    profile: str | None = None
    aws_access_key_id: str | None = None
    aws_secret_access_key: str | None = None
    aws_session_token: str | None = None
    read_timeout: float = Field(default=900.0, gt=0)
    connect_timeout: float = Field(default=10.0, gt=0)
    botocore_max_attempts: int = Field(default=1, ge=1)  # 1: the router's attempt loop does the retrying
    max_pool_connections: int = Field(default=50, ge=1)
    additional_model_request_fields: dict[str, Any] = Field(default_factory=dict)
    guardrail_config: dict[str, Any] | None = None

    @field_validator("image_urls")
    @classmethod
    def _bytes_only(cls, value: bool | None) -> bool | None:
        if value is not None:
            raise ValueError("Bedrock Converse takes image bytes only; image_urls cannot be set")
        return value


class GeminiOptions(ProviderOptions):
    vertex: bool = False  # Vertex AI: base_url names the publisher, the key is a bearer token
    api_version: str = "v1beta"
    auth: Literal["api-key", "bearer"] = "api-key"
    schema_fields: Literal["json_schema", "openapi"] = "json_schema"
    thinking: Literal["level", "budget"] | None = None  # None: by model (Gemini 1.x/2.x budget, else level)
    reasoning_map: dict[Effort, int | str] = Field(default_factory=dict)
    signature_fallback: bool | None = None  # None: on for Gemini >= 3
    stream_function_call_arguments: bool = False
    extra_body: dict[str, Any] = Field(default_factory=dict)


# provider name -> its options model; a test keeps the keys equal to PROVIDER_NAMES.
PROVIDER_OPTIONS: dict[str, type[ProviderOptions]] = {
    "openai": OpenAIChatOptions,
    "openai_compatible": OpenAICompatibleOptions,
    "simulated": SimulatedOptions,
    "anthropic": AnthropicOptions,
    "bedrock": BedrockOptions,
    "azure": AzureOptions,
    "gemini": GeminiOptions,
    "openai_responses": OpenAIResponsesOptions,
}

# Providers without a default URL: without a base_url their prompts (and key) would go to the wrong place.
_NEEDS_BASE_URL: dict[str, str] = {
    "openai_compatible": "the server's URL, e.g. http://localhost:8000/v1 (without one the prompts and the key "
                         "would go to api.openai.com)",
    "azure": "https://<resource>.openai.azure.com",
}

_O = TypeVar("_O", bound=ProviderOptions)


class Deployment(_Strict):
    name: str = Field(min_length=1)
    provider: str
    model: str = Field(min_length=1)
    # The model id to look up in the price catalog when `model` is not one (an Azure deployment's own name).
    catalog_model: str | None = Field(default=None, min_length=1)
    base_url: str | None = None
    api_key: str | None = None
    region: str | None = None
    # Unset: the catalog's (by provider and model id), key by key; without a catalog entry either, the price is
    # unknown (`price_known`): accounted as free, ranked after priced deployments by `cheapest`.
    price: Price = Price(input=0, output=0)
    context_window: int | None = Field(default=None, gt=0)  # tokens; None: the catalog's, else unknown
    capabilities: ModelCapabilities = ModelCapabilities()
    # Validated by the provider's model in PROVIDER_OPTIONS; documented in README "Configuration".
    options: ProviderOptions = Field(default_factory=ProviderOptions, validate_default=True)
    enabled: bool = True
    # Why a deployment is off when the config did not say `enabled: false` itself (set by `parse_config`).
    _off_reason: str | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _from_catalog(cls, data: Any) -> Any:
        """What the config leaves unset of price, window and capabilities comes from the catalog entry."""
        if not isinstance(data, dict):
            return data
        provider, model = data.get("provider"), data.get("catalog_model") or data.get("model")
        entry = catalog_entry(provider, model) if isinstance(provider, str) and isinstance(model, str) else None
        if entry is None:
            return data
        out = dict(data)
        price = out.get("price")
        if isinstance(price, Price):
            price = price.model_dump(exclude_unset=True)
        if price is None or isinstance(price, dict):
            out["price"] = {**entry.price.model_dump(exclude_none=True), **(price or {})}
        if out.get("context_window") is None:
            out["context_window"] = entry.context_window
        caps = out.get("capabilities")
        if isinstance(caps, ModelCapabilities):
            caps = caps.model_dump(exclude_unset=True)
        if caps is None or isinstance(caps, dict):
            out["capabilities"] = {**entry.capabilities.model_dump(), **(caps or {})}
        return out

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(sorted(PROVIDER_NAMES))}")
        return value

    @field_validator("options", mode="before")
    @classmethod
    def _provider_options(cls, value: Any, info: ValidationInfo) -> Any:
        model = PROVIDER_OPTIONS.get(info.data.get("provider", ""))
        if model is None:
            return ProviderOptions()  # the unknown provider is the error
        if isinstance(value, model):
            return value
        if isinstance(value, ProviderOptions):
            value = value.model_dump(exclude_unset=True)
        return model.model_validate({} if value is None else value)

    @model_validator(mode="after")
    def _needs_base_url(self) -> Deployment:
        if not self.base_url:
            if self.provider in _NEEDS_BASE_URL:
                raise ValueError(f"provider {self.provider} needs a base_url: {_NEEDS_BASE_URL[self.provider]}")
            if isinstance(self.options, GeminiOptions) and self.options.vertex:
                raise ValueError("options.vertex needs a base_url: https://{region}-aiplatform.googleapis.com/v1/"
                                 "projects/{project}/locations/{region}/publishers/google")
        return self

    def options_as(self, cls: type[_O]) -> _O:
        """The options as the model an adapter reads (its provider's, or one it extends)."""
        if not isinstance(self.options, cls):
            raise TypeError(f"deployment {self.name} ({self.provider}) has {type(self.options).__name__}, "
                            f"not {cls.__name__}")
        return self.options

    @property
    def price_known(self) -> bool:
        """A price came from the config or the catalog (else `price` is a placeholder of zeros)."""
        return "price" in self.model_fields_set

    @property
    def no_price_reason(self) -> str:
        """What check-config and the startup log say of a deployment without a known price."""
        return (f"no known price ({self.provider} model {self.catalog_model or self.model} is not in the price "
                f"catalog and the config gives none): its cost counts as 0 and `cheapest` ranks it last; set "
                f"`price: {{input, output}}`")

    @property
    def window(self) -> int | None:
        """The context window in tokens (`options.context_window`, the older spelling, wins), None if unknown."""
        return self.options.context_window or self.context_window

    @property
    def off_reason(self) -> str | None:
        """Why the deployment is switched off (None when it is on). Names an environment variable, never a value."""
        if self.enabled:
            return None
        return self._off_reason or "enabled: false in the config"


PolicyName = Literal["cheapest", "fastest", "balanced", "weighted", "ordered"]
POLICY_NAMES: tuple[PolicyName, ...] = ("cheapest", "fastest", "balanced", "weighted", "ordered")


class BalanceWeights(_Strict):
    """`balanced`: how much normalised expected cost and normalised expected latency count (any scale)."""

    cost: float = Field(default=0.5, ge=0)
    latency: float = Field(default=0.5, ge=0)

    @model_validator(mode="after")
    def _not_both_zero(self) -> BalanceWeights:
        if self.cost == 0 and self.latency == 0:
            raise ValueError("cost and latency cannot both be 0")
        return self


class RoutingSettings(_Strict):
    """How a model's deployments are ranked for each request (docs/routing.md). The ranked list is the attempt
    order; a request's `X-Unbroken-Policy` header overrides `policy`."""

    policy: PolicyName = "ordered"
    balance: BalanceWeights = BalanceWeights()  # `balanced`
    # `weighted`: deployment name -> share of first attempts (relative; unlisted deployments get none, but still
    # serve as failover). Empty: an even split.
    weights: dict[str, float] = Field(default_factory=dict)
    # Constraints. A deployment whose expected cost for the request is above this is not tried.
    max_price_per_request_usd: float | None = Field(default=None, gt=0)
    # Only deployments whose `region` is listed (a deployment without a region is left out too).
    regions: list[str] | None = Field(default=None, min_length=1)
    # Deployments whose live p95 time to first token is above this go after those that meet it (or are unknown).
    ttft_objective_ms: float | None = Field(default=None, gt=0)
    # Expected output tokens while a model has no recent mean (and the request sets no max_output_tokens).
    default_output_tokens: int = Field(default=256, gt=0)
    # Share of requests (deterministic per response id) for which `fastest` and `balanced` put a deployment with
    # no live latency yet first, so that it gets measured.
    explore_share: float = Field(default=0.05, ge=0, le=1)
    # Waiting or moving on (a 429 with Retry-After, a transient 5xx): never wait longer than this for the same
    # deployment, and `cheapest` waits only when the next one would cost at least `wait_price_ratio` times as much.
    max_wait_s: float = Field(default=2.0, ge=0, le=60)
    wait_price_ratio: float = Field(default=2.0, ge=1)
    # Cache affinity: a continuation (previous_response_id, or the same long prompt prefix seen in this process
    # within `affinity_ttl_s`) prices its predecessor's deployment with a prompt-cache hit on what it shares.
    cache_affinity: bool = True
    affinity_ttl_s: float = Field(default=300.0, gt=0)

    @field_validator("weights")
    @classmethod
    def _shares(cls, value: dict[str, float]) -> dict[str, float]:
        if any(w < 0 for w in value.values()):
            raise ValueError("weights must be >= 0")
        if value and not sum(value.values()) > 0:
            raise ValueError("at least one weight must be > 0")
        return value


class PublicModel(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    deployments: list[Deployment] = Field(min_length=1)
    routing: RoutingSettings = RoutingSettings()

    @model_validator(mode="after")
    def _unique_deployments(self) -> PublicModel:
        names = [d.name for d in self.deployments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"deployment names must be unique within a model: {', '.join(dupes)}")
        unknown = sorted(set(self.routing.weights) - set(names))
        if unknown:
            raise ValueError(f"routing.weights names no deployment of this model: {', '.join(unknown)}")
        if self.routing.regions is not None and not any(d.region in self.routing.regions for d in self.deployments):
            raise ValueError(f"routing.regions ({', '.join(self.routing.regions)}) leaves no deployment of this "
                             f"model (their regions: {', '.join(str(d.region) for d in self.deployments)})")
        return self

    @property
    def enabled_deployments(self) -> list[Deployment]:
        return [d for d in self.deployments if d.enabled]

    @property
    def why_off(self) -> str:
        """Why a model with no deployment on is not served: each deployment's reason."""
        return "; ".join(f"{d.name}: {d.off_reason}" for d in self.deployments if not d.enabled)


class ApiKey(_Strict):
    """A caller's key: `key` in plain text (development) or `sha256` of it (hex). `tenant` scopes responses."""

    tenant: str = Field(min_length=1)
    key: str | None = None
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-fA-F]{64}$")
    name: str | None = None

    @model_validator(mode="after")
    def _one_form(self) -> ApiKey:
        if (self.key is None) == (self.sha256 is None):
            raise ValueError("give exactly one of `key` or `sha256`")
        return self

    @functools.cached_property
    def digest(self) -> bytes:
        """Computed once per key (every request compares against every key's digest)."""
        if self.sha256 is not None:
            return bytes.fromhex(self.sha256)
        assert self.key is not None
        return hashlib.sha256(self.key.encode()).digest()


# -- server.cors and auth.jwt (issue 11) -----------------------------------------------------------------------------


class CorsSettings(_Strict):
    """Browser access (`server.cors`). No origins: CORS is off, and a preflight is an ordinary 405."""

    # Exact origins ("https://app.example.com": scheme, host and port as the browser sends them), or "*" for any.
    allow_origins: list[str] = Field(default_factory=list)
    # Request headers allowed beyond the router's own (api/cors.py ROUTER_REQUEST_HEADERS); "*" allows any.
    allow_headers: list[str] = Field(default_factory=list)
    max_age_seconds: int = Field(default=600, ge=0, le=86400)
    # Cookies / HTTP auth in credentialed fetches. A bearer token in Authorization needs no credentials mode.
    allow_credentials: bool = False

    @field_validator("allow_origins")
    @classmethod
    def _origins(cls, value: list[str]) -> list[str]:
        for origin in value:
            if origin != "*" and not re.fullmatch(r"https?://[^/\s]+", origin):
                raise ValueError(f"{origin!r} is not an origin: give scheme://host[:port] with no path, or \"*\"")
        return value

    @model_validator(mode="after")
    def _no_credentials_for_everyone(self) -> CorsSettings:
        if self.allow_credentials and "*" in self.allow_origins:
            raise ValueError("allow_credentials with allow_origins \"*\" would let any site send credentialed "
                             "requests; list the origins")
        return self

    @property
    def enabled(self) -> bool:
        return bool(self.allow_origins)


JwtAlgorithm = Literal["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
_DEFAULT_JWT_ALGORITHMS: tuple[JwtAlgorithm, ...] = ("RS256", "ES256")


class JwtSettings(_Strict):
    """Bearer JWTs verified by the router itself (`auth.jwt`): signature by a key of the JWKS, issuer, audience,
    expiry. The tenant is `jwt:` + the value of `tenant_claim`."""

    issuer: str = Field(min_length=1)
    audience: str | list[str]
    jwks_url: str | None = None
    jwks_file: str | None = None
    tenant_claim: str = Field(default="sub", min_length=1)
    # Asymmetric only: an HMAC algorithm would let a public key be used as a shared secret.
    algorithms: list[JwtAlgorithm] = Field(default_factory=lambda: list(_DEFAULT_JWT_ALGORITHMS), min_length=1)
    leeway_seconds: float = Field(default=30.0, ge=0, le=600)
    # How long keys fetched from jwks_url are kept before they are fetched again (a kid not in them refetches).
    jwks_cache_seconds: int = Field(default=300, gt=0)

    @model_validator(mode="after")
    def _one_key_source(self) -> JwtSettings:
        if (self.jwks_url is None) == (self.jwks_file is None):
            raise ValueError("give exactly one of `jwks_url` or `jwks_file`")
        if self.jwks_url is not None and not self.jwks_url.startswith(("https://", "http://")):
            raise ValueError("jwks_url must be an http(s) URL")
        return self


def _matching_key(keys: list[ApiKey], presented: str) -> int | None:
    """The position of the (last) key whose digest is the presented key's. Every key is compared, so the time taken
    does not say which, or whether one, matched."""
    digest = hashlib.sha256(presented.encode()).digest()
    found: int | None = None
    for i, k in enumerate(keys):
        if hmac.compare_digest(digest, k.digest):
            found = i
    return found


class AuthSettings(_Strict):
    jwt: JwtSettings | None = None
    # Behind an API Gateway authorizer (Cognito user pool): the claim of `requestContext.authorizer.claims` that
    # names the tenant ("jwt:" + its value). None: the claims are not read. Trusted only inside Lambda under the
    # Web Adapter (api/identity.in_lambda), where the adapter, not the client, writes the request context header.
    gateway_tenant_claim: str | None = Field(default=None, min_length=1)
    # Operators (the `/admin/v1` routes locally: keys, budgets, spend, deployment health). Same forms as api_keys;
    # the tenant is a label for the logs. On AWS the admin function is authorised by IAM instead.
    admin_keys: list[ApiKey] = Field(default_factory=list)
    # Keys created through the admin API live in the store (durable/keys.py); each process caches a lookup, found
    # or not, for at most this long: a revoked key is refused by every instance within it (plus a store read).
    # Look up `sk-ub-...` keys in the store. Say `store_keys: true` explicitly in a config whose callers' keys all
    # live there (no api_keys, no admin keys: e.g. on AWS, where the admin API is authorised by IAM).
    store_keys: bool = True
    key_cache_seconds: float = Field(default=5.0, ge=0, le=5.0)
    key_cache_entries: int = Field(default=10_000, ge=1, le=1_000_000)

    def is_admin_key(self, presented: str) -> bool:
        return _matching_key(self.admin_keys, presented) is not None


class HedgeSettings(_Strict):
    """Hedged first token (README "Hedged first token"): when the first attempt's first token is later than its
    deployment's live p95 time to first token (clamped to `floor_ms`..`ceiling_ms`; the ceiling until a p95 is
    known; the ceiling wins a floor above it), the next ranked deployment is started alongside and the first to
    stream wins. Bounded per model: at most `max_share` of its recent requests are hedged, and the losers cost at
    most `max_cost_share` of its spend."""

    enabled: bool = False
    floor_ms: float = Field(default=500.0, ge=0)
    ceiling_ms: float = Field(default=5000.0, gt=0)
    max_share: float = Field(default=0.1, ge=0, le=1)
    max_cost_share: float = Field(default=0.05, ge=0, le=1)


class HealthSettings(_Strict):
    """Live deployment stats and the circuit breaker (`server.health`, README "Deployment health"). With a store,
    every instance adds its attempts to time windows in the store's counters and reads every instance's windows
    back; the breaker's state is a store record all instances share. Without one, both stay in the process."""

    # Stats windows: each instance adds its attempts to the current window (one counter per deployment and window);
    # readers combine the last `windows` windows, each weighed by 0.5 ** (age / half_life_seconds).
    window_seconds: float = Field(default=10.0, ge=1, le=300)
    windows: int = Field(default=12, ge=1, le=100)
    half_life_seconds: float = Field(default=30.0, gt=0)
    # How often an instance re-reads the shared stats and circuits (through the counter cache) off the request path.
    refresh_seconds: float = Field(default=1.0, gt=0, le=60)
    # Open the circuit after this many consecutive failures seen by one instance ...
    failures_to_open: int = Field(default=3, ge=1)
    # ... or when the shared windows since the last close hold at least `min_failures` failures that are at least
    # `failure_share` of the attempts (counted over every instance).
    min_failures: int = Field(default=5, ge=1)
    failure_share: float = Field(default=0.5, gt=0, le=1)
    # An open circuit stays open this long; then exactly one instance claims the half-open probe.
    open_seconds: float = Field(default=30.0, gt=0)
    # A claimed probe that reports nothing within this long lapses (its instance died): another may claim it.
    probe_seconds: float = Field(default=30.0, gt=0)


class ServerSettings(_Strict):
    max_body_bytes: int = Field(default=10 * 1024 * 1024, gt=0)
    heartbeat_seconds: float = Field(default=15.0, gt=0)
    # Below the Lambda timeout (900 s) so that a stream ends with a terminal event rather than a cut body.
    stream_deadline_seconds: float = Field(default=840.0, gt=0)
    # How long a response may keep generating into the journal after its client went away.
    detached_cap_seconds: float = Field(default=300.0, ge=0)
    retention_seconds: int = Field(default=24 * 3600, gt=0)
    # A producer renews its lease every third of this; a reader that finds it expired takes the response over.
    lease_seconds: float = Field(default=15.0, gt=0)
    # Group commit: a journal batch closes at this many bytes or after this many milliseconds.
    journal_batch_bytes: int = Field(default=4096, gt=0)
    journal_batch_ms: float = Field(default=100.0, gt=0, le=1000)
    # Attempt loop bounds.
    max_attempts: int = Field(default=6, ge=1, le=50)
    max_total_seconds: float = Field(default=600.0, gt=0)
    hedge: HedgeSettings = HedgeSettings()  # hedged first token, per model (off by default)
    health: HealthSettings = HealthSettings()  # live stats and the circuit breaker, shared through the store
    # Hold function-call argument deltas until the call is complete, so a failover never leaves half a call.
    hold_tool_arguments: bool = True
    compaction_key: str | None = None
    cors: CorsSettings = CorsSettings()
    # CloudWatch metrics as EMF lines on stdout (README "Logs and metrics"); the template turns them on.
    metrics: bool = False
    # X-Ray tracing through Powertools' Tracer (needs the aws-xray-sdk package); imported only when on.
    tracing: bool = False


class Config(_Strict):
    api_keys: list[ApiKey] = Field(default_factory=list)
    models: list[PublicModel] = Field(default_factory=list)
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    allow_anonymous: bool = False  # only for local experiments; every request is tenant "anonymous"

    @model_validator(mode="after")
    def _unique_models(self) -> Config:
        names = [m.name for m in self.models]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"model names must be unique: {', '.join(dupes)}")
        store_keys = self.auth.store_keys and ("store_keys" in self.auth.model_fields_set or self.auth.admin_keys)
        if not (self.api_keys or self.allow_anonymous or self.auth.jwt or self.auth.gateway_tenant_claim
                or store_keys):
            raise ValueError("no api_keys or auth.jwt configured (set auth.store_keys: true when every key is "
                             "created in the store, allow_anonymous: true to run without keys)")
        return self

    def model(self, name: str) -> PublicModel | None:
        for m in self.models:
            if m.name == name and m.enabled_deployments:
                return m
        return None

    def configured_model(self, name: str) -> PublicModel | None:
        """The model of that name whether or not any of its deployments is on."""
        return next((m for m in self.models if m.name == name), None)

    @property
    def served_models(self) -> list[PublicModel]:
        return [m for m in self.models if m.enabled_deployments]

    @property
    def switched_off(self) -> list[tuple[str, str, str]]:
        """(model, deployment, why) for every deployment that is off; the startup log and check-config say them."""
        return [(m.name, d.name, d.off_reason) for m in self.models for d in m.deployments if d.off_reason]

    @property
    def unpriced(self) -> list[tuple[str, Deployment]]:
        """(model, deployment) for every deployment that is on and has no known price (neither in the config nor in
        the catalog): accounted as free and ranked last by `cheapest`; the startup log and check-config say them."""
        return [(m.name, d) for m in self.models for d in m.deployments if d.enabled and not d.price_known]

    def tenant_for_key(self, presented: str) -> str | None:
        """The tenant a presented key belongs to, comparing digests in constant time over all keys."""
        found = self.key_for(presented)
        return found[1].tenant if found is not None else None

    def key_for(self, presented: str) -> tuple[str, ApiKey] | None:
        """(key id, key) of a presented YAML key, in constant time over all keys. The id names the key in spend and
        logs: its `name`, else `yaml-<position in api_keys>` (never derived from the secret)."""
        i = _matching_key(self.api_keys, presented)
        if i is None:
            return None
        return self.yaml_key_id(i), self.api_keys[i]

    def yaml_key_id(self, position: int) -> str:
        """The id of the YAML key at this position of `api_keys` (see `key_for`)."""
        return self.api_keys[position].name or f"yaml-{position}"


@dataclass(frozen=True, slots=True)
class ConfigProblem:
    where: str  # "path/to/file.yaml:12:5 models[0].deployments[1].price.input"
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}"


class ConfigError(Exception):
    def __init__(self, problems: list[ConfigProblem]) -> None:
        super().__init__("\n".join(str(p) for p in problems))
        self.problems = problems


def expand_env(value: Any, env: dict[str, str] | os._Environ[str]) -> Any:
    """Expand `${VAR}` and `${VAR:-default}` in every string of a parsed YAML tree."""
    if isinstance(value, str):
        return _ENV_REF.sub(lambda m: env.get(m.group(1)) or (m.group(2) or ""), value)
    if isinstance(value, list):
        return [expand_env(v, env) for v in value]
    if isinstance(value, dict):
        return {k: expand_env(v, env) for k, v in value.items()}
    return value


def _switch_off_keyless(raw: Any, tree: Any) -> dict[tuple[int, int], str]:
    """A deployment that names an api_key which expanded to nothing is off: its secret is not in this
    environment. `simulated` and keyless local servers simply omit `api_key`. Returns why each is off, by
    (model index, deployment index), naming the variables of the unexpanded value (never a value)."""
    reasons: dict[tuple[int, int], str] = {}
    if not isinstance(tree, dict) or not isinstance(raw, dict):
        return reasons
    for i, model in enumerate(tree.get("models") or []):
        if not isinstance(model, dict):
            continue
        for j, dep in enumerate(model.get("deployments") or []):
            if isinstance(dep, dict) and "api_key" in dep and not dep["api_key"]:
                dep["enabled"] = False
                dep["api_key"] = None
                raw_key = raw["models"][i]["deployments"][j]["api_key"]
                names = list(dict.fromkeys(m.group(1) for m in _ENV_REF.finditer(raw_key))) \
                    if isinstance(raw_key, str) else []
                reasons[i, j] = (f"no key in the environment: {', '.join(names)} "
                                 f"{'is' if len(names) == 1 else 'are'} unset or empty" if names
                                 else "its api_key is empty")
    return reasons


def _locate(root: yaml.Node | None, loc: tuple[int | str, ...], *, key: bool = False) -> yaml.Node | None:
    """The YAML node at `loc` (with `key`, the last key itself: an unknown key), or the deepest one on the way: a
    key the mapping lacks ("Field required") points at the mapping that lacks it."""
    node = root
    for i, part in enumerate(loc):
        if isinstance(node, yaml.MappingNode):
            last_key = key and i == len(loc) - 1
            found = next((k if last_key else v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            found = node.value[part]
        else:
            found = None
        if found is None:
            return node
        node = found
    return node


def _dotted(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def _merge(tree: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    out = dict(tree)
    for key, value in overrides.items():
        below = out.get(key)
        out[key] = _merge(below, value) if isinstance(value, dict) and isinstance(below, dict) else value
    return out


def _message(kind: str, msg: str, loc: tuple[int | str, ...], tree: Any) -> str:
    """pydantic's message, said for a config file: which key is missing, and for an unknown option the known ones
    of the deployment's provider."""
    if kind == "missing" and loc:
        return f"{loc[-1]} is required"
    if kind == "extra_forbidden" and loc:
        known: list[str] = []
        if len(loc) >= 2 and loc[-2] == "options":
            dep: Any = tree
            for part in loc[:-2]:
                if isinstance(dep, list) and isinstance(part, int):
                    dep = dep[part]
                else:
                    dep = dep.get(part) if isinstance(dep, dict) else None
            options_model = PROVIDER_OPTIONS.get(dep.get("provider", "")) if isinstance(dep, dict) else None
            if options_model is not None:
                known = sorted(options_model.model_fields)
        close = difflib.get_close_matches(str(loc[-1]), known, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        where = f"{dep['provider']} option" if known else "key"
        return f"unknown {where} {loc[-1]!r}{hint}" + (f" (known: {', '.join(known)})" if known else "")
    return msg.removeprefix("Value error, ")


def parse_config(text: str, source: str = "<config>", env: dict[str, str] | None = None,
                 overrides: dict[str, Any] | None = None) -> Config:
    """`overrides` (a tree like the YAML's, e.g. from the deployment's environment) is merged over the file before
    validation."""
    env_map = os.environ if env is None else env
    try:
        node = yaml.compose(text)
        tree = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
        raise ConfigError([ConfigProblem(where, f"not valid YAML: {exc}")]) from None
    if tree is None:
        tree = {}
    if not isinstance(tree, dict):
        raise ConfigError([ConfigProblem(source, "the top level must be a mapping")])
    expanded = expand_env(tree, env_map)
    if overrides:
        expanded = _merge(expanded, overrides)
    off = _switch_off_keyless(tree, expanded)
    try:
        config = Config.model_validate(expanded)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            at = _locate(node, loc, key=err["type"] == "extra_forbidden")
            line = f":{at.start_mark.line + 1}:{at.start_mark.column + 1}" if at is not None else ""
            msg = _message(err["type"], err["msg"], loc, expanded)
            problems.append(ConfigProblem(f"{source}{line} {_dotted(loc)}", msg))
        raise ConfigError(problems) from None
    for (i, j), reason in off.items():
        config.models[i].deployments[j]._off_reason = reason
    return config


def load_config(path: str | Path, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(p), f"cannot read: {exc.strerror}")]) from None
    return parse_config(text, str(p), env, overrides)

