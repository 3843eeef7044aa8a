"""`unbroken serve` as `make run` starts it: a ready line with a working curl and openai example, and the `demo`
model answering with the example config's development key and no provider keys. No key reaches its output: the
banner shows a placeholder, and the logs of a served request carry no key either."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
from openai import OpenAI

from tests.support.paths import REPO_ROOT
from tests.support.server import RouterProcess


def test_serve_with_example_config_answers_demo(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(REPO_ROOT)
    with RouterProcess(REPO_ROOT / "router.example.yaml", f"sqlite:///{tmp_path / 'journal.db'}", env=env) as router:
        assert router.base_url.startswith("http://127.0.0.1:") and router.base_url.endswith("/v1")
        assert "curl -N" in router.banner and "from openai import OpenAI" in router.banner
        assert "$UNBROKEN_API_KEY" in router.banner and "sk-unbroken-dev" not in router.banner
        client = OpenAI(base_url=router.base_url, api_key="sk-unbroken-dev", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["demo"]
        response = client.responses.create(model="demo", input="Hello", metadata={"sim_tps": "0", "sim_ttft_ms": "0"})
        assert response.status == "completed" and len(response.output_text.split()) == 120


CALLER_KEY = "sk-caller-7f3e9b1c2d4a"
PROVIDER_KEY = "sk-provider-5a8c0e6f9b21"
WRONG_KEY = "sk-wrong-0d4b7e2a6c13"
KEYED_CONFIG = f"""
api_keys:
  - key: {CALLER_KEY}
    tenant: t1
models:
  - name: demo
    deployments:
      - name: sim
        provider: simulated
        model: sim-1
        options: {{seed: 7, ttft_ms: 0, tps: 0, length: 20}}
  - name: upstream
    deployments:
      - name: openai
        provider: openai
        model: gpt-4o-mini
        base_url: http://127.0.0.1:9/v1
        api_key: {PROVIDER_KEY}
        options: {{max_retries: 0}}
"""


def _wait_for_ready(proc: subprocess.Popen[bytes], stdout: Path, timeout: float = 30.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = stdout.read_text(errors="replace")
        if text.count("\n") >= 3:
            first = text.splitlines()[0]
            assert first.startswith("unbroken ready on "), text
            return first.split()[3]
        assert proc.poll() is None, f"unbroken serve exited with {proc.returncode}"
        time.sleep(0.05)
    raise AssertionError("unbroken serve did not print its ready line in time")


def test_no_key_in_banner_or_logs(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(KEYED_CONFIG)
    out, err = tmp_path / "stdout.txt", tmp_path / "stderr.txt"
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "layers"), str(REPO_ROOT)])
    with open(out, "wb") as stdout, open(err, "wb") as stderr:
        proc = subprocess.Popen(
            [sys.executable, "-m", "unbroken.cli", "serve", "--config", str(config), "--port", "0",
             "--store", f"sqlite:///{tmp_path / 'journal.db'}", "--log-level", "DEBUG"],
            stdout=stdout, stderr=stderr, env=env)
    try:
        base_url = _wait_for_ready(proc, out)
        auth = {"Authorization": f"Bearer {CALLER_KEY}"}
        with httpx.Client(base_url=base_url, timeout=60) as http:
            ok = http.post("/responses", headers=auth, json={"model": "demo", "input": "Hello"})
            assert ok.status_code == 200 and ok.json()["status"] == "completed", ok.text
            with http.stream("POST", "/responses", headers=auth,
                             json={"model": "demo", "input": "Hello", "stream": True}) as streamed:
                assert streamed.status_code == 200 and b"data: [DONE]" in streamed.read()
            # The provider deployment fails (nothing listens on port 9): its error path logs too.
            failed = http.post("/responses", headers=auth, json={"model": "upstream", "input": "Hello"})
            assert failed.status_code >= 400 or failed.json()["status"] == "failed", failed.text
            refused = http.post("/responses", headers={"Authorization": f"Bearer {WRONG_KEY}"},
                                json={"model": "demo", "input": "Hello"})
            assert refused.status_code == 401, refused.text
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
    stdout_text, stderr_text = out.read_text(errors="replace"), err.read_text(errors="replace")
    assert "$UNBROKEN_API_KEY" in stdout_text.splitlines()[1], stdout_text
    assert stderr_text.strip(), "the router logged nothing: the check below would prove nothing"
    for key in (CALLER_KEY, PROVIDER_KEY, WRONG_KEY):
        for name, text in (("stdout", stdout_text), ("stderr", stderr_text)):
            assert key not in text, f"{key} appears in {name}:\n{text}"
