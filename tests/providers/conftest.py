"""Fixtures shared by the adapter tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import httpx
import pytest


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    """The HTTP client an adapter is given (the router shares one process-wide)."""
    async with httpx.AsyncClient() as client:
        yield client
