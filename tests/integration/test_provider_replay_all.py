"""EVERY recorded stream of anthropic, bedrock, azure, gemini and openai_responses, replayed by that provider's fake
upstream over real HTTP, through the real router (`POST /v1/responses`, stream): every event validates against the
Open Responses spec, the stream is well formed, and the outcome is the recording's — text and function calls (name
and parsed arguments) as recorded and `response.completed`, or `response.incomplete` with the recorded reason, or,
for a recording that ends in a provider error / is synthetic-invalid, anything but `response.completed`.

Expected values come from the adapter-level tests' own fixture parsers (tests/providers/), never from the adapters.
One router per module with one public model per case (a single deployment, `max_retries: 0`): a failing case cannot
trip the health of another case's deployment, and the fakes are started once per provider.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.fakes.anthropic import ANTHROPIC_FIXTURES, FakeAnthropic
from tests.fakes.anthropic import fixture_frames as anthropic_frames
from tests.fakes.anthropic import stream_script as anthropic_script
from tests.fakes.azure import AZURE_FIXTURES, AzureFake, azure_recordings
from tests.fakes.bedrock import BEDROCK_FIXTURES, FakeBedrock, cassette_interactions, cassette_script
from tests.fakes.bedrock import fixture_frames as bedrock_frames
from tests.fakes.bedrock import stream_script as bedrock_script
from tests.fakes.gemini import GEMINI_FIXTURES, GeminiFake, gemini_recordings
from tests.fakes.openai_responses import RESPONSES_FIXTURES, ResponsesFake, responses_recordings
from tests.fakes.sse_replay import stream
from tests.fakes.upstream import Script
from tests.providers import test_anthropic, test_bedrock
from tests.providers.sse_support import Expected, expected_responses
from tests.providers.test_azure import api_of
from tests.providers.test_azure import expected as azure_expected
from tests.providers.test_gemini import expected_gemini
from tests.support.client import post_stream
from tests.support.server import RouterThread, base_config
from tests.support.sse import assert_well_formed

PROVIDER_DIRS = {"anthropic": ANTHROPIC_FIXTURES, "bedrock": BEDROCK_FIXTURES, "azure": AZURE_FIXTURES,
                 "gemini": GEMINI_FIXTURES, "openai_responses": RESPONSES_FIXTURES}
STREAM_SUFFIXES = (".txt", ".bin", ".yaml")  # `.chunks.txt` ends with `.txt`
# Files that are not recorded streams (error bodies, replayed by the adapter tests as pre-stream errors).
NOT_STREAMS = {"gemini/google-429-retry-info.json", "openai_responses/openai-error.1.json"}

# Outcome of a recording as the router must report it.
COMPLETED, LENGTH, FILTERED, ERROR = "completed", "max_output_tokens", "content_filter", "error"
OUTCOME = {"stop": COMPLETED, "tool_calls": COMPLETED, "length": LENGTH, "content_filter": FILTERED}

# Synthetic-invalid recordings: the provider (or the adapter, by decision) must fail them.
ANTHROPIC_ERRORS = {"spliced-message-start.chunks.txt"}


@dataclass
class Case:
    id: str  # "<provider>/<file>" or "<provider>/<file>#<i>"
    provider: str
    model: dict[str, Any]  # deployment fields besides name/provider/base_url/options
    options: dict[str, Any]
    script: Callable[[], Script]
    text: str = ""
    calls: list[tuple[str | None, str, Any]] = field(default_factory=list)  # (call id or None, name, arguments)
    outcome: str = COMPLETED

    @property
    def file(self) -> str:
        return self.id.split("/", 1)[1].split("#")[0]


def _args(raw: str) -> Any:
    try:
        return json.loads(raw or "{}")
    except json.JSONDecodeError:
        return raw  # a call cut by max tokens: its arguments are not a complete document


def _from_adapter_expected(e: dict[str, Any]) -> tuple[str, list[tuple[str | None, str, Any]], str]:
    return e["text"], [(cid, name, _args(args)) for cid, name, args in e["calls"]], OUTCOME[e["finish"]]


def _from_sse_expected(e: Expected) -> tuple[str, list[tuple[str | None, str, Any]], str]:
    outcome = ERROR if e.error_code is not None or e.finish is None else OUTCOME[e.finish]
    return e.text, [(cid, name, _args(args)) for cid, name, args in e.calls], outcome


def _anthropic_cases() -> list[Case]:
    cases = []
    for path in sorted(ANTHROPIC_FIXTURES.iterdir()):
        if not path.name.endswith(STREAM_SUFFIXES):
            continue
        frames = anthropic_frames(path)
        case = Case(f"anthropic/{path.name}", "anthropic", {"model": "claude-test", "api_key": "k"}, {},
                    lambda frames=frames: anthropic_script(frames))
        if path.name in ANTHROPIC_ERRORS:
            case.outcome = ERROR
        else:
            case.text, case.calls, case.outcome = _from_adapter_expected(test_anthropic.expected_from_fixture(path))
        cases.append(case)
    return cases


def _bedrock_cases() -> list[Case]:
    cases = []
    deployment = {"model": "us.anthropic.claude-test-v1:0", "region": "us-east-1"}  # SigV4, tests/conftest.py keys
    for name, interaction in test_bedrock._cases():
        path = BEDROCK_FIXTURES / name
        cid = f"bedrock/{name}"
        if path.suffix == ".yaml":
            if len(cassette_interactions(path)) > 1:
                cid += f"#{interaction}"
            status = cassette_interactions(path)[interaction]["response"]["status"]["code"]
            script: Callable[[], Script] = lambda path=path, i=interaction: cassette_script(path, i)  # noqa: E731
            if status != 200:  # test_bedrock_streaming_error: a pre-stream 400
                cases.append(Case(cid, "bedrock", deployment, {}, script, outcome=ERROR))
                continue
        else:
            frames = bedrock_frames(path)
            script = lambda frames=frames: bedrock_script(frames)  # noqa: E731
        case = Case(cid, "bedrock", deployment, {}, script)
        case.text, case.calls, case.outcome = _from_adapter_expected(
            test_bedrock.expected_from_fixture(path, interaction))
        cases.append(case)
    return cases


def _sse_cases(provider: str, recordings: dict[str, list[bytes]], model: str,
               expected: Callable[[str, list[bytes]], tuple[str, list[tuple[str | None, str, Any]], str]],
               options: Callable[[str], dict[str, Any]] = lambda name: {}) -> list[Case]:
    cases = []
    for name, frames in sorted(recordings.items()):
        case = Case(f"{provider}/{name}", provider, {"model": model, "api_key": "k"}, options(name),
                    lambda frames=frames: stream(frames))
        case.text, case.calls, case.outcome = expected(name, frames)
        cases.append(case)
    return cases


def _gemini_expected(name: str, frames: list[bytes]) -> tuple[str, list[tuple[str | None, str, Any]], str]:
    e, calls = expected_gemini(frames)
    outcome = ERROR if e.error_code is not None or e.finish is None else OUTCOME[e.finish]
    return e.text, [(None, n, a) for n, a in calls], outcome  # Gemini has no call ids: the adapter makes them


def _all_cases() -> list[Case]:
    return [
        *_anthropic_cases(),
        *_bedrock_cases(),
        *_sse_cases("azure", azure_recordings(), "my-gpt5", lambda n, f: _from_sse_expected(azure_expected(n)),
                    lambda n: {"api": api_of(n)}),
        *_sse_cases("gemini", gemini_recordings(), "gemini-3-pro-preview", _gemini_expected),
        *_sse_cases("openai_responses", responses_recordings(), "gpt-5",
                    lambda n, f: _from_sse_expected(expected_responses(f))),
    ]


CASES = _all_cases()

# Cases that reveal a router bug: {case id: precise description}.
ROUTER_BUGS: dict[str, str] = {}


def _param(case: Case) -> Any:
    marks = [pytest.mark.xfail(strict=True, reason=ROUTER_BUGS[case.id])] if case.id in ROUTER_BUGS else []
    return pytest.param(case, id=case.id, marks=marks)


def _model_name(case: Case) -> str:
    return "m-" + "".join(c if c.isalnum() else "-" for c in case.id)


FAKES: dict[str, Callable[[], Any]] = {"anthropic": FakeAnthropic, "bedrock": FakeBedrock, "azure": AzureFake,
                                       "gemini": GeminiFake, "openai_responses": ResponsesFake}


@pytest.fixture(scope="module")
def env() -> Iterator[tuple[RouterThread, dict[str, Any]]]:
    """One fake per provider and one router with a model per case, for the module."""
    fakes: dict[str, Any] = {}
    try:
        for provider, make in FAKES.items():
            fakes[provider] = make().__enter__()
        models = []
        for case in CASES:
            base = fakes[case.provider].base_url + ("/v1" if case.provider == "openai_responses" else "")
            deployment = {"name": f"d-{_model_name(case)}", "provider": case.provider, "base_url": base,
                          **case.model, "options": {"max_retries": 0, **case.options}}
            models.append({"name": _model_name(case), "deployments": [deployment]})
        with RouterThread(base_config(*models)) as server:
            yield server, fakes
    finally:
        for fake in fakes.values():
            fake.__exit__(None, None, None)


def _serve(fake: Any, script: Script) -> None:
    if isinstance(fake, FakeAnthropic | FakeBedrock):
        fake.play(script)
    else:
        fake.reset()
        fake.serve(script)


def test_every_fixture_file_is_a_case() -> None:
    listed = {f"{provider}/{p.name}" for provider, d in PROVIDER_DIRS.items() for p in d.iterdir()}
    streams = {name for name in listed if name.endswith(STREAM_SUFFIXES)}
    assert listed - streams == NOT_STREAMS
    assert {c.provider + "/" + c.file for c in CASES} == streams
    ids = [c.id for c in CASES]
    assert len(ids) == len(set(ids))
    # Files holding several streams are split: the 4 concatenated responses, every cassette interaction.
    assert sum(i.startswith("openai_responses/openai-reasoning-encrypted-content.1.chunks.txt#") for i in ids) == 4
    for provider, d in PROVIDER_DIRS.items():
        for path in d.glob("*.yaml"):
            n = len(cassette_interactions(path))
            assert sum(c.id.split("#")[0] == f"{provider}/{path.name}" for c in CASES) == n, path


@pytest.mark.parametrize("case", [_param(c) for c in CASES])
def test_recorded_stream_through_the_router(case: Case, env: tuple[RouterThread, dict[str, Any]]) -> None:
    server, fakes = env
    _serve(fakes[case.provider], case.script())
    names = dict.fromkeys(name for _, name, _ in case.calls)
    tools = [{"type": "function", "name": name, "parameters": {"type": "object"}} for name in names]
    body = {"model": _model_name(case), "input": "hi", **({"tools": tools} if tools else {})}
    response, got = post_stream(server.base_url, body)
    # One deployment, `max_retries: 0`: exactly one upstream request, whatever the outcome.
    assert len(fakes[case.provider].requests) == 1

    if case.outcome == ERROR:
        if response.status_code != 200:
            assert response.status_code >= 400
            assert "error" in response.json()
            return
        assert_well_formed(got)  # spec-valid events (validated while parsing), dense, one terminal + [DONE]
        assert got.terminal["type"] in ("response.failed", "response.incomplete"), got.terminal["type"]
        return

    assert response.status_code == 200, response.text
    assert_well_formed(got)
    terminal = got.terminal
    if case.outcome == COMPLETED:
        assert terminal["type"] == "response.completed", terminal
    else:
        assert terminal["type"] == "response.incomplete", terminal
        assert terminal["response"]["incomplete_details"]["reason"] == case.outcome
    assert got.text() == case.text
    assert got.output_text() == case.text
    calls = got.function_calls()
    want = [(name, args) for _, name, args in case.calls]
    assert [(c["name"], _args(c["arguments"])) for c in calls] == want
    for call, (call_id, _, _) in zip(calls, case.calls, strict=True):
        assert call["call_id"] == call_id if call_id else call["call_id"]
        if not isinstance(_args(call["arguments"]), dict):  # cut by max tokens: not a complete call
            assert case.outcome == LENGTH and call["status"] == "incomplete", call
    usage = got.response["usage"]
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
