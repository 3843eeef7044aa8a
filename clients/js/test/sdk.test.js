// resumableFetch under the official `openai` SDK and the Vercel AI SDK's `@ai-sdk/openai`, against a real
// `unbroken serve` behind a cutting proxy.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { createOpenAI } from "@ai-sdk/openai";
import { streamText } from "ai";
import OpenAI from "openai";

import { resumableFetch } from "../index.js";
import { API_KEY, AUTH, checkSequence, referenceEvents, simBody, startProxy, startRouter, textOf } from "../testing/support.js";

const FAST = { initialDelayMs: 5, maxDelayMs: 40 };

let router;
before(async () => {
  router = await startRouter();
});
after(async () => {
  await router?.stop();
});

async function withProxy(plan, fn) {
  const proxy = await startProxy(router.url, plan);
  try {
    return await fn(proxy);
  } finally {
    await proxy.close();
  }
}

/** Cut the first connections after a few KB each (several cuts in one stream). */
const SEVERAL_CUTS = (n) => (n < 4 ? 1400 + 900 * n : undefined);

describe("resumableFetch", () => {
  test("the bytes a consumer reads: one stream, every event once, the terminal event, then [DONE]", async () => {
    const body = simBody("raw bytes", { length: 60 });
    const reference = await referenceEvents(router.url, body);
    await withProxy(SEVERAL_CUTS, async (proxy) => {
      const retries = [];
      const doFetch = resumableFetch(undefined, { ...FAST, onRetry: (r) => retries.push(r) });
      const response = await doFetch(`${proxy.url}/responses`, { method: "POST",
        headers: { ...AUTH, "content-type": "application/json" }, body: JSON.stringify({ ...body, stream: true }) });
      assert.equal(response.status, 200);
      assert.match(response.headers.get("content-type"), /text\/event-stream/);
      const raw = await response.text();
      assert.ok(raw.endsWith("data: [DONE]\n\n"));
      assert.equal(raw.split("data: [DONE]").length, 2, "one [DONE]");
      const blocks = raw.split("\n\n").filter(Boolean).slice(0, -1);
      const events = blocks.map((b) => {
        const lines = b.split("\n");
        const event = JSON.parse(lines.find((l) => l.startsWith("data: ")).slice(6));
        assert.equal(lines[0], `event: ${event.type}`);
        return event;
      });
      checkSequence(assert, events);
      assert.equal(textOf(events), textOf(reference.events));
      assert.ok(retries.length >= 3, `cut several times (${retries.length})`);
    });
  });

  test("other requests pass through untouched", async () => {
    const calls = [];
    const base = (input, init) => {
      calls.push([String(input), init?.method ?? "GET"]);
      return fetch(input, init);
    };
    const doFetch = resumableFetch(base);
    const created = await (await doFetch(`${router.url}/responses`, { method: "POST",
      headers: { ...AUTH, "content-type": "application/json" }, body: JSON.stringify(simBody("not streamed")) }))
      .json();
    assert.equal(created.status, "completed");
    const got = await doFetch(`${router.url}/responses/${created.id}`, { headers: AUTH });
    assert.equal((await got.json()).id, created.id);
    const models = await doFetch(`${router.url}/models`, { headers: AUTH });
    assert.equal(models.status, 200);
    assert.deepEqual(calls.map((c) => c[1]), ["POST", "GET", "GET"]);
    // An error answer comes back as it is.
    const bad = await doFetch(`${router.url}/responses`, { method: "POST",
      headers: { ...AUTH, "content-type": "application/json" },
      body: JSON.stringify({ model: "no-such-model", input: "x", stream: true }) });
    assert.ok(bad.status >= 400);
    assert.equal(typeof (await bad.json()).error.message, "string");
  });

  test("openai SDK: responses.stream() through cuts yields the full text and the final response", async () => {
    const body = simBody("openai sdk stream", { length: 80, tps: 300 });
    const reference = await referenceEvents(router.url, body);
    await withProxy(SEVERAL_CUTS, async (proxy) => {
      const retries = [];
      const client = new OpenAI({ baseURL: proxy.url, apiKey: API_KEY, maxRetries: 0,
        fetch: resumableFetch(undefined, { ...FAST, onRetry: (r) => retries.push(r) }) });
      const stream = client.responses.stream(body);
      let text = "";
      const seqs = [];
      for await (const event of stream) {
        seqs.push(event.sequence_number);
        if (event.type === "response.output_text.delta") text += event.delta;
      }
      const final = await stream.finalResponse();
      assert.equal(text, textOf(reference.events));
      assert.equal(final.output_text, textOf(reference.events));
      assert.equal(final.status, "completed");
      assert.deepEqual(seqs, seqs.map((_, i) => i));
      assert.ok(retries.length >= 3, `cut several times (${retries.length})`);
    });
  });

  test("openai SDK: responses.create({stream: true}) through cuts", async () => {
    const body = simBody("openai sdk create", { length: 60 });
    const reference = await referenceEvents(router.url, body);
    await withProxy(SEVERAL_CUTS, async (proxy) => {
      const client = new OpenAI({ baseURL: proxy.url, apiKey: API_KEY, maxRetries: 0,
        fetch: resumableFetch(undefined, FAST) });
      const stream = await client.responses.create({ ...body, stream: true });
      const events = [];
      for await (const event of stream) events.push(event);
      checkSequence(assert, events);
      assert.equal(textOf(events), textOf(reference.events));
    });
  });

  test("openai SDK: an abort stops the stream and cancels the response on the server", async () => {
    const client = new OpenAI({ baseURL: router.url, apiKey: API_KEY, maxRetries: 0, fetch: resumableFetch() });
    const controller = new AbortController();
    const stream = await client.responses.create({ ...simBody("sdk abort", { length: 400, tps: 40 }), stream: true },
      { signal: controller.signal });
    let id;
    let deltas = 0;
    let terminal = false;
    // The SDK ends its loop quietly on an abort (or throws an abort error, depending on the moment).
    try {
      for await (const event of stream) {
        if (event.type === "response.created") id = event.response.id;
        if (event.type === "response.completed") terminal = true;
        if (event.type === "response.output_text.delta" && ++deltas === 2) controller.abort();
      }
    } catch (err) {
      assert.ok(err.name === "AbortError" || err.constructor.name === "APIUserAbortError", String(err));
    }
    assert.equal(terminal, false);
    // What the SDK had already read ahead may still come out; nothing more.
    assert.ok(deltas <= 4, `stopped reading (${deltas} deltas)`);
    assert.ok(id);
    let status;
    for (let i = 0; i < 100; i++) {
      status = (await (await fetch(`${router.url}/responses/${id}`, { headers: AUTH })).json()).status;
      if (status === "cancelled") break;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(status, "cancelled");
  });

  test("AI SDK (@ai-sdk/openai Responses model): doStream through cuts yields the full text", async () => {
    const body = simBody("ai sdk stream", { length: 80 });
    const reference = await referenceEvents(router.url, body);
    await withProxy(SEVERAL_CUTS, async (proxy) => {
      const retries = [];
      const provider = createOpenAI({ baseURL: proxy.url, apiKey: API_KEY,
        fetch: resumableFetch(undefined, { ...FAST, onRetry: (r) => retries.push(r) }) });
      const model = provider.responses("demo");
      const { stream } = await model.doStream({
        prompt: [{ role: "user", content: [{ type: "text", text: body.input }] }],
        providerOptions: { openai: { metadata: body.metadata } },
      });
      let text = "";
      const parts = [];
      const reader = stream.getReader();
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        parts.push(value.type);
        if (value.type === "text-delta") text += value.delta;
        if (value.type === "error") throw value.error;
      }
      assert.equal(text, textOf(reference.events));
      assert.equal(parts.filter((t) => t === "finish").length, 1);
      assert.ok(retries.length >= 3, `cut several times (${retries.length})`);
    });
  });
  test("AI SDK: streamText (the README example) through cuts", async () => {
    const body = simBody("ai sdk streamText", { length: 80, tps: 300 });
    const reference = await referenceEvents(router.url, body);
    await withProxy(SEVERAL_CUTS, async (proxy) => {
      const retries = [];
      const unbroken = createOpenAI({ baseURL: proxy.url, apiKey: API_KEY,
        fetch: resumableFetch(undefined, { ...FAST, onRetry: (r) => retries.push(r) }) });
      const errors = [];
      const result = streamText({ model: unbroken.responses("demo"), prompt: body.input, maxRetries: 0,
        providerOptions: { openai: { metadata: body.metadata } }, onError: ({ error }) => errors.push(error) });
      let text = "";
      for await (const delta of result.textStream) text += delta;
      assert.deepEqual(errors, []);
      assert.equal(text, textOf(reference.events));
      assert.equal(await result.text, textOf(reference.events));
      assert.equal(await result.finishReason, "stop");
      assert.ok(retries.length >= 3, `cut several times (${retries.length})`);
    });
  });
});
