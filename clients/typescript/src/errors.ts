/**
 * Every failure of a billsync call, whatever its cause, is one `BillsyncError`.
 *
 * - billsync answered with an error: `code` is its stable code (`user_not_found`,
 *   `rate_limited`, …), `status` the HTTP status, `message` its message.
 * - billsync could not be reached or did not answer in time: `status` is 0 and `code` is
 *   `network_error` or `timeout`.
 * - Something that is not billsync answered (a proxy's HTML page, a cut-off body): `code` is
 *   `unexpected_response` with the status it had.
 *
 * `requestId` is the `x-request-id` of the call, the one billsync logs it under: quote it when
 * asking an operator. `retryAfter` is set when billsync says how long to wait (`Retry-After` on
 * 429 `rate_limited`, 503 and 409 `resolve_in_progress`).
 */
export class BillsyncError extends Error {
  override readonly name = "BillsyncError";
  readonly code: string;
  readonly status: number;
  readonly requestId: string | null;
  /** Whole seconds to wait before trying again (`Retry-After`); `null` when not given. */
  readonly retryAfter: number | null;

  constructor(init: {
    code: string;
    status: number;
    message: string;
    requestId: string | null;
    retryAfter?: number | null;
    cause?: unknown;
  }) {
    super(init.message, init.cause === undefined ? undefined : { cause: init.cause });
    this.code = init.code;
    this.status = init.status;
    this.requestId = init.requestId;
    this.retryAfter = init.retryAfter ?? null;
  }

  /**
   * Worth trying again later: billsync said when (`Retry-After`), was rate limiting, was
   * unavailable for a while (Stripe, its database, the JWT keys), or was not reached; or a
   * proxy in front of it answered 502–504. Not an abort (the caller's own), and not a 503 that
   * says a feature is switched off in billsync's settings (retrying changes nothing).
   */
  get retryable(): boolean {
    if (this.code === "aborted" || SWITCHED_OFF.has(this.code)) return false;
    if (this.code === "unexpected_response") return this.retryAfter !== null || [502, 503, 504].includes(this.status);
    return this.retryAfter !== null || this.status === 0 || this.status === 429 || this.status === 503;
  }

  /** The error document billsync itself answers with, for passing an error on unchanged. */
  toJSON(): { error: { code: string; message: string } } {
    return { error: { code: this.code, message: this.message } };
  }
}

/** billsync's 503s for a feature its settings leave off. */
const SWITCHED_OFF = new Set(["admin_disabled", "auth_disabled", "portal_not_configured", "webhooks_disabled"]);

/** `Retry-After` as whole seconds: a number of seconds, or an HTTP date from now. */
export function parseRetryAfter(header: string | null, now: number = Date.now()): number | null {
  if (header === null) return null;
  const value = header.trim();
  if (/^\d+$/.test(value)) return Number(value);
  const at = Date.parse(value);
  if (Number.isNaN(at)) return null;
  return Math.max(0, Math.ceil((at - now) / 1000));
}
