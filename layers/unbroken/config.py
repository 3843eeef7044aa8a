"""The router's configuration: a YAML file with `${VAR}` / `${VAR:-default}` expanded from the environment.

A deployment whose `api_key` expands to nothing is switched off (so the example config serves only what has keys);
a model with no deployment left is not served. `load_config` raises `ConfigError` listing every problem with its
file location.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

# The `provider` values a deployment may name; `unbroken.providers.PROVIDERS` maps each to its adapter (a test keeps
# the two in step). Listed here so that reading a config never imports an adapter.
PROVIDER_NAMES = frozenset({"openai", "openai_compatible", "simulated", "anthropic", "bedrock", "azure", "gemini",
                            "openai_responses"})

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Price(_Strict):
    """USD per 1M tokens."""

    input: float = Field(ge=0)
    output: float = Field(ge=0)
    cached_input: float | None = Field(default=None, ge=0)

    def cost(self, input_tokens: int, output_tokens: int, cached_input_tokens: int = 0) -> float:
        cached_rate = self.cached_input if self.cached_input is not None else self.input
        uncached = max(0, input_tokens - cached_input_tokens)
        return (uncached * self.input + cached_input_tokens * cached_rate + output_tokens * self.output) / 1e6


class Deployment(_Strict):
    name: str = Field(min_length=1)
    provider: str
    model: str = Field(min_length=1)
    base_url: str | None = None
    api_key: str | None = None
    region: str | None = None
    price: Price = Price(input=0, output=0)
    # Provider-specific knobs and resilience limits; documented in README "Configuration".
    options: dict[str, Any] = Field(default_factory=dict)
    enabled: bool = True

    @field_validator("provider")
    @classmethod
    def _known_provider(cls, value: str) -> str:
        if value not in PROVIDER_NAMES:
            raise ValueError(f"unknown provider {value!r}; known: {', '.join(sorted(PROVIDER_NAMES))}")
        return value

    def option(self, key: str, default: Any = None) -> Any:
        return self.options.get(key, default)


class PublicModel(_Strict):
    name: str = Field(min_length=1)
    description: str | None = None
    deployments: list[Deployment] = Field(min_length=1)

    @model_validator(mode="after")
    def _unique_deployments(self) -> PublicModel:
        names = [d.name for d in self.deployments]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"deployment names must be unique within a model: {', '.join(dupes)}")
        return self

    @property
    def enabled_deployments(self) -> list[Deployment]:
        return [d for d in self.deployments if d.enabled]


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

    @property
    def digest(self) -> bytes:
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


class AuthSettings(_Strict):
    jwt: JwtSettings | None = None
    # Behind an API Gateway authorizer (Cognito user pool): the claim of `requestContext.authorizer.claims` that
    # names the tenant ("jwt:" + its value). None: the claims are not read. Trusted only inside Lambda under the
    # Web Adapter (api/identity.in_lambda), where the adapter, not the client, writes the request context header.
    gateway_tenant_claim: str | None = Field(default=None, min_length=1)


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
        if not (self.api_keys or self.allow_anonymous or self.auth.jwt or self.auth.gateway_tenant_claim):
            raise ValueError("no api_keys or auth.jwt configured (set allow_anonymous: true to run without keys)")
        return self

    def model(self, name: str) -> PublicModel | None:
        for m in self.models:
            if m.name == name and m.enabled_deployments:
                return m
        return None

    @property
    def served_models(self) -> list[PublicModel]:
        return [m for m in self.models if m.enabled_deployments]

    def tenant_for_key(self, presented: str) -> str | None:
        """The tenant a presented key belongs to, comparing digests in constant time over all keys."""
        digest = hashlib.sha256(presented.encode()).digest()
        found: str | None = None
        for k in self.api_keys:
            if hmac.compare_digest(digest, k.digest):
                found = k.tenant
        return found


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


def _switch_off_keyless(tree: Any) -> None:
    """A deployment that names an api_key which expanded to nothing is off: its secret is not in this
    environment. `simulated` and keyless local servers simply omit `api_key`."""
    if not isinstance(tree, dict):
        return
    for model in tree.get("models") or []:
        if not isinstance(model, dict):
            continue
        for dep in model.get("deployments") or []:
            if isinstance(dep, dict) and "api_key" in dep and not dep["api_key"]:
                dep["enabled"] = False
                dep["api_key"] = None


def _locate(root: yaml.Node | None, loc: tuple[int | str, ...]) -> yaml.Node | None:
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            node = next((v for k, v in node.value if k.value == part), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
        if node is None:
            return None
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
    tree = expand_env(tree, env_map)
    if overrides:
        tree = _merge(tree, overrides)
    _switch_off_keyless(tree)
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            at = _locate(node, loc)
            line = f":{at.start_mark.line + 1}:{at.start_mark.column + 1}" if at is not None else ""
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(ConfigProblem(f"{source}{line} {_dotted(loc)}", msg))
        raise ConfigError(problems) from None


def load_config(path: str | Path, env: dict[str, str] | None = None,
                overrides: dict[str, Any] | None = None) -> Config:
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([ConfigProblem(str(p), f"cannot read: {exc.strerror}")]) from None
    return parse_config(text, str(p), env, overrides)

