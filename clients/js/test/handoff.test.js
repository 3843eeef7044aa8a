// A stream longer than the router's stream deadline: with recovery events the router ends each HTTP stream at the
// deadline with `router:stream.resume` and `[DONE]` while the response goes on; the client reconnects with
// `starting_after` and the caller sees one dense stream with the uncut text.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";

import { resumableFetch, streamResponse } from "../index.js";
import { AUTH, checkSequence, simBody, startRouter, textOf } from "../testing/support.js";

// ~2 s of generation (120 tokens at 60/s) against a 0.7 s stream deadline: three or four HTTP streams.
const BODY = simBody("a story longer than one invocation", { length: 120, tps: 60 });

let router;
let uncut;
before(async () => {
  uncut = await startRouter();
  router = await startRouter({ server: { stream_deadline_seconds: 0.7 } });
});
after(async () => {
  await router?.stop();
  await uncut?.stop();
});

/** The uncut text, from a router whose deadline the answer does not reach. */
async function uncutText() {
  const events = [];
  for await (const event of streamResponse(uncut.url, BODY, { headers: AUTH })) events.push(event);
  checkSequence(assert, events);
  return textOf(events);
}

describe("handoff at the stream deadline", () => {
  test("the raw POST ends with router:stream.resume and [DONE], no terminal event", async () => {
    const response = await fetch(`${router.url}/responses`, { method: "POST", body: JSON.stringify({ ...BODY,
      stream: true }), headers: { ...AUTH, "content-type": "application/json", "X-Unbroken-Recovery-Events": "true" } });
    const blocks = (await response.text()).split("\n\n").filter((b) => b.includes("data: "));
    assert.equal(blocks.at(-1), "data: [DONE]");
    const events = blocks.slice(0, -1).map((b) => JSON.parse(b.split("\n").find((l) => l.startsWith("data: "))
      .slice(6)));
    const resume = events.at(-1);
    assert.equal(resume.type, "router:stream.resume");
    assert.equal(resume.sequence_number, events.at(-2).sequence_number);
    assert.ok(!events.some((e) => e.type.startsWith("response.") && ["response.completed", "response.incomplete",
      "response.failed"].includes(e.type)));
  });

  test("streamResponse resumes across every deadline to the full text", async () => {
    const retries = [];
    const stream = streamResponse(router.url, BODY, { headers: AUTH, recoveryEvents: true,
      onRetry: (r) => retries.push(r) });
    const events = [];
    for await (const event of stream) events.push(event);
    checkSequence(assert, events);
    assert.ok(!events.some((e) => e.type === "router:stream.resume"));
    assert.equal(events.at(-1).type, "response.completed");
    assert.equal(textOf(events), await uncutText());
    assert.ok(retries.length >= 2, `resumed ${retries.length} times`);
    assert.ok(retries.every((r) => r.error.code === "resume_requested" && r.delayMs === 0));
    assert.equal((await stream.done).status, "completed");
  });

  test("resumableFetch gives one stream ending with the terminal event and [DONE]", async () => {
    const fetchWithResume = resumableFetch();
    const response = await fetchWithResume(`${router.url}/responses`, { method: "POST",
      body: JSON.stringify({ ...BODY, stream: true }),
      headers: { ...AUTH, "content-type": "application/json", "X-Unbroken-Recovery-Events": "true" } });
    const blocks = (await response.text()).split("\n\n").filter((b) => b.includes("data: "));
    assert.equal(blocks.at(-1), "data: [DONE]");
    const events = blocks.slice(0, -1).map((b) => JSON.parse(b.split("\n").find((l) => l.startsWith("data: "))
      .slice(6)));
    checkSequence(assert, events);
    assert.equal(textOf(events), await uncutText());
  });
});
