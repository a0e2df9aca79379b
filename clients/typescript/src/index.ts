/**
 * Client SDK for the customws WebSocket tier, for browsers and Node.
 *
 * ```ts
 * import { Client } from "@customws/client";
 * const client = new Client({ url: "ws://localhost:8082/ws", token: () => fetchToken() });
 * await client.connect();
 * await client.send(2, { text: "hi" }); // resolves on server_ack "delivered", rejects 404 offline
 * ```
 */
export { Client } from "./client.js";
export type {
  CallOptions,
  ClientEvents,
  ClientOptions,
  CloseInfo,
  PushHandler,
  RequestHandler,
  TokenSource,
  WebSocketConstructor,
  WebSocketLike,
} from "./client.js";
export { CustomWsError } from "./errors.js";
export type { ErrorKind } from "./errors.js";
export { backoffDelay, retryHint } from "./backoff.js";
export type { BackoffOptions } from "./backoff.js";
export { tokenClaims } from "./jwt.js";
export type { TokenClaims } from "./jwt.js";
export type * from "./types.js";
