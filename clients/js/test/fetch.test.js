// resumableFetch's request handling with a fake base fetch (no server): what is wrapped, what passes through, what
// the resume request looks like.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { resumableFetch } from "../index.js";

const events = [
  { type: "response.created", sequence_number: 0, response: { id: "resp_f", status: "in_progress" } },
  { type: "response.output_text.delta", sequence_number: 1, delta: "a" },
  { type: "response.output_text.delta", sequence_number: 2, delta: "b" },
  { type: "response.completed", sequence_number: 3, response: { id: "resp_f", status: "completed" } },
];
const frame = (e) => `event: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`;
const sse = (text, init = {}) => new Response(text, { ...init, headers: { "content-type": "text/event-stream",
  "x-request-id": "req_1", ...init.headers } });

/** A base fetch whose POST answer stops after `upTo` events (no terminal), then serves resumes from `events`. */
function fakeServer(upTo) {
  const calls = [];
  const base = async (input, init = {}) => {
    const request = input instanceof Request ? input : undefined;
    const method = init.method ?? request?.method ?? "GET";
    const url = String(request?.url ?? input);
    const headers = new Headers(init.headers ?? request?.headers);
    calls.push({ url, method, headers });
    if (method === "POST") return sse(events.slice(0, upTo).map(frame).join(""));
    const after = Number(new URL(url).searchParams.get("starting_after"));
    return sse(`${events.filter((e) => e.sequence_number > after).map(frame).join("")}data: [DONE]\n\n`);
  };
  return { base, calls };
}

describe("resumableFetch request handling", () => {
  test("a Request object with a streamed body is wrapped; the resume keeps the query and the auth header", async () => {
    const { base, calls } = fakeServer(2);
    const doFetch = resumableFetch(base, { initialDelayMs: 1, maxDelayMs: 2 });
    const request = new Request("https://api.example.test/v1/responses?api-version=7", { method: "POST",
      headers: { Authorization: "Bearer k", "content-type": "application/json" },
      body: JSON.stringify({ model: "m", input: "x", stream: true }) });
    const response = await doFetch(request);
    assert.equal(response.headers.get("x-request-id"), "req_1");
    const text = await response.text();
    assert.equal(text, `${events.map(frame).join("")}data: [DONE]\n\n`);
    assert.equal(calls.length, 2);
    const resume = new URL(calls[1].url);
    assert.equal(resume.pathname, "/v1/responses/resp_f");
    assert.equal(resume.searchParams.get("api-version"), "7");
    assert.equal(resume.searchParams.get("stream"), "true");
    assert.equal(resume.searchParams.get("starting_after"), "1");
    assert.equal(calls[1].method, "GET");
    assert.equal(calls[1].headers.get("authorization"), "Bearer k");
    assert.equal(calls[1].headers.get("content-type"), null);
  });

  test("passes through: non-POST, other paths, stream false or absent, non-JSON bodies", async () => {
    const seen = [];
    const base = async (input, init) => {
      seen.push(init?.body ?? null);
      return new Response("ok");
    };
    const doFetch = resumableFetch(base);
    const results = await Promise.all([
      doFetch("http://h.test/v1/responses/resp_1?stream=true"),
      doFetch("http://h.test/v1/chat/completions", { method: "POST", body: JSON.stringify({ stream: true }) }),
      doFetch("http://h.test/v1/responses", { method: "POST", body: JSON.stringify({ model: "m" }) }),
      doFetch("http://h.test/v1/responses", { method: "POST", body: JSON.stringify({ stream: false }) }),
      doFetch("http://h.test/v1/responses", { method: "POST", body: "not json" }),
      doFetch("http://h.test/v1/responses/compact", { method: "POST", body: JSON.stringify({ stream: true }) }),
    ]);
    for (const response of results) assert.equal(await response.text(), "ok");
    assert.equal(seen.length, 6);
  });

  test("a streamed POST answered with an error comes back as it is", async () => {
    const base = async () => Response.json({ error: { message: "nope", type: "invalid_request_error", param: null,
      code: "model_not_found" } }, { status: 404 });
    const response = await resumableFetch(base)("http://h.test/v1/responses", { method: "POST",
      body: JSON.stringify({ model: "x", stream: true }) });
    assert.equal(response.status, 404);
    assert.equal((await response.json()).error.code, "model_not_found");
  });

  test("a Uint8Array body is read too", async () => {
    const { base, calls } = fakeServer(4);
    const response = await resumableFetch(base)("http://h.test/v1/responses", { method: "POST",
      body: new TextEncoder().encode(JSON.stringify({ stream: true })) });
    assert.ok((await response.text()).endsWith("data: [DONE]\n\n"));
    assert.equal(calls.length, 1, "a whole stream needs no resume");
  });

  test("a cut before the id without an Idempotency-Key errors the body; with one the POST is retried", async () => {
    let posts = 0;
    const base = async (input, init) => {
      posts += 1;
      if (posts === 1) return sse(": only a heartbeat\n\n");
      assert.equal(new Headers(init.headers).get("idempotency-key"), "k1");
      assert.equal(init.body, JSON.stringify({ stream: true }));
      return sse(`${events.map(frame).join("")}data: [DONE]\n\n`);
    };
    const noKey = await resumableFetch(base)("http://h.test/v1/responses", { method: "POST",
      body: JSON.stringify({ stream: true }) });
    await assert.rejects(noKey.text(), { code: "not_resumable" });
    posts = 0;
    const withKey = await resumableFetch(base, { initialDelayMs: 1, maxDelayMs: 2 })("http://h.test/v1/responses",
      { method: "POST", headers: { "Idempotency-Key": "k1" }, body: JSON.stringify({ stream: true }) });
    assert.ok((await withKey.text()).includes('"response.completed"'));
    assert.equal(posts, 2);
  });
});
