"""The Azure OpenAI adapter (chat and Responses styles, v1 and classic URLs) against a real HTTP fake replaying every
recorded Azure stream, Azure's content filtering, every fault kind, and the request mapping."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.fakes.azure import AZURE_FIXTURES, AzureFake, azure_recordings, is_responses
from tests.fakes.sse_replay import data_frame, stream
from tests.providers.sse_support import (
    Expected,
    expected_chat,
    expected_responses,
    fold,
    make_provider,
    run,
    simple_request,
    usage_dict,
)
from unbroken.ir import Continuation, Delta, GenerationRequest, Message, Reasoning, TextPart
from unbroken.providers.azure import AzureChatProvider, AzureOpenAIProvider, AzureResponsesProvider
from unbroken.providers.base import Provider, ProviderError

RECORDINGS = azure_recordings()
CHAT = "azure-model-router.1.chunks.txt"
RESPONSES_TEXT = "azure-text.1.chunks.txt"
DEPLOYMENT = "my-gpt5"


@pytest.fixture(scope="module")
def server() -> Iterator[AzureFake]:
    with AzureFake() as f:
        yield f


@pytest.fixture
def fake(server: AzureFake) -> AzureFake:
    server.reset()
    return server


def provider(http: httpx.AsyncClient, fake: AzureFake, **options: Any) -> Provider:
    return make_provider(http, "azure", DEPLOYMENT, fake.base_url, **options)


def api_of(name: str) -> str:
    return "responses" if is_responses(AZURE_FIXTURES / name.split("#")[0]) else "chat"


def expected(name: str) -> Expected:
    frames = RECORDINGS[name]
    return expected_responses(frames) if api_of(name) == "responses" else expected_chat(frames)


def test_every_fixture_file_is_replayed() -> None:
    assert {p.name for p in AZURE_FIXTURES.iterdir()} == {n.split("#")[0] for n in RECORDINGS}
    assert {api_of(n) for n in RECORDINGS} == {"chat", "responses"}


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_recorded_stream(name: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.replay(name))
    p = provider(http, fake, api=api_of(name))
    got = await run(p, simple_request())
    want = expected(name)
    assert got.error is None, got.error
    assert got.text == want.text
    assert want.text or want.calls  # the recording holds something
    assert got.refusal == want.refusal
    assert got.calls == want.calls
    assert got.seals == want.seals
    assert got.finish == want.finish
    assert usage_dict(got.usage) == want.usage
    assert got.models[:1] == [want.model]


async def test_style_dispatch(http: httpx.AsyncClient) -> None:
    chat = make_provider(http, "azure", "d", "https://r.openai.azure.com")
    assert isinstance(chat, AzureOpenAIProvider) and isinstance(chat.inner, AzureChatProvider)
    responses = make_provider(http, "azure", "d", "https://r.openai.azure.com", api="responses")
    assert isinstance(responses, AzureOpenAIProvider) and isinstance(responses.inner, AzureResponsesProvider)
    assert responses.capabilities.literal_continuation is False
    with pytest.raises(ValueError, match=r"options\.api"):
        make_provider(http, "azure", "d", "https://r.openai.azure.com", api="completions")


# -- URLs and auth ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("options", "path"), [
    ({}, "/openai/v1/chat/completions"),
    ({"api_version": "preview"}, "/openai/v1/chat/completions?api-version=preview"),
    ({"api_style": "classic"}, f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2024-10-21"),
    ({"api_style": "classic", "api_version": "2025-01-01-preview"},
     f"/openai/deployments/{DEPLOYMENT}/chat/completions?api-version=2025-01-01-preview"),
])
async def test_chat_urls(options: dict[str, Any], path: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.replay(CHAT))
    got = await run(provider(http, fake, **options), simple_request())
    assert got.error is None
    req = fake.requests[0]
    assert req.path == path
    body = req.json()
    assert body["model"] == DEPLOYMENT and body["stream"] is True
    assert body["messages"] == [{"role": "user", "content": "Hello"}]


@pytest.mark.parametrize(("options", "path"), [
    ({"api": "responses"}, "/openai/v1/responses"),
    ({"api": "responses", "api_version": "preview"}, "/openai/v1/responses?api-version=preview"),
    ({"api": "responses", "api_style": "classic"}, "/openai/responses?api-version=2025-04-01-preview"),
])
async def test_responses_urls(options: dict[str, Any], path: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.replay(RESPONSES_TEXT))
    got = await run(provider(http, fake, **options), simple_request())
    assert got.error is None
    req = fake.requests[0]
    assert req.path == path
    body = req.json()
    assert body["model"] == DEPLOYMENT and body["stream"] is True and body["store"] is False
    assert body["input"] == [{"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hello"}]}]


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize(("auth", "header", "value"), [
    (None, "api-key", "test-key"),
    ("bearer", "authorization", "Bearer test-key"),
])
async def test_auth_headers(api: str, auth: str | None, header: str, value: str, http: httpx.AsyncClient,
                            fake: AzureFake) -> None:
    fake.serve(fake.replay(CHAT if api == "chat" else RESPONSES_TEXT))
    options: dict[str, Any] = {"api": api} | ({"auth": auth} if auth else {})
    await run(provider(http, fake, **options), simple_request())
    headers = fake.requests[0].headers
    assert headers[header] == value
    other = "authorization" if header == "api-key" else "api-key"
    assert other not in headers


async def test_base_url_with_api_prefix(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.replay(CHAT))
    p = make_provider(http, "azure", DEPLOYMENT, fake.base_url + "/openai/v1/")
    await run(p, simple_request())
    assert fake.requests[0].path == "/openai/v1/chat/completions"


async def test_missing_base_url_is_a_config_error(http: httpx.AsyncClient) -> None:
    with pytest.raises(ValueError, match=r"azure needs a base_url"):
        make_provider(http, "azure", DEPLOYMENT, None)


# -- content filtering --------------------------------------------------------------------------------------------


async def test_prompt_filter_400_is_content_filter(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.prompt_filtered())
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.status, got.error.code) == ("content_filter", 400, "content_filter")


async def test_finish_reason_content_filter(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.content_filtered(CHAT))
    got = await run(provider(http, fake), simple_request())
    assert got.error is None and got.finish == "content_filter"
    assert got.text == expected(CHAT).text


@pytest.mark.parametrize(("late", "finish"), [(None, "stop"), ("content_filter", "content_filter")])
async def test_async_filter_annotation_after_finish(late: str | None, finish: str, http: httpx.AsyncClient,
                                                    fake: AzureFake) -> None:
    """Asynchronous-filter mode: annotation chunks (empty id/model, no delta) come after `finish_reason: stop`; the
    stream is read to `[DONE]` and a late `content_filter` wins."""
    fake.serve(fake.late_annotation(CHAT, late))
    got = await run(provider(http, fake), simple_request())
    assert got.error is None and got.finish == finish
    assert got.text == expected(CHAT).text


async def test_responses_incomplete_content_filter(http: httpx.AsyncClient, fake: AzureFake) -> None:
    ev = {"type": "response.incomplete", "response": {"status": "incomplete",
                                                      "incomplete_details": {"reason": "content_filter"}}}
    fake.serve(stream([data_frame({"type": "response.output_text.delta", "delta": "Hel"}),
                       data_frame(ev, event=ev["type"])]))
    got = await run(provider(http, fake, api="responses"), simple_request())
    assert (got.text, got.finish) == ("Hel", "content_filter")


# -- faults -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("api", ["chat", "responses"])
async def test_429_with_retry_after(api: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.http_error(429, "429", "Rate limit reached", headers={"retry-after": "12"}))
    got = await run(provider(http, fake, api=api), simple_request())
    assert got.error is not None
    assert (got.error.kind, got.error.retry_after, got.error.mid_stream) == ("rate_limited", 12.0, False)


@pytest.mark.parametrize("api", ["chat", "responses"])
@pytest.mark.parametrize(("status", "kind"), [(500, "server_error"), (503, "overloaded"), (401, "auth"),
                                              (404, "not_found")])
async def test_http_errors(api: str, status: int, kind: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.http_error(status))
    got = await run(provider(http, fake, api=api), simple_request())
    assert got.error is not None and (got.error.kind, got.error.status) == (kind, status)


async def test_chat_in_band_error(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.chat_error_after(CHAT, 4))
    got = await run(provider(http, fake), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("server_error", True)
    assert got.text == expected_chat(RECORDINGS[CHAT][:4]).text != ""


async def test_responses_in_band_error(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.responses_error_after(RESPONSES_TEXT, 5))
    got = await run(provider(http, fake, api="responses"), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("overloaded", True)
    assert got.text == expected_responses(RECORDINGS[RESPONSES_TEXT][:5]).text != ""


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_connection_reset(name: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    n = len(RECORDINGS[name]) // 2
    fake.serve(fake.reset_after(name, n))
    got = await run(provider(http, fake, api=api_of(name)), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("connection", True)
    assert got.finish is None


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_malformed_chunk(name: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.malformed_after(name, 2))
    got = await run(provider(http, fake, api=api_of(name)), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("malformed", True)


@pytest.mark.parametrize("name", sorted(RECORDINGS))
async def test_missing_terminator_is_truncated(name: str, http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.missing_terminator(name))
    got = await run(provider(http, fake, api=api_of(name)), simple_request())
    assert got.error is not None and (got.error.kind, got.error.mid_stream) == ("truncated", True)
    assert got.finish is None


async def test_stall_then_reset(http: httpx.AsyncClient) -> None:
    """What a stalled upstream sent arrives; nothing more until it drops the connection (stall timeouts belong to
    the attempt loop)."""
    want = expected_chat(RECORDINGS[CHAT][:4]).text
    seen: list[Delta] = []
    got_all = asyncio.Event()
    with AzureFake() as fake:
        fake.serve(fake.stall_after(CHAT, 4))

        async def consume() -> None:
            async for d in provider(http, fake).stream(simple_request()):
                seen.append(d)
                if fold(seen).text == want:
                    got_all.set()

        task = asyncio.create_task(consume())
        await asyncio.wait_for(got_all.wait(), 10)
        assert not task.done()
        await asyncio.to_thread(fake.close)
        with pytest.raises(ProviderError) as exc:
            await asyncio.wait_for(task, 10)
    assert exc.value.kind == "connection" and exc.value.mid_stream


# -- request mapping specific to Azure ----------------------------------------------------------------------------


async def test_responses_reasoning_is_bound_to_azure(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.replay(RESPONSES_TEXT))
    request = GenerationRequest(model="m", reasoning_effort="low", items=[
        Message("user", [TextPart("hi")]),
        Reasoning(encrypted_content="enc-azure", provider="azure"),
        Reasoning(encrypted_content="enc-openai", provider="openai_responses"),
    ])
    await run(provider(http, fake, api="responses"), request)
    body = fake.requests[0].json()
    assert [i.get("encrypted_content") for i in body["input"] if i["type"] == "reasoning"] == ["enc-azure"]
    assert body["include"] == ["reasoning.encrypted_content"]


async def test_chat_continuation_is_an_instruction(http: httpx.AsyncClient, fake: AzureFake) -> None:
    fake.serve(fake.replay(CHAT))
    p = provider(http, fake)
    assert p.capabilities.literal_continuation is False
    await run(p, simple_request("Story?", continuation=Continuation("Once", literal=False)))
    messages = fake.requests[0].json()["messages"]
    assert messages[-2] == {"role": "assistant", "content": "Once"} and messages[-1]["role"] == "user"
