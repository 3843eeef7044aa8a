// @unbroken/client: Open Responses streams that survive network cuts. No runtime dependencies: fetch, streams,
// TextDecoder and AbortController are the platform's (Node 18+, browsers, Deno, Bun, edge runtimes).
//
// One engine (`resilientEvents`) reads SSE from a response body, tracks the last `sequence_number` and, when the
// connection fails or the body ends before a terminal event, reconnects with
// `GET {base}/responses/{id}?stream=true&starting_after=N` (bounded exponential backoff with jitter), dropping
// events it has already seen. `streamResponse` puts callbacks, an async iterator and promises on it;
// `resumableFetch` turns it back into SSE bytes behind a `fetch` for the openai SDK and the Vercel AI SDK.

import { SSEParser } from "./sse.js";

export { SSEParser };

/** The events that end a response stream. */
export const TERMINAL_EVENTS = Object.freeze(["response.completed", "response.incomplete", "response.failed"]);
const TERMINAL = new Set(TERMINAL_EVENTS);

/** A server-sent request to reconnect (an opt-in recovery event): handled like a network cut. */
export const RESUME_EVENT = "router:stream.resume";

export const RECOVERY_EVENTS_HEADER = "X-Unbroken-Recovery-Events";

const DEFAULTS = Object.freeze({ maxRetries: 6, initialDelayMs: 200, maxDelayMs: 5000, idleTimeoutMs: 0 });

/**
 * Every failure this package reports. `code` says which:
 * - `http_error`: the server answered 4xx/5xx (`status`, and `error`, the Open Responses error object);
 * - `not_resumable`: the stream was cut before the response id arrived (and no `idempotencyKey` made a re-POST safe);
 * - `resume_unsupported`: the resume GET answered 404/405/501 or not with an event stream (a server without resume,
 *   or a `store: false` response);
 * - `retries_exhausted`: every reconnection failed (`cause` is the last failure);
 * - `protocol_error`: the server sent something that is not an Open Responses stream;
 * - `stream_cut`, `resume_requested`, `journal_unavailable`, `idle_timeout`: why a connection ended (seen in
 *   `onRetry` and as the `cause` of the errors above).
 */
export class UnbrokenError extends Error {
  /**
   * @param {string} message
   * @param {{ code: string, status?: number, error?: any, responseId?: string | null,
   *           lastSequenceNumber?: number, cause?: unknown, retryAfterMs?: number }} details
   */
  constructor(message, details) {
    super(message, details.cause === undefined ? undefined : { cause: details.cause });
    this.name = "UnbrokenError";
    this.code = details.code;
    this.status = details.status;
    this.error = details.error;
    this.responseId = details.responseId ?? null;
    this.lastSequenceNumber = details.lastSequenceNumber ?? -1;
    this.retryAfterMs = details.retryAfterMs;
  }
}

// -- small helpers ----------------------------------------------------------------------------------------------

function abortReason(signal) {
  return signal.reason ?? new DOMException("This operation was aborted", "AbortError");
}

/** A controller aborted when `parent` is (or when aborted itself); `dispose()` detaches it from the parent. */
function linkedController(...parents) {
  const ctrl = new AbortController();
  const listeners = [];
  for (const parent of parents) {
    if (!parent) continue;
    if (parent.aborted) {
      ctrl.abort(parent.reason);
      break;
    }
    const onAbort = () => ctrl.abort(parent.reason);
    parent.addEventListener("abort", onAbort, { once: true });
    listeners.push([parent, onAbort]);
  }
  return {
    signal: ctrl.signal,
    abort: (reason) => ctrl.abort(reason),
    dispose() {
      for (const [parent, onAbort] of listeners) parent.removeEventListener("abort", onAbort);
      listeners.length = 0;
    },
  };
}

function sleep(ms, signal) {
  return new Promise((resolve, reject) => {
    if (signal?.aborted) return reject(abortReason(signal));
    const onAbort = () => {
      clearTimeout(timer);
      reject(abortReason(signal));
    };
    const timer = setTimeout(() => {
      signal?.removeEventListener("abort", onAbort);
      resolve();
    }, ms);
    signal?.addEventListener("abort", onAbort, { once: true });
  });
}

/** Equal jitter: half the exponential step is fixed, half random (never 0, never above the cap). */
function backoffDelay(attempt, { initialDelayMs, maxDelayMs }) {
  const step = Math.min(maxDelayMs, initialDelayMs * 2 ** (attempt - 1));
  return Math.round(step / 2 + Math.random() * (step / 2));
}

function retryAfterMs(response) {
  const value = response.headers.get("retry-after");
  if (!value) return undefined;
  const seconds = Number(value);
  if (Number.isFinite(seconds)) return Math.max(0, seconds * 1000);
  const date = Date.parse(value);
  return Number.isNaN(date) ? undefined : Math.max(0, date - Date.now());
}

/** The error a non-2xx answer carries: `{error: {message, type, param, code}}` per the spec, else its text. */
async function httpError(response, describe, state, code = "http_error") {
  let text = "";
  try {
    text = await response.text();
  } catch {
    // the body could not be read: the status says enough
  }
  let error;
  try {
    const parsed = JSON.parse(text);
    if (parsed && typeof parsed.error === "object" && parsed.error !== null) error = parsed.error;
  } catch {
    // not JSON
  }
  const detail = error?.message ?? (text.trim().slice(0, 300) || response.statusText || "no detail");
  return new UnbrokenError(describe(`HTTP ${response.status}: ${detail}`), {
    code, status: response.status, error, responseId: state.responseId, lastSequenceNumber: state.lastSeq,
    retryAfterMs: retryAfterMs(response),
  });
}

const RETRYABLE_STATUS = new Set([408, 425, 429, 500, 502, 503, 504]);

function isEventStream(response) {
  return (response.headers.get("content-type") ?? "").toLowerCase().includes("text/event-stream");
}

/** SSE frames from a body; ends (and releases the body) when `ctrl` aborts or after `idleTimeoutMs` of silence. */
async function* readFrames(body, ctrl, idleTimeoutMs) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  const parser = new SSEParser();
  let timer;
  const arm = () => {
    if (idleTimeoutMs > 0) {
      clearTimeout(timer);
      timer = setTimeout(() => ctrl.abort(new UnbrokenError(`No bytes for ${idleTimeoutMs} ms.`,
        { code: "idle_timeout" })), idleTimeoutMs);
    }
  };
  // An abort (the caller's signal, the idle timer, a stop) must end a pending read whatever fetch implementation
  // produced the body: cancelling the reader resolves it.
  const onAbort = () => reader.cancel(ctrl.signal.reason).catch(() => {});
  ctrl.signal.addEventListener("abort", onAbort, { once: true });
  try {
    arm();
    for (;;) {
      if (ctrl.signal.aborted) throw ctrl.signal.reason;
      const { value, done } = await reader.read();
      if (ctrl.signal.aborted) throw ctrl.signal.reason;
      if (done) break;
      arm();
      yield* parser.push(decoder.decode(value, { stream: true }));
    }
    yield* parser.push(decoder.decode());
    parser.end();
  } finally {
    clearTimeout(timer);
    ctrl.signal.removeEventListener("abort", onAbort);
    reader.cancel().catch(() => {});
  }
}

// -- the engine -------------------------------------------------------------------------------------------------

/**
 * Events of one response across as many connections as it takes. Yields `{frame, event}` (the SSE frame as sent
 * and its parsed JSON; or once `{json}` for a non-streamed JSON answer), each event once, in order, until the
 * terminal event. `state` is kept up to date (`responseId`, `lastSeq`, `terminal`) for the caller to read.
 *
 * @param {object} o
 * @param {(signal: AbortSignal) => Promise<Response>} o.post        the creating POST
 * @param {(id: string, after: number, signal: AbortSignal) => Promise<Response>} o.resume   the resume GET
 * @param {boolean} o.canRePost  a retried POST is safe (an Idempotency-Key is sent)
 * @param {AbortSignal} o.signal
 * @param {{ responseId: string | null, lastSeq: number, terminal: boolean }} o.state
 * @param {(info: {attempt: number, delayMs: number, error: unknown}) => void} [o.onRetry]
 * @param {(id: string) => void} [o.onResponseId]
 */
export async function* resilientEvents(o) {
  const opts = { ...o };
  for (const [key, value] of Object.entries(DEFAULTS)) opts[key] ??= value;
  const st = opts.state;
  let request = opts.post;
  let resuming = false;
  let attempt = 0;
  let unsequenced = false;
  for (;;) {
    let progressed = false;
    let answered = false;
    let cut;
    const conn = linkedController(opts.signal);
    try {
      const response = await request(conn.signal);
      answered = true;
      if (!response.ok) {
        if (resuming && [404, 405, 501].includes(response.status)) {
          throw await httpError(response, (status) => `The server cannot resume the stream: GET /responses/`
            + `${st.responseId} answered ${status} (a server without resume, or a response with store: false).`,
          st, "resume_unsupported");
        }
        const err = await httpError(response, (status) => (resuming ? `The resume request answered ${status}`
          : `The server answered ${status}`), st);
        // The first POST's error is the answer; a resume or a safe re-POST retries what may pass.
        if (!resuming && attempt === 0) throw err;
        if (!RETRYABLE_STATUS.has(response.status)) throw err;
        err.retryable = true;
        throw err;
      }
      if (!isEventStream(response)) {
        if (!resuming && (response.headers.get("content-type") ?? "").includes("json")) {
          const json = await response.json();
          if (typeof json?.id === "string") {
            st.responseId = json.id;
            opts.onResponseId?.(json.id);
          }
          st.terminal = true;
          yield { json };
          return;
        }
        const got = response.headers.get("content-type") ?? "no content type";
        await response.body?.cancel().catch(() => {});
        if (resuming) {
          // e.g. a server that has GET /responses/{id} but ignores stream=true
          throw new UnbrokenError(`The server cannot resume the stream: GET /responses/${st.responseId}`
            + `?stream=true answered ${got}, not an event stream.`, { code: "resume_unsupported",
            status: response.status, responseId: st.responseId, lastSequenceNumber: st.lastSeq });
        }
        throw new UnbrokenError(`Expected an event stream, got ${got}.`, { code: "protocol_error",
          status: response.status, responseId: st.responseId });
      }
      if (!response.body) throw new UnbrokenError("The stream has no body.", { code: "protocol_error" });
      for await (const frame of readFrames(response.body, conn, opts.idleTimeoutMs)) {
        if (opts.signal?.aborted) throw abortReason(opts.signal); // frames of one chunk come together
        if (frame.data === "[DONE]") {
          if (st.terminal) return;
          continue; // [DONE] without a terminal event: the body ends next, and that is a cut
        }
        let event;
        try {
          event = JSON.parse(frame.data);
        } catch {
          throw new UnbrokenError(`An event is not JSON: ${frame.data.slice(0, 200)}`,
            { code: "protocol_error", responseId: st.responseId, lastSequenceNumber: st.lastSeq });
        }
        const type = typeof event?.type === "string" ? event.type : frame.event;
        if (type === RESUME_EVENT) {
          cut = new UnbrokenError("The server asked for a reconnection.", { code: "resume_requested" });
          break;
        }
        if (type === "error" && event.error?.code === "journal_unavailable" && st.responseId) {
          // Not durable and numbered past the journal: the stream is resumable once the journal is back.
          cut = new UnbrokenError(event.error.message ?? "journal unavailable", { code: "journal_unavailable",
            error: event.error });
          break;
        }
        const seq = event?.sequence_number;
        if (typeof seq === "number") {
          if (seq <= st.lastSeq) continue; // a duplicate from a replay
          st.lastSeq = seq;
        } else {
          unsequenced = true; // no cursor to resume from, no way to tell a replayed event from a new one
        }
        if (!st.responseId && typeof event?.response?.id === "string") {
          st.responseId = event.response.id;
          opts.onResponseId?.(st.responseId);
        }
        progressed = true;
        if (TERMINAL.has(type)) st.terminal = true;
        yield { frame, event };
        if (st.terminal) return;
      }
      cut ??= new UnbrokenError("The stream ended before a terminal event.", { code: "stream_cut" });
    } catch (err) {
      if (opts.signal?.aborted) throw abortReason(opts.signal);
      if (err instanceof UnbrokenError && !err.retryable && ["http_error", "resume_unsupported",
        "protocol_error"].includes(err.code)) {
        throw err;
      }
      cut = err;
    } finally {
      conn.abort(); // releases the connection of a body we stop reading
      conn.dispose();
    }

    if (progressed) attempt = 0;
    attempt += 1;
    const where = { responseId: st.responseId, lastSequenceNumber: st.lastSeq, cause: cut };
    if (unsequenced) {
      throw new UnbrokenError("The stream was cut, and its events carry no sequence_number to resume from.",
        { code: "not_resumable", ...where });
    }
    if (!st.responseId) {
      if (!opts.canRePost) {
        const why = answered ? "The stream was cut before the response id arrived"
          : `The request failed before any answer (${cut?.message ?? cut})`;
        throw new UnbrokenError(`${why}, so it cannot be resumed, and a retried POST could start a second `
          + "response (an idempotencyKey makes a retried POST safe).", { code: "not_resumable", ...where });
      }
      request = opts.post; // the router attaches a retried POST with the same Idempotency-Key to the same response
      resuming = false;
    } else {
      request = (signal) => opts.resume(st.responseId, st.lastSeq, signal);
      resuming = true;
    }
    if (attempt > opts.maxRetries) {
      throw new UnbrokenError(`The stream could not be resumed after ${opts.maxRetries} retries.`,
        { code: "retries_exhausted", ...where });
    }
    // The server asked for the reconnection (its stream reached its deadline, the response goes on): no wait.
    let delayMs = cut?.code === "resume_requested" ? 0 : backoffDelay(attempt, opts);
    if (typeof cut?.retryAfterMs === "number") delayMs = Math.max(delayMs, Math.min(cut.retryAfterMs, 60_000));
    opts.onRetry?.({ attempt, delayMs, error: cut, responseId: st.responseId, lastSequenceNumber: st.lastSeq });
    await sleep(delayMs, opts.signal);
  }
}

// -- streamResponse ---------------------------------------------------------------------------------------------

function trimBase(baseUrl) {
  return String(baseUrl).replace(/\/+$/, "");
}

function mergeHeaders(...sources) {
  const headers = new Headers();
  for (const source of sources) {
    if (!source) continue;
    new Headers(source).forEach((value, key) => headers.set(key, value));
  }
  return headers;
}

/** POST /responses/{id}/cancel, best effort: failures are swallowed. */
async function cancelOnServer(fetchImpl, url, headers) {
  try {
    const response = await fetchImpl(url, { method: "POST", headers });
    await response.body?.cancel();
  } catch {
    // best effort
  }
}

/**
 * Stream a response, resuming it across cuts. See index.d.ts for the options and the returned object.
 * @param {string} baseUrl  e.g. "http://127.0.0.1:8080/v1"
 * @param {object} body     the CreateResponse body (`stream: true` is set)
 * @param {object} [options]
 */
export function streamResponse(baseUrl, body, options = {}) {
  if (typeof (options.fetch ?? globalThis.fetch) !== "function") throw new TypeError("no fetch: pass options.fetch");
  // Called through a closure: some platforms' fetch throws "Illegal invocation" when called off its global.
  const fetchImpl = options.fetch ?? ((...args) => globalThis.fetch(...args));
  const base = trimBase(baseUrl);
  const common = mergeHeaders(options.headers);
  if (options.recoveryEvents) common.set(RECOVERY_EVENTS_HEADER, "true");
  const postHeaders = mergeHeaders(common, { "content-type": "application/json", accept: "text/event-stream" });
  if (options.idempotencyKey) postHeaders.set("Idempotency-Key", String(options.idempotencyKey));
  const getHeaders = mergeHeaders(common, { accept: "text/event-stream" });
  const payload = JSON.stringify({ ...body, stream: true });
  const state = { responseId: null, lastSeq: -1, terminal: false };
  const stop = new AbortController(); // the iterator's return(), a failing callback
  const run = linkedController(options.signal, stop.signal);

  let resolveId, rejectId, resolveDone, rejectDone;
  const responseId = new Promise((res, rej) => { resolveId = res; rejectId = rej; });
  const done = new Promise((res, rej) => { resolveDone = res; rejectDone = rej; });
  // Nobody has to await these: an unobserved rejection must not crash the process.
  responseId.catch(() => {});
  done.catch(() => {});
  let text = "";

  // The iterator's queue: every event is kept until iterated (so an iterator created late misses nothing).
  const queue = [];
  let waiter = null;
  let finished = false;
  let failure;
  const wake = () => {
    if (waiter) {
      const w = waiter;
      waiter = null;
      w();
    }
  };

  const onUserAbort = () => {
    if (state.responseId && !state.terminal && options.cancelOnAbort !== false) {
      void cancelOnServer(fetchImpl, `${base}/responses/${encodeURIComponent(state.responseId)}/cancel`,
        common);
    }
  };
  options.signal?.addEventListener("abort", onUserAbort, { once: true });

  const pump = async () => {
    await Promise.resolve(); // callers attach handlers first
    try {
      const events = resilientEvents({
        maxRetries: options.maxRetries ?? DEFAULTS.maxRetries,
        initialDelayMs: options.initialDelayMs ?? DEFAULTS.initialDelayMs,
        maxDelayMs: options.maxDelayMs ?? DEFAULTS.maxDelayMs,
        idleTimeoutMs: options.idleTimeoutMs ?? DEFAULTS.idleTimeoutMs,
        state,
        signal: run.signal,
        canRePost: Boolean(options.idempotencyKey),
        post: (signal) => fetchImpl(`${base}/responses`, { method: "POST", headers: postHeaders, body: payload,
          signal }),
        resume: (id, after, signal) => fetchImpl(`${base}/responses/${encodeURIComponent(id)}?stream=true`
          + `&starting_after=${after}`, { method: "GET", headers: getHeaders, signal }),
        onRetry: options.onRetry,
        onResponseId: resolveId,
      });
      let final;
      for await (const item of events) {
        if (item.json) {
          final = item.json;
          break;
        }
        const event = item.event;
        if (event.type === "response.output_text.delta" && typeof event.delta === "string") {
          text += event.delta;
          options.onTextDelta?.(event.delta, event);
        }
        options.onEvent?.(event);
        queue.push(event);
        wake();
        if (TERMINAL.has(event.type)) final = event.response;
      }
      if (!state.responseId) rejectId(new UnbrokenError("The response has no id.", { code: "protocol_error" }));
      finished = true;
      resolveDone(final);
    } catch (err) {
      const reason = stop.signal.aborted && !options.signal?.aborted ? stop.signal.reason : err;
      failure = reason;
      finished = true;
      rejectId(reason);
      rejectDone(reason);
    } finally {
      options.signal?.removeEventListener("abort", onUserAbort);
      run.dispose();
      wake();
    }
  };
  void pump();

  let iterated = false;
  const stream = {
    responseId,
    done,
    get text() {
      return done.then(() => text);
    },
    get id() {
      return state.responseId;
    },
    get lastSequenceNumber() {
      return state.lastSeq;
    },
    [Symbol.asyncIterator]() {
      if (iterated) throw new TypeError("a response stream can be iterated once");
      iterated = true;
      return {
        async next() {
          for (;;) {
            if (queue.length > 0) return { value: queue.shift(), done: false };
            if (finished) {
              if (failure !== undefined) {
                const f = failure;
                failure = undefined;
                throw f;
              }
              return { value: undefined, done: true };
            }
            await new Promise((resolve) => { waiter = resolve; });
          }
        },
        async return() {
          // Leaving the loop stops reading (the response goes on into the server's journal; abort the signal to
          // cancel it there).
          if (!finished) stop.abort(new UnbrokenError("The stream was closed by its reader.", { code: "closed" }));
          queue.length = 0;
          return { value: undefined, done: true };
        },
        [Symbol.asyncIterator]() {
          return this;
        },
      };
    },
  };
  return stream;
}

// -- resumableFetch ---------------------------------------------------------------------------------------------

async function bodyText(input, init) {
  const body = init?.body;
  if (body === undefined || body === null) {
    if (input instanceof Request && input.body) return input.clone().text();
    return undefined;
  }
  if (typeof body === "string") return body;
  if (body instanceof ArrayBuffer || ArrayBuffer.isView(body)) return new TextDecoder().decode(body);
  if (body instanceof URLSearchParams || body instanceof FormData || body instanceof ReadableStream) return undefined;
  if (typeof Blob !== "undefined" && body instanceof Blob) return body.text();
  return undefined;
}

function serializeFrame(frame) {
  let out = "";
  if (frame.id !== undefined) out += `id: ${frame.id}\n`;
  if (frame.event && frame.event !== "message") out += `event: ${frame.event}\n`;
  for (const line of frame.data.split("\n")) out += `data: ${line}\n`;
  return `${out}\n`;
}

/**
 * A `fetch` that makes streamed `POST …/responses` calls resume across cuts (see index.d.ts); every other
 * request goes to `baseFetch` untouched.
 * @param {typeof fetch} [baseFetch]
 * @param {object} [options]
 */
export function resumableFetch(baseFetch, options = {}) {
  const inner = baseFetch ?? ((...args) => globalThis.fetch(...args));
  return async function fetchWithResume(input, init) {
    const url = input instanceof Request ? input.url : String(input instanceof URL ? input.href : input);
    const method = (init?.method ?? (input instanceof Request ? input.method : "GET")).toUpperCase();
    let parsedUrl;
    try {
      parsedUrl = new URL(url);
    } catch {
      return inner(input, init);
    }
    if (method !== "POST" || !/\/responses\/?$/.test(parsedUrl.pathname)) return inner(input, init);
    const text = await bodyText(input, init);
    let json;
    try {
      json = text === undefined ? undefined : JSON.parse(text);
    } catch {
      json = undefined;
    }
    if (!json || json.stream !== true) return inner(input, init);

    const headers = mergeHeaders(input instanceof Request ? input.headers : undefined, init?.headers);
    const userSignal = init?.signal ?? (input instanceof Request ? input.signal : undefined);
    const stop = new AbortController();
    const run = linkedController(userSignal ?? undefined, stop.signal);
    const first = await inner(input, { ...init, signal: run.signal });
    if (!first.ok || !isEventStream(first) || !first.body) {
      run.dispose();
      return first;
    }

    const resumeHeaders = mergeHeaders(headers);
    for (const name of ["content-type", "content-length", "idempotency-key"]) resumeHeaders.delete(name);
    resumeHeaders.set("accept", "text/event-stream");
    const resumeUrl = (id, after) => {
      const u = new URL(parsedUrl.href);
      u.pathname = `${u.pathname.replace(/\/+$/, "")}/${encodeURIComponent(id)}`;
      u.searchParams.set("stream", "true");
      u.searchParams.set("starting_after", String(after));
      return u.href;
    };
    const cancelUrl = (id) => {
      const u = new URL(parsedUrl.href);
      u.pathname = `${u.pathname.replace(/\/+$/, "")}/${encodeURIComponent(id)}/cancel`;
      return u.href;
    };
    const postHeaders = mergeHeaders(headers);
    const canRePost = postHeaders.has("idempotency-key");
    const state = { responseId: null, lastSeq: -1, terminal: false };
    let usedFirst = false;
    const events = resilientEvents({
      maxRetries: options.maxRetries ?? DEFAULTS.maxRetries,
      initialDelayMs: options.initialDelayMs ?? DEFAULTS.initialDelayMs,
      maxDelayMs: options.maxDelayMs ?? DEFAULTS.maxDelayMs,
      idleTimeoutMs: options.idleTimeoutMs ?? DEFAULTS.idleTimeoutMs,
      state,
      signal: run.signal,
      canRePost,
      post: (signal) => {
        if (!usedFirst) {
          usedFirst = true;
          return Promise.resolve(first);
        }
        return inner(url, { method: "POST", headers: postHeaders, body: text, signal });
      },
      resume: (id, after, signal) => inner(resumeUrl(id, after), { method: "GET", headers: resumeHeaders, signal }),
      onRetry: options.onRetry,
    });
    const iterator = events[Symbol.asyncIterator]();
    const encoder = new TextEncoder();

    const onUserAbort = () => {
      if (state.responseId && !state.terminal && options.cancelOnAbort !== false) {
        const cancelHeaders = mergeHeaders(resumeHeaders);
        cancelHeaders.delete("accept");
        void cancelOnServer(inner, cancelUrl(state.responseId), cancelHeaders);
      }
    };
    userSignal?.addEventListener("abort", onUserAbort, { once: true });
    const cleanup = () => {
      userSignal?.removeEventListener("abort", onUserAbort);
      run.dispose();
    };

    const body = new ReadableStream({
      async pull(controller) {
        try {
          const { value, done } = await iterator.next();
          if (done) {
            controller.enqueue(encoder.encode("data: [DONE]\n\n"));
            controller.close();
            cleanup();
            return;
          }
          controller.enqueue(encoder.encode(serializeFrame(value.frame)));
        } catch (err) {
          cleanup();
          try {
            controller.error(err);
          } catch {
            // already cancelled
          }
        }
      },
      cancel(reason) {
        stop.abort(reason);
        void iterator.return?.(undefined).catch(() => {});
        cleanup();
      },
    });
    const outHeaders = new Headers(first.headers);
    outHeaders.delete("content-length");
    outHeaders.delete("content-encoding");
    const response = new Response(body, { status: first.status, statusText: first.statusText,
      headers: outHeaders });
    try {
      Object.defineProperty(response, "url", { value: first.url || url });
    } catch {
      // some platforms freeze it; the url is informational
    }
    return response;
  };
}
