// A real billsync for Node tests: the binary the Rust build made, on SQLite in a temporary
// directory, talking to localstripe through a stand-in that adds what localstripe lacks
// (billing-portal sessions) and records what billsync asked for. Shared by the client's
// tests and the example app's.
//
// Needs BILLSYNC_BIN (the billsync binary) and BILLSYNC_TEST_LOCALSTRIPE_URL; without them a
// test fails saying so, it is never skipped.
import { spawn, type ChildProcess } from "node:child_process";
import { createHmac, randomBytes } from "node:crypto";
import { mkdtempSync, rmSync, writeFileSync } from "node:fs";
import http from "node:http";
import type { AddressInfo } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";

export const ADMIN_KEY = "test-admin-key-0123456789";
const JWT_SECRET = "test-jwt-secret-0123456789-abcdefghijklmnop";
export const APP_URL = "https://app.example.com";
const STRIPE_WEBHOOK_SECRET = "whsec_test_secret";
const STRIPE_KEY = "sk_test_billsync_0123456789";
/** Standard Webhooks secrets are base64 after `whsec_`. */
export const APP_WEBHOOK_SECRET = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSwMfKQ9r8GKYo=";

function required(name: string): string {
  const value = process.env[name];
  if (!value) {
    throw new Error(`${name} is not set: these tests need a real billsync and localstripe (scripts/test-typescript.sh sets both)`);
  }
  return value;
}

export function unique(prefix: string): string {
  return `${prefix}-${Date.now().toString(36)}-${randomBytes(4).toString("hex")}`;
}

/**
 * Waits into the next whole second: Stripe's `created` has a resolution of one second, and
 * billsync orders a subscription's events by it, so a test's next change is made after it.
 */
export async function nextSecond(): Promise<void> {
  await new Promise((resolve) => setTimeout(resolve, 1000 - (Date.now() % 1000) + 10));
}

export async function eventually<T>(what: string, check: () => Promise<T | undefined | null | false>, timeoutMs = 20_000): Promise<T> {
  const deadline = Date.now() + timeoutMs;
  let last: unknown;
  for (;;) {
    try {
      const value = await check();
      if (value) return value;
    } catch (err) {
      last = err;
    }
    if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}${last ? `: ${String(last)}` : ""}`);
    await new Promise((resolve) => setTimeout(resolve, 100));
  }
}

/** A Supabase-style HS256 access token for `sub`, issued now. */
export function userToken(sub: string, email: string): string {
  const now = Math.floor(Date.now() / 1000);
  const encode = (part: object) => Buffer.from(JSON.stringify(part)).toString("base64url");
  const head = encode({ alg: "HS256", typ: "JWT" });
  const body = encode({ sub, email, email_verified: true, aud: "authenticated", role: "authenticated", iat: now, exp: now + 3600 });
  const signature = createHmac("sha256", JWT_SECRET).update(`${head}.${body}`).digest("base64url");
  return `${head}.${body}.${signature}`;
}

/** A new person of the app: their id, address and access token. */
export function person(): { id: string; email: string; token: string } {
  const id = unique("user");
  const email = `${id}@example.com`;
  return { id, email, token: userToken(id, email) };
}

/** A plans file (free by default, pro for `proPrice`) in a temporary directory: its path. */
export function writePlans(proPrice: string): string {
  const path = join(mkdtempSync(join(tmpdir(), "billsync-plans-")), "plans.toml");
  writeFileSync(
    path,
    `default_plan = "free"
[[plans]]
id = "free"
features = ["projects"]
limits = { projects = 1 }
[[plans]]
id = "pro"
prices = ["${proPrice}"]
features = ["projects", "exports"]
limits = { projects = 50 }
`,
  );
  return path;
}

/** Starts `server` on a free loopback port: its base URL. */
export async function listen(server: http.Server): Promise<string> {
  await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
  return `http://127.0.0.1:${(server.address() as AddressInfo).port}`;
}

function readBody(req: http.IncomingMessage): Promise<Buffer> {
  return new Promise((resolve, reject) => {
    const chunks: Buffer[] = [];
    req.on("data", (chunk: Buffer) => chunks.push(chunk));
    req.on("end", () => resolve(Buffer.concat(chunks)));
    req.on("error", reject);
  });
}

/** A request billsync sent to Stripe, as the stand-in saw it. */
export interface StripeRequest {
  method: string;
  path: string;
  form: URLSearchParams;
  headers: http.IncomingHttpHeaders;
}

/** localstripe, with billing-portal sessions added (localstripe has none). */
export class StripeStandIn {
  readonly requests: StripeRequest[] = [];
  /** While set, Stripe answers these paths 500 (an outage). */
  outage: RegExp | null = null;
  private constructor(
    readonly url: string,
    readonly localstripe: string,
    private readonly server: http.Server,
  ) {}

  static async start(localstripe: string): Promise<StripeStandIn> {
    let self: StripeStandIn | undefined;
    const server = http.createServer(async (req, res) => {
      const body = await readBody(req);
      const path = (req.url ?? "/").split("?")[0] ?? "/";
      const form = new URLSearchParams(body.toString("utf8"));
      self?.requests.push({ method: req.method ?? "GET", path, form, headers: req.headers });
      if (self?.outage?.test(path)) {
        res.writeHead(500, { "content-type": "application/json" });
        res.end(JSON.stringify({ error: { type: "api_error", message: "An unknown error occurred" } }));
        return;
      }
      if (req.method === "POST" && path === "/v1/billing_portal/sessions") {
        const id = `bps_${randomBytes(8).toString("hex")}`;
        res.writeHead(200, { "content-type": "application/json", "request-id": `req_${id}` });
        res.end(
          JSON.stringify({
            id,
            object: "billing_portal.session",
            customer: form.get("customer"),
            return_url: form.get("return_url"),
            url: `https://billing.stripe.com/p/session/test_${id}`,
            livemode: false,
            created: Math.floor(Date.now() / 1000),
          }),
        );
        return;
      }
      const headers: Record<string, string> = {};
      for (const [name, value] of Object.entries(req.headers)) {
        if (typeof value === "string" && name !== "host" && name !== "content-length") headers[name] = value;
      }
      try {
        const upstream = await fetch(localstripe + req.url, {
          method: req.method,
          headers,
          body: req.method === "GET" || req.method === "HEAD" ? undefined : Uint8Array.from(body),
        });
        res.writeHead(upstream.status, { "content-type": upstream.headers.get("content-type") ?? "application/json" });
        res.end(Buffer.from(await upstream.arrayBuffer()));
      } catch {
        res.writeHead(502).end();
      }
    });
    self = new StripeStandIn(await listen(server), localstripe, server);
    return self;
  }

  /** A call on localstripe itself, as the Dashboard or another app would make it. */
  async stripe(method: string, path: string, form?: Record<string, string>): Promise<any> {
    const response = await fetch(this.localstripe + path, {
      method,
      headers: { authorization: `Bearer ${STRIPE_KEY}`, "content-type": "application/x-www-form-urlencoded" },
      body: form ? new URLSearchParams(form).toString() : undefined,
    });
    const body = await response.json();
    if (!response.ok) throw new Error(`localstripe ${method} ${path}: ${response.status} ${JSON.stringify(body)}`);
    return body;
  }

  /**
   * Subscribes `customer` to a monthly plan `price`, created here (once per price), paying
   * with a test card: localstripe then sends `customer.subscription.created`.
   */
  async subscribe(customer: string, price: string): Promise<any> {
    await this.stripe("POST", "/v1/plans", { id: price, amount: "1000", currency: "usd", interval: "month", "product[name]": "Pro" });
    const card = await this.stripe("POST", "/v1/tokens", {
      "card[number]": "4242424242424242",
      "card[exp_month]": "12",
      "card[exp_year]": "2030",
      "card[cvc]": "123",
    });
    await this.stripe("POST", `/v1/customers/${customer}/sources`, { source: card.id });
    return this.stripe("POST", "/v1/subscriptions", { customer, "items[0][plan]": price });
  }

  /** Has localstripe send its signed events to `url` (localstripe cannot unregister one). */
  async sendEventsTo(url: string): Promise<() => Promise<void>> {
    const name = unique("hook");
    const register = async (form: Record<string, string>) => {
      const response = await fetch(`${this.localstripe}/_config/webhooks/${name}`, {
        method: "POST",
        headers: { "content-type": "application/x-www-form-urlencoded" },
        body: new URLSearchParams(form).toString(),
      });
      if (!response.ok) throw new Error(`localstripe webhook registration: ${response.status}`);
    };
    await register({ url, secret: STRIPE_WEBHOOK_SECRET });
    return () => register({ url: "http://127.0.0.1:9/", secret: "whsec_muted", "events[]": "none.none" });
  }

  /**
   * Delivers a Stripe event of `type` about `object` to billsync, signed as Stripe signs: for
   * what localstripe never sends (it has no `customer.subscription.updated`).
   */
  async deliverEvent(billsyncUrl: string, type: string, object: unknown): Promise<void> {
    const created = Math.floor(Date.now() / 1000);
    const body = JSON.stringify({
      id: `evt_${randomBytes(12).toString("hex")}`,
      object: "event",
      type,
      created,
      livemode: false,
      api_version: "2025-08-27.basil",
      data: { object },
    });
    const v1 = createHmac("sha256", STRIPE_WEBHOOK_SECRET).update(`${created}.${body}`).digest("hex");
    const response = await fetch(`${billsyncUrl}/api/webhooks/stripe`, {
      method: "POST",
      headers: { "content-type": "application/json", "stripe-signature": `t=${created},v1=${v1}` },
      body,
    });
    if (!response.ok) throw new Error(`billsync refused the ${type} event: ${response.status} ${await response.text()}`);
  }

  stop(): Promise<void> {
    return new Promise((resolve) => this.server.close(() => resolve()));
  }
}

export interface BillsyncProcess {
  url: string;
  stripe: StripeStandIn;
  stop(): Promise<void>;
}

/** Starts billsync on a fresh SQLite database, with localstripe (through the stand-in) as Stripe. */
export async function startBillsync(env: Record<string, string> = {}): Promise<BillsyncProcess> {
  const binary = required("BILLSYNC_BIN");
  const stripe = await StripeStandIn.start(required("BILLSYNC_TEST_LOCALSTRIPE_URL"));
  const dir = mkdtempSync(join(tmpdir(), "billsync-node-"));
  const child: ChildProcess = spawn(binary, ["serve"], {
    env: {
      PATH: process.env.PATH ?? "",
      RUST_LOG: "info",
      DATABASE_URL: `sqlite://${join(dir, "billsync.db")}`,
      // Port 0: billsync binds a free port and logs it (no race for a port picked beforehand).
      BILLSYNC_LISTEN: "127.0.0.1:0",
      STRIPE_SECRET_KEY: STRIPE_KEY,
      BILLSYNC_STRIPE_API_BASE: stripe.url,
      BILLSYNC_STRIPE_TIMEOUT_MS: "5000",
      BILLSYNC_ADMIN_API_KEY: ADMIN_KEY,
      BILLSYNC_JWT_SECRET: JWT_SECRET,
      APP_URL,
      STRIPE_WEBHOOK_SECRET,
      BILLSYNC_OUTBOX_DEBOUNCE_MS: "50",
      BILLSYNC_OUTBOX_POLL_MS: "50",
      BILLSYNC_OUTBOX_BACKOFF_BASE_MS: "200",
      ...env,
    },
    stdio: ["ignore", "pipe", "pipe"],
  });
  let output = "";
  child.stdout?.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
  child.stderr?.on("data", (chunk: Buffer) => (output += chunk.toString("utf8")));
  const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
  const stop = async () => {
    if (child.exitCode === null) child.kill("SIGTERM");
    await exited;
    await stripe.stop();
    rmSync(dir, { recursive: true, force: true });
  };
  let url: string;
  try {
    url = await eventually("billsync to be ready", async () => {
      if (child.exitCode !== null) throw new Error(`billsync exited (${child.exitCode}):\n${output}`);
      const port = /billsync serving listen=127\.0\.0\.1:(\d+)/.exec(output)?.[1];
      if (!port) return undefined;
      const response = await fetch(`http://127.0.0.1:${port}/readyz`).catch(() => undefined);
      return response?.ok ? `http://127.0.0.1:${port}` : undefined;
    });
  } catch (err) {
    await stop();
    throw err;
  }
  return { url, stripe, stop };
}

/** A web-standard handler (a Next.js route handler's shape). */
export type Handler = (request: Request) => Promise<Response>;

/**
 * Serves `handler` on a loopback port, each Node request turned into a real `Request` and
 * the `Response` written back: how billsync's app-event deliveries reach a route handler.
 */
export async function serveHandler(handler: Handler): Promise<{ url: string; stop(): Promise<void> }> {
  const server = http.createServer(async (req, res) => {
    const body = await readBody(req);
    const headers = new Headers();
    for (const [name, value] of Object.entries(req.headers)) {
      if (typeof value === "string") headers.set(name, value);
    }
    const request = new Request(`http://127.0.0.1${req.url ?? "/"}`, {
      method: req.method,
      headers,
      body: req.method === "GET" || req.method === "HEAD" ? undefined : Uint8Array.from(body),
    });
    try {
      const response = await handler(request);
      res.writeHead(response.status, Object.fromEntries(response.headers));
      res.end(Buffer.from(await response.arrayBuffer()));
    } catch (err) {
      res.writeHead(500).end(String(err));
    }
  });
  const url = await listen(server);
  return {
    url,
    stop: () =>
      new Promise((resolve) => {
        server.closeAllConnections();
        server.close(() => resolve());
      }),
  };
}
