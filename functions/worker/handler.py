"""Worker entry point: background responses, takeovers and handoffs, invoked asynchronously (events/README.md)."""

from __future__ import annotations

from typing import Any


def handler(event: dict[str, Any], context: object) -> dict[str, Any]:
    # Imported on first call, not at module load: this module then loads without the layer (tests inject a fake
    # `unbroken.worker`), and Python's import cache makes later invocations pay nothing.
    from unbroken.worker import handle_event

    return handle_event(event, context)
