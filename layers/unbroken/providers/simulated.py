"""The `simulated` provider: the OpenAI Chat adapter pointed at the built-in simulated upstream (a real HTTP server
in this process unless the deployment names a `base_url`). Deployment options become the simulator's controls;
`sim_*` request metadata overrides them. Only this adapter forwards those keys: no real provider ever sees them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from unbroken.config import SimulatedOptions
from unbroken.ir import Delta, GenerationRequest
from unbroken.providers.base import Capabilities
from unbroken.providers.openai_chat import OpenAIChatProvider

# Deployment option (`config.SimulatedOptions`; unset ones are not sent) -> simulator control.
_OPTION_KEYS = {
    "seed": "sim_seed",
    "ttft_ms": "sim_ttft_ms",
    "tps": "sim_tps",
    "length": "sim_length",
    "fault": "sim_fault",
    "fault_attempts": "sim_fault_attempts",
    "literal_continuation": "sim_literal_continuation",
    "reject_prefill": "sim_reject_prefill",
    "parallel_tools": "sim_parallel_tools",
    "fail_rate": "sim_fail_rate",
    "prompt_cache": "sim_prompt_cache",
}


def _as_str(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


class SimulatedProvider(OpenAIChatProvider):
    name = "simulated"

    default_capabilities = Capabilities(literal_continuation=True, image_urls=True, native_json_schema=True)

    def url(self) -> str:
        assert self._base_url is not None
        return f"{self._base_url.rstrip('/')}/chat/completions"

    _base_url: str | None = None

    def build_body(self, request: GenerationRequest) -> dict[str, Any]:
        body = super().build_body(request)
        options = self.deployment.options_as(SimulatedOptions).model_dump()
        controls = {sim: _as_str(options[opt]) for opt, sim in _OPTION_KEYS.items() if options[opt] is not None}
        controls.update({k: v for k, v in request.metadata.items() if k.startswith("sim_")})
        if request.trace_id and "sim_request" not in controls:
            # Lets `sim_fault_attempts` count the attempts of one response.
            controls["sim_request"] = request.trace_id
        body["metadata"] = controls
        return body

    async def stream(self, request: GenerationRequest) -> AsyncIterator[Delta]:
        if self.deployment.base_url:
            self._base_url = self.deployment.base_url
        else:
            # Imported here, not at the top: a deployment of real providers never loads the simulator (cold start).
            from unbroken.simulator import shared_upstream

            self._base_url = (await shared_upstream()).base_url
        async for delta in super().stream(request):
            yield delta
