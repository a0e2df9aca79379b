/** Why a call failed: the server refused it, nobody answered in time, or the connection went. */
export type ErrorKind = "server" | "timeout" | "closed";

/**
 * A failed call. `kind` says why; `code` is the server's `error_notification` code
 * (400, 403, 404, 429, …) for `server`, 408 for `timeout`, the close code for `closed`.
 */
export class CustomWsError extends Error {
  override name = "CustomWsError";
  constructor(
    readonly kind: ErrorKind,
    readonly code: number,
    message: string,
    readonly pid?: string,
  ) {
    super(message);
  }
}
