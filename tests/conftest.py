"""Shared fixtures. Servers are real (uvicorn on 127.0.0.1); nothing here talks to the internet."""

from __future__ import annotations

import os

# Tests never reach real providers: make sure no real key from the developer's shell switches one on.
for _key in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "GEMINI_API_KEY", "AZURE_OPENAI_API_KEY"):
    os.environ.pop(_key, None)
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
