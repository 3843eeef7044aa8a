"""`POST /v1/responses/compact`: pack a conversation into one `compaction` item (lossless, encrypted, bound to the
caller's tenant). Such an item is opened again wherever it comes back as input (`POST /v1/responses`, or compacting
again) by `protocol.compaction.expand_compaction_for`.

Compaction here is lossless packing of the context, not summarisation: no model is called, so `usage` is zero.
`instructions` is accepted and not packed: like `previous_response_id` chains, the next request brings its own.
"""

from __future__ import annotations

import asyncio
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from unbroken.api.auth import authenticate
from unbroken.durable.runtime import Runtime
from unbroken.durable.service import served_model
from unbroken.errors import invalid
from unbroken.ir import Usage
from unbroken.protocol.body import parse_json, validate
from unbroken.protocol.compaction import compaction_codec, expand_compaction_for
from unbroken.protocol.request import InputParam, items_from_input
from unbroken.protocol.responses import new_id, usage_object

router = APIRouter()

# Above this request size, sealing (JSON + zlib + AES) runs in a worker thread rather than on the event loop.
_THREAD_THRESHOLD_BYTES = 256 * 1024


class CompactBody(BaseModel):
    """`CompactResponseMethodPublicBody`. `model` is required by the spec; checked in the route for a clear 400."""

    model_config = ConfigDict(extra="allow")  # extensions are allowed by the spec, and ignored

    model: str | None = None
    input: InputParam = None
    previous_response_id: str | None = None
    instructions: str | None = None
    prompt_cache_key: str | None = Field(default=None, max_length=64)



@router.post("/v1/responses/compact", response_model=None)
async def compact_response(request: Request, tenant: Annotated[str, Depends(authenticate)]) -> JSONResponse:
    runtime: Runtime = request.app.state.runtime
    body = validate(CompactBody, parse_json(await request.body()))
    served_model(runtime, body.model)
    if body.previous_response_id is not None:
        # Needs stored responses to load the chain from; until the store serves them, say so rather than drop it.
        raise invalid("previous_response_id is not supported by /v1/responses/compact yet: send the items "
                       "as input.", param="previous_response_id", code="unsupported_parameter")
    secret = runtime.settings.compaction_key
    codec = compaction_codec(secret)
    items = items_from_input(body.input, expand_compaction=expand_compaction_for(tenant, secret))
    if not items:
        raise invalid("Missing required parameter: 'input'.", param="input", code="missing_required_parameter")
    large = int(request.headers.get("content-length") or 0) > _THREAD_THRESHOLD_BYTES
    token = await asyncio.to_thread(codec.seal, tenant, items) if large else codec.seal(tenant, items)
    return JSONResponse({
        "id": new_id("resp"),
        "object": "response.compaction",
        "output": [{"id": new_id("cmp"), "type": "compaction", "encrypted_content": token}],
        "created_at": int(time.time()),
        "usage": usage_object(Usage()),
    })
