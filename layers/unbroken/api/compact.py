"""`POST /v1/responses/compact`: pack a conversation into one `compaction` item (lossless, encrypted, bound to the
caller's tenant), and `expand_compaction_for`, which turns such an item back into the items it holds wherever it
comes back as input (`POST /v1/responses`, or compacting again).

Compaction here is lossless packing of the context, not summarisation: no model is called, so `usage` is zero.
`instructions` is accepted and not packed: like `previous_response_id` chains, the next request brings its own.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Annotated, Any

from fastapi import APIRouter, Body, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from unbroken.api.auth import authenticate
from unbroken.api.errors import APIError
from unbroken.api.request import MAX_INPUT_STRING, ItemParam, items_from_input
from unbroken.ir import Item, Usage
from unbroken.protocol.compaction import CompactionCodec, CompactionError, codec_for
from unbroken.protocol.responses import new_id, usage_object
from unbroken.runtime import Runtime

router = APIRouter()

# Above this request size, sealing (JSON + zlib + AES) runs in a worker thread rather than on the event loop.
_THREAD_THRESHOLD_BYTES = 256 * 1024


class CompactBody(BaseModel):
    """`CompactResponseMethodPublicBody`. `model` is required by the spec; checked in the route for a clear 400."""

    model_config = ConfigDict(extra="allow")  # extensions are allowed by the spec, and ignored

    model: str | None = None
    input: str | list[ItemParam] | None = None
    previous_response_id: str | None = None
    instructions: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=64)

    @field_validator("input", mode="before")
    @classmethod
    def _shorthand_messages(cls, value: Any) -> Any:
        # OpenAI's shorthand `{role, content}` is a message item, as on /v1/responses.
        if isinstance(value, list):
            return [{"type": "message", **v} if isinstance(v, dict) and "type" not in v and "role" in v else v
                    for v in value]
        return value

    @field_validator("input")
    @classmethod
    def _input_size(cls, value: Any) -> Any:
        if isinstance(value, str) and len(value) > MAX_INPUT_STRING:
            raise ValueError("input string is longer than 10 MiB")
        return value


def compaction_codec(runtime: Runtime) -> CompactionCodec:
    try:
        return codec_for(runtime.settings.compaction_key)
    except ValueError as exc:
        # A bad key is the operator's error; the message names the setting, never the key.
        raise APIError(500, f"Compaction is misconfigured: {exc}.", code="server_error") from None


def expand_compaction_for(tenant: str, runtime: Runtime) -> Callable[[str, str], list[Item]]:
    """The `expand_compaction` callable for `items_from_input`: a compaction item made for `tenant` becomes the
    items it holds; anything else (another tenant's item, a modified one) is a 400 naming the item."""

    def expand(encrypted_content: str, param: str) -> list[Item]:
        try:
            return compaction_codec(runtime).open(tenant, encrypted_content)
        except CompactionError:
            raise APIError(400, "The compaction item could not be opened: it was not made by this router for this "
                           "caller, or it was modified.", param=f"{param}.encrypted_content",
                           code="invalid_encrypted_content") from None

    return expand


@router.post("/v1/responses/compact", response_model=None)
async def compact_response(
    request: Request,
    body: Annotated[CompactBody, Body()],
    tenant: Annotated[str, Depends(authenticate)],
) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    if not body.model:
        raise APIError(400, "Missing required parameter: 'model'.", param="model", code="missing_required_parameter")
    if runtime.config.model(body.model) is None:
        raise APIError(404, f"The model '{body.model}' does not exist or you do not have access to it.",
                       param="model", code="model_not_found")
    if body.previous_response_id is not None:
        # Needs stored responses to load the chain from; until the store serves them, say so rather than drop it.
        raise APIError(400, "previous_response_id is not supported by /v1/responses/compact yet: send the items "
                       "as input.", param="previous_response_id", code="unsupported_parameter")
    codec = compaction_codec(runtime)
    items = items_from_input(body.input, expand_compaction=expand_compaction_for(tenant, runtime))
    if not items:
        raise APIError(400, "Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    large = int(request.headers.get("content-length") or 0) > _THREAD_THRESHOLD_BYTES
    token = await asyncio.to_thread(codec.seal, tenant, items) if large else codec.seal(tenant, items)
    return JSONResponse({
        "id": new_id("resp"),
        "object": "response.compaction",
        "output": [{"id": new_id("cmp"), "type": "compaction", "encrypted_content": token}],
        "created_at": int(time.time()),
        "usage": usage_object(Usage()),
    })
