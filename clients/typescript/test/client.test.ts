// The client against a real billsync (and localstripe): every wrapped route, every error
// mapping, and verifyAppEvent on genuine, tampered and stale deliveries.
import assert from "node:assert/strict";
import { getEventListeners } from "node:events";
import http from "node:http";
import { after, before, describe, it } from "node:test";
import { Webhook } from "standardwebhooks";

import {
  AppEventVerificationError,
  Billsync,
  BillsyncError,
  receiveAppEvent,
  verifyAppEvent,
  type AppEvent,
  type AppEventData,
  type AppEventType,
  type SubscriptionSnapshot,
  type UserSnapshot,
} from "../src/index.js";
import { parseRetryAfter } from "../src/errors.js";
import {
  ADMIN_KEY,
  APP_URL,
  APP_WEBHOOK_SECRET,
  eventually,
  listen,
  nextSecond,
  person,
  serveHandler,
  startBillsync,
  unique,
  userToken,
  writePlans,
  type BillsyncProcess,
} from "./support/world.js";

/** What billsync delivered to the app: raw body and headers, as the app's route gets them. */
interface Delivery {
  body: Uint8Array<ArrayBuffer>;
  headers: Headers;
}

let server: BillsyncProcess;
let receiver: { url: string; stop(): Promise<void> };
const deliveries: Delivery[] = [];
let billsync: Billsync;
let muteStripe: () => Promise<void>;
const PRO_PRICE = unique("price_pro");

before(async () => {
  receiver = await serveHandler(async (request) => {
    deliveries.push({ body: new Uint8Array(await request.arrayBuffer()), headers: request.headers });
    return new Response(null, { status: 204 });
  });
  server = await startBillsync({
    BILLSYNC_APP_WEBHOOK_URL: `${receiver.url}/billsync`,
    BILLSYNC_APP_WEBHOOK_SECRET: APP_WEBHOOK_SECRET,
    BILLSYNC_STRIPE_MAX_RETRIES: "0",
    // A failed push is parked at once, so that sync.failed can be seen.
    BILLSYNC_OUTBOX_MAX_ATTEMPTS: "1",
    BILLSYNC_PLANS_FILE: writePlans(PRO_PRICE),
  });
  muteStripe = await server.stripe.sendEventsTo(`${server.url}/api/webhooks/stripe`);
  billsync = new Billsync({ baseUrl: server.url, adminKey: ADMIN_KEY });
});

after(async () => {
  await muteStripe?.();
  await server?.stop();
  await receiver?.stop();
});

/** Asserts `promise` rejects with a `BillsyncError` of this code and status, and returns it. */
async function rejectsWith(promise: Promise<unknown>, code: string, status: number): Promise<BillsyncError> {
  try {
    await promise;
  } catch (err) {
    assert.ok(err instanceof BillsyncError, `expected a BillsyncError, got ${String(err)}`);
    assert.equal(err.code, code, err.message);
    assert.equal(err.status, status);
    assert.ok(err.requestId, "every error carries the request id");
    return err;
  }
  assert.fail(`expected ${code}, but the call succeeded`);
}

/** A `fetch` that records the request id each call sent and the one billsync answered with. */
function recordingFetch() {
  const sent: string[] = [];
  const echoed: (string | null)[] = [];
  const fetchRecording: typeof fetch = async (input, init) => {
    sent.push(new Headers(init?.headers).get("x-request-id") ?? "");
    const response = await fetch(input, init);
    echoed.push(response.headers.get("x-request-id"));
    return response;
  };
  return { fetch: fetchRecording, sent, echoed };
}

/** A Standard Webhooks secret billsync does not sign with. */
const OTHER_SECRET = "whsec_" + Buffer.from("another secret of 32 bytes long!").toString("base64");

describe("admin calls", () => {
  it("upserts and reads a user", async () => {
    const { id, email } = person();
    const user = await billsync.upsertUser(id, { email, first_name: "Ada", last_name: "Lovelace" });
    assert.equal(user.id, id);
    assert.equal(user.first_name, "Ada");
    assert.equal(user.version, 1);

    const read = await billsync.getUser(id);
    assert.equal(read.user.email, email);
    assert.equal(read.customer, null);
    assert.deepEqual(read.subscriptions, []);
  });

  it("maps billsync's validation errors", async () => {
    const { id } = person();
    const err = await rejectsWith(billsync.upsertUser(id, { email: "not an email" }), "invalid_email", 422);
    assert.equal(err.retryAfter, null);
    assert.equal(err.retryable, false);
    assert.deepEqual(err.toJSON().error.code, "invalid_email");
  });

  it("says user_not_found for a user billsync does not hold", async () => {
    await rejectsWith(billsync.getUser(unique("nobody")), "user_not_found", 404);
    await rejectsWith(billsync.getBilling(unique("nobody")), "user_not_found", 404);
  });

  it("resolves a new user's customer once, then finds it again", async () => {
    const { id, email } = person();
    const first = await billsync.resolveCustomer(id, { email, first_name: "Grace" });
    assert.equal(first.source, "created");
    assert.match(first.customer_id, /^cus_/);
    const again = await billsync.resolveCustomer(id);
    assert.deepEqual(again, { customer_id: first.customer_id, source: "existing" });

    const customer = await server.stripe.stripe("GET", `/v1/customers/${first.customer_id}`);
    assert.equal(customer.email, email);
    assert.equal(customer.name, "Grace");

    const billing = await billsync.getBilling(id);
    assert.equal(billing.user_id, id);
    assert.equal(billing.customer?.id, first.customer_id);
  });

  it("links a customer that already exists in Stripe by its email", async () => {
    const { id, email } = person();
    const existing = await server.stripe.stripe("POST", "/v1/customers", { email });
    // Only a verified address links: anyone can sign up with someone else's.
    const resolved = await billsync.resolveCustomer(id, { email, email_verified: true });
    assert.deepEqual(resolved, { customer_id: existing.id, source: "stripe_email" });
  });

  it("answers 503 stripe_unavailable with Retry-After while Stripe is down, and nothing is linked", async () => {
    const { id, email } = person();
    server.stripe.outage = /^\/v1\/customers/;
    try {
      const err = await rejectsWith(billsync.resolveCustomer(id, { email }), "stripe_unavailable", 503);
      assert.equal(err.retryAfter, 1);
      assert.equal(err.retryable, true);
    } finally {
      server.stripe.outage = null;
    }
    assert.equal((await billsync.getUser(id)).customer, null);
    assert.equal((await billsync.resolveCustomer(id)).source, "created");
  });

  it("imports a batch, one result per row", async () => {
    const a = person();
    const b = person();
    const answer = await billsync.importUsers([
      { id: a.id, email: a.email },
      { id: b.id, email: "nope" },
    ]);
    assert.deepEqual(
      answer.results.map((r) => [r.id, r.status, r.error?.code ?? null]),
      [
        [a.id, "created", null],
        [b.id, "invalid", "invalid_email"],
      ],
    );
    assert.equal(answer.summary.created, 1);
    assert.equal(answer.summary.invalid, 1);

    const tooMany = Array.from({ length: 1001 }, (_, i) => ({ id: `${a.id}-${i}`, email: a.email }));
    await rejectsWith(billsync.importUsers(tooMany), "invalid_request", 422);
  });

  it("pages app events in order and follows the cursor", async () => {
    const { id, email } = person();
    const { customer_id } = await billsync.resolveCustomer(id, { email });
    let cursor: string | null = null;
    const seen: AppEvent[] = [];
    const linked = await eventually("the customer.linked event", async () => {
      for (;;) {
        const page = await billsync.listAppEvents({ after: cursor, limit: 50 });
        seen.push(...page.events);
        if (page.events.length === 0) {
          // Nothing newer: the cursor to ask with again is the one just used.
          assert.equal(page.nextCursor, cursor);
          break;
        }
        assert.ok(page.nextCursor && page.nextCursor !== cursor);
        cursor = page.nextCursor;
      }
      return seen.find((e) => e.type === "customer.linked" && e.data.user_id === id);
    });
    assert.ok(linked.type === "customer.linked");
    assert.equal(linked.data.customer_id, customer_id);
    assert.equal(linked.data.source, "created");
    assert.equal(new Set(seen.map((e) => e.id)).size, seen.length, "no event twice");

    await rejectsWith(billsync.listAppEvents({ after: "not-a-cursor" }), "invalid_request", 422);
  });

  it("sends its own request id, which billsync keeps and the error carries", async () => {
    const { fetch, sent, echoed } = recordingFetch();
    const recording = new Billsync({ baseUrl: server.url, adminKey: ADMIN_KEY, fetch });
    const err = await rejectsWith(recording.getUser(unique("nobody")), "user_not_found", 404);
    assert.equal(sent.length, 1);
    assert.match(sent[0] ?? "", /^[0-9a-f-]{36}$/);
    assert.deepEqual(echoed, sent, "billsync kept the caller's id");
    assert.equal(err.requestId, sent[0]);
  });

  it("leaves no listener on a long-lived signal the calls share", async () => {
    const shutdown = new AbortController();
    for (let i = 0; i < 15; i++) {
      await billsync.getUser(unique("nobody"), { signal: shutdown.signal }).catch(() => undefined);
      await billsync.upsertUser(unique("user"), { email: "a@example.com" }, { signal: shutdown.signal });
    }
    assert.equal(getEventListeners(shutdown.signal, "abort").length, 0);
  });

  it("makes its request id without crypto.randomUUID (a browser page over plain http)", async () => {
    const { fetch, sent } = recordingFetch();
    const recording = new Billsync({ baseUrl: server.url, adminKey: ADMIN_KEY, fetch });
    const original = Object.getOwnPropertyDescriptor(Object.getPrototypeOf(crypto), "randomUUID");
    Object.defineProperty(crypto, "randomUUID", { value: undefined, configurable: true });
    try {
      const err = await rejectsWith(recording.getUser(unique("nobody")), "user_not_found", 404);
      assert.match(sent[0] ?? "", /^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
      assert.equal(err.requestId, sent[0]);
    } finally {
      delete (crypto as { randomUUID?: unknown }).randomUUID;
      assert.ok(original && typeof crypto.randomUUID === "function", "randomUUID restored");
    }
  });

  it("says unauthorized for a wrong admin key, and for user calls without one", async () => {
    const wrong = new Billsync({ baseUrl: server.url, adminKey: "wrong-admin-key-0123456789" });
    await rejectsWith(wrong.getUser("anyone"), "unauthorized", 401);
    const none = new Billsync({ baseUrl: server.url });
    await rejectsWith(none.listAppEvents(), "unauthorized", 401);
  });
});

describe("user calls", () => {
  it("updates the profile, and billsync pushes it to the customer", async () => {
    const { id, email, token } = person();
    const { customer_id } = await billsync.resolveCustomer(id, { email });
    const me = billsync.asUser(token);
    const profile = await me.updateProfile({ firstName: "Katherine", lastName: "Johnson", phone: "+14155550100" });
    assert.equal(profile.id, id);
    assert.equal(profile.first_name, "Katherine");
    assert.equal(profile.phone, "+14155550100");
    await eventually("the push to Stripe", async () => {
      const customer = await server.stripe.stripe("GET", `/v1/customers/${customer_id}`);
      return customer.name === "Katherine Johnson" && customer.phone === "+14155550100";
    });

    const err = await rejectsWith(me.updateProfile({ phone: "12345" }), "invalid_profile", 422);
    assert.match(err.message, /phone/);
  });

  it("reads the person's billing", async () => {
    const { id, email, token } = person();
    const { customer_id } = await billsync.resolveCustomer(id, { email });
    const billing = await billsync.asUser(token).getBilling();
    assert.equal(billing.user_id, id);
    assert.equal(billing.customer?.id, customer_id);
    assert.deepEqual(billing.subscriptions, []);
  });

  it("opens a portal session, deep-linked into a flow", async () => {
    const { id, email, token } = person();
    const me = billsync.asUser(token);
    await rejectsWith(me.createPortalSession(), "no_customer", 404);

    const { customer_id } = await billsync.resolveCustomer(id, { email });
    const url = await me.createPortalSession("payment_method_update");
    assert.match(url, /^https:\/\/billing\.stripe\.com\/p\/session\//);
    const sent = server.stripe.requests.filter((r) => r.path === "/v1/billing_portal/sessions").at(-1);
    assert.ok(sent);
    assert.equal(sent.form.get("customer"), customer_id);
    assert.equal(sent.form.get("return_url"), `${APP_URL}/billing`);
    assert.equal(sent.form.get("flow_data[type]"), "payment_method_update");

    // Cancelling needs a subscription to cancel.
    await rejectsWith(me.createPortalSession("subscription_cancel"), "no_subscription", 409);
  });

  it("exports the person's data as a download, then rate limits with Retry-After", async () => {
    const { id, email, token } = person();
    await billsync.resolveCustomer(id, { email });
    const me = billsync.asUser(token);
    const response = await me.exportData();
    assert.equal(response.headers.get("content-disposition"), `attachment; filename="customer-data-${id}.json"`);
    const document = (await response.json()) as { export_version: string; user_profile: { id: string } };
    assert.equal(document.export_version, "3.0");
    assert.equal(document.user_profile.id, id);

    const err = await rejectsWith(me.exportData(), "rate_limited", 429);
    assert.ok(err.retryAfter !== null && err.retryAfter > 0 && err.retryAfter <= 300, `retryAfter ${err.retryAfter}`);
    assert.equal(err.retryable, true);
  });

  it("deletes the account; the old token then answers account_erased", async () => {
    const { id, email, token } = person();
    const { customer_id } = await billsync.resolveCustomer(id, { email });
    const me = billsync.asUser(token);
    assert.deepEqual(await me.deleteAccount({ deleteFromStripe: true }), { status: "deleted" });
    const customer = await server.stripe.stripe("GET", `/v1/customers/${customer_id}`).catch((e: Error) => e);
    assert.ok(customer instanceof Error || customer.deleted === true, "the customer is deleted in Stripe");
    await rejectsWith(me.getBilling(), "account_erased", 410);
    await rejectsWith(billsync.getUser(id), "user_not_found", 404);
  });

  it("keeps a scrubbed customer when the person does not ask for Stripe deletion", async () => {
    const { id, email, token } = person();
    const { customer_id } = await billsync.resolveCustomer(id, { email, first_name: "Mary" });
    assert.deepEqual(await billsync.asUser(token).deleteAccount(), { status: "deleted" });
    const customer = await server.stripe.stripe("GET", `/v1/customers/${customer_id}`);
    assert.notEqual(customer.deleted, true);
    // Cleared with "": Stripe then answers null, localstripe keeps "".
    assert.ok(!customer.email, `email ${customer.email}`);
    assert.ok(!customer.name, `name ${customer.name}`);
  });

  it("says unauthorized for a token billsync did not sign for", async () => {
    const forged = `${userToken("mallory", "m@example.com").slice(0, -4)}AAAA`;
    await rejectsWith(billsync.asUser(forged).getBilling(), "unauthorized", 401);
  });
});

describe("transport failures", () => {
  async function rawServer(answer: (res: http.ServerResponse) => void) {
    const s = http.createServer((_req, res) => answer(res));
    return {
      url: await listen(s),
      stop: () => {
        s.closeAllConnections();
        return new Promise((resolve) => s.close(resolve));
      },
    };
  }

  /** Runs `use` against a server that answers as `answer` says (or never), then closes it. */
  async function against(answer: (res: http.ServerResponse) => void, use: (url: string) => Promise<void>) {
    const fake = await rawServer(answer);
    try {
      await use(fake.url);
    } finally {
      await fake.stop();
    }
  }
  const silence = () => undefined;

  it("network_error when billsync cannot be reached", async () => {
    const closed = await rawServer(silence);
    await closed.stop();
    const client = new Billsync({ baseUrl: closed.url, adminKey: ADMIN_KEY });
    const err = await rejectsWith(client.getUser("u"), "network_error", 0);
    assert.equal(err.retryable, true);
  });

  it("timeout when billsync does not answer in time", async () => {
    await against(silence, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY, timeoutMs: 200 });
      await rejectsWith(client.getUser("u"), "timeout", 0);
    });
  });

  it("aborted when the caller gives up", async () => {
    await against(silence, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      const controller = new AbortController();
      const call = client.getUser("u", { signal: controller.signal });
      controller.abort();
      await rejectsWith(call, "aborted", 0);
    });
  });

  it("unexpected_response for an answer that is not billsync's, keeping status and Retry-After", async () => {
    await against((res) => {
      res.writeHead(503, { "content-type": "text/html", "retry-after": "7", "x-request-id": "proxy-req-1" });
      res.end("<html>Service Unavailable</html>");
    }, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      const err = await rejectsWith(client.getUser("u"), "unexpected_response", 503);
      assert.equal(err.retryAfter, 7);
      assert.equal(err.requestId, "proxy-req-1");
    });
  });

  it("aborted when the caller gives up with a reason of its own", async () => {
    await against(silence, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      const controller = new AbortController();
      const call = client.getUser("u", { signal: controller.signal });
      controller.abort(new Error("the page was closed"));
      const err = await rejectsWith(call, "aborted", 0);
      assert.equal(err.retryable, false);
    });
  });

  it("timeout when the answer's body stops arriving", async () => {
    await against((res) => {
      res.writeHead(200, { "content-type": "application/json" });
      res.write('{"user": {"id": "u"');
    }, async (url) => {
      let headersArrived = false;
      const client = new Billsync({
        baseUrl: url,
        adminKey: ADMIN_KEY,
        timeoutMs: 300,
        fetch: async (input, init) => {
          const response = await fetch(input, init);
          headersArrived = true;
          return response;
        },
      });
      await rejectsWith(client.getUser("u"), "timeout", 0);
      assert.ok(headersArrived, "the timeout struck while the body was read");
    });
  });

  it("network_error when the connection breaks in the middle of the answer", async () => {
    await against((res) => {
      res.writeHead(200, { "content-type": "application/json", "content-length": "200" });
      res.write('{"user": {"id": "u"');
      setTimeout(() => res.socket?.destroy(), 50);
    }, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      const err = await rejectsWith(client.getUser("u"), "network_error", 0);
      assert.equal(err.retryable, true);
    });
  });

  it("calls a 503 for a feature switched off not retryable, and a proxy's 502 retryable", async () => {
    let answer: [number, string] = [503, JSON.stringify({ error: { code: "admin_disabled", message: "no admin key is configured" } })];
    await against((res) => {
      res.writeHead(answer[0], { "content-type": "application/json" });
      res.end(answer[1]);
    }, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      assert.equal((await rejectsWith(client.getUser("u"), "admin_disabled", 503)).retryable, false);
      answer = [502, "Bad Gateway"];
      assert.equal((await rejectsWith(client.getUser("u"), "unexpected_response", 502)).retryable, true);
      answer = [500, JSON.stringify({ error: { code: "internal", message: "internal error" } })];
      assert.equal((await rejectsWith(client.getUser("u"), "internal", 500)).retryable, false);
    });
  });

  it("unexpected_response for a 2xx that is not JSON", async () => {
    await against((res) => {
      res.writeHead(200, { "content-type": "text/html" });
      res.end("<html>hello</html>");
    }, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      await rejectsWith(client.getUser("u"), "unexpected_response", 200);
    });
  });

  it("exposes Retry-After wherever billsync sends it (409 resolve_in_progress)", async () => {
    await against((res) => {
      res.writeHead(409, { "content-type": "application/json", "retry-after": "1" });
      res.end(JSON.stringify({ error: { code: "resolve_in_progress", message: "another instance is resolving this user" } }));
    }, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY });
      const err = await rejectsWith(client.resolveCustomer("u"), "resolve_in_progress", 409);
      assert.equal(err.retryAfter, 1);
      assert.equal(err.retryable, true);
    });
  });

  it("does not cut off an export's download at timeoutMs", async () => {
    await against((res) => {
      res.writeHead(200, { "content-type": "application/json", "content-disposition": 'attachment; filename="x.json"' });
      res.write('{"export_version": "3.0", "rows": [');
      let sent = 0;
      const more = setInterval(() => {
        res.write(sent++ === 0 ? "1" : ",1");
        if (sent === 5) {
          clearInterval(more);
          res.end("]}");
        }
      }, 100);
    }, async (url) => {
      const client = new Billsync({ baseUrl: url, adminKey: ADMIN_KEY, timeoutMs: 200 });
      const response = await client.asUser("token").exportData();
      assert.deepEqual(await response.json(), { export_version: "3.0", rows: [1, 1, 1, 1, 1] });
      // The same slow body on an ordinary call is bounded.
      await rejectsWith(client.getUser("u"), "timeout", 0);
    });
  });

  it("reads Retry-After as seconds or as an HTTP date", () => {
    assert.equal(parseRetryAfter("120"), 120);
    assert.equal(parseRetryAfter(null), null);
    assert.equal(parseRetryAfter("soon"), null);
    const now = Date.parse("2026-12-06T12:00:00Z");
    assert.equal(parseRetryAfter("Sun, 06 Dec 2026 12:00:30 GMT", now), 30);
    assert.equal(parseRetryAfter("Sun, 06 Dec 2026 11:00:00 GMT", now), 0);
  });
});

describe("verifyAppEvent", () => {
  /** A genuine delivery of `customer.linked` for a new user, as billsync sent it. */
  async function genuineDelivery(): Promise<{ delivery: Delivery; userId: string }> {
    const { id, email } = person();
    await billsync.resolveCustomer(id, { email });
    const delivery = await eventually("the delivery", async () =>
      deliveries.find((d) => new TextDecoder().decode(d.body).includes(`"user_id":"${id}"`)),
    );
    return { delivery, userId: id };
  }

  it("accepts a genuine delivery and types it", async () => {
    const { delivery, userId } = await genuineDelivery();
    const event = verifyAppEvent(delivery.body, delivery.headers, APP_WEBHOOK_SECRET);
    assert.equal(event.type, "customer.linked");
    if (event.type !== "customer.linked") return;
    assert.equal(event.data.user_id, userId);
    assert.equal(event.data.source, "created");
    assert.equal(event.id, delivery.headers.get("webhook-id"));

    // Node's header object and a request object work the same; so does a list of secrets.
    const nodeHeaders = Object.fromEntries(delivery.headers);
    assert.equal(verifyAppEvent(new TextDecoder().decode(delivery.body), nodeHeaders, APP_WEBHOOK_SECRET).id, event.id);
    assert.equal(verifyAppEvent(delivery.body, delivery.headers, [OTHER_SECRET, APP_WEBHOOK_SECRET]).id, event.id);
    const request = new Request("http://app.example.com/api/billsync", {
      method: "POST",
      headers: delivery.headers,
      body: delivery.body,
    });
    assert.equal((await receiveAppEvent(request, APP_WEBHOOK_SECRET)).id, event.id);
  });

  it("reads Node's header shapes: repeated signature headers as a list", async () => {
    const { delivery } = await genuineDelivery();
    const foreign = new Webhook(OTHER_SECRET).sign(delivery.headers.get("webhook-id") ?? "", new Date(), delivery.body);
    const nodeHeaders: Record<string, string | string[] | undefined> = {
      "webhook-id": delivery.headers.get("webhook-id") ?? "",
      "webhook-timestamp": [delivery.headers.get("webhook-timestamp") ?? ""],
      "webhook-signature": [foreign, delivery.headers.get("webhook-signature") ?? ""],
      "content-type": "application/json",
    };
    assert.equal(verifyAppEvent(delivery.body, nodeHeaders, APP_WEBHOOK_SECRET).type, "customer.linked");
  });

  it("says so when a configured secret is not one, rather than refusing every delivery", async () => {
    const { delivery } = await genuineDelivery();
    assert.throws(
      () => verifyAppEvent(delivery.body, delivery.headers, [APP_WEBHOOK_SECRET, "whsec_!!!"]),
      (err: unknown) => err instanceof TypeError && /secret 2/.test(err.message),
    );
  });

  it("refuses a tampered delivery", async () => {
    const { delivery, userId } = await genuineDelivery();
    const tampered = new TextDecoder().decode(delivery.body).replace(userId, "someone-else");
    assert.throws(
      () => verifyAppEvent(tampered, delivery.headers, APP_WEBHOOK_SECRET),
      (err: unknown) => err instanceof AppEventVerificationError && err.reason === "signature",
    );
  });

  it("refuses a delivery signed with another secret", async () => {
    const { delivery } = await genuineDelivery();
    assert.throws(
      () => verifyAppEvent(delivery.body, delivery.headers, OTHER_SECRET),
      (err: unknown) => err instanceof AppEventVerificationError && err.reason === "signature",
    );
  });

  it("refuses a stale delivery replayed after the tolerance", async (t) => {
    const { delivery } = await genuineDelivery();
    t.mock.timers.enable({ apis: ["Date"], now: Date.now() + 6 * 60 * 1000 });
    assert.throws(
      () => verifyAppEvent(delivery.body, delivery.headers, APP_WEBHOOK_SECRET),
      (err: unknown) => err instanceof AppEventVerificationError && err.reason === "timestamp",
    );
  });

  it("refuses a delivery without its headers", async () => {
    const { delivery } = await genuineDelivery();
    const headers = new Headers(delivery.headers);
    headers.delete("webhook-signature");
    assert.throws(
      () => verifyAppEvent(delivery.body, headers, APP_WEBHOOK_SECRET),
      (err: unknown) => err instanceof AppEventVerificationError && err.reason === "headers",
    );
  });
});

describe("app event types", () => {
  // Every field each type's `data` declares, and no other: TypeScript refuses a missing or an
  // extra key here, and the test below compares them with what billsync sends.
  const fields: { [T in AppEventType]: Record<keyof AppEventData[T], true> } = {
    "customer.linked": { user_id: true, customer_id: true, source: true },
    "customer.unlinked": { user_id: true, customer_id: true, reason: true },
    "user.updated": { user_id: true, origin: true, changed: true, user: true },
    "subscription.created": { user_id: true, customer_id: true, subscription: true, previous: true },
    "subscription.updated": { user_id: true, customer_id: true, subscription: true, previous: true },
    "subscription.deleted": { user_id: true, customer_id: true, subscription: true, previous: true },
    "plan.changed": { user_id: true, plan: true, previous_plan: true, features: true, limits: true },
    "user.erased": { subject: true },
    "sync.failed": { user_id: true, job_id: true, kind: true, attempts: true, error_code: true },
  };
  const subscriptionFields: Record<keyof SubscriptionSnapshot, true> = {
    id: true,
    customer_id: true,
    status: true,
    items: true,
    cancel_at_period_end: true,
    cancel_at: true,
    canceled_at: true,
    ended_at: true,
    current_period_end: true,
  };
  const userFields: Record<keyof UserSnapshot, true> = {
    id: true,
    email: true,
    email_verified: true,
    first_name: true,
    last_name: true,
    phone: true,
    version: true,
  };
  const keys = (value: unknown) => Object.keys(value as object).sort();

  it("billsync sends every type with exactly the fields the union declares", async () => {
    // Each type from its real cause.
    const { id, email, token } = person();
    await billsync.upsertUser(id, { email, first_name: "Ada" });
    const { customer_id } = await billsync.resolveCustomer(id); // customer.linked
    await billsync.upsertUser(id, { email, first_name: "Augusta" }); // user.updated
    await eventually("the push of the new name", async () => {
      return (await server.stripe.stripe("GET", `/v1/customers/${customer_id}`)).name === "Augusta";
    });
    const subscription = await server.stripe.subscribe(customer_id, PRO_PRICE); // subscription.created, plan.changed
    await eventually("the subscription in billsync", async () => (await billsync.getBilling(id)).subscriptions.length === 1);
    await nextSecond();
    const updated = await server.stripe.stripe("POST", `/v1/subscriptions/${subscription.id}`, { cancel_at_period_end: "true" });
    // localstripe sends no customer.subscription.updated: Stripe would.
    await server.stripe.deliverEvent(server.url, "customer.subscription.updated", updated); // .updated
    await eventually("the update in billsync", async () => (await billsync.getBilling(id)).subscriptions[0]?.cancel_at_period_end);
    await nextSecond();
    await server.stripe.stripe("DELETE", `/v1/subscriptions/${subscription.id}`); // .deleted
    await eventually("the plan back to free", async () => (await billsync.getBilling(id)).plan?.id === "free");

    const seen = new Map<AppEventType, AppEvent>();
    let cursor: string | null = null;
    const other = person();
    const collect = async () => {
      for (;;) {
        const page = await billsync.listAppEvents({ after: cursor, limit: 1000 });
        for (const event of page.events) {
          const about = "user_id" in event.data ? event.data.user_id : null;
          if (about === id || about === other.id || event.type === "user.erased") seen.set(event.type, event);
        }
        cursor = page.nextCursor;
        if (page.events.length === 0) return;
      }
    };

    // A push that Stripe refuses to take is parked at once here: sync.failed.
    server.stripe.outage = /^\/v1\/customers\//;
    try {
      await billsync.asUser(token).updateProfile({ lastName: "King" });
      await eventually("the parked push", async () => {
        await collect();
        return seen.has("sync.failed");
      });
    } finally {
      server.stripe.outage = null;
    }
    // The cursor is now past earlier tests' erasures: only this test's counts below.
    seen.delete("user.erased");

    // customer.unlinked: a second person's customer is deleted in Stripe. Read before they
    // are erased below: an erasure deletes the person's own events.
    const linked = await billsync.resolveCustomer(other.id, { email: other.email });
    await server.stripe.stripe("DELETE", `/v1/customers/${linked.customer_id}`);
    await eventually("customer.unlinked", async () => {
      await collect();
      return seen.has("customer.unlinked");
    });
    // user.erased: the second person deletes their account.
    await billsync.asUser(other.token).deleteAccount();
    await eventually("one event of every type", async () => {
      await collect();
      return seen.size === Object.keys(fields).length;
    });
    assert.deepEqual([...seen.keys()].sort(), Object.keys(fields).sort());
    for (const [type, event] of seen) {
      assert.deepEqual(keys(event.data), keys(fields[type]), type);
      assert.match(event.timestamp, /^\d{4}-\d\d-\d\dT/);
      if ("subscription" in event.data) assert.deepEqual(keys(event.data.subscription), keys(subscriptionFields), type);
      if (event.type === "user.updated") assert.deepEqual(keys(event.data.user), keys(userFields));
    }
  });
});
