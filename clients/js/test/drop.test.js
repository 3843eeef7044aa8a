// What the demo page's "drop my connection" relies on (layers/unbroken/api/static/demo.js): a fetch wrapper whose
// response body the caller errors mid-stream is a cut like any other, and streamResponse resumes the response
// (which was not cancelled on the server) with the same text.

import assert from "node:assert/strict";
import { after, before, test } from "node:test";

import { streamResponse } from "../index.js";
import { AUTH, checkSequence, referenceEvents, simBody, startRouter, textOf } from "../testing/support.js";

let router;
before(async () => {
  router = await startRouter();
});
after(async () => {
  await router?.stop();
});

function droppableFetch(onConnection) {
  return async (input, init) => {
    const response = await fetch(input, init);
    if (!response.body) return response;
    const reader = response.body.getReader();
    let controller;
    const body = new ReadableStream({
      start(c) {
        controller = c;
      },
      async pull(c) {
        try {
          const { value, done } = await reader.read();
          if (done) c.close();
          else c.enqueue(value);
        } catch (err) {
          c.error(err);
        }
      },
      cancel: (reason) => reader.cancel(reason),
    });
    onConnection(() => {
      controller.error(new TypeError("connection dropped"));
      reader.cancel().catch(() => {});
    });
    return new Response(body, { status: response.status, headers: response.headers });
  };
}

test("a body the caller errors mid-stream is resumed: same text, dense sequence", async () => {
  const body = simBody("drop me", { length: 60, tps: 60 });
  const reference = await referenceEvents(router.url, body);
  let drop = () => {};
  let deltas = 0;
  const retries = [];
  const stream = streamResponse(router.url, body, {
    headers: AUTH, initialDelayMs: 5, maxDelayMs: 40,
    fetch: droppableFetch((d) => { drop = d; }),
    onTextDelta: () => {
      deltas += 1;
      if (deltas === 10) drop();
    },
    onRetry: (r) => retries.push(r),
  });
  const events = [];
  for await (const event of stream) events.push(event);
  checkSequence(assert, events);
  assert.equal(textOf(events), textOf(reference.events));
  assert.equal((await stream.done).status, "completed");
  assert.equal(retries.length, 1);
});
