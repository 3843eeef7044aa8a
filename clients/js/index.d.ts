// Types for @unbroken/client (hand-written; the package is plain ES module JavaScript with no build step).

/** One Open Responses streaming event (or a `router:` extension event). */
export interface ResponseEvent {
  type: string;
  sequence_number: number;
  [key: string]: unknown;
}

export interface TextDeltaEvent extends ResponseEvent {
  type: "response.output_text.delta";
  delta: string;
  item_id?: string;
  output_index?: number;
  content_index?: number;
}

/** The response object (`response.created` … `response.completed` carry it); only the common fields are typed. */
export interface ResponseObject {
  id: string;
  object: "response";
  status: "queued" | "in_progress" | "completed" | "incomplete" | "failed" | "cancelled" | string;
  output: unknown[];
  error?: OpenResponsesErrorBody | null;
  incomplete_details?: { reason?: string } | null;
  [key: string]: unknown;
}

/** The spec's error object: `{"error": {message, type, param, code}}` without the wrapper. */
export interface OpenResponsesErrorBody {
  message: string;
  type: string;
  param: string | null;
  code: string | null;
}

export type UnbrokenErrorCode =
  | "http_error"
  | "not_resumable"
  | "resume_unsupported"
  | "retries_exhausted"
  | "protocol_error"
  | "stream_cut"
  | "resume_requested"
  | "journal_unavailable"
  | "idle_timeout"
  | "closed";

export class UnbrokenError extends Error {
  readonly name: "UnbrokenError";
  readonly code: UnbrokenErrorCode;
  /** The HTTP status, for `http_error` and `resume_unsupported`. */
  readonly status: number | undefined;
  /** The server's error object, when it sent one. */
  readonly error: OpenResponsesErrorBody | undefined;
  /** The response's id, if it was known when the error happened. */
  readonly responseId: string | null;
  /** The last `sequence_number` received (-1: none). */
  readonly lastSequenceNumber: number;
  readonly retryAfterMs: number | undefined;
  readonly cause?: unknown;
}

export interface RetryInfo {
  /** 1 for the first reconnection after progress; reset whenever a connection delivers a new event. */
  attempt: number;
  delayMs: number;
  /** Why the previous connection ended (a network error, an `UnbrokenError` with code `stream_cut`, …). */
  error: unknown;
  responseId: string | null;
  lastSequenceNumber: number;
}

export interface RetryOptions {
  /** Reconnections in a row without progress before giving up (default 6). */
  maxRetries?: number;
  /** The first backoff step (default 200 ms); it doubles per attempt, with jitter (half fixed, half random). */
  initialDelayMs?: number;
  /** The cap of a backoff step (default 5000 ms). A `Retry-After` on 429/503 is honoured (up to 60 s). */
  maxDelayMs?: number;
  /** Treat this long without a byte (heartbeats count) as a cut; 0 (default) relies on fetch's own timeouts. */
  idleTimeoutMs?: number;
  onRetry?: (info: RetryInfo) => void;
}

export interface StreamResponseOptions extends RetryOptions {
  /** The fetch to use (default `globalThis.fetch`). */
  fetch?: typeof fetch;
  /** Sent with every request (e.g. `{ Authorization: "Bearer sk-…" }`). */
  headers?: HeadersInit;
  /** Stops reading, rejects `done` with the signal's reason and cancels the response on the server. */
  signal?: AbortSignal;
  /** Set false to abort locally only (the response then completes into the server's journal). Default true. */
  cancelOnAbort?: boolean;
  /** Sent as `Idempotency-Key`: makes a retried POST safe, so a cut before the response id arrived is retried. */
  idempotencyKey?: string;
  /** Opt in to the router's `router:` recovery events (sends `X-Unbroken-Recovery-Events: true`). */
  recoveryEvents?: boolean;
  onEvent?: (event: ResponseEvent) => void;
  onTextDelta?: (delta: string, event: TextDeltaEvent) => void;
}

/**
 * A response being streamed. Iterate it for the events (each once, in order, through any number of reconnections;
 * events are buffered until iterated, so iterating late misses nothing). Leaving the loop early stops reading
 * without cancelling on the server.
 */
export interface ResponseStream extends AsyncIterable<ResponseEvent> {
  /** Resolves with the id from `response.created`; rejects if the stream fails before it. */
  readonly responseId: Promise<string>;
  /** The response of the terminal event (completed, incomplete or failed: check `status`); rejects with an
   * `UnbrokenError`, or the abort reason. */
  readonly done: Promise<ResponseObject>;
  /** The concatenated `response.output_text.delta`s, once `done` resolves. */
  readonly text: Promise<string>;
  /** The id once known (synchronous). */
  readonly id: string | null;
  readonly lastSequenceNumber: number;
}

/**
 * `POST {baseUrl}/responses` with `stream: true`, resumed with
 * `GET {baseUrl}/responses/{id}?stream=true&starting_after=N` whenever the connection fails or the body ends
 * without a terminal event. An HTTP error before the stream starts rejects `done` with an `UnbrokenError`
 * (code `http_error`, `status`, `error`).
 * @param baseUrl e.g. `"http://127.0.0.1:8080/v1"`
 */
export function streamResponse(
  baseUrl: string,
  body: Record<string, unknown>,
  options?: StreamResponseOptions,
): ResponseStream;

export interface ResumableFetchOptions extends RetryOptions {
  /** On the caller's signal abort, POST `/responses/{id}/cancel` (best effort). Default true. */
  cancelOnAbort?: boolean;
}

/**
 * A `fetch` for SDKs (`new OpenAI({ fetch })`, `createOpenAI({ fetch })`): a streamed `POST …/responses` answers a
 * Response whose body re-emits the SSE frames and, on a cut, reconnects with `starting_after`, so the consumer reads
 * one uninterrupted stream ending with the terminal event and `data: [DONE]`. Every other request goes to
 * `baseFetch` (default `globalThis.fetch`) untouched. A request with an `Idempotency-Key` header (the openai SDK
 * sends one) is also re-POSTed when it is cut before the response id arrived.
 */
export function resumableFetch(baseFetch?: typeof fetch, options?: ResumableFetchOptions): typeof fetch;

export const TERMINAL_EVENTS: readonly ["response.completed", "response.incomplete", "response.failed"];
export const RESUME_EVENT: "router:stream.resume";
export const RECOVERY_EVENTS_HEADER: "X-Unbroken-Recovery-Events";

export interface SSEFrame {
  event: string;
  data: string;
  id: string | undefined;
}

/** The SSE parser the client uses: feed decoded text in any pieces, get whole frames back. */
export class SSEParser {
  push(text: string): SSEFrame[];
  end(): SSEFrame[];
}

/** The engine under both APIs (exported for custom integrations). */
export function resilientEvents(options: RetryOptions & {
  post: (signal: AbortSignal) => Promise<Response>;
  resume: (id: string, after: number, signal: AbortSignal) => Promise<Response>;
  canRePost: boolean;
  signal?: AbortSignal;
  state: { responseId: string | null; lastSeq: number; terminal: boolean };
  onResponseId?: (id: string) => void;
}): AsyncGenerator<{ frame: SSEFrame; event: ResponseEvent } | { json: ResponseObject }, void, undefined>;
