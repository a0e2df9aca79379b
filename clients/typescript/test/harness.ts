// Test harness: the real customws binary on ephemeral loopback ports, HS256 tokens, the backend
// HTTP API, and bounded waits for conditions (no sleep-and-hope).

import { type ChildProcess, spawn, spawnSync } from "node:child_process";
import { createHmac } from "node:crypto";
import { existsSync } from "node:fs";
import { createServer } from "node:net";
import { dirname, join, resolve } from "node:path";
import { fileURLToPath } from "node:url";
import WebSocket from "ws";

import { Client, type ClientOptions, type WebSocketConstructor } from "../src/index.js";

/** The repository root (this file runs from clients/typescript/build-test/test/). */
export const ROOT = resolve(dirname(fileURLToPath(import.meta.url)), "../../../..");
export const SECRET = "sdk-test-secret";
export const API_KEY = "sdk-test-key";

let binary: string | undefined;

/**
 * The server binary: `CUSTOMWS_BIN`, else target/debug/customws after `cargo build --bin customws`
 * (a no-op when it is up to date), so a clean checkout works.
 */
export function serverBinary(): string {
  if (binary) return binary;
  if (process.env.CUSTOMWS_BIN) return (binary = process.env.CUSTOMWS_BIN);
  const built = join(ROOT, "target/debug/customws");
  const cargo = spawnSync("cargo", ["build", "--quiet", "--bin", "customws"], { cwd: ROOT, stdio: "inherit" });
  if (cargo.error && !existsSync(built)) {
    throw new Error(`cannot build the server (cargo: ${cargo.error.message}); set CUSTOMWS_BIN`);
  }
  if (cargo.status !== 0 && !existsSync(built)) throw new Error("cargo build --bin customws failed");
  return (binary = built);
}

/** A free loopback port (bound and released; the server binds it right after). */
export function freePort(): Promise<number> {
  return new Promise((ok, fail) => {
    const srv = createServer();
    srv.once("error", fail);
    srv.listen(0, "127.0.0.1", () => {
      const port = (srv.address() as { port: number }).port;
      srv.close(() => ok(port));
    });
  });
}

/** A running server. */
export interface Server {
  port: number;
  apiPort: number;
  url: string;
  proc: ChildProcess;
  stdout: () => string;
  args: string[];
}

/** Starts the server with `extra` flags on `port` (fresh by default); resolves once /health answers. */
export async function startServer(extra: string[] = [], ports?: { port: number; apiPort: number }): Promise<Server> {
  const port = ports?.port ?? (await freePort());
  const apiPort = ports?.apiPort ?? (await freePort());
  const args = [
    "--listen", `127.0.0.1:${port}`,
    "--api-listen", `127.0.0.1:${apiPort}`,
    "--api-key", API_KEY,
    "--jwt-secret", SECRET,
    "--shards", "2",
    "--log-level", "warn",
    ...extra,
  ];
  const proc = spawn(serverBinary(), args, { cwd: ROOT, stdio: ["ignore", "pipe", "pipe"] });
  let out = "";
  proc.stdout!.on("data", (d) => (out += d));
  let err = "";
  proc.stderr!.on("data", (d) => (err += d));
  let exited = false;
  proc.once("exit", () => (exited = true));
  await waitFor(
    async () => {
      if (exited) throw new Error(`server exited at start: ${err}`);
      return fetch(`http://127.0.0.1:${port}/health`).then((r) => r.ok, () => false);
    },
    10_000,
    "server /health",
  );
  return { port, apiPort, url: `ws://127.0.0.1:${port}/ws`, proc, stdout: () => out, args };
}

/** Stops a server (SIGKILL: the tests that restart want an abrupt loss) and waits for its exit. */
export function killServer(server: Server, signal: NodeJS.Signals = "SIGKILL"): Promise<void> {
  if (server.proc.exitCode !== null || server.proc.signalCode !== null) return Promise.resolve();
  return new Promise((ok) => {
    server.proc.once("exit", () => ok());
    server.proc.kill(signal);
  });
}

const b64url = (data: string | Buffer) => Buffer.from(data).toString("base64url");

/** An HS256 token for `userId`, valid `ttlSec` seconds. */
export function mintToken(userId: number, opts: { ttlSec?: number; roles?: string[]; secret?: string } = {}): string {
  const now = Math.floor(Date.now() / 1000);
  const header = b64url(JSON.stringify({ alg: "HS256", typ: "JWT" }));
  const claims = b64url(JSON.stringify({ user_id: userId, roles: opts.roles ?? [], iat: now, exp: now + (opts.ttlSec ?? 3600) }));
  const sig = createHmac("sha256", opts.secret ?? SECRET).update(`${header}.${claims}`).digest("base64url");
  return `${header}.${claims}.${sig}`;
}

/** A call to the backend HTTP API; resolves with status and JSON body. */
export async function api(server: Server, method: string, path: string, body?: unknown): Promise<{ status: number; body: any }> {
  const res = await fetch(`http://127.0.0.1:${server.apiPort}/api/v1${path}`, {
    method,
    headers: { Authorization: `apikey ${API_KEY}`, "Content-Type": "application/json" },
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  const text = await res.text();
  return { status: res.status, body: text ? JSON.parse(text) : undefined };
}

/** Polls `cond` every 20 ms until it is truthy; fails after `ms`. */
export async function waitFor<T>(cond: () => T | Promise<T>, ms = 5000, what = "condition"): Promise<NonNullable<T>> {
  const deadline = Date.now() + ms;
  for (;;) {
    const value = await cond();
    if (value) return value as NonNullable<T>;
    if (Date.now() > deadline) throw new Error(`timed out after ${ms} ms waiting for ${what}`);
    await new Promise((r) => setTimeout(r, 20));
  }
}

/** A client on `server` for `userId` (or with `opts.token`), with test-friendly timings. */
export function client(server: Server | string, userId: number, opts: Partial<ClientOptions> & { roles?: string[] } = {}): Client {
  const url = typeof server === "string" ? server : server.url;
  return new Client({
    url,
    token: mintToken(userId, { roles: opts.roles }),
    WebSocket: WebSocket as unknown as WebSocketConstructor,
    reconnect: { initialMs: 50, maxMs: 300 },
    timeoutMs: 3000,
    ...opts,
  });
}

/** Collects events of `kind` from a client; `next(pred)` waits for one that matches. */
export function recorder<T>(subscribe: (fn: (value: T) => void) => void) {
  const seen: T[] = [];
  subscribe((value) => seen.push(value));
  return {
    seen,
    next: (pred: (value: T) => boolean = () => true, ms = 5000, what = "event") =>
      waitFor(() => seen.find(pred), ms, what),
    clear: () => (seen.length = 0),
  };
}
