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
from tests.support.server import API_KEY, RouterProcess, RouterThread, base_config, sim_model


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
  - name: offline
    deployments:
      - name: keyless
        provider: anthropic
        model: claude-sonnet-4-5
        api_key: ${{UNBROKEN_TEST_ABSENT_KEY}}
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
            offline = http.post("/responses", headers=auth, json={"model": "offline", "input": "Hello"})
            assert offline.status_code == 503 and offline.json()["error"]["code"] == "model_unavailable", offline.text
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
    # The startup log names every switched-off deployment and the variable its key would come from.
    assert "deployment switched off: offline/keyless" in stderr_text and "UNBROKEN_TEST_ABSENT_KEY" in stderr_text
    for key in (CALLER_KEY, PROVIDER_KEY, WRONG_KEY):
        for name, text in (("stdout", stdout_text), ("stderr", stderr_text)):
            assert key not in text, f"{key} appears in {name}:\n{text}"


def _cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    base["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT / "layers"), str(REPO_ROOT)])
    return subprocess.run([sys.executable, "-m", "unbroken.cli", *args], capture_output=True, text=True, timeout=60,
                          env={**base, **(env or {})})


def test_version_prints_the_package_version() -> None:
    from importlib.metadata import version

    run = _cli("--version")
    assert run.returncode == 0 and run.stdout.strip() == f"unbroken {version('unbroken')}", run


def test_check_config_names_switched_off_deployments_and_why(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text(KEYED_CONFIG)
    run = _cli("check-config", str(config), env={"UNBROKEN_TEST_ABSENT_KEY": ""})
    assert run.returncode == 0, run
    lines = run.stdout.splitlines()
    assert "model offline: not served (every deployment is off: requests get a 503)" in lines, run.stdout
    assert "  off: keyless: no key in the environment: UNBROKEN_TEST_ABSENT_KEY is unset or empty" in lines
    assert "model demo: 1 deployment(s) on" in lines and PROVIDER_KEY not in run.stdout
    # With the key there the deployment is on, and its value is printed nowhere.
    on = _cli("check-config", str(config), env={"UNBROKEN_TEST_ABSENT_KEY": "sk-ant-9c1e"})
    assert "model offline: 1 deployment(s) on" in on.stdout.splitlines() and "sk-ant-9c1e" not in on.stdout


def test_check_config_reports_option_problems_with_their_place(tmp_path: Path) -> None:
    config = tmp_path / "router.yaml"
    config.write_text("""api_keys: [{key: k, tenant: t}]
models:
  - name: local
    deployments:
      - name: vllm
        provider: openai_compatible
        model: llama
        options: {stall_timeout_s: fast, max_retrys: 0}
""")
    run = _cli("check-config", str(config))
    assert run.returncode == 1, run
    assert run.stdout.splitlines() == [
        f"{config}:8:36 models[0].deployments[0].options.stall_timeout_s: Input should be a valid number, unable to "
        "parse string as a number",
        f"{config}:8:42 models[0].deployments[0].options.max_retrys: unknown openai_compatible option 'max_retrys'; "
        "did you mean max_retries? (known: context_window, continuation_body, extra_body, image_urls, "
        "literal_continuation, max_retries, max_tokens_field, native_json_schema, prefix_flag, reasoning_effort, "
        "stall_timeout_s, system_role, ttft_timeout_s)",
        f"2 problem(s) in {config}",
    ], run.stdout
    config.write_text(config.read_text().replace("{stall_timeout_s: fast, max_retrys: 0}", "{stall_timeout_s: 5}"))
    run = _cli("check-config", str(config))
    assert run.returncode == 1 and run.stdout.startswith(
        f"{config}:5:9 models[0].deployments[0]: provider openai_compatible needs a base_url"), run.stdout


def test_a_model_whose_deployments_are_all_off_is_a_503_saying_why() -> None:
    config = base_config(sim_model(), {"name": "offline", "deployments": [
        {"name": "keyless", "provider": "openai", "model": "gpt-4o-mini", "api_key": "${OPENAI_API_KEY}"}]})
    with RouterThread(config) as router, httpx.Client(base_url=router.base_url, timeout=30,
                                                      headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        chat = {"model": "offline", "messages": [{"role": "user", "content": "Hi"}]}
        for path, body in (("/responses", {"model": "offline", "input": "Hi"}), ("/chat/completions", chat)):
            got = http.post(path, json=body)
            assert got.status_code == 503, got.text
            error = got.json()["error"]
            assert error["code"] == "model_unavailable" and error["param"] == "model"
            assert "keyless: no key in the environment: OPENAI_API_KEY" in error["message"]
        missing = http.post("/responses", json={"model": "nosuch", "input": "Hi"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "model_not_found"
        assert [m["id"] for m in http.get("/models").json()["data"]] == ["demo"]
