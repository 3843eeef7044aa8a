"""`GET /v1/models`: the public models this router serves (those with at least one enabled deployment)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request

from unbroken.api.auth import authenticate

router = APIRouter()


@router.get("/v1/models")
async def list_models(request: Request, tenant: Annotated[str, Depends(authenticate)]) -> dict[str, Any]:
    config = request.app.state.runtime.config
    return {
        "object": "list",
        "data": [{"id": m.name, "object": "model", "created": 0, "owned_by": "unbroken",
                  **({"description": m.description} if m.description else {})}
                 for m in config.served_models],
    }
