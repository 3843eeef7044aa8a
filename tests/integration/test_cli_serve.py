"""`unbroken serve` as `make run` starts it: a ready line with a working curl and openai example, and the `demo`
model answering with the example config's development key and no provider keys."""

from __future__ import annotations

import os
from pathlib import Path

from openai import OpenAI

from tests.support.server import RouterProcess

ROOT = Path(__file__).resolve().parents[2]


def test_serve_with_example_config_answers_demo(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
    env["PYTHONPATH"] = str(ROOT)
    with RouterProcess(ROOT / "router.example.yaml", f"sqlite:///{tmp_path / 'journal.db'}", env=env) as router:
        assert router.base_url.startswith("http://127.0.0.1:") and router.base_url.endswith("/v1")
        assert "curl -N" in router.banner and "from openai import OpenAI" in router.banner
        client = OpenAI(base_url=router.base_url, api_key="sk-unbroken-dev", max_retries=0, timeout=60)
        assert [m.id for m in client.models.list()] == ["demo"]
        response = client.responses.create(model="demo", input="Hello", metadata={"sim_tps": "0", "sim_ttft_ms": "0"})
        assert response.status == "completed" and len(response.output_text.split()) == 120
