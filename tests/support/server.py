"""Real routers for tests: `RouterThread` runs the app under uvicorn in a thread of the test process (fast, and the
test can reach into its runtime); `RouterProcess` runs `unbroken serve` as a subprocess (for SIGKILL and
cross-process tests). Both listen on 127.0.0.1 on an ephemeral port and are stopped by their context manager."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import uvicorn
import yaml

from unbroken.api.app import create_app
from unbroken.api.http1 import H11Protocol
from unbroken.config import Config, parse_config

API_KEY = "sk-test"
START_TIMEOUT = 60.0


def config_from(data: dict[str, Any] | str) -> Config:
    text = data if isinstance(data, str) else yaml.safe_dump(data)
    return parse_config(text, "<test>", env={})


def sim_model(name: str = "demo", deployments: int = 2, **options: Any) -> dict[str, Any]:
    """A public model on simulated deployments (fast by default: no delays)."""
    opts = {"seed": 7, "ttft_ms": 0, "tps": 0, "length": 40, **options}
    return {"name": name, "deployments": [
        {"name": f"sim-{i}", "provider": "simulated", "model": f"sim-{i}", "price": {"input": 1.0, "output": 2.0},
         "options": dict(opts)} for i in range(deployments)]}


def base_config(*models: dict[str, Any], **server: Any) -> dict[str, Any]:
    return {"api_keys": [{"key": API_KEY, "tenant": "t1"}, {"key": "sk-other", "tenant": "t2"}],
            "models": list(models) or [sim_model()], "server": server}


def admin_config(admin_key: str, *models: dict[str, Any], api_keys: list[dict[str, str]] | None = None,
                 **server: Any) -> dict[str, Any]:
    """`base_config` with an admin key (tenant `ops`); `api_keys` replaces the default YAML keys."""
    cfg = base_config(*models, **server)
    if api_keys is not None:
        cfg["api_keys"] = api_keys
    cfg["auth"] = {"admin_keys": [{"key": admin_key, "tenant": "ops"}]}
    return cfg


class RouterThread:
    def __init__(self, config: Config | dict[str, Any], store: Any = None,
                 lambda_env: dict[str, str] | None = None, http: type[asyncio.Protocol] = H11Protocol) -> None:
        """`http`: the server's protocol class; the router's own (`unbroken serve`, the Lambda) by default."""
        self.config = config if isinstance(config, Config) else config_from(config)
        self.app = create_app(self.config, store, lambda_env=lambda_env)
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.server = uvicorn.Server(uvicorn.Config(self.app, http=http, log_level="warning", access_log=False,
                                                    lifespan="on", timeout_graceful_shutdown=2))
        self.server.install_signal_handlers = lambda: None  # type: ignore[method-assign]
        self.loop: asyncio.AbstractEventLoop | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    @property
    def runtime(self) -> Any:
        return self.app.state.runtime

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def _run(self) -> None:
        self.loop = asyncio.new_event_loop()
        try:
            self.loop.run_until_complete(self.server.serve(sockets=[self.sock]))
        finally:
            self.loop.run_until_complete(self.loop.shutdown_asyncgens())
            self.loop.close()

    def __enter__(self) -> RouterThread:
        self.thread.start()
        started = threading.Event()

        def wait() -> None:
            for _ in range(int(START_TIMEOUT * 100)):
                if self.server.started:
                    started.set()
                    return
                threading.Event().wait(0.01)

        wait()
        assert started.is_set(), "router did not start"
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=15)
        self.sock.close()


class RouterProcess:
    """`unbroken serve` in a subprocess; `kill()` sends SIGKILL (no cleanup, like a crashed Lambda)."""

    def __init__(self, config_path: Path, store_url: str, env: dict[str, str] | None = None,
                 extra_args: list[str] | None = None) -> None:
        self.config_path = config_path
        self.store_url = store_url
        self.env = {**os.environ, **(env or {})}
        self.extra_args = extra_args or []
        self.proc: subprocess.Popen[str] | None = None
        self.base_url = ""
        self.banner = ""

    def __enter__(self) -> RouterProcess:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "unbroken.cli", "serve", "--config", str(self.config_path), "--port", "0",
             "--store", self.store_url, "--log-level", "WARNING", *self.extra_args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=self.env)
        assert self.proc.stdout is not None
        line = _readline_with_timeout(self.proc, START_TIMEOUT)
        assert line.startswith("unbroken ready on "), f"unexpected first line: {line!r}"
        self.base_url = line.split()[3]
        self.banner = line + _readline_with_timeout(self.proc, START_TIMEOUT) + _readline_with_timeout(
            self.proc, START_TIMEOUT)
        threading.Thread(target=self._drain, daemon=True).start()
        return self

    def _drain(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for _ in self.proc.stdout:
            pass

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _readline_with_timeout(proc: subprocess.Popen[str], timeout: float) -> str:
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(proc.stdout.readline() if proc.stdout else ""),
                              daemon=True)
    reader.start()
    reader.join(timeout)
    if not result:
        proc.kill()
        raise AssertionError("router process did not print its ready line in time")
    return result[0]
