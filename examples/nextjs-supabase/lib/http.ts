// What every route shares: the caller's Supabase access token, and billsync's errors passed
// on as billsync's own error document with its status.
import { BillsyncError } from "@billsync/client";

/**
 * The signed-in person's Supabase access token. A browser `fetch` sends it as a bearer
 * token; with `@supabase/ssr`'s cookies, read `session.access_token` instead.
 */
export function accessToken(request: Request): string | null {
  const header = request.headers.get("authorization") ?? "";
  const match = /^Bearer\s+(\S+)$/i.exec(header);
  return match?.[1] ?? null;
}

/**
 * The `sub` of a token billsync has just accepted. Not a verification: only for a token a
 * billsync call has verified already (with @supabase/ssr, use `supabase.auth.getUser()`).
 */
export function subjectOf(acceptedToken: string): string {
  const payload = acceptedToken.split(".")[1] ?? "";
  return (JSON.parse(Buffer.from(payload, "base64url").toString("utf8")) as { sub: string }).sub;
}

export function json(body: unknown, status = 200): Response {
  return Response.json(body, { status });
}

export const unauthorized = (): Response => json({ error: { code: "unauthorized", message: "sign in first" } }, 401);

/** billsync's error as the browser should see it; anything else is logged and is a 500. */
export function errorResponse(err: unknown): Response {
  if (!(err instanceof BillsyncError)) {
    console.error("unexpected error", err);
    return json({ error: { code: "internal", message: "internal error" } }, 500);
  }
  // billsync unreachable: the app's dependency is down.
  const status = err.status === 0 || err.code === "unexpected_response" ? 503 : err.status;
  if (status >= 500) console.error(`billsync ${err.code} (request ${err.requestId})`);
  const response = json(err.toJSON(), status);
  if (err.retryAfter !== null) response.headers.set("retry-after", String(err.retryAfter));
  return response;
}
