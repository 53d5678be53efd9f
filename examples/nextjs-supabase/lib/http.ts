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
  const payload = (acceptedToken.split(".")[1] ?? "").replace(/-/g, "+").replace(/_/g, "/");
  const bytes = Uint8Array.from(atob(payload), (c) => c.charCodeAt(0));
  return (JSON.parse(new TextDecoder().decode(bytes)) as { sub: string }).sub;
}

/**
 * The request's JSON body, checked as billsync checks it: not JSON is 400 `invalid_json`; an
 * empty body, or `null` where the route allows it, is `{}`; anything but an object is 422
 * `invalid_request`. Returns the body, or the answer to give.
 */
export async function jsonBody(
  request: Request,
  options: { nullAllowed: boolean },
): Promise<Record<string, unknown> | Response> {
  const text = await request.text();
  if (text.trim() === "") return {};
  let value: unknown;
  try {
    value = JSON.parse(text);
  } catch {
    return json({ error: { code: "invalid_json", message: "the body is not JSON" } }, 400);
  }
  if (value === null && options.nullAllowed) return {};
  if (typeof value !== "object" || value === null || Array.isArray(value)) {
    return json({ error: { code: "invalid_request", message: "the body must be a JSON object" } }, 422);
  }
  return value as Record<string, unknown>;
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
