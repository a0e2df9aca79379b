// Seed 001's client guide, flow by flow, through the SDK against the real server: connecting
// with a token (§1), P2P with ack and the offline 404 (§4), broadcast, client_ack to a server push
// (§5), answering a server request (§6), keep-alive (§7), generic requests (§8), closing (§9),
// presence with typing that expires (§10), rooms, and typed errors.

import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import WebSocket from "ws";

import { Client, CustomWsError, type PresenceEvent, type RoomEnvelope, type ServerMessage, type State } from "../src/index.js";
import { type Server, api, client, killServer, mintToken, recorder, startServer, waitFor } from "./harness.js";

interface Chat {
  action: string;
  resource: string;
  data: { text: string; messageType?: string };
}

describe("seed 001 flows", () => {
  let server: Server;
  const clients: Client[] = [];
  const open = async (userId: number, opts: Parameters<typeof client>[2] = {}) => {
    const c = client(server, userId, opts);
    clients.push(c);
    await c.connect();
    return c;
  };

  before(async () => {
    server = await startServer(["--transient-ttl", "400ms", "--presence-coalesce", "50ms"]);
  });
  after(async () => {
    clients.forEach((c) => c.close());
    await killServer(server, "SIGTERM");
  });

  test("connects with the token as a subprotocol or in the URL; states and close", async () => {
    for (const tokenIn of ["protocol", "query"] as const) {
      const c = client(server, 11, { tokenIn });
      const states = recorder<State>((fn) => c.on("state", fn));
      await c.connect();
      assert.equal(c.state, "open");
      assert.equal(c.userId, 11);
      const closes = recorder<{ code: number; willReconnect: boolean }>((fn) => c.on("close", fn));
      c.close();
      assert.deepEqual(states.seen, ["connecting", "open", "closed"]);
      assert.deepEqual(closes.seen.map((x) => [x.code, x.willReconnect]), [[1000, false]]);
    }
    const users = await api(server, "GET", "/users/11");
    await waitFor(async () => (await api(server, "GET", "/users/11")).body.online === false, 3000, "user 11 offline");
    assert.equal(users.status, 200);
  });

  test("a bad token is refused at the handshake and the client closes when it may not retry", async () => {
    const c = client(server, 12, { token: mintToken(12, { secret: "wrong" }), reconnect: { maxAttempts: 1, initialMs: 10 } });
    await assert.rejects(c.connect(), (e: CustomWsError) => e.kind === "closed");
    assert.equal(c.state, "closed");
  });

  test("P2P: send resolves on server_ack delivered; the target gets data_event from the sender", async () => {
    const a = await open(1);
    const b = await open(2);
    const got = recorder<ServerMessage<Chat>>((fn) => b.onPush<Chat>("data_event", (_p, msg) => void fn(msg)));
    const chat: Chat = { action: "send_message", resource: "chat", data: { text: "Hola! Este es un mensaje privado", messageType: "private" } };
    const ack = await a.send(2, chat);
    assert.equal(ack.status, "delivered");
    const msg = await got.next();
    assert.equal(msg.fromUserId, 1);
    assert.deepEqual(msg.payload, chat);
  });

  test("P2P to an offline user rejects with a typed 404", async () => {
    const a = await open(3);
    await assert.rejects(a.send(999, { text: "anyone?" }), (e: unknown) => {
      assert.ok(e instanceof CustomWsError);
      assert.equal(e.kind, "server");
      assert.equal(e.code, 404);
      return true;
    });
  });

  test("many requests in flight resolve on their own pids", async () => {
    const a = await open(4);
    const replies = await Promise.all(
      Array.from({ length: 50 }, (_, i) => a.request<{ action: string; n: number }>("generic_request", { action: "get_history", n: i })),
    );
    assert.deepEqual(replies.map((r) => r.n), Array.from({ length: 50 }, (_, i) => i));
    assert.equal(replies[0]!.action, "get_history");
  });

  test("broadcast needs the broadcast role: delivered to others, else a typed 403", async () => {
    const caster = await open(5, { roles: ["broadcast"] });
    const listener = await open(6);
    const got = recorder<ServerMessage>((fn) => listener.on("message", (m) => m.type === "data_event" && fn(m)));
    assert.equal((await caster.broadcast({ action: "announce", resource: "system" })).status, "broadcast");
    assert.equal((await got.next((m) => m.fromUserId === 5)).fromUserId, 5);
    await assert.rejects(listener.broadcast({ x: 1 }), (e: CustomWsError) => e.kind === "server" && e.code === 403);
  });

  test("a server push that wants a client_ack is answered with the handler's result", async () => {
    const b = await open(7);
    b.onPush<{ text: string }>("data_event", (payload) => (payload.text === "fail" ? Promise.reject(new Error("cannot show it")) : "read"));
    const ok = await api(server, "POST", "/send", { userId: 7, message: { type: "data_event", payload: { text: "hi" } }, ack: true, timeoutMs: 3000 });
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.equal(ok.body.ack.status, "read");
    const failed = await api(server, "POST", "/send", { userId: 7, message: { type: "data_event", payload: { text: "fail" } }, ack: true, timeoutMs: 3000 });
    assert.equal(failed.body.ack.status, "error");
    assert.equal(failed.body.ack.error, "cannot show it");
    // Without a handler the push is still acknowledged.
    const other = await api(server, "POST", "/send", { userId: 7, message: { type: "notice", payload: {} }, ack: true, timeoutMs: 3000 });
    assert.equal(other.body.ack.status, "received");
  });

  test("a server request is answered by the handler's result, or its error", async () => {
    const b = await open(8);
    b.onRequest<{ action: string }, { locale: string }>("generic_request", (payload) => {
      if (payload.action !== "get_client_info") throw new CustomWsError("server", 400, "unknown action");
      return { locale: "es-ES" };
    });
    const ok = await api(server, "POST", "/request", { userId: 8, message: { type: "generic_request", payload: { action: "get_client_info" } }, timeoutMs: 3000 });
    assert.equal(ok.status, 200, JSON.stringify(ok.body));
    assert.equal(ok.body.response.type, "generic_response");
    assert.deepEqual(ok.body.response.payload, { locale: "es-ES" });
    const bad = await api(server, "POST", "/request", { userId: 8, message: { type: "generic_request", payload: { action: "nope" } }, timeoutMs: 3000 });
    assert.deepEqual(bad.body.response.error, { code: 400, message: "unknown action" });
    // A client with no handler answers at once instead of leaving the backend to its timeout.
    await open(9);
    const started = Date.now();
    const none = await api(server, "POST", "/request", { userId: 9, message: { type: "generic_request", payload: {} }, timeoutMs: 3000 });
    assert.deepEqual(none.body.response.error, { code: 501, message: "no handler for generic_request" });
    assert.ok(Date.now() - started < 2500);
  });

  test("presence: current status on subscribe, updates, typing that expires, offline on disconnect", async () => {
    const watcher = await open(20);
    const events = recorder<PresenceEvent>((fn) => watcher.on("presence", (e) => e.userId === 21 && fn(e)));
    await watcher.subscribe([21]);
    await events.next((e) => e.status === "offline", 3000, "current status offline");
    const typist = await open(21);
    await events.next((e) => e.status === "online", 3000, "online on connect");
    await typist.update("busy", { location: "chat-room-general" });
    const busy = await events.next((e) => e.status === "busy", 3000, "busy");
    assert.deepEqual(busy.context, { location: "chat-room-general" });
    events.clear();
    const first = await typist.typing(undefined, { chatId: "c1" });
    assert.equal(first?.status, "ok");
    assert.equal(await typist.typing(undefined, { chatId: "c1" }), undefined, "throttled within half the TTL");
    await events.next((e) => e.status === "typing", 3000, "typing");
    // transient_ttl is 400 ms here: the lasting status comes back by itself.
    await events.next((e) => e.status === "busy", 3000, "typing expired back to busy");
    typist.close();
    await events.next((e) => e.status === "offline", 3000, "offline on disconnect");
    await watcher.unsubscribe([21]);
  });

  test("typing to one user, and stopTyping ends it at once", async () => {
    const a = await open(22);
    const b = await open(23);
    const events = recorder<PresenceEvent>((fn) => b.on("presence", (e) => e.userId === 22 && fn(e)));
    await a.typing(23, { chatId: "dm" });
    await events.next((e) => e.status === "typing");
    await a.stopTyping(23);
    await events.next((e) => e.status === "online");
  });

  test("rooms: join, publish with a typed envelope, room presence, leave; errors are typed", async () => {
    const a = await open(30);
    const b = await open(31);
    await a.join("lobby");
    assert.equal((await b.join("lobby")).status, "joined");
    assert.deepEqual(b.rooms, ["lobby"]);
    const got = recorder<RoomEnvelope<{ text: string }, { lang: string }>>((fn) => b.on("room", fn as never));
    assert.equal((await a.publish("lobby", { text: "hello room" }, { lang: "es" })).status, "published");
    const env = await got.next();
    assert.deepEqual([env.from, env.room, env.body, env.meta], [30, "lobby", { text: "hello room" }, { lang: "es" }]);
    assert.equal(typeof env.ts, "number");
    const page = await a.roomPresence("lobby");
    assert.deepEqual([page.room, page.next, page.members.map((m) => [m.userId, m.status])], ["lobby", null, [[30, "online"], [31, "online"]]]);
    await assert.rejects(b.roomPresence("elsewhere"), (e: CustomWsError) => e.code === 403);
    assert.equal((await b.leave("lobby")).status, "left");
    await assert.rejects(b.publish("lobby", { text: "not a member" }), (e: CustomWsError) => e.code === 403);
    await assert.rejects(b.join("bad room name!"), (e: CustomWsError) => e.code === 400);
    await assert.rejects(b.leave("lobby"), (e: CustomWsError) => e.code === 404);
  });

  test("a message type nobody handles is a typed 400", async () => {
    const a = await open(32);
    await assert.rejects(a.request("no_such_type", {}), (e: CustomWsError) => e.kind === "server" && e.code === 400);
  });
});

describe("keep-alive", () => {
  test("pings are answered without the application doing anything", async () => {
    const server = await startServer(["--ping-period", "100ms", "--pong-wait", "300ms"]);
    try {
      const c = client(server, 40);
      const closes = recorder<unknown>((fn) => c.on("close", fn));
      await c.connect();
      // Ten pong deadlines pass; a client that did not answer pings would be dropped.
      const until = Date.now() + 3000;
      await waitFor(() => Date.now() > until || closes.seen.length > 0, 5000);
      assert.deepEqual(closes.seen, []);
      assert.equal(c.state, "open");
      assert.equal((await c.request<{ n: number }>("generic_request", { n: 1 })).n, 1);
      c.close();
    } finally {
      await killServer(server);
    }
  });
});

describe("the ws package is what Node 20 needs", () => {
  test("connect() explains a missing WebSocket implementation", async () => {
    const hasGlobal = typeof (globalThis as { WebSocket?: unknown }).WebSocket === "function";
    const c = new Client({ url: "ws://127.0.0.1:1/ws", token: "t" });
    if (hasGlobal) c.close();
    else await assert.rejects(c.connect(), /no WebSocket implementation/);
    assert.ok(WebSocket);
  });
});
