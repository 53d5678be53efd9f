// The calls an app makes to billsync, over the platform's `fetch` (Node 20, edge runtimes,
// browsers). Request and answer types come from the generated `schema.ts`; every failure is
// one `BillsyncError`.
import { BillsyncError, parseRetryAfter } from "./errors.js";
import type { AppEvent } from "./events.js";
import type { components, operations } from "./schema.js";

type Schemas = components["schemas"];
type Json<Op extends keyof operations, Status extends number> = operations[Op]["responses"] extends {
  [S in Status]: { content: { "application/json": infer Body } };
}
  ? Body
  : never;

export type UserBody = Schemas["UserBody"];
export type User = Schemas["UserView"];
export type UserWithCustomer = Json<"get_user", 200>;
export type ResolvedCustomer = Json<"resolve_customer", 200>;
export type Billing = Schemas["BillingView"];
export type UserBatchRow = Schemas["UserBatchRow"];
export type UserBatchResponse = Schemas["UserBatchResponse"];
export type ProfileUpdate = Schemas["ProfileBody"];
export type Profile = Schemas["ProfileView"];
export type PortalFlow = Schemas["PortalFlow"];

/** A page of app events in their total order. */
export interface AppEventsPage {
  events: AppEvent[];
  /**
   * Pass as `after` for the next page: the last event's place, or, when the page is empty,
   * the `after` you passed (nothing newer yet: ask again later). `null` when you passed none
   * and no event is kept.
   */
  nextCursor: string | null;
}

/** What `deleteAccount` did. */
export type AccountDeletion =
  /** Everything is done, in billsync and in Stripe. */
  | { status: "deleted" }
  /** The person's data is gone from billsync; a Stripe step failed and is retried by its queue. */
  | { status: "pending" };

export interface BillsyncOptions {
  /** Where billsync listens, e.g. `http://127.0.0.1:8080`. */
  baseUrl: string;
  /** `BILLSYNC_ADMIN_API_KEY`: needed for every call except those of `asUser`. Keep it on the server. */
  adminKey?: string;
  /** Per call, until its answer is read (default 30 s); for `exportData`, until the download starts. */
  timeoutMs?: number;
  /** Another `fetch` (a test double, an instrumented one); the platform's by default. */
  fetch?: typeof globalThis.fetch;
}

interface Call {
  method: "GET" | "PUT" | "POST" | "DELETE";
  path: string;
  token: string | undefined;
  body?: unknown;
  query?: Record<string, string | number | undefined>;
  signal?: AbortSignal;
}

/** Per-call options. */
export interface CallOptions {
  /** Abandons the call (in addition to `timeoutMs`). */
  signal?: AbortSignal;
}

/** A v4 UUID; `crypto.randomUUID` exists only in secure contexts (https, localhost) in browsers. */
function newRequestId(): string {
  if (typeof crypto.randomUUID === "function") return crypto.randomUUID();
  const bytes = crypto.getRandomValues(new Uint8Array(16));
  bytes[6] = ((bytes[6] ?? 0) & 0x0f) | 0x40;
  bytes[8] = ((bytes[8] ?? 0) & 0x3f) | 0x80;
  const hex = Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  return `${hex.slice(0, 8)}-${hex.slice(8, 12)}-${hex.slice(12, 16)}-${hex.slice(16, 20)}-${hex.slice(20)}`;
}

/**
 * One call's bounds: `timeoutMs` from the start until the answer is read (or, for a streamed
 * answer, until its headers arrive), and the caller's signal throughout. `settle` lets go of
 * both once the answer is read, so a long-lived caller signal does not collect listeners.
 */
class Exchange {
  readonly requestId = newRequestId();
  readonly #controller = new AbortController();
  readonly #caller: AbortSignal | undefined;
  readonly #onCallerAbort: () => void;
  #timer: ReturnType<typeof setTimeout> | undefined;
  /** What cut the call short first, if anything did. */
  #cutBy: "timeout" | "caller" | undefined;

  constructor(
    readonly what: string,
    timeoutMs: number,
    caller: AbortSignal | undefined,
  ) {
    this.#caller = caller;
    this.#onCallerAbort = () => this.#cut("caller", caller?.reason);
    this.#timer = setTimeout(() => this.#cut("timeout", new DOMException("timed out", "TimeoutError")), timeoutMs);
    // Node: a pending call keeps the process alive by itself; its timer need not.
    (this.#timer as { unref?: () => void }).unref?.();
    if (caller?.aborted) this.#cut("caller", caller.reason);
    else caller?.addEventListener("abort", this.#onCallerAbort, { once: true });
  }

  #cut(by: "timeout" | "caller", reason: unknown): void {
    if (this.#controller.signal.aborted) return;
    this.#cutBy = by;
    this.#controller.abort(reason);
  }

  get signal(): AbortSignal {
    return this.#controller.signal;
  }

  /** From now on only the caller's signal bounds the call: its body is streamed to the caller. */
  unbound(): void {
    clearTimeout(this.#timer);
  }

  /** The answer is read: neither the timeout nor the caller's signal concerns this call any more. */
  settle(): void {
    clearTimeout(this.#timer);
    this.#caller?.removeEventListener("abort", this.#onCallerAbort);
  }

  /** The error for a call that was cut short: by the caller, by the timeout, or by the network. */
  failure(err: unknown, requestId: string | null = this.requestId): BillsyncError {
    if (this.#cutBy === "caller") {
      return new BillsyncError({ code: "aborted", status: 0, message: `${this.what}: abandoned by the caller`, requestId, cause: err });
    }
    if (this.#cutBy === "timeout") {
      return new BillsyncError({ code: "timeout", status: 0, message: `${this.what}: no answer in time`, requestId, cause: err });
    }
    return new BillsyncError({ code: "network_error", status: 0, message: `${this.what}: billsync could not be reached`, requestId, cause: err });
  }
}

class Transport {
  readonly baseUrl: string;
  readonly timeoutMs: number;
  readonly fetch: typeof globalThis.fetch;

  constructor(options: BillsyncOptions) {
    this.baseUrl = options.baseUrl.replace(/\/+$/, "");
    this.timeoutMs = options.timeoutMs ?? 30_000;
    this.fetch = options.fetch ?? globalThis.fetch.bind(globalThis);
  }

  /**
   * Sends a call and returns billsync's 2xx answer with its exchange, or throws
   * `BillsyncError`. With `stream`, the answer's body is no longer bounded by `timeoutMs`.
   */
  async send(call: Call, stream = false): Promise<{ response: Response; exchange: Exchange }> {
    const url = new URL(this.baseUrl + call.path);
    for (const [name, value] of Object.entries(call.query ?? {})) {
      if (value !== undefined) url.searchParams.set(name, String(value));
    }
    const exchange = new Exchange(`${call.method} ${call.path}`, this.timeoutMs, call.signal);
    // Our own id, so that even a call that never got an answer can be found in billsync's logs.
    const headers: Record<string, string> = { accept: "application/json", "x-request-id": exchange.requestId };
    if (call.token !== undefined) headers.authorization = `Bearer ${call.token}`;
    if (call.body !== undefined) headers["content-type"] = "application/json";

    let response: Response;
    try {
      response = await this.fetch(url, {
        method: call.method,
        headers,
        body: call.body === undefined ? undefined : JSON.stringify(call.body),
        signal: exchange.signal,
      });
    } catch (err) {
      exchange.settle();
      throw exchange.failure(err);
    }
    if (!response.ok) {
      try {
        throw await errorOf(response, exchange);
      } finally {
        exchange.settle();
      }
    }
    if (stream) exchange.unbound();
    return { response, exchange };
  }

  async json<T>(call: Call): Promise<T> {
    const { response, exchange } = await this.send(call);
    const requestId = response.headers.get("x-request-id") ?? exchange.requestId;
    let text: string;
    try {
      text = await response.text();
    } catch (err) {
      // Cut short by the timeout, the caller, or the network (a reset mid-body).
      throw exchange.failure(err, requestId);
    } finally {
      exchange.settle();
    }
    try {
      return JSON.parse(text) as T;
    } catch (err) {
      throw new BillsyncError({
        code: "unexpected_response",
        status: response.status,
        message: `billsync's answer to ${exchange.what} is not JSON`,
        requestId,
        cause: err,
      });
    }
  }

  /** Sends a call whose answer's body says nothing its status does not: returns the status. */
  async status(call: Call): Promise<number> {
    const { response, exchange } = await this.send(call);
    try {
      // Drained so the connection can be reused; a body cut short changes nothing.
      await response.arrayBuffer().catch(() => undefined);
    } finally {
      exchange.settle();
    }
    return response.status;
  }
}

async function errorOf(response: Response, exchange: Exchange): Promise<BillsyncError> {
  const requestId = response.headers.get("x-request-id") ?? exchange.requestId;
  // billsync sends it with 429, 503 and 409 resolve_in_progress; honoured wherever it comes.
  const retryAfter = parseRetryAfter(response.headers.get("retry-after"));
  let text: string;
  try {
    text = await response.text();
  } catch (err) {
    throw exchange.failure(err, requestId);
  }
  try {
    const body = JSON.parse(text) as Partial<Schemas["ErrorBody"]>;
    const error = body.error;
    if (error && typeof error.code === "string" && typeof error.message === "string") {
      return new BillsyncError({ code: error.code, status: response.status, message: error.message, requestId, retryAfter });
    }
  } catch {
    // Not billsync's error document: below.
  }
  return new BillsyncError({
    code: "unexpected_response",
    status: response.status,
    message: `HTTP ${response.status} without billsync's error document`,
    requestId,
    retryAfter,
  });
}

const userPath = (id: string) => `/v1/users/${encodeURIComponent(id)}`;

/**
 * billsync for the app's server, with the admin key: users, their Stripe customer, their
 * billing, and the app events. `asUser(token)` gives the calls a person makes with their own
 * token.
 */
export class Billsync {
  readonly #transport: Transport;
  readonly #adminKey: string | undefined;

  constructor(options: BillsyncOptions) {
    this.#transport = new Transport(options);
    this.#adminKey = options.adminKey;
  }

  #admin<T>(call: Omit<Call, "token">): Promise<T> {
    return this.#transport.json<T>({ ...call, token: this.#adminKey });
  }

  /** Creates or replaces a user (`PUT /v1/users/{id}`); omitted fields are cleared. */
  async upsertUser(userId: string, body: UserBody, options: CallOptions = {}): Promise<User> {
    const answer = await this.#admin<Schemas["UserResponse"]>({ method: "PUT", path: userPath(userId), body, ...options });
    return answer.user;
  }

  /** A user with their customer link and mirrored subscriptions; `user_not_found` if billsync has no such user. */
  getUser(userId: string, options: CallOptions = {}): Promise<UserWithCustomer> {
    return this.#admin({ method: "GET", path: userPath(userId), ...options });
  }

  /** Up to 1,000 users at once, one result per row in order (`POST /v1/users/batch`). */
  importUsers(users: UserBatchRow[], options: CallOptions = {}): Promise<UserBatchResponse> {
    return this.#admin({ method: "POST", path: "/v1/users/batch", body: { users }, ...options });
  }

  /**
   * The user's Stripe customer, found or created exactly once however many calls race
   * (the spec's `getOrCreateStripeCustomer`). With `user`, the user is upserted first.
   */
  resolveCustomer(userId: string, user?: UserBody, options: CallOptions = {}): Promise<ResolvedCustomer> {
    return this.#admin({ method: "POST", path: `${userPath(userId)}/customer`, body: user, ...options });
  }

  /** The billing read: customer, plan and subscriptions, from billsync's mirror (no Stripe call). */
  getBilling(userId: string, options: CallOptions = {}): Promise<Billing> {
    return this.#admin({ method: "GET", path: `${userPath(userId)}/billing`, ...options });
  }

  /**
   * App events after `after` (a `nextCursor`; from the oldest kept when absent), in their
   * total order: a reader that follows `nextCursor` sees every event once.
   */
  async listAppEvents(
    page: { after?: string | null; limit?: number } = {},
    options: CallOptions = {},
  ): Promise<AppEventsPage> {
    const answer = await this.#admin<{ events: AppEvent[]; next_cursor?: string | null }>({
      method: "GET",
      path: "/v1/app-events",
      query: { after: page.after ?? undefined, limit: page.limit },
      ...options,
    });
    return { events: answer.events, nextCursor: answer.next_cursor ?? page.after ?? null };
  }

  /** The calls a signed-in person makes, with their own token (Supabase's access token). */
  asUser(token: string): BillsyncUser {
    return new BillsyncUser(this.#transport, token);
  }
}

/** The user routes, as the person whose token this is. */
export class BillsyncUser {
  readonly #transport: Transport;
  readonly #token: string;

  /** @internal use `Billsync.asUser` */
  constructor(transport: Transport, token: string) {
    this.#transport = transport;
    this.#token = token;
  }

  /** Absent fields are kept; `null` or `""` clears. The push to Stripe is billsync's, durable. */
  async updateProfile(update: ProfileUpdate, options: CallOptions = {}): Promise<Profile> {
    const answer = await this.#transport.json<Schemas["ProfileResponse"]>({
      method: "PUT",
      path: "/api/user/profile",
      token: this.#token,
      body: update,
      ...options,
    });
    return answer.data;
  }

  /** The person's billing read. */
  getBilling(options: CallOptions = {}): Promise<Billing> {
    return this.#transport.json({ method: "GET", path: "/api/user/billing", token: this.#token, ...options });
  }

  /** A billing-portal session's URL, optionally deep-linked into one flow. */
  async createPortalSession(flow?: PortalFlow, options: CallOptions = {}): Promise<string> {
    const answer = await this.#transport.json<Schemas["UrlResponse"]>({
      method: "POST",
      path: "/api/billing/create-portal-session",
      token: this.#token,
      body: flow === undefined ? {} : { flow },
      ...options,
    });
    return answer.url;
  }

  /**
   * The person's data export, as billsync's streaming answer (`Content-Disposition`
   * included): return it from a route handler as it is, or read it with `.json()`.
   * `timeoutMs` bounds the wait for the answer to start, not the download (an export with
   * years of invoices takes a while): pass a `signal` to bound that.
   */
  async exportData(options: CallOptions = {}): Promise<Response> {
    const call = { method: "GET", path: "/api/user/export-data", token: this.#token, ...options } as const;
    return (await this.#transport.send(call, true)).response;
  }

  /**
   * Erases the person (GDPR). By default the Stripe customer is kept, scrubbed; with
   * `deleteFromStripe` it is deleted. Subscriptions are cancelled either way. Safe to repeat.
   */
  async deleteAccount(
    request: { deleteFromStripe?: boolean } = {},
    options: CallOptions = {},
  ): Promise<AccountDeletion> {
    const status = await this.#transport.status({
      method: "DELETE",
      path: "/api/user/delete-account",
      token: this.#token,
      body: request,
      ...options,
    });
    return { status: status === 202 ? "pending" : "deleted" };
  }
}
