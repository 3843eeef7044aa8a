// Test support: a real `unbroken serve` (simulated model, SQLite store in a temp dir) and a TCP proxy that cuts
// connections after a number of response bytes.

import { spawn } from "node:child_process";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import net from "node:net";
import { tmpdir } from "node:os";
import path from "node:path";
import { createInterface } from "node:readline";

export const API_KEY = "sk-test";
export const AUTH = { Authorization: `Bearer ${API_KEY}` };
const START_TIMEOUT_MS = 60_000;

function unbrokenBin() {
  if (process.env.UNBROKEN_BIN) return process.env.UNBROKEN_BIN;
  // Run from the repository without make: the venv at its root.
  return path.resolve(import.meta.dirname ?? path.dirname(new URL(import.meta.url).pathname),
    "../../../.venv/bin/unbroken");
}

const CONFIG = `
api_keys:
  - key: ${API_KEY}
    tenant: t1
models:
  - name: demo
    deployments:
      - name: sim-0
        provider: simulated
        model: sim-0
        price: {input: 1.0, output: 2.0}
        options: {seed: 7, ttft_ms: 0, tps: 0, length: 40}
server:
  heartbeat_seconds: 0.5
  lease_seconds: 1.5
`;

/** The config with more `server:` settings (e.g. `{ stream_deadline_seconds: 1 }`). */
function configWith(server) {
  return CONFIG + Object.entries(server).map(([key, value]) => `  ${key}: ${JSON.stringify(value)}\n`).join("");
}

/**
 * Start `unbroken serve` on an ephemeral port; resolves `{ url, dir, stop(), kill() }` once it printed its ready
 * line. `dir` (another router's) shares that router's SQLite store; the router that made the dir removes it.
 * `server` adds settings to the config's `server:` section.
 */
export async function startRouter({ dir: shared, server = {} } = {}) {
  const dir = shared ?? mkdtempSync(path.join(tmpdir(), "unbroken-js-"));
  const config = path.join(dir, "router.yaml");
  if (!shared) writeFileSync(config, configWith(server));
  const proc = spawn(unbrokenBin(), ["serve", "--config", config, "--host", "127.0.0.1", "--port", "0",
    "--store", `sqlite:///${path.join(dir, "j.db")}`, "--log-level", "WARNING"],
  { stdio: ["ignore", "pipe", "pipe"] });
  let stderr = "";
  proc.stderr.on("data", (chunk) => { stderr += chunk; });
  const url = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error(`router did not start in time: ${stderr}`)), START_TIMEOUT_MS);
    const lines = createInterface({ input: proc.stdout });
    lines.once("line", (line) => {
      clearTimeout(timer);
      const match = /^unbroken ready on (\S+)/.exec(line);
      if (match) resolve(match[1]);
      else reject(new Error(`unexpected first line: ${line}`));
      lines.on("line", () => {}); // drain the rest
    });
    proc.once("exit", (code) => {
      clearTimeout(timer);
      reject(new Error(`router exited with ${code}: ${stderr}`));
    });
  });
  const exited = new Promise((resolve) => {
    if (proc.exitCode !== null || proc.signalCode !== null) resolve();
    else proc.once("exit", resolve);
  });
  return {
    url,
    dir,
    /** SIGKILL: no cleanup, like a crashed Lambda. */
    async kill() {
      proc.kill("SIGKILL");
      await exited;
    },
    async stop() {
      if (proc.exitCode === null && proc.signalCode === null) {
        proc.kill("SIGTERM");
        const timer = setTimeout(() => proc.kill("SIGKILL"), 10_000);
        await exited;
        clearTimeout(timer);
      }
      if (!shared) rmSync(dir, { recursive: true, force: true });
    },
  };
}

/**
 * A TCP proxy to `target` (a router URL). `plan(n)` says what happens to the n-th connection (0-based):
 * `undefined`/`Infinity` forwards everything; a number N forwards the response head and N bytes of its body, then
 * destroys both sides; `"head"` destroys the connection after 10 bytes of the response head.
 * Resolves `{ url, stats, retarget(url), close() }` (`url` with the target's path, e.g. `/v1`).
 */
export async function startProxy(target, plan = () => undefined) {
  let upstream = new URL(target);
  const sockets = new Set();
  const stats = { connections: 0 };
  const server = net.createServer((client) => {
    const index = stats.connections++;
    const budget = plan(index);
    const router = net.connect(Number(upstream.port), upstream.hostname);
    sockets.add(client);
    sockets.add(router);
    client.setNoDelay(true);
    router.setNoDelay(true);
    const kill = () => {
      client.destroy();
      router.destroy();
    };
    client.on("error", kill);
    router.on("error", kill);
    client.on("close", () => { router.destroy(); sockets.delete(client); });
    router.on("close", () => { client.destroy(); sockets.delete(router); });
    client.on("data", (chunk) => router.write(chunk));
    let head = Buffer.alloc(0);
    let inBody = false;
    let sent = 0; // body bytes forwarded
    router.on("data", (chunk) => {
      if (budget === undefined || budget === Infinity) {
        client.write(chunk);
        return;
      }
      if (budget === "head") {
        client.write(chunk.subarray(0, 10), kill);
        router.pause();
        return;
      }
      let rest = chunk;
      if (!inBody) {
        head = Buffer.concat([head, chunk]);
        const end = head.indexOf("\r\n\r\n");
        if (end === -1) {
          client.write(chunk);
          return;
        }
        inBody = true;
        const headLeft = chunk.length - (head.length - (end + 4)); // bytes of this chunk that are head
        client.write(chunk.subarray(0, headLeft));
        rest = chunk.subarray(headLeft);
      }
      const allowed = Math.max(0, budget - sent);
      if (rest.length <= allowed) {
        sent += rest.length;
        client.write(rest);
        return;
      }
      sent += allowed;
      router.pause();
      client.write(rest.subarray(0, allowed), kill);
    });
  });
  await new Promise((resolve) => server.listen(0, "127.0.0.1", resolve));
  const { port } = server.address();
  return {
    url: `http://127.0.0.1:${port}${upstream.pathname}`,
    stats,
    /** Send new connections to another router (same path). */
    retarget(url) {
      upstream = new URL(url);
    },
    async close() {
      for (const socket of sockets) socket.destroy();
      await new Promise((resolve) => server.close(resolve));
    },
  };
}

/** A request body for the simulated model: `tps` 0 answers at once, more spreads the stream out. */
export function simBody(input, { length = 60, tps = 0, seed = "7" } = {}) {
  return { model: "demo", input, metadata: { sim_length: String(length), sim_tps: String(tps), sim_seed: seed } };
}

/** The plain SSE text of a POST (no client library): events in order, for the uncut reference run. */
export async function referenceEvents(url, body) {
  const response = await fetch(`${url}/responses`, { method: "POST",
    headers: { ...AUTH, "content-type": "application/json" }, body: JSON.stringify({ ...body, stream: true }) });
  const text = await response.text();
  const events = [];
  for (const block of text.split("\n\n")) {
    const data = block.split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("\n");
    if (data && data !== "[DONE]") events.push(JSON.parse(data));
  }
  return { events, raw: text };
}

export function textOf(events) {
  return events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta).join("");
}

/** Dense from 0, no duplicates, exactly one terminal event and it is last. */
export function checkSequence(assert, events) {
  assert.deepEqual(events.map((e) => e.sequence_number), events.map((_, i) => i));
  const terminals = events.filter((e) => ["response.completed", "response.incomplete", "response.failed"]
    .includes(e.type));
  assert.equal(terminals.length, 1, "exactly one terminal event");
  assert.equal(events.at(-1), terminals[0], "the terminal event is last");
}
