// The SSE parser, and streamResponse reading a body that arrives in awkward pieces (no server needed).

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import { SSEParser, streamResponse } from "../index.js";

function parseAll(pieces) {
  const parser = new SSEParser();
  const frames = [];
  for (const piece of pieces) frames.push(...parser.push(piece));
  frames.push(...parser.end());
  return frames;
}

function everySplit(text) {
  const out = [];
  for (let i = 0; i <= text.length; i++) out.push([text.slice(0, i), text.slice(i)]);
  return out;
}

describe("SSEParser", () => {
  const stream = 'event: a\ndata: {"x":1}\n\n: keep-alive\n\nevent: b\r\ndata: line1\r\ndata: line2\r\n\r\n'
    + "id: 7\rdata:nospace\r\r";
  const expected = [
    { event: "a", data: '{"x":1}', id: undefined },
    { event: "b", data: "line1\nline2", id: undefined },
    { event: "message", data: "nospace", id: "7" },
  ];

  test("LF, CRLF and CR line ends, comments, multi-line data, id", () => {
    assert.deepEqual(parseAll([stream]), expected);
  });

  test("the same frames whatever the split (including between CR and LF)", () => {
    for (const pieces of everySplit(stream)) assert.deepEqual(parseAll(pieces), expected, JSON.stringify(pieces));
  });

  test("one character at a time", () => {
    assert.deepEqual(parseAll([...stream]), expected);
  });

  test("a leading BOM is dropped; a frame without its blank line is never dispatched", () => {
    assert.deepEqual(parseAll(["\uFEFFdata: 1\n\ndata: 2\n"]), [{ event: "message", data: "1", id: undefined }]);
  });

  test("comment-only and empty blocks dispatch nothing", () => {
    assert.deepEqual(parseAll([": hi\n\n\n\n:\n\n"]), []);
  });
});

describe("streamResponse body reading", () => {
  const events = [
    { type: "response.created", sequence_number: 0, response: { id: "resp_x", status: "in_progress" } },
    { type: "response.output_text.delta", sequence_number: 1, delta: "héllo wörld — ✓ " },
    { type: "response.output_text.delta", sequence_number: 2, delta: "😀 done" },
    { type: "response.completed", sequence_number: 3, response: { id: "resp_x", status: "completed" } },
  ];
  const wire = `: keep-alive\r\n\r\n${events.map((e) => `event: ${e.type}\r\ndata: ${JSON.stringify(e)}\r\n\r\n`)
    .join(": keep-alive\r\n\r\n")}data: [DONE]\r\n\r\n`;
  const bytes = new TextEncoder().encode(wire);

  function fetchInPieces(size) {
    return async () => new Response(new ReadableStream({
      start(controller) {
        for (let i = 0; i < bytes.length; i += size) controller.enqueue(bytes.slice(i, i + size));
        controller.close();
      },
    }), { headers: { "content-type": "text/event-stream; charset=utf-8" } });
  }

  for (const size of [1, 2, 3, 7, 64, 100000]) {
    test(`chunks of ${size} bytes (UTF-8 sequences split across chunks)`, async () => {
      const stream = streamResponse("http://unused.invalid/v1", { model: "m", input: "x" },
        { fetch: fetchInPieces(size) });
      const got = [];
      for await (const event of stream) got.push(event);
      assert.deepEqual(got, events);
      assert.equal(await stream.text, "héllo wörld — ✓ 😀 done");
      assert.equal((await stream.done).status, "completed");
      assert.equal(await stream.responseId, "resp_x");
    });
  }

  test("duplicates (sequence_number <= last seen) are dropped", async () => {
    const dup = [events[0], events[1], events[1], events[0], events[2], events[3]];
    const text = dup.map((e) => `data: ${JSON.stringify(e)}\n\n`).join("");
    const fetchDup = async () => new Response(text, { headers: { "content-type": "text/event-stream" } });
    const got = [];
    for await (const event of streamResponse("http://unused.invalid/v1", {}, { fetch: fetchDup })) got.push(event);
    assert.deepEqual(got.map((e) => e.sequence_number), [0, 1, 2, 3]);
  });

  test("a JSON answer (a server that ignored stream: true) is the final response", async () => {
    const fetchJson = async () => Response.json({ id: "resp_j", object: "response", status: "completed", output: [] });
    const stream = streamResponse("http://unused.invalid/v1", {}, { fetch: fetchJson });
    assert.equal((await stream.done).id, "resp_j");
    assert.equal(await stream.responseId, "resp_j");
  });

  test("the request: POST {base}/responses with stream: true, headers and Idempotency-Key", async () => {
    let seen;
    const capture = async (url, init) => {
      seen = { url, method: init.method, headers: new Headers(init.headers), body: JSON.parse(init.body) };
      return fetchInPieces(100000)();
    };
    await streamResponse("http://h.invalid/v1/", { model: "m", input: "x" }, { fetch: capture,
      headers: { Authorization: "Bearer k" }, idempotencyKey: "key-1", recoveryEvents: true }).done;
    assert.equal(seen.url, "http://h.invalid/v1/responses");
    assert.equal(seen.method, "POST");
    assert.equal(seen.body.stream, true);
    assert.equal(seen.headers.get("authorization"), "Bearer k");
    assert.equal(seen.headers.get("idempotency-key"), "key-1");
    assert.equal(seen.headers.get("x-unbroken-recovery-events"), "true");
    assert.equal(seen.headers.get("content-type"), "application/json");
  });

  test("an idle connection (idleTimeoutMs) counts as a cut", async () => {
    let calls = 0;
    const encoder = new TextEncoder();
    const stalls = async (url, init) => {
      calls += 1;
      if (calls === 1) {
        return new Response(new ReadableStream({ start(c) { c.enqueue(encoder.encode(
          `data: ${JSON.stringify(events[0])}\n\n`)); } }), { headers: { "content-type": "text/event-stream" } });
      }
      assert.equal(init.method, "GET");
      assert.equal(url, "http://h.invalid/v1/responses/resp_x?stream=true&starting_after=0");
      return new Response(events.slice(1).map((e) => `data: ${JSON.stringify(e)}\n\n`).join(""),
        { headers: { "content-type": "text/event-stream" } });
    };
    const retries = [];
    const stream = streamResponse("http://h.invalid/v1", {}, { fetch: stalls, idleTimeoutMs: 50,
      initialDelayMs: 1, maxDelayMs: 2, onRetry: (r) => retries.push(r) });
    assert.equal((await stream.done).status, "completed");
    assert.equal(retries[0].error.code, "idle_timeout");
  });
});

describe("streamResponse without sequence numbers", () => {
  test("a cut stream whose events have no sequence_number is not resumed (no cursor, no dedup)", async () => {
    let calls = 0;
    const fetchPlain = async () => {
      calls += 1;
      return new Response(`data: ${JSON.stringify({ type: "response.created", response: { id: "resp_n" } })}\n\n`,
        { headers: { "content-type": "text/event-stream" } });
    };
    const stream = streamResponse("http://h.invalid/v1", {}, { fetch: fetchPlain, initialDelayMs: 1 });
    await assert.rejects(stream.done, { code: "not_resumable", message: /sequence_number/ });
    assert.equal(calls, 1);
  });
});

describe("streamResponse against servers that cannot resume", () => {
  test("a GET that answers the JSON object (stream=true ignored) is resume_unsupported", async () => {
    const first = { type: "response.created", sequence_number: 0, response: { id: "resp_g" } };
    const fetchOld = async (url, init) => (init.method === "POST"
      ? new Response(`data: ${JSON.stringify(first)}\n\n`, { headers: { "content-type": "text/event-stream" } })
      : Response.json({ id: "resp_g", object: "response", status: "in_progress" }));
    const stream = streamResponse("http://h.invalid/v1", {}, { fetch: fetchOld, initialDelayMs: 1 });
    await assert.rejects(stream.done, { code: "resume_unsupported", status: 200, lastSequenceNumber: 0 });
  });
});
