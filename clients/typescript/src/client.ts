/**
 * The customws client: one WebSocket, reconnected with backoff, with calls that resolve on the
 * server's answer, rooms and presence that survive a reconnect, and handlers whose result
 * becomes the client's answer to a server push.
 */

import { type BackoffOptions, backoffDelay, retryHint } from "./backoff.js";
import { CustomWsError } from "./errors.js";
import { tokenClaims } from "./jwt.js";
import type {
  ClientMessage,
  PresenceEvent,
  RoomEnvelope,
  RoomPresencePage,
  ServerAck,
  ServerMessage,
  State,
} from "./types.js";

/** The part of the standard `WebSocket` the client uses (browsers, Node ≥ 22, the `ws` package). */
export interface WebSocketLike {
  readonly readyState: number;
  send(data: string): void;
  close(code?: number, reason?: string): void;
  onopen: ((ev: any) => void) | null;
  onmessage: ((ev: { data: any }) => void) | null;
  onclose: ((ev: { code: number; reason: string }) => void) | null;
  onerror: ((ev: any) => void) | null;
}

/** A `WebSocket` constructor. */
export type WebSocketConstructor = new (url: string, protocols?: string | string[]) => WebSocketLike;

/** A token, or a function that fetches a fresh one (called on every connect and before `exp`). */
export type TokenSource = string | (() => string | Promise<string>);

/** Options of {@link Client}. */
export interface ClientOptions {
  /** `ws://host:port/ws` or `wss://…`. */
  url: string;
  /** The JWT, or a provider of fresh ones. */
  token?: TokenSource;
  /**
   * How the token travels: `protocol` (default) offers `Sec-WebSocket-Protocol: bearer, <jwt>`,
   * which keeps it out of URLs and access logs; `query` appends `?token=`.
   */
  tokenIn?: "protocol" | "query";
  /** The WebSocket implementation; default `globalThis.WebSocket` (pass `ws` in Node 20). */
  WebSocket?: WebSocketConstructor;
  /** Reconnection backoff, or `false` for none. */
  reconnect?: BackoffOptions | false;
  /** Default time to wait for an answer, ms (10 000). */
  timeoutMs?: number;
  /**
   * With a token provider, send `auth_refresh` with a fresh token this long before `exp`, ms
   * (30 000; at most half the token's remaining life). `false` turns refreshing off: at `exp` the
   * server closes 1008 and the client reconnects with a token from the provider.
   */
  refreshBeforeMs?: number | false;
  /** The server's `transient_ttl` for `typing`, ms (5 000): `typing()` sends at most once per half of it. */
  typingTtlMs?: number;
  /** Messages kept while not connected (256); beyond it calls fail at once. */
  maxQueue?: number;
}

/** Options of one call. */
export interface CallOptions {
  /** Time to wait for the answer, ms. */
  timeoutMs?: number;
}

/** Why the connection closed, and whether the client comes back by itself. */
export interface CloseInfo {
  code: number;
  reason: string;
  willReconnect: boolean;
}

/** The events of {@link Client.on}. */
export interface ClientEvents {
  /** Every state change of the machine `connecting → open → reconnecting → open … → closed`. */
  state: (state: State, previous: State) => void;
  open: () => void;
  close: (info: CloseInfo) => void;
  /** A reconnect is scheduled after `delayMs`. */
  reconnecting: (info: { attempt: number; delayMs: number }) => void;
  /** An error nobody else receives: an unanswered `error_notification`, a failed restore or refresh. */
  error: (error: Error) => void;
  /** The session was extended with a fresh token (`auth_refresh` answered `refreshed`). */
  refreshed: (token: string) => void;
  /** `presence_event`, from watches, rooms, targeted updates and `roomPresence`. */
  presence: (event: PresenceEvent, message: ServerMessage<PresenceEvent>) => void;
  /** `room_message` of a room this client is in. */
  room: (envelope: RoomEnvelope, message: ServerMessage<RoomEnvelope>) => void;
  /** Every message from the server, before it is dispatched. */
  message: (message: ServerMessage) => void;
}

/**
 * Handles a server push. The result (a status string) becomes the `client_ack` when the push
 * carries a `pid` (default status `received`); a thrown error becomes `client_ack`
 * `{status: "error", error}`.
 */
export type PushHandler<P = any> = (payload: P, message: ServerMessage<P>) => unknown;

/**
 * Answers a server request. The result becomes the reply payload (`generic_response` with the
 * request's `pid`); a thrown error becomes a reply with `error: {code, message}`.
 */
export type RequestHandler<P = any, R = unknown> = (payload: P, message: ServerMessage<P>) => R | Promise<R>;

interface Pending {
  resolve: (value: any) => void;
  reject: (error: Error) => void;
  timer: ReturnType<typeof setTimeout>;
  /** Resolve with the reply's payload (a request), or with the `server_ack` payload. */
  reply: boolean;
  sent: boolean;
}

const OPEN = 1;
/** Close codes after which reconnecting would only repeat the failure or undo a decision. */
const FINAL_CODES = new Set([1000, 1002, 1003, 1008, 4000]);
const MAX_WATCH_LIST = 1024;

/** A customws connection. See the package README for the flows. */
export class Client {
  /** The current state. */
  state: State = "closed";
  /** The authenticated user, read from the token's `user_id` or `sub`. */
  userId?: number;

  private readonly opts: ClientOptions;
  private ws?: WebSocketLike;
  private seq = 0;
  private attempt = 0;
  private openedAt = 0;
  private stopped = true;
  private tokenExpired = false;
  private reconnectTimer?: ReturnType<typeof setTimeout>;
  private refreshTimer?: ReturnType<typeof setTimeout>;
  private readonly pending = new Map<string, Pending>();
  private readonly queue: string[] = [];
  private readonly listeners = new Map<string, Set<(...args: any[]) => void>>();
  private readonly pushHandlers = new Map<string, PushHandler>();
  private readonly requestHandlers = new Map<string, RequestHandler>();
  private readonly lastTyping = new Map<number, number>();
  /** Restored after a reconnect. */
  private readonly joined = new Set<string>();
  private readonly watched = new Set<number>();
  private presence?: { status: string; context?: unknown };

  constructor(opts: ClientOptions) {
    this.opts = opts;
  }

  /** Opens the connection; resolves when it is open, rejects if the client closes first. */
  connect(): Promise<void> {
    if (this.state === "open") return Promise.resolve();
    if (!(this.opts.WebSocket ?? (globalThis as any).WebSocket)) {
      return Promise.reject(new Error("no WebSocket implementation: pass options.WebSocket (e.g. the ws package)"));
    }
    const opened = new Promise<void>((resolve, reject) => {
      const offOpen = this.on("open", () => (offOpen(), offClose(), resolve()));
      const offClose = this.on("close", (info) => {
        if (!info.willReconnect) offOpen(), offClose(), reject(new CustomWsError("closed", info.code, info.reason || "closed"));
      });
    });
    if (this.stopped) {
      this.stopped = false;
      this.setState("connecting");
      void this.dial();
    }
    return opened;
  }

  /** Closes for good: no reconnect; calls in flight fail with kind `closed`. */
  close(code = 1000, reason = ""): void {
    this.stopped = true;
    clearTimeout(this.reconnectTimer);
    clearTimeout(this.refreshTimer);
    const ws = this.ws;
    this.ws = undefined;
    if (ws) {
      ws.onclose = ws.onmessage = ws.onopen = null;
      ws.close(code, reason);
    }
    this.failAll(code, "closed by the client", true);
    if (this.state !== "closed") {
      this.setState("closed");
      this.emit("close", { code, reason, willReconnect: false });
    }
  }

  /** Subscribes to an event; returns the function that unsubscribes. */
  on<E extends keyof ClientEvents>(event: E, fn: ClientEvents[E]): () => void {
    let set = this.listeners.get(event);
    if (!set) this.listeners.set(event, (set = new Set()));
    set.add(fn);
    return () => set!.delete(fn);
  }

  /** Handles server pushes of `type` (see {@link PushHandler}); one handler per type. */
  onPush<P = any>(type: string, fn: PushHandler<P>): () => void {
    this.pushHandlers.set(type, fn);
    return () => this.pushHandlers.delete(type);
  }

  /** Answers server requests of `type` (see {@link RequestHandler}); one handler per type. */
  onRequest<P = any, R = unknown>(type: string, fn: RequestHandler<P, R>): () => void {
    this.requestHandlers.set(type, fn);
    return () => this.requestHandlers.delete(type);
  }

  // ---- messages ----

  /** Peer-to-peer through the server: resolves on `server_ack` `delivered`, rejects with code 404 when the user is offline. */
  send<P>(targetUserId: number, payload: P, opts?: CallOptions): Promise<ServerAck> {
    return this.call("data_request", payload, opts, targetUserId);
  }

  /** A `data_event` to every other connection (needs the `broadcast` role): resolves on ack `broadcast`. */
  broadcast<P>(payload: P, opts?: CallOptions): Promise<ServerAck> {
    return this.call("data_request", payload, opts);
  }

  /** Sends `type` with a new pid and resolves with the payload of the reply carrying that pid. */
  request<R = unknown, P = unknown>(type: string, payload: P, opts?: CallOptions): Promise<R> {
    return this.call(type, payload, opts, undefined, true);
  }

  /** Sends a message of any type without waiting for an answer. */
  post<P>(type: string, payload?: P, targetUserId?: number): void {
    this.write({ type, payload, targetUserId });
  }

  // ---- rooms ----

  /** Joins `room` (re-joined after every reconnect). */
  async join(room: string, opts?: CallOptions): Promise<ServerAck> {
    const ack = await this.call<ServerAck>("join", { room }, opts);
    this.joined.add(room);
    return ack;
  }

  /** Leaves `room`. */
  async leave(room: string, opts?: CallOptions): Promise<ServerAck> {
    this.joined.delete(room);
    return this.call("leave", { room }, opts);
  }

  /** Publishes to a room this client is in; members get a `room` event with the {@link RoomEnvelope}. */
  publish<B, M = undefined>(room: string, body: B, meta?: M, opts?: CallOptions): Promise<ServerAck> {
    return this.call("broadcast", { room, body, meta }, opts);
  }

  /**
   * One page of the presence of `room`'s members (members only; 403 otherwise). Pass the page's
   * `next` as `cursor` for the following one; the server caps members per page and per second.
   */
  roomPresence<C = unknown>(room: string, cursor?: number, opts?: CallOptions): Promise<RoomPresencePage<C>> {
    return this.call("room_presence", cursor === undefined ? { room } : { room, cursor }, opts, undefined, true);
  }

  /** The rooms restored after a reconnect. */
  get rooms(): readonly string[] {
    return [...this.joined];
  }

  // ---- presence ----

  /** Watches the presence of `userIds`: their current status at once, then every change. */
  async subscribe(userIds: number[], opts?: CallOptions): Promise<void> {
    for (let i = 0; i < userIds.length; i += MAX_WATCH_LIST) {
      const part = userIds.slice(i, i + MAX_WATCH_LIST);
      await this.call("presence_subscribe", { userIds: part }, opts);
      part.forEach((id) => this.watched.add(id));
    }
  }

  /** Stops watching `userIds`. */
  async unsubscribe(userIds: number[], opts?: CallOptions): Promise<void> {
    userIds.forEach((id) => this.watched.delete(id));
    for (let i = 0; i < userIds.length; i += MAX_WATCH_LIST) {
      await this.call("presence_unsubscribe", { userIds: userIds.slice(i, i + MAX_WATCH_LIST) }, opts);
    }
  }

  /**
   * Sets this user's presence; an untargeted status is sent again after a reconnect. With
   * `targetUserId`, only that user is told.
   */
  update<C = unknown>(status: string, context?: C, targetUserId?: number, opts?: CallOptions): Promise<ServerAck> {
    if (targetUserId === undefined) this.presence = { status, context };
    this.lastTyping.delete(targetUserId ?? 0);
    return this.call("presence_update", { status, context, targetUserId }, opts);
  }

  /**
   * "Typing…", throttled: sent at most once per half of the server's typing TTL (per target), so
   * calling it on every keystroke keeps the indicator alive without flooding the server. The
   * server drops it by itself after the TTL; {@link stopTyping} ends it at once.
   */
  typing<C = unknown>(targetUserId?: number, context?: C): Promise<ServerAck | undefined> {
    const key = targetUserId ?? 0;
    const now = Date.now();
    if (now - (this.lastTyping.get(key) ?? -Infinity) < (this.opts.typingTtlMs ?? 5000) / 2) {
      return Promise.resolve(undefined);
    }
    this.lastTyping.set(key, now);
    return this.call("presence_update", { status: "typing", context, targetUserId });
  }

  /** Ends "typing…" by sending the lasting status again (`online` if none was set). */
  stopTyping(targetUserId?: number): Promise<ServerAck> {
    this.lastTyping.delete(targetUserId ?? 0);
    const { status, context } = this.presence ?? { status: "online" };
    return this.call("presence_update", { status, context, targetUserId });
  }

  // ---- internals: connection ----

  private setState(state: State): void {
    const previous = this.state;
    if (previous === state) return;
    this.state = state;
    this.emit("state", state, previous);
  }

  private emit(event: string, ...args: unknown[]): void {
    this.listeners.get(event)?.forEach((fn) => {
      try {
        fn(...args);
      } catch (e) {
        if (event !== "error") this.emit("error", e as Error);
      }
    });
  }

  private async dial(): Promise<void> {
    let token: string | undefined;
    try {
      const source = this.opts.token;
      token = typeof source === "function" ? await source() : source;
    } catch (e) {
      this.emit("error", e as Error);
      return this.lost(1006, "token provider failed");
    }
    if (this.stopped) return;
    const Ctor: WebSocketConstructor = this.opts.WebSocket ?? (globalThis as any).WebSocket;
    let url = this.opts.url;
    let protocols: string[] | undefined;
    if (token) {
      const claims = tokenClaims(token);
      this.userId = claims.user_id ?? (claims.sub ? Number(claims.sub) : this.userId);
      if (this.opts.tokenIn === "query") url += (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(token);
      else protocols = ["bearer", token];
    }
    this.tokenExpired = false;
    let ws: WebSocketLike;
    try {
      ws = new Ctor(url, protocols);
    } catch (e) {
      this.emit("error", e as Error);
      return this.lost(1006, String(e));
    }
    this.ws = ws;
    ws.onopen = () => this.opened(token);
    ws.onmessage = (ev) => this.receive(String(ev.data));
    ws.onclose = (ev) => {
      if (this.ws === ws) this.lost(ev.code, ev.reason);
    };
    ws.onerror = () => {};
  }

  private opened(token: string | undefined): void {
    this.openedAt = Date.now();
    this.setState("open");
    this.restore();
    for (const frame of this.queue.splice(0)) this.ws!.send(frame);
    for (const p of this.pending.values()) p.sent = true;
    this.scheduleRefresh(token);
    this.emit("open");
  }

  /** After a reconnect: the rooms, watches and presence the server forgot. */
  private restore(): void {
    const report = (e: Error) => this.emit("error", e);
    for (const room of this.joined) this.call("join", { room }).catch(report);
    const ids = [...this.watched];
    for (let i = 0; i < ids.length; i += MAX_WATCH_LIST) {
      this.call("presence_subscribe", { userIds: ids.slice(i, i + MAX_WATCH_LIST) }).catch(report);
    }
    if (this.presence) this.call("presence_update", this.presence).catch(report);
  }

  private lost(code: number, reason: string): void {
    this.ws = undefined;
    clearTimeout(this.refreshTimer);
    this.failAll(code, reason || `connection closed (${code})`, false);
    if (this.stopped) return;
    // The backoff starts again only after a connection that held; one that drops at once keeps growing it.
    if (this.openedAt && Date.now() - this.openedAt > 5000) this.attempt = 0;
    this.openedAt = 0;
    const backoff = this.opts.reconnect;
    // A token that expired is fixed by asking the provider again; any other 1008 is a policy.
    const expiredWithProvider = code === 1008 && this.tokenExpired && typeof this.opts.token === "function";
    const final =
      backoff === false ||
      (FINAL_CODES.has(code) && !expiredWithProvider) ||
      this.attempt >= (backoff?.maxAttempts ?? Infinity);
    if (final) {
      this.stopped = true;
      this.failAll(code, reason || "closed", true);
      this.setState("closed");
      this.emit("close", { code, reason, willReconnect: false });
      return;
    }
    const hint = code === 1001 ? retryHint(reason) : undefined;
    const delayMs =
      hint !== undefined ? hint + Math.floor(Math.random() * Math.min(hint / 10, 1000)) : backoffDelay(this.attempt, backoff);
    this.attempt++;
    this.setState("reconnecting");
    this.emit("close", { code, reason, willReconnect: true });
    this.emit("reconnecting", { attempt: this.attempt, delayMs });
    this.reconnectTimer = setTimeout(() => void this.dial(), delayMs);
  }

  /** Fails the calls whose message went out (`all`: also those still queued). */
  private failAll(code: number, reason: string, all: boolean): void {
    for (const [pid, p] of this.pending) {
      if (all || p.sent) this.settle(pid)?.reject(new CustomWsError("closed", code, reason, pid));
    }
    if (all) this.queue.length = 0;
  }

  private scheduleRefresh(token: string | undefined): void {
    const before = this.opts.refreshBeforeMs ?? 30_000;
    const exp = token && before !== false && typeof this.opts.token === "function" ? tokenClaims(token).exp : undefined;
    if (!exp) return;
    const left = exp * 1000 - Date.now();
    const delay = Math.max(0, left - Math.min(before as number, left / 2));
    clearTimeout(this.refreshTimer);
    this.refreshTimer = setTimeout(() => void this.refresh(), delay);
  }

  private async refresh(): Promise<void> {
    try {
      const token = await (this.opts.token as () => string | Promise<string>)();
      await this.call("auth_refresh", { token });
      this.scheduleRefresh(token);
      this.emit("refreshed", token);
    } catch (e) {
      this.emit("error", e as Error);
    }
  }

  // ---- internals: calls ----

  private write(msg: ClientMessage): boolean {
    const frame = JSON.stringify(msg);
    if (this.ws?.readyState === OPEN && this.state === "open") {
      this.ws.send(frame);
      return true;
    }
    if (this.stopped || this.queue.length >= (this.opts.maxQueue ?? 256)) {
      throw new CustomWsError("closed", 0, this.stopped ? "not connected" : "send queue full");
    }
    this.queue.push(frame);
    return false;
  }

  private call<T>(type: string, payload: unknown, opts?: CallOptions, targetUserId?: number, reply = false): Promise<T> {
    const pid = `c${++this.seq}`;
    return new Promise<T>((resolve, reject) => {
      const ms = opts?.timeoutMs ?? this.opts.timeoutMs ?? 10_000;
      const timer = setTimeout(
        () => this.settle(pid)?.reject(new CustomWsError("timeout", 408, `no answer to ${type} within ${ms} ms`, pid)),
        ms,
      );
      this.pending.set(pid, { resolve, reject, timer, reply, sent: false });
      try {
        this.pending.get(pid)!.sent = this.write({ pid, type, targetUserId, payload });
      } catch (e) {
        this.settle(pid);
        reject(e);
      }
    });
  }

  private settle(pid: string | undefined): Pending | undefined {
    const p = pid === undefined ? undefined : this.pending.get(pid);
    if (p) {
      clearTimeout(p.timer);
      this.pending.delete(pid!);
    }
    return p;
  }

  private receive(text: string): void {
    let msg: ServerMessage<any>;
    try {
      msg = JSON.parse(text);
    } catch {
      return this.emit("error", new Error("unparsable message from the server"));
    }
    if (!msg || typeof msg.type !== "string") return;
    this.emit("message", msg);
    const { type, payload, pid } = msg;
    if (type === "server_ack") {
      const p = this.settle(payload?.acknowledgedPid);
      if (p) return p.resolve(payload);
    }
    if (type === "error_notification") {
      const err = msg.error ?? { code: 0, message: "unknown error" };
      const origin = err.originalPid ?? pid;
      const failure = new CustomWsError("server", err.code, err.message, origin);
      const p = this.settle(origin);
      if (p) return p.reject(failure);
      if (err.code === 401) this.tokenExpired = true;
      return this.emit("error", failure);
    }
    if (pid !== undefined && this.pending.get(pid)?.reply) {
      return this.settle(pid)!.resolve(payload);
    }
    if (type === "presence_event") this.emit("presence", payload, msg);
    else if (type === "room_message") this.emit("room", payload, msg);
    void this.dispatch(msg);
  }

  /** Runs the handler of a push or request; answers when the server gave a pid. */
  private async dispatch(msg: ServerMessage): Promise<void> {
    const { type, payload, pid } = msg;
    const onRequest = this.requestHandlers.get(type);
    const onPush = this.pushHandlers.get(type);
    if (onRequest && pid !== undefined) {
      try {
        const result = await onRequest(payload, msg);
        this.answer({ pid, type: "generic_response", payload: result });
      } catch (e) {
        const code = e instanceof CustomWsError ? e.code : 500;
        this.answer({ pid, type: "generic_response", payload: null, error: { code, message: String((e as Error)?.message ?? e) } });
      }
      return;
    }
    if (!onPush && pid !== undefined && type === "generic_request") {
      // A request nobody here answers: say so now rather than let the server wait for its timeout.
      return this.answer({ pid, type: "generic_response", payload: null, error: { code: 501, message: "no handler for generic_request" } });
    }
    if (!onPush && pid === undefined) return;
    let ack: { acknowledgedPid?: string; status: string; error?: string };
    try {
      const result = onPush ? await onPush(payload, msg) : undefined;
      ack = { status: typeof result === "string" ? result : "received" };
    } catch (e) {
      ack = { status: "error", error: String((e as Error)?.message ?? e) };
    }
    if (pid !== undefined) this.answer({ type: "client_ack", payload: { ...ack, acknowledgedPid: pid } });
  }

  private answer(msg: ClientMessage & { error?: unknown }): void {
    try {
      this.write(msg);
    } catch (e) {
      this.emit("error", e as Error);
    }
  }
}
