/** Reading (not verifying) the claims of a JWT: the client needs `exp` and the user id. */

/** The claims the client uses. */
export interface TokenClaims {
  exp?: number;
  user_id?: number;
  sub?: string;
}

/** The token's claims, or `{}` when it is not a readable JWT. */
export function tokenClaims(token: string): TokenClaims {
  try {
    const part = token.split(".")[1]!.replace(/-/g, "+").replace(/_/g, "/");
    const text = decodeURIComponent(
      Array.from(atob(part), (c) => "%" + c.charCodeAt(0).toString(16).padStart(2, "0")).join(""),
    );
    return JSON.parse(text) as TokenClaims;
  } catch {
    return {};
  }
}
