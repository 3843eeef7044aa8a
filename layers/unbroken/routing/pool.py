"""Provider instances, one per deployment, sharing one HTTP client (connection pooling across requests).

Adapters are imported on first use only (cold start: a deployment that is never called costs nothing)."""

from __future__ import annotations

import httpx

from unbroken.config import Deployment
from unbroken.providers import provider_class
from unbroken.providers.base import Provider


class ProviderPool:
    def __init__(self, http: httpx.AsyncClient | None = None) -> None:
        self._http = http
        self._providers: dict[tuple[str, str], Provider] = {}

    @property
    def http(self) -> httpx.AsyncClient:
        if self._http is None:
            self._http = httpx.AsyncClient(
                limits=httpx.Limits(max_connections=200, max_keepalive_connections=50, keepalive_expiry=30),
                follow_redirects=False,
            )
        return self._http

    def get(self, model: str, deployment: Deployment) -> Provider:
        key = (model, deployment.name)
        provider = self._providers.get(key)
        if provider is None or provider.deployment is not deployment:
            provider = provider_class(deployment.provider)(deployment, self.http)
            self._providers[key] = provider
        return provider

    async def aclose(self) -> None:
        for provider in self._providers.values():
            await provider.aclose()
        self._providers.clear()
        if self._http is not None:
            await self._http.aclose()
            self._http = None
