// The demo page's script: streams with the repository's own JS client (clients/js, served at demo/client.js).
// Everything is relative to the page, so the page works wherever the router serves it (`/` locally, a stage path
// behind API Gateway).

import { streamResponse } from "./client.js";

const root = new URL(".", document.baseURI);
const API = new URL("v1", root).href;
const KEY_ITEM = "unbroken.demo.apiKey";
const $ = (id) => document.getElementById(id);
const controls = document.body.dataset.demoControls === "on";

let current = null; // { stream, drop() } of the answer being streamed

function authHeaders() {
  const key = $("key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function log(kind, text) {
  const li = document.createElement("li");
  li.className = kind;
  li.textContent = `${new Date().toISOString().slice(11, 23)}  ${text}`;
  $("log").append(li);
  li.scrollIntoView({ block: "nearest" });
}

function setState(state) {
  document.body.dataset.state = state;
  $("state").dataset.state = state;
  $("state").textContent = state;
  const streaming = state === "streaming";
  $("send").disabled = streaming;
  $("drop").disabled = !streaming;
  $("kill").disabled = !streaming || !current?.stream.id;
}

async function loadModels() {
  const select = $("model");
  const note = $("models-note");
  try {
    const response = await fetch(`${API}/models`, { headers: authHeaders() });
    const body = await response.json().catch(() => ({}));
    if (!response.ok) {
      note.textContent = `GET /v1/models: ${response.status} ${body?.error?.message ?? ""}`;
      return;
    }
    const previous = select.value;
    select.replaceChildren(...body.data.map((m) => {
      const option = new Option(m.id, m.id);
      option.title = m.description ?? "";
      return option;
    }));
    if (body.data.some((m) => m.id === previous)) select.value = previous;
    note.textContent = `${body.data.length} model(s) from GET /v1/models.`;
  } catch (err) {
    note.textContent = `GET /v1/models failed: ${err}`;
  }
}

// A fetch whose response body this page can break: "Drop my connection" errors the stream the client reads and
// cancels the network body under it, as a lost connection would. The response itself is not cancelled on the
// server (that is what the client's AbortSignal would do), so the client resumes it with starting_after.
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
      cancel(reason) {
        return reader.cancel(reason);
      },
    });
    onConnection(() => {
      try {
        controller.error(new TypeError("connection dropped by the demo page"));
      } catch {
        // already closed
      }
      reader.cancel().catch(() => {});
    });
    return new Response(body, { status: response.status, statusText: response.statusText,
      headers: response.headers });
  };
}

function randomKey() {
  if (crypto.randomUUID) return `demo-${crypto.randomUUID()}`;
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  return `demo-${Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("")}`;
}

function showAccounting(response) {
  const router = response?.router;
  if (!router) return;
  $("served-by").textContent = router.served_by ?? "–";
  $("cost").textContent = typeof router.cost_usd === "number" ? `$${router.cost_usd.toFixed(6)}` : "–";
  const rows = (router.attempts ?? []).map((a, i) => {
    const tr = document.createElement("tr");
    for (const value of [i + 1, a.deployment, a.outcome, a.continuation ?? "–", a.output_tokens, a.cost_usd]) {
      const td = document.createElement("td");
      td.textContent = String(value);
      tr.append(td);
    }
    return tr;
  });
  $("attempts").querySelector("tbody").replaceChildren(...rows);
  $("attempts").hidden = rows.length === 0;
}

function resetView() {
  $("output").textContent = "";
  $("log").replaceChildren();
  $("response-id").textContent = "–";
  $("served-by").textContent = "–";
  $("cost").textContent = "–";
  $("reconnects").textContent = "0";
  $("recoveries").textContent = "0";
  $("attempts").hidden = true;
}

async function send() {
  const model = $("model").value;
  if (!model) {
    log("error", "pick a model first (enter your API key to list them)");
    return;
  }
  resetView();
  let dropConnection = () => {};
  let reconnects = 0;
  let recoveries = 0;
  const headers = authHeaders();
  const policy = $("policy").value;
  if (policy) headers["X-Unbroken-Policy"] = policy;
  const stream = streamResponse(API, { model, input: $("prompt").value }, {
    headers,
    recoveryEvents: true,
    idempotencyKey: randomKey(), // a cut before the response id arrives is safe to re-POST
    fetch: droppableFetch((drop) => { dropConnection = drop; }),
    onEvent(event) {
      if (event.type === "response.created") {
        $("response-id").textContent = event.response.id;
        $("kill").disabled = false;
        log("event", `response.created ${event.response.id}`);
      } else if (event.type === "response.output_text.delta") {
        $("output").textContent += event.delta;
      } else if (event.type.startsWith("router:")) {
        recoveries += 1;
        $("recoveries").textContent = String(recoveries);
        const { type, sequence_number: seq, ...rest } = event;
        log("router", `${type} #${seq} ${JSON.stringify(rest)}`);
      } else if (["response.completed", "response.incomplete", "response.failed"].includes(event.type)) {
        log("event", `${event.type} #${event.sequence_number}`);
      }
    },
    onRetry({ attempt, delayMs, error, lastSequenceNumber }) {
      reconnects += 1;
      $("reconnects").textContent = String(reconnects);
      log("client", `connection lost (${error?.code ?? error?.message ?? error}); resuming after event `
        + `#${lastSequenceNumber} in ${delayMs} ms (try ${attempt})`);
    },
  });
  current = { stream, drop: () => dropConnection() };
  setState("streaming");
  try {
    const final = await stream.done;
    showAccounting(final);
    setState(final?.status ?? "completed");
  } catch (err) {
    log("error", `${err?.code ?? "error"}: ${err?.message ?? err}`);
    setState("failed");
  } finally {
    current = null;
    $("kill").disabled = true;
  }
}

async function kill() {
  const id = current?.stream.id;
  if (!id) return;
  $("kill").disabled = true;
  const response = await fetch(new URL(`demo/responses/${encodeURIComponent(id)}/kill-producer`, root),
    { method: "POST", headers: authHeaders() });
  const body = await response.json().catch(() => ({}));
  if (response.ok) {
    log("client", `producer killed; its lease expires within ${body.lease_seconds} s, then the reader takes over`);
  } else {
    log("error", `kill-producer: ${response.status} ${body?.error?.message ?? ""}`);
  }
}

$("key").value = sessionStorage.getItem(KEY_ITEM) ?? "";
$("key").addEventListener("change", () => {
  const key = $("key").value.trim();
  if (key) sessionStorage.setItem(KEY_ITEM, key);
  else sessionStorage.removeItem(KEY_ITEM);
  void loadModels();
});
$("send").addEventListener("click", () => void send());
$("drop").addEventListener("click", () => {
  log("client", "dropping the connection (the response goes on on the server)");
  current?.drop();
});
$("kill").hidden = !controls;
$("kill-note").hidden = !controls;
$("kill").addEventListener("click", () => void kill());
setState("idle");
void loadModels();
document.body.dataset.ready = "true";
