/** Wire types of the customws protocol (see the repository's README). */

/** Client → server envelope. */
export interface ClientMessage<P = unknown> {
  pid?: string;
  type: string;
  targetUserId?: number;
  payload?: P;
}

/** The `error` of an `error_notification`. */
export interface ServerErrorBody {
  originalPid?: string;
  code: number;
  message: string;
}

/** Server → client envelope. */
export interface ServerMessage<P = unknown> {
  pid?: string;
  type: string;
  fromUserId?: number;
  payload?: P;
  error?: ServerErrorBody;
}

/** `server_ack` payload: the answer to a client message that carried a `pid`. */
export interface ServerAck {
  acknowledgedPid: string;
  /** `delivered`, `broadcast`, `joined`, `left`, `published`, `ok`, `coalesced`, `refreshed`… */
  status: string;
}

/** `client_ack` payload: the client's answer to a server push that carried a `pid`. */
export interface ClientAck {
  acknowledgedPid: string;
  status?: string;
  error?: string;
}

/** `presence_event` payload. */
export interface PresenceEvent<C = unknown> {
  userId: number;
  status: string;
  context: C | null;
  /** RFC 3339. */
  timestamp: string;
}

/** `room_presence` answer: one page of a room's members, in user-id order. */
export interface RoomPresencePage<C = unknown> {
  room: string;
  /** Each member's current presence (`userId`, `status`, `context`, `timestamp`). */
  members: PresenceEvent<C>[];
  /** Pass as `cursor` for the next page; `null` on the last one. */
  next: number | null;
}

/** `room_message` payload (seed 003's envelope). */
export interface RoomEnvelope<B = unknown, M = unknown> {
  from: number;
  room: string;
  /** Unix milliseconds. */
  ts: number;
  body: B;
  meta?: M;
}

/** The client's connection state. */
export type State = "connecting" | "open" | "reconnecting" | "closed";
