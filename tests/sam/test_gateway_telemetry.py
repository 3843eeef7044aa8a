"""The gateway started exactly as on Lambda (functions/gateway/run.sh, the adapter's environment), one streamed
request through it, and what it wrote: JSON log lines on stderr whose correlation id is the response id (no prompt
text, no key), and one EMF blob on stdout with the response's metrics under model and deployment."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import yaml

from tests.support.client import post_stream
from tests.support.server import API_KEY, base_config, sim_model

ROOT = Path(__file__).resolve().parents[2]
RUN_SH = ROOT / "functions" / "gateway" / "run.sh"
PROMPT = "zebra-secret-prompt-4711 tell me something"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            out.append(json.loads(line))
    return out


def test_the_gateway_logs_json_with_the_response_id_and_emits_emf(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(yaml.safe_dump(base_config(sim_model("demo", deployments=2))), encoding="utf-8")
    port = _free_port()
    env = {
        "PATH": f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
        "PYTHONPATH": str(ROOT / "layers"),
        "AWS_LWA_PORT": str(port),
        "AWS_LAMBDA_FUNCTION_NAME": "unbroken-GatewayFunction-test",
        "AWS_LAMBDA_EXEC_WRAPPER": "/opt/bootstrap",
        "LAMBDA_TASK_ROOT": str(tmp_path / "task"),
        "UNBROKEN_CONFIG": str(config),
        "UNBROKEN_STORE": "memory://",
        "UNBROKEN_LOG_LEVEL": "INFO",
        "UNBROKEN_METRICS": "true",
        "POWERTOOLS_SERVICE_NAME": "unbroken",
        "POWERTOOLS_METRICS_NAMESPACE": "UnbrokenTest",
    }
    proc = subprocess.Popen(["bash", str(RUN_SH)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            try:
                if httpx.get(f"{base}/healthz", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "the gateway did not become healthy"
            time.sleep(0.1)
        body = {"model": "demo", "input": PROMPT, "metadata": {"sim_fault": "cut:5"}}
        response, stream = post_stream(f"{base}/v1", body)
        assert response.status_code == 200
        assert stream.terminal["type"] == "response.completed"
        response_id = stream.response["id"]
        router = stream.response["router"]
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=15)

    assert PROMPT not in stderr + stdout and API_KEY not in stderr + stdout
    logs = _json_lines(stderr)
    assert logs, stderr
    assert all({"level", "message", "timestamp", "service"} <= line.keys() for line in logs)
    mine = [line for line in logs if line.get("correlation_id") == response_id]
    messages = {line["message"] for line in mine}
    assert {"response created", "attempt failed", "response attempts"} <= messages, messages
    assert all(line.get("tenant") == "t1" and line.get("model") == "demo" for line in mine)
    summary = next(line for line in mine if line["message"] == "response attempts")
    assert summary["attempt_count"] == 2 and summary["deployment"] == router["served_by"]
    assert summary["cost_usd"] == router["cost_usd"] and summary["usage_estimated"] is True
    assert summary["ttft_ms"] is not None and summary["output_tokens"] == stream.response["usage"]["output_tokens"]
    failed = next(line for line in mine if line["message"] == "attempt failed")
    assert failed["attempt"] == 1 and failed["deployment"] == "sim-0" and failed["output_tokens"] > 0

    blobs = [b for b in _json_lines(stdout) if "_aws" in b]
    assert len(blobs) == 1, stdout
    blob = blobs[0]
    directive = blob["_aws"]["CloudWatchMetrics"][0]
    assert directive["Namespace"] == "UnbrokenTest"
    assert sorted(directive["Dimensions"][0]) == ["deployment", "model", "service"]
    assert (blob["model"], blob["deployment"], blob["service"]) == ("demo", router["served_by"], "unbroken")
    names = {m["Name"] for m in directive["Metrics"]}
    assert {"Requests", "TimeToFirstToken", "OutputTokens", "CostUSD", "Failovers", "Continuations"} <= names
    assert blob["Requests"] == [1.0] and blob["Continuations"] == [1.0]
    assert blob["OutputTokens"] == [float(stream.response["usage"]["output_tokens"])]
    assert abs(blob["CostUSD"][0] - router["cost_usd"]) < 1e-9
