"""Azure OpenAI as an upstream: Chat Completions (default) or the Responses API, on the v1 URL style (default) or
the classic per-deployment URL style with a dated `api-version`.

Deployment options:
  api: "chat" | "responses"                 which wire protocol (default chat)
  api_style: "v1" | "classic"               v1: {base_url}/openai/v1/chat/completions | /openai/v1/responses
                                            classic: {base_url}/openai/deployments/{model}/chat/completions
                                                     ?api-version={api_version} (responses: /openai/responses)
  api_version: str                          required by classic (defaults below); optional query on v1
  auth: "api-key" | "bearer"                `api-key: <key>` header (default) or `Authorization: Bearer <token>`

`model` is the Azure deployment name. The chat wire is the OpenAI Chat adapter's: Azure's extras (the empty-choices
first chunk with `prompt_filter_results`, per-chunk `content_filter_results`, annotation chunks after
`finish_reason`, `finish_reason: content_filter`, the prompt-filter 400 with code `content_filter`) are all things
that parser already steps over or maps.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from unbroken.config import AzureOptions, Deployment
from unbroken.ir import Delta, GenerationRequest
from unbroken.providers.base import Capabilities, Provider, ProviderError
from unbroken.providers.openai_chat import OpenAIChatProvider
from unbroken.providers.openai_responses import OpenAIResponsesProvider

if TYPE_CHECKING:
    import httpx

CLASSIC_CHAT_API_VERSION = "2024-10-21"
CLASSIC_RESPONSES_API_VERSION = "2025-04-01-preview"


def _base(deployment: Deployment) -> str:
    if not deployment.base_url:  # the config refuses an azure deployment without one
        raise ProviderError("bad_request", f"deployment {deployment.name} (azure) needs a base_url "
                            "(https://<resource>.openai.azure.com)")
    base = deployment.base_url.rstrip("/")
    # Accept a base_url given with the API prefix already on it.
    for suffix in ("/openai/v1", "/openai"):
        if base.endswith(suffix):
            return base[: -len(suffix)]
    return base


def _auth_headers(deployment: Deployment) -> dict[str, str]:
    headers = {"content-type": "application/json", "accept": "text/event-stream"}
    if deployment.api_key:
        if deployment.options_as(AzureOptions).auth == "bearer":
            headers["authorization"] = f"Bearer {deployment.api_key}"
        else:
            headers["api-key"] = deployment.api_key
    return headers


def _classic(deployment: Deployment) -> bool:
    return deployment.options_as(AzureOptions).api_style == "classic"


class AzureChatProvider(OpenAIChatProvider):
    name = "azure"

    def url(self) -> str:
        base = _base(self.deployment)
        if _classic(self.deployment):
            version = self.deployment.options_as(AzureOptions).api_version or CLASSIC_CHAT_API_VERSION
            return f"{base}/openai/deployments/{self.deployment.model}/chat/completions?api-version={version}"
        v1_version = self.deployment.options_as(AzureOptions).api_version
        return f"{base}/openai/v1/chat/completions" + (f"?api-version={v1_version}" if v1_version else "")

    def headers(self) -> dict[str, str]:
        return _auth_headers(self.deployment)


class AzureResponsesProvider(OpenAIResponsesProvider):
    name = "azure"
    # Azure's encrypted reasoning is bound to Azure, not to api.openai.com.
    reasoning_provider = "azure"

    def url(self) -> str:
        base = _base(self.deployment)
        return f"{base}/openai/responses" if _classic(self.deployment) else f"{base}/openai/v1/responses"

    def params(self) -> dict[str, str] | None:
        default = CLASSIC_RESPONSES_API_VERSION if _classic(self.deployment) else None
        version = self.deployment.options_as(AzureOptions).api_version or default
        return {"api-version": version} if version else None

    def headers(self) -> dict[str, str]:
        return _auth_headers(self.deployment)


class AzureOpenAIProvider(Provider):
    """The configured `azure` provider: delegates to the chat or the Responses adapter (`options.api`)."""

    name = "azure"

    def __init__(self, deployment: Deployment, http: httpx.AsyncClient) -> None:
        super().__init__(deployment, http)
        chat = deployment.options_as(AzureOptions).api == "chat"
        self.inner: Provider = AzureChatProvider(deployment, http) if chat else AzureResponsesProvider(deployment, http)

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        return self.inner.stream(request)

    async def aclose(self) -> None:
        await self.inner.aclose()
