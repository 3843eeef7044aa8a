"""The thin Lambda entry points: run.sh starts the lazy ASGI app under uvicorn the way the adapter expects, and the
worker handler only delegates to unbroken.worker.handle_event."""

from __future__ import annotations

import importlib.util
import os
import re
import stat
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "functions" / "gateway" / "run.sh"
WORKER = ROOT / "functions" / "worker" / "handler.py"


def test_run_sh_is_executable_in_the_tree_and_in_git() -> None:
    assert RUN_SH.stat().st_mode & stat.S_IXUSR
    res = subprocess.run(["git", "ls-files", "-s", str(RUN_SH)], cwd=ROOT, capture_output=True, text=True)
    if res.returncode != 0 or not res.stdout:
        pytest.skip("run.sh is not committed yet")
    assert res.stdout.startswith("100755"), res.stdout


def test_run_sh_starts_lambda_app_on_loopback() -> None:
    text = RUN_SH.read_text(encoding="utf-8")
    assert text.startswith("#!/bin/bash\n")
    command = " ".join(line for line in text.splitlines() if not line.lstrip().startswith("#")).replace("\\", " ")
    assert re.search(r"exec python -m uvicorn unbroken\.app:lambda_app\b", command)
    assert "--host 127.0.0.1" in command
    assert '--port "${AWS_LWA_PORT' in command
    assert "--no-server-header" in command
    assert "--no-access-log" in command
    assert "/opt/python" in text and "PYTHONPATH" in text
    res = subprocess.run(["bash", "-n", str(RUN_SH)], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_run_sh_execs_uvicorn_with_the_adapter_port(tmp_path: Path) -> None:
    """Run the script with a stub `python` that prints its arguments and PYTHONPATH."""
    stub = tmp_path / "python"
    stub.write_text('#!/bin/bash\necho "PYTHONPATH=$PYTHONPATH"\necho "ARGS=$*"\n', encoding="utf-8")
    stub.chmod(0o755)
    env = {
        "PATH": f"{tmp_path}:{os.environ.get('PATH', '')}",
        "AWS_LWA_PORT": "8123",
        "UNBROKEN_LOG_LEVEL": "WARNING",
        "LAMBDA_TASK_ROOT": "/var/task",
        "LAMBDA_RUNTIME_DIR": "/var/runtime",
    }
    res = subprocess.run(["bash", str(RUN_SH)], env=env, capture_output=True, text=True, timeout=10)
    assert res.returncode == 0, res.stderr
    lines = dict(line.split("=", 1) for line in res.stdout.splitlines())
    assert lines["PYTHONPATH"].split(":")[:2] == ["/var/task", "/opt/python"]
    args = lines["ARGS"].split()
    assert args[:3] == ["-m", "uvicorn", "unbroken.app:lambda_app"]
    assert args[args.index("--port") + 1] == "8123"
    assert args[args.index("--host") + 1] == "127.0.0.1"
    assert args[args.index("--log-level") + 1] == "warning"
    assert args[args.index("--http") + 1] == "unbroken.api.http1:H11Protocol"  # the head with the first chunk


def _load_worker_module() -> types.ModuleType:
    spec = importlib.util.spec_from_file_location("unbroken_worker_entry", WORKER)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_worker_handler_delegates(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[dict[str, Any], object]] = []
    fake = types.ModuleType("unbroken.worker")

    def handle_event(event: dict[str, Any], context: object) -> dict[str, Any]:
        calls.append((event, context))
        return {"ok": True, "kind": event["kind"]}

    fake.handle_event = handle_event  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "unbroken.worker", fake)
    module = _load_worker_module()
    ctx = object()
    event = {"kind": "background", "response_id": "resp_x", "epoch": 0}
    assert module.handler(event, ctx) == {"ok": True, "kind": "background"}
    assert calls == [(event, ctx)]


def test_entry_points_are_thin() -> None:
    for path in (RUN_SH, WORKER):
        code = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
        assert len(code) <= 20, (path, len(code))


# --- the gateway app built from the environment: the request body limit on Lambda --------------------------------

_LAMBDA_ENV = {"AWS_LAMBDA_FUNCTION_NAME": "unbroken-gateway", "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap"}


def _app_max_body(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, server: str, env: dict[str, str]) -> int:
    from unbroken.app import app_from_env

    config = tmp_path / "router.yaml"
    config.write_text("allow_anonymous: true\n" + server, encoding="utf-8")
    for name in ("UNBROKEN_SECRETS", "UNBROKEN_CONFIG_SSM", "UNBROKEN_STORE", "UNBROKEN_WORKER_FUNCTION",
                 "AWS_LAMBDA_FUNCTION_NAME", "AWS_LAMBDA_EXEC_WRAPPER"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("UNBROKEN_CONFIG", str(config))
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    limit: int = app_from_env().state.runtime.settings.max_body_bytes
    return limit


def test_on_lambda_the_body_limit_fits_the_invocation_payload(monkeypatch: pytest.MonkeyPatch,
                                                             tmp_path: Path) -> None:
    from unbroken.app import LAMBDA_MAX_BODY_BYTES

    assert LAMBDA_MAX_BODY_BYTES < 6 * 1024 * 1024  # Lambda's synchronous invocation payload limit
    # The 10 MiB default (and any larger setting) is capped on Lambda, kept elsewhere; a smaller one is kept.
    assert _app_max_body(monkeypatch, tmp_path, "", _LAMBDA_ENV) == LAMBDA_MAX_BODY_BYTES
    assert _app_max_body(monkeypatch, tmp_path, "server: {max_body_bytes: 20000000}\n",
                         _LAMBDA_ENV) == LAMBDA_MAX_BODY_BYTES
    assert _app_max_body(monkeypatch, tmp_path, "server: {max_body_bytes: 1000000}\n", _LAMBDA_ENV) == 1000000
    assert _app_max_body(monkeypatch, tmp_path, "", {}) == 10 * 1024 * 1024


def test_a_body_over_the_lambda_cap_is_the_routers_own_413() -> None:
    import httpx

    from tests.support.server import API_KEY, RouterThread, base_config, config_from
    from unbroken.app import LAMBDA_MAX_BODY_BYTES, cap_body_for_lambda

    config = cap_body_for_lambda(config_from(base_config()))
    body = b'{"model": "demo", "input": "' + b"x" * LAMBDA_MAX_BODY_BYTES + b'"}'
    with RouterThread(config) as router, httpx.Client(base_url=router.base_url, timeout=60) as http:
        got = http.post("/responses", content=body, headers={"Authorization": f"Bearer {API_KEY}",
                                                             "Content-Type": "application/json"})
    assert got.status_code == 413, got.text
    assert got.json()["error"]["code"] == "request_too_large"
