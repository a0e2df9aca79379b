// Reconnection and tokens: a server killed and restarted on the same port (rooms, watches and
// presence restored), no reconnect storm when connections_per_user = 1 replaces a connection,
// auth_refresh before exp, reconnect with a fresh token after a 401 or an expiry, the drain's
// restart hint, final close codes, and the kinds of failure a call can have.

import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { WebSocketServer } from "ws";

import { Client, CustomWsError, type PresenceEvent, type RoomEnvelope, type State, backoffDelay, retryHint, tokenClaims } from "../src/index.js";
import { api, client, freePort, killServer, mintToken, recorder, startServer, waitFor } from "./harness.js";

describe("reconnection against the real server", () => {
  test("after a kill and a restart on the same port, rooms, watches and presence are restored", async () => {
    let server = await startServer();
    const ports = { port: server.port, apiPort: server.apiPort };
    const a = client(server, 50);
    const b = client(server, 51);
    try {
      await Promise.all([a.connect(), b.connect()]);
      await a.join("lobby");
      await b.join("lobby");
      await a.subscribe([51]);
      await a.update("busy", { desk: 3 });
      const statesA = recorder<State>((fn) => a.on("state", fn));
      const inFlight = b.request("generic_request", { n: 1 }, { timeoutMs: 60_000 }).catch((e) => e);
      await killServer(server);
      const lost = (await inFlight) as CustomWsError;
      // The reply may have come back before the kill; if not, the call failed as "closed".
      if (lost instanceof CustomWsError) assert.equal(lost.kind, "closed");
      await waitFor(() => statesA.seen.includes("reconnecting"), 3000, "reconnecting");
      assert.equal(a.state, "reconnecting");
      server = await startServer([], ports);
      await waitFor(() => a.state === "open" && b.state === "open", 10_000, "both reopened");
      // Presence restored: the server knows user 50 is busy again.
      await waitFor(async () => (await api(server, "GET", "/users/50")).body.presence?.status === "busy", 5000, "busy restored");
      // Room restored: B's publish reaches A.
      const rooms = recorder<RoomEnvelope>((fn) => a.on("room", fn));
      await waitFor(() => b.publish("lobby", { text: "back" }).then(() => true, () => false), 5000, "B re-joined");
      assert.deepEqual((await rooms.next()).body, { text: "back" });
      // Watch restored: B's update reaches A.
      const events = recorder<PresenceEvent>((fn) => a.on("presence", (e) => e.userId === 51 && fn(e)));
      await b.update("away");
      await events.next((e) => e.status === "away", 5000, "watch restored");
      assert.deepEqual(statesA.seen.slice(-2), ["reconnecting", "open"]);
    } finally {
      a.close();
      b.close();
      await killServer(server);
    }
  });

  test("a graceful shutdown (1001) is followed by reconnect attempts", async () => {
    const server = await startServer();
    const c = client(server, 55);
    try {
      const closes = recorder<{ code: number; willReconnect: boolean }>((fn) => c.on("close", fn));
      await c.connect();
      await killServer(server, "SIGTERM");
      const closed = await closes.next(() => true, 5000, "shutdown close");
      assert.deepEqual([closed.code, closed.willReconnect], [1001, true]);
      assert.equal(c.state, "reconnecting");
    } finally {
      c.close();
      await killServer(server);
    }
  });

  test("connections_per_user = 1: the replaced connection (4000) does not reconnect", async () => {
    const server = await startServer(["--connections-per-user", "1"]);
    const first = client(server, 60);
    const second = client(server, 60);
    try {
      const closes = recorder<{ code: number; willReconnect: boolean }>((fn) => first.on("close", fn));
      await first.connect();
      await second.connect();
      const closed = await closes.next();
      assert.deepEqual([closed.code, closed.willReconnect], [4000, false]);
      assert.equal(first.state, "closed");
      // Ten times the largest backoff (300 ms): a storm would have replaced `second` by now.
      const secondCloses = recorder<unknown>((fn) => second.on("close", fn));
      const until = Date.now() + 3000;
      await waitFor(() => Date.now() > until || secondCloses.seen.length > 0, 5000);
      assert.deepEqual(secondCloses.seen, []);
      const metrics = await (await fetch(`http://127.0.0.1:${server.port}/metrics`)).text();
      assert.match(metrics, /^ws_connections_total 2$/m);
      assert.equal(second.state, "open");
    } finally {
      first.close();
      second.close();
      await killServer(server);
    }
  });

  test("a token provider refreshes the session before exp", async () => {
    const server = await startServer(["--jwt-leeway", "0s"]);
    let issued = 0;
    const c = client(server, 70, { token: () => (issued++, mintToken(70, { ttlSec: 3 })), refreshBeforeMs: 1500 });
    try {
      const closes = recorder<unknown>((fn) => c.on("close", fn));
      const refreshed = recorder<string>((fn) => c.on("refreshed", fn));
      await c.connect();
      const firstExp = tokenClaims(mintToken(70, { ttlSec: 3 })).exp! * 1000;
      await refreshed.next(() => true, 5000, "auth_refresh answered");
      // Past the first token's exp (no leeway): still the same connection.
      await waitFor(() => Date.now() > firstExp + 500, 6000);
      assert.deepEqual(closes.seen, []);
      assert.equal(c.state, "open");
      assert.ok(issued >= 2);
      assert.equal((await c.request<{ n: number }>("generic_request", { n: 7 })).n, 7);
    } finally {
      c.close();
      await killServer(server);
    }
  });

  test("without refresh, the expiry's 401 + 1008 makes the client ask the provider again", async () => {
    const server = await startServer(["--jwt-leeway", "0s"]);
    let issued = 0;
    const c = client(server, 71, { token: () => (issued++, mintToken(71, { ttlSec: 2 })), refreshBeforeMs: false });
    try {
      const closes = recorder<{ code: number; willReconnect: boolean }>((fn) => c.on("close", fn));
      const errors = recorder<Error>((fn) => c.on("error", fn));
      await c.connect();
      const closed = await closes.next(() => true, 6000, "expiry close");
      assert.deepEqual([closed.code, closed.willReconnect], [1008, true]);
      assert.equal((errors.seen[0] as CustomWsError).code, 401);
      await waitFor(() => c.state === "open", 5000, "reopened with a fresh token");
      assert.ok(issued >= 2);
    } finally {
      c.close();
      await killServer(server);
    }
  });

  test("a static token that expires closes for good (1008)", async () => {
    const server = await startServer(["--jwt-leeway", "0s"]);
    const c = client(server, 72, { token: mintToken(72, { ttlSec: 1 }) });
    try {
      const closes = recorder<{ code: number; willReconnect: boolean }>((fn) => c.on("close", fn));
      await c.connect();
      const closed = await closes.next(() => true, 5000, "expiry close");
      assert.deepEqual([closed.code, closed.willReconnect], [1008, false]);
      assert.equal(c.state, "closed");
    } finally {
      await killServer(server);
    }
  });

  test("a refused handshake (401) asks the provider again and gets in", async () => {
    const server = await startServer();
    const tokens = [mintToken(73, { secret: "stale" }), mintToken(73)];
    const c = client(server, 73, { token: async () => tokens.shift() ?? mintToken(73) });
    try {
      await c.connect();
      assert.equal(tokens.length, 0);
      assert.equal(c.state, "open");
    } finally {
      c.close();
      await killServer(server);
    }
  });
});

/** A scripted server: each connection gets `script(ws, n)`. */
async function fakeServer(script: (ws: import("ws").WebSocket, n: number) => void) {
  const port = await freePort();
  const wss = new WebSocketServer({ host: "127.0.0.1", port, handleProtocols: () => "bearer" });
  const arrivals: number[] = [];
  wss.on("connection", (ws) => {
    arrivals.push(Date.now());
    script(ws, arrivals.length);
  });
  await new Promise((ok) => wss.once("listening", ok));
  return { url: `ws://127.0.0.1:${port}/ws`, arrivals, close: () => new Promise((ok) => wss.close(ok)) };
}

describe("close codes and the drain hint", () => {
  test("1001 with `retry after N ms` waits N ms before reconnecting", async () => {
    const fake = await fakeServer((ws, n) => n === 1 && setTimeout(() => ws.close(1001, "server restarting; retry after 400 ms"), 20));
    const c = client(fake.url, 80);
    try {
      const plans = recorder<{ delayMs: number }>((fn) => c.on("reconnecting", fn));
      await c.connect();
      const plan = await plans.next();
      assert.ok(plan.delayMs >= 400 && plan.delayMs <= 440, `delay ${plan.delayMs}`);
      await waitFor(() => fake.arrivals.length === 2 && c.state === "open", 3000, "second connection");
      assert.ok(fake.arrivals[1]! - fake.arrivals[0]! >= 400);
    } finally {
      c.close();
      await fake.close();
    }
  });

  for (const [code, reason] of [[4000, "replaced by a newer connection"], [1008, "rate limit"], [1000, "bye"]] as const) {
    test(`close ${code} is final: no reconnect`, async () => {
      const fake = await fakeServer((ws) => setTimeout(() => ws.close(code, reason), 20));
      const c = client(fake.url, 81);
      try {
        const closes = recorder<{ code: number; willReconnect: boolean }>((fn) => c.on("close", fn));
        await c.connect();
        const closed = await closes.next();
        assert.deepEqual([closed.code, closed.willReconnect], [code, false]);
        assert.equal(c.state, "closed");
        assert.equal(fake.arrivals.length, 1);
      } finally {
        await fake.close();
      }
    });
  }

  test("an abrupt loss reconnects with growing, jittered delays", async () => {
    const fake = await fakeServer((ws, n) => n <= 4 && setTimeout(() => ws.terminate(), 5));
    const c = client(fake.url, 82, { reconnect: { initialMs: 40, maxMs: 100 } });
    try {
      const plans = recorder<{ attempt: number; delayMs: number }>((fn) => c.on("reconnecting", fn));
      await c.connect();
      await waitFor(() => fake.arrivals.length === 5 && c.state === "open", 5000, "fifth connection holds");
      assert.deepEqual(plans.seen.map((p) => p.attempt), [1, 2, 3, 4]);
      plans.seen.forEach((p, i) => assert.ok(p.delayMs < Math.min(100, 40 * 2 ** i), `attempt ${p.attempt}: ${p.delayMs}`));
    } finally {
      c.close();
      await fake.close();
    }
  });

  test("a call nobody answers fails with kind timeout; calls while closed fail at once", async () => {
    const fake = await fakeServer(() => {});
    const c = client(fake.url, 83);
    try {
      await c.connect();
      await assert.rejects(c.request("generic_request", {}, { timeoutMs: 100 }), (e: CustomWsError) => e.kind === "timeout" && e.code === 408);
      c.close();
      await assert.rejects(c.send(1, {}), (e: CustomWsError) => e.kind === "closed");
    } finally {
      await fake.close();
    }
  });

  test("calls made while reconnecting are sent once the connection is back", async () => {
    const fake = await fakeServer((ws, n) => {
      if (n === 1) setTimeout(() => ws.terminate(), 5);
      ws.on("message", (data) => {
        const msg = JSON.parse(String(data));
        ws.send(JSON.stringify({ type: "generic_response", pid: msg.pid, payload: msg.payload }));
      });
    });
    const c = client(fake.url, 84, { reconnect: { initialMs: 200, maxMs: 200 } });
    try {
      // The call is made from the `reconnecting` event itself: polling for the state could miss
      // it, since full jitter may pick a delay of a few milliseconds.
      const queued = new Promise<unknown>((ok, fail) =>
        c.on("reconnecting", () => {
          assert.equal(c.state, "reconnecting");
          c.request("generic_request", { queued: true }).then(ok, fail);
        }),
      );
      await c.connect();
      assert.deepEqual(await queued, { queued: true });
    } finally {
      c.close();
      await fake.close();
    }
  });
});

describe("helpers", () => {
  test("full jitter stays under the exponential cap", () => {
    assert.equal(backoffDelay(0, { initialMs: 100 }, () => 0.999), 99);
    assert.equal(backoffDelay(3, { initialMs: 100 }, () => 0.999), 799);
    assert.equal(backoffDelay(40, { initialMs: 100, maxMs: 5000 }, () => 0.999), 4995);
    assert.equal(backoffDelay(5, {}, () => 0), 0);
  });

  test("the restart hint is read from a drain's reason", () => {
    assert.equal(retryHint("server restarting; retry after 1500 ms"), 1500);
    assert.equal(retryHint("server shutting down"), undefined);
  });

  test("token claims are read without verifying", () => {
    const claims = tokenClaims(mintToken(5, { ttlSec: 10 }));
    assert.equal(claims.user_id, 5);
    assert.deepEqual(tokenClaims("not a jwt"), {});
    assert.ok(Client);
  });
});
