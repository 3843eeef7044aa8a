"""Provider adapters, one module per wire protocol, imported only when a deployment uses them (cold start)."""

from __future__ import annotations

import importlib

from unbroken.providers.base import Provider

# provider name in config -> "module:Class". Modules are imported on first use only.
PROVIDERS: dict[str, str] = {
    "openai": "unbroken.providers.openai_chat:OpenAIChatProvider",
    "openai_compatible": "unbroken.providers.openai_chat:OpenAICompatibleProvider",
    "simulated": "unbroken.providers.simulated:SimulatedProvider",
    "anthropic": "unbroken.providers.anthropic:AnthropicProvider",
    "bedrock": "unbroken.providers.bedrock:BedrockProvider",
    "azure": "unbroken.providers.azure:AzureOpenAIProvider",
    "gemini": "unbroken.providers.gemini:GeminiProvider",
    "openai_responses": "unbroken.providers.openai_responses:OpenAIResponsesProvider",
}


def provider_class(name: str) -> type[Provider]:
    try:
        target = PROVIDERS[name]
    except KeyError:
        raise KeyError(f"unknown provider {name!r}; known: {', '.join(sorted(PROVIDERS))}") from None
    module_name, _, class_name = target.partition(":")
    cls: type[Provider] = getattr(importlib.import_module(module_name), class_name)
    return cls
