// streamResponse against a real `unbroken serve`, with a TCP proxy cutting connections in between.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { streamResponse, UnbrokenError } from "../index.js";
import { AUTH, checkSequence, referenceEvents, simBody, startProxy, startRouter, textOf } from "../testing/support.js";

const FAST = { initialDelayMs: 5, maxDelayMs: 40 };

let router;
before(async () => {
  router = await startRouter();
});
after(async () => {
  await router?.stop();
});

async function collect(stream) {
  const events = [];
  for await (const event of stream) events.push(event);
  return events;
}

async function withProxy(plan, fn) {
  const proxy = await startProxy(router.url, plan);
  try {
    return await fn(proxy);
  } finally {
    await proxy.close();
  }
}

describe("streamResponse", () => {
  test("an uncut stream: events, text, id and final response", async () => {
    const body = simBody("uncut please", { length: 30 });
    const reference = await referenceEvents(router.url, body);
    const deltas = [];
    const seen = [];
    const stream = streamResponse(router.url, body, { headers: AUTH, onTextDelta: (d) => deltas.push(d),
      onEvent: (e) => seen.push(e) });
    const events = await collect(stream);
    const final = await stream.done;
    checkSequence(assert, events);
    assert.deepEqual(seen, events);
    assert.equal(deltas.join(""), textOf(reference.events));
    assert.equal(await stream.text, textOf(reference.events));
    assert.equal(final.status, "completed");
    assert.equal(await stream.responseId, final.id);
    assert.equal(stream.id, final.id);
    assert.match(final.id, /^resp_/);
  });

  for (const budget of [0, 40, 700, 1600, 3000, 5000]) {
    test(`one cut after ${budget} body bytes: resumed, same text, dense sequence`, async () => {
      const body = simBody(`one cut ${budget}`, { length: 60 });
      const reference = await referenceEvents(router.url, body);
      await withProxy((n) => (n === 0 ? budget : undefined), async (proxy) => {
        const retries = [];
        const stream = streamResponse(proxy.url, body, { headers: AUTH, idempotencyKey: `cut-${budget}-${Date.now()}`,
          ...FAST, onRetry: (r) => retries.push(r) });
        const events = await collect(stream);
        checkSequence(assert, events);
        assert.equal(textOf(events), textOf(reference.events));
        assert.equal((await stream.done).status, "completed");
        assert.ok(retries.length >= 1, "the cut was noticed");
        assert.equal(retries[0].attempt, 1);
        assert.ok(retries[0].delayMs >= 0 && retries[0].delayMs <= FAST.maxDelayMs);
      });
    });
  }

  test("every connection cut after 1500 bytes: many resumes, one uninterrupted stream", async () => {
    const body = simBody("many cuts", { length: 120 });
    const reference = await referenceEvents(router.url, body);
    await withProxy((n) => (n < 12 ? 1500 : undefined), async (proxy) => {
      const retries = [];
      const stream = streamResponse(proxy.url, body, { headers: AUTH, ...FAST, maxRetries: 4,
        onRetry: (r) => retries.push(r) });
      const events = await collect(stream);
      checkSequence(assert, events);
      assert.equal(textOf(events), textOf(reference.events));
      assert.ok(retries.length >= 5, `several cuts (${retries.length})`);
      // Every reconnection made progress, so the attempt counter never climbed.
      assert.ok(retries.every((r) => r.attempt === 1), JSON.stringify(retries.map((r) => r.attempt)));
    });
  });

  test("cuts while the response is still generating: resume follows it live", async () => {
    const body = simBody("live cuts", { length: 80, tps: 200 });
    const reference = await referenceEvents(router.url, body);
    await withProxy((n) => (n < 4 ? 1200 + 400 * n : undefined), async (proxy) => {
      const retries = [];
      const stream = streamResponse(proxy.url, body, { headers: AUTH, ...FAST, onRetry: (r) => retries.push(r) });
      const events = await collect(stream);
      checkSequence(assert, events);
      assert.equal(textOf(events), textOf(reference.events));
      assert.equal(retries.length, 4);
      assert.ok(retries[0].responseId && retries[0].lastSequenceNumber >= 0);
    });
  });

  test("a cut before the response id arrived is not resumable: a clear error", async () => {
    await withProxy((n) => (n === 0 ? 0 : undefined), async (proxy) => {
      const stream = streamResponse(proxy.url, simBody("no id"), { headers: AUTH, ...FAST });
      await assert.rejects(stream.done, (err) => {
        assert.ok(err instanceof UnbrokenError);
        assert.equal(err.code, "not_resumable");
        assert.equal(err.responseId, null);
        assert.match(err.message, /idempotencyKey/);
        return true;
      });
      await assert.rejects(stream.responseId, { code: "not_resumable" });
      await assert.rejects(collect(stream), { code: "not_resumable" });
    });
  });

  test("a cut in the response head (fetch itself fails) with an idempotencyKey: re-POSTed, same response", async () => {
    const body = simBody("head cut", { length: 40 });
    const reference = await referenceEvents(router.url, body);
    const key = `head-${Date.now()}`;
    await withProxy((n) => (n === 0 ? "head" : n === 1 ? 0 : undefined), async (proxy) => {
      const retries = [];
      const stream = streamResponse(proxy.url, body, { headers: AUTH, idempotencyKey: key, ...FAST,
        onRetry: (r) => retries.push(r) });
      const events = await collect(stream);
      checkSequence(assert, events);
      assert.equal(textOf(events), textOf(reference.events));
      assert.equal(retries.length, 2, "two re-POSTs");
      // The router attached both retried POSTs to one response: a third POST with the key replays it.
      const again = streamResponse(router.url, body, { headers: AUTH, idempotencyKey: key });
      assert.equal(await again.responseId, events[0].response.id);
      assert.equal(await again.text, textOf(reference.events));
    });
  });

  test("without an idempotencyKey a failed POST is not retried", async () => {
    await withProxy(() => "head", async (proxy) => {
      const stream = streamResponse(proxy.url, simBody("head cut, no key"), { headers: AUTH, ...FAST });
      await assert.rejects(stream.done, { code: "not_resumable" });
      assert.equal(proxy.stats.connections, 1);
    });
  });

  test("abort: stops reading, rejects with the abort reason and cancels on the server", async () => {
    const controller = new AbortController();
    let deltas = 0;
    const stream = streamResponse(router.url, simBody("abort me", { length: 400, tps: 40 }), { headers: AUTH,
      signal: controller.signal, onTextDelta: () => { if (++deltas === 3) controller.abort(); } });
    const id = await stream.responseId;
    await assert.rejects(stream.done, { name: "AbortError" });
    assert.equal(deltas, 3, "no event after the abort");
    let status;
    for (let i = 0; i < 100; i++) {
      const response = await fetch(`${router.url}/responses/${id}`, { headers: AUTH });
      status = (await response.json()).status;
      if (status === "cancelled") break;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(status, "cancelled");
  });

  test("an abort during the backoff sleep ends at once", async () => {
    await withProxy((n) => (n === 0 ? 1600 : "head"), async (proxy) => {
      const controller = new AbortController();
      const stream = streamResponse(proxy.url, simBody("abort in backoff", { length: 60 }), { headers: AUTH,
        signal: controller.signal, initialDelayMs: 60_000, maxDelayMs: 60_000,
        onRetry: () => setTimeout(() => controller.abort(new Error("user gave up")), 20) });
      const started = Date.now();
      await assert.rejects(stream.done, { message: "user gave up" });
      assert.ok(Date.now() - started < 5000);
    });
  });

  test("an HTTP error before the stream: status and the spec's error object", async () => {
    const stream = streamResponse(router.url, { model: "no-such-model", input: "hi" }, { headers: AUTH });
    await assert.rejects(stream.done, (err) => {
      assert.ok(err instanceof UnbrokenError);
      assert.equal(err.code, "http_error");
      assert.ok(err.status >= 400 && err.status < 500, String(err.status));
      assert.equal(typeof err.error.message, "string");
      assert.equal(typeof err.error.type, "string");
      assert.ok("param" in err.error && "code" in err.error);
      return true;
    });
    const unauthorized = streamResponse(router.url, simBody("who am i"), {});
    await assert.rejects(unauthorized.done, { code: "http_error", status: 401 });
  });

  test("a server without resume (GET answers 404): the events so far, then a clear error", async () => {
    const noResume = (input, init) => (init?.method === "GET"
      ? Promise.resolve(new Response(JSON.stringify({ error: { message: "Not Found", type: "invalid_request_error",
        param: null, code: null } }), { status: 404, headers: { "content-type": "application/json" } }))
      : fetch(input, init));
    await withProxy((n) => (n === 0 ? 2500 : undefined), async (proxy) => {
      const seen = [];
      const stream = streamResponse(proxy.url, simBody("plain server", { length: 60 }), { headers: AUTH,
        fetch: noResume, ...FAST, onEvent: (e) => seen.push(e) });
      await assert.rejects(stream.done, (err) => {
        assert.equal(err.code, "resume_unsupported");
        assert.equal(err.status, 404);
        assert.equal(err.lastSequenceNumber, seen.at(-1).sequence_number);
        return true;
      });
      assert.ok(seen.length > 0);
    });
  });

  test("a store: false response cannot be resumed: resume_unsupported", async () => {
    await withProxy((n) => (n === 0 ? 2500 : undefined), async (proxy) => {
      const stream = streamResponse(proxy.url, { ...simBody("not stored", { length: 60 }), store: false },
        { headers: AUTH, ...FAST });
      await assert.rejects(stream.done, { code: "resume_unsupported", status: 404 });
    });
  });

  test("retries are bounded: a router that stays down gives up with retries_exhausted", async () => {
    await withProxy((n) => (n === 0 ? 1600 : "head"), async (proxy) => {
      const retries = [];
      const stream = streamResponse(proxy.url, simBody("down", { length: 60 }), { headers: AUTH, maxRetries: 3,
        initialDelayMs: 5, maxDelayMs: 20, onRetry: (r) => retries.push(r) });
      await assert.rejects(stream.done, (err) => {
        assert.equal(err.code, "retries_exhausted");
        assert.ok(err.cause, "the last failure is the cause");
        return true;
      });
      assert.deepEqual(retries.map((r) => r.attempt), [1, 2, 3]);
      assert.ok(retries.every((r) => r.delayMs <= 20));
    });
  });

  test("router:stream.resume is handled like a cut (the connection is left at once)", async () => {
    const body = simBody("resume event", { length: 50 });
    const reference = await referenceEvents(router.url, body);
    // The first answer: the reference's first five events, then the resume event, and a body that never ends.
    const encoder = new TextEncoder();
    const fake = (input, init) => {
      if (init?.method !== "POST") return fetch(input, init);
      const head = reference.events.slice(0, 5).map((e) => `event: ${e.type}\ndata: ${JSON.stringify(e)}\n\n`);
      const frames = [...head, `event: router:stream.resume\ndata: ${JSON.stringify({ type: "router:stream.resume",
        sequence_number: 5 })}\n\n`];
      const bodyStream = new ReadableStream({ start(c) { for (const f of frames) c.enqueue(encoder.encode(f)); } });
      return Promise.resolve(new Response(bodyStream, { headers: { "content-type": "text/event-stream" } }));
    };
    // The resume goes to the real router for the reference response.
    const stream = streamResponse(router.url, body, { headers: AUTH, fetch: fake, ...FAST });
    const events = await collect(stream);
    checkSequence(assert, events);
    assert.equal(textOf(events), textOf(reference.events));
    assert.equal(events[0].response.id, reference.events[0].response.id);
  });

  test("leaving the loop early stops reading; the response completes on the server", async () => {
    const stream = streamResponse(router.url, simBody("break early", { length: 60, tps: 300 }), { headers: AUTH });
    for await (const event of stream) {
      if (event.type === "response.output_text.delta") break;
    }
    await assert.rejects(stream.done, { code: "closed" });
    const id = await stream.responseId;
    let status;
    for (let i = 0; i < 100; i++) {
      status = (await (await fetch(`${router.url}/responses/${id}`, { headers: AUTH })).json()).status;
      if (status === "completed") break;
      await new Promise((resolve) => setTimeout(resolve, 100));
    }
    assert.equal(status, "completed");
  });
  test("recovery events (opt-in) pass through with their sequence numbers, across cuts", async () => {
    const body = simBody("recovery events", { length: 60 });
    const reference = await referenceEvents(router.url, body);
    const faulty = { ...body, metadata: { ...body.metadata, sim_fault: "cut:10" } };
    await withProxy((n) => (n < 3 ? 2000 : undefined), async (proxy) => {
      const retries = [];
      const stream = streamResponse(proxy.url, faulty, { headers: AUTH, recoveryEvents: true, ...FAST,
        onRetry: (r) => retries.push(r) });
      const events = await collect(stream);
      checkSequence(assert, events);
      const types = events.map((e) => e.type);
      assert.ok(types.includes("router:stream.interrupted"), types.join(" "));
      assert.ok(types.includes("router:stream.resumed"), types.join(" "));
      assert.equal(textOf(events), textOf(reference.events));
      assert.equal(retries.length, 3);
    });
  });
  test("the router is SIGKILLed mid-stream: the client resumes from a restarted router sharing the store", async () => {
    const first = await startRouter();
    let second;
    const proxy = await startProxy(first.url);
    try {
      const body = simBody("crash and resume", { length: 120, tps: 60 });
      const retries = [];
      let deltas = 0;
      let restarting;
      const stream = streamResponse(proxy.url, body, { headers: AUTH, maxRetries: 30, initialDelayMs: 100,
        maxDelayMs: 1000, onRetry: (r) => retries.push(r),
        onTextDelta: () => {
          if (++deltas !== 15) return;
          restarting = (async () => {
            await first.kill();
            second = await startRouter({ dir: first.dir });
            proxy.retarget(second.url);
          })();
        } });
      const events = await collect(stream);
      await restarting;
      checkSequence(assert, events);
      assert.ok(retries.length >= 1);
      const reference = await referenceEvents(second.url, body);
      assert.equal(textOf(events), textOf(reference.events));
      assert.equal(events.at(-1).type, "response.completed");
    } finally {
      await proxy.close();
      await second?.stop();
      await first.stop();
    }
  });
});
