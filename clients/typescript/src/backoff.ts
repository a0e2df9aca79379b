/** Reconnection timing: exponential backoff with full jitter, and the server's restart hint. */

/** Backoff settings; all in milliseconds. */
export interface BackoffOptions {
  /** Upper bound of the first delay (default 500). */
  initialMs?: number;
  /** Largest delay (default 30 000). */
  maxMs?: number;
  /** Attempts before giving up and going to `closed` (default unbounded). */
  maxAttempts?: number;
}

/**
 * Full jitter: a uniform delay in `[0, min(maxMs, initialMs · 2^attempt))`, so that clients
 * dropped together do not come back together.
 */
export function backoffDelay(attempt: number, opts: BackoffOptions = {}, random: () => number = Math.random): number {
  const cap = Math.min(opts.maxMs ?? 30_000, (opts.initialMs ?? 500) * 2 ** Math.min(attempt, 30));
  return Math.floor(random() * cap);
}

/** The delay a draining server asks for in its 1001 close reason (`… retry after N ms`). */
export function retryHint(reason: string): number | undefined {
  const m = /retry after (\d+) ms/.exec(reason);
  return m ? Number(m[1]) : undefined;
}
