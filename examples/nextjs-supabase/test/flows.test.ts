// Every flow of the spec, through the example's own route handlers and modules, called with
// real `Request` objects against a real billsync and localstripe; billsync's app events reach
// the example's events route over HTTP, signed.
import assert from "node:assert/strict";
import { after, before, describe, it } from "node:test";
import { Webhook } from "standardwebhooks";

import {
  ADMIN_KEY,
  APP_URL,
  APP_WEBHOOK_SECRET,
  eventually,
  person,
  serveHandler,
  startBillsync,
  unique,
  writePlans,
  type BillsyncProcess,
} from "../../../clients/typescript/test/support/world.js";
import { POST as portalRoute } from "../app/api/billing/create-portal-session/route.js";
import { POST as eventsRoute } from "../app/api/billsync/events/route.js";
import { DELETE as deleteRoute } from "../app/api/user/delete-account/route.js";
import { GET as exportRoute } from "../app/api/user/export-data/route.js";
import { PUT as profileRoute } from "../app/api/user/profile/route.js";
import { appDb } from "../lib/app-db.js";
import { getOrCreateStripeCustomer } from "../lib/customer-management.js";
import { sentNotifications } from "../lib/notifications.js";

const PRO_PRICE = unique("price_pro");

let server: BillsyncProcess;
let events: { url: string; stop(): Promise<void> };
let muteStripe: () => Promise<void>;
/** Every delivery billsync made to the events route, as it arrived. */
const deliveries: Request[] = [];

before(async () => {
  events = await serveHandler(async (request) => {
    deliveries.push(request.clone());
    return eventsRoute(request);
  });
  server = await startBillsync({
    BILLSYNC_APP_WEBHOOK_URL: `${events.url}/api/billsync/events`,
    BILLSYNC_APP_WEBHOOK_SECRET: APP_WEBHOOK_SECRET,
    BILLSYNC_PLANS_FILE: writePlans(PRO_PRICE),
  });
  process.env.BILLSYNC_URL = server.url;
  process.env.BILLSYNC_ADMIN_API_KEY = ADMIN_KEY;
  process.env.BILLSYNC_APP_WEBHOOK_SECRET = APP_WEBHOOK_SECRET;
  // Stripe's webhooks go to billsync, as `billsync stripe setup` arranges in production.
  muteStripe = await server.stripe.sendEventsTo(`${server.url}/api/webhooks/stripe`);
});

after(async () => {
  await muteStripe?.();
  await server?.stop();
  await events?.stop();
});

async function findDelivery(matches: (body: string) => boolean): Promise<Request> {
  for (const delivery of deliveries) {
    if (matches(await delivery.clone().text())) return delivery;
  }
  throw new Error("no such delivery");
}

function call(method: string, path: string, token: string | null, body?: unknown): Request {
  return callWithText(method, path, token, body === undefined ? undefined : JSON.stringify(body));
}

/** A request whose body is this text as it is (JSON or not). */
function callWithText(method: string, path: string, token: string | null, text?: string): Request {
  const headers = new Headers({ "content-type": "application/json" });
  if (token) headers.set("authorization", `Bearer ${token}`);
  return new Request(`${APP_URL}${path}`, { method, headers, body: text });
}

/** The `code` of an error answer. */
async function errorCode(response: Response): Promise<string> {
  return ((await response.json()) as { error: { code: string } }).error.code;
}

async function customersWithEmail(email: string): Promise<{ id: string }[]> {
  return (await server.stripe.stripe("GET", `/v1/customers?email=${encodeURIComponent(email)}`)).data;
}

describe("getOrCreateStripeCustomer", () => {
  it("creates a new user's customer, and the app hears the link", async () => {
    const { id, email } = person();
    const customerId = await getOrCreateStripeCustomer(id, email, { firstName: "Ada", lastName: "Lovelace" });
    assert.match(customerId, /^cus_/);
    const customer = await server.stripe.stripe("GET", `/v1/customers/${customerId}`);
    assert.equal(customer.email, email);
    assert.equal(customer.name, "Ada Lovelace");
    await eventually("customer.linked at the app", async () => appDb.plans.get(id)?.stripe_customer_id === customerId);
  });

  it("makes one customer for two racing first requests, and finds it for a returning user", async () => {
    const { id, email } = person();
    const [first, second] = await Promise.all([getOrCreateStripeCustomer(id, email), getOrCreateStripeCustomer(id, email)]);
    assert.equal(first, second);
    assert.equal(await getOrCreateStripeCustomer(id, email), first);
    assert.deepEqual((await customersWithEmail(email)).map((c) => c.id), [first]);
  });

  it("falls back to the customer Stripe already has for a verified email", async () => {
    const { id, email } = person();
    const existing = await server.stripe.stripe("POST", "/v1/customers", { email });
    assert.equal(await getOrCreateStripeCustomer(id, email, { emailVerified: true }), existing.id);
    assert.deepEqual((await customersWithEmail(email)).map((c) => c.id), [existing.id]);
  });
});

describe("PUT /api/user/profile", () => {
  it("saves the profile and billsync pushes it to Stripe", async () => {
    const { id, email, token } = person();
    const customerId = await getOrCreateStripeCustomer(id, email);
    const response = await profileRoute(call("PUT", "/api/user/profile", token, { firstName: "Katherine", lastName: "Johnson", phone: "+14155550100" }));
    assert.equal(response.status, 200);
    const { data } = (await response.json()) as { data: { id: string; first_name: string } };
    assert.equal(data.id, id);
    assert.equal(data.first_name, "Katherine");
    await eventually("the push to Stripe", async () => {
      const customer = await server.stripe.stripe("GET", `/v1/customers/${customerId}`);
      return customer.name === "Katherine Johnson" && customer.phone === "+14155550100";
    });
  });

  it("hears an edit made in Stripe (the portal, the Dashboard) and updates the app's user", async () => {
    const { id, email, token } = person();
    const customerId = await getOrCreateStripeCustomer(id, email);
    await profileRoute(call("PUT", "/api/user/profile", token, { firstName: "Dorothy" }));
    // The person's own edit reaches Stripe first; the Dashboard edit comes after it.
    await eventually("the push to Stripe", async () => (await server.stripe.stripe("GET", `/v1/customers/${customerId}`)).name === "Dorothy");
    await server.stripe.stripe("POST", `/v1/customers/${customerId}`, { name: "Dorothy Vaughan", phone: "+14155550199" });
    await eventually("user.updated at the app", async () => {
      const user = appDb.users.get(id);
      return user?.first_name === "Dorothy" && user.last_name === "Vaughan" && user.phone === "+14155550199";
    });
  });

  it("checks the body as billsync does: not JSON, not an object, null where allowed", async () => {
    const { token } = person();
    for (const [body, status, expected] of [
      ["{not json", 400, "invalid_json"],
      ["null", 422, "invalid_request"],
      ["[1]", 422, "invalid_request"],
    ] as const) {
      const response = await profileRoute(callWithText("PUT", "/api/user/profile", token, body));
      assert.equal(response.status, status, body);
      assert.equal(await errorCode(response), expected, body);
    }
    // The portal route takes null as no options, as billsync does: this person has no customer.
    const portal = await portalRoute(callWithText("POST", "/api/billing/create-portal-session", token, "null"));
    assert.equal(portal.status, 404);
    assert.equal(await errorCode(portal), "no_customer");
  });

  it("passes billsync's errors on: unauthorized, invalid_profile", async () => {
    const unauthenticated = await profileRoute(call("PUT", "/api/user/profile", null, { firstName: "X" }));
    assert.equal(unauthenticated.status, 401);
    const { token } = person();
    const invalid = await profileRoute(call("PUT", "/api/user/profile", token, { phone: "12345" }));
    assert.equal(invalid.status, 422);
    assert.equal(await errorCode(invalid), "invalid_profile");
    const forged = await profileRoute(call("PUT", "/api/user/profile", `${token.slice(0, -4)}AAAA`, { firstName: "X" }));
    assert.equal(forged.status, 401);
  });
});

describe("POST /api/billing/create-portal-session", () => {
  it("opens the portal for a person with a customer, into a flow when asked", async () => {
    const { id, email, token } = person();
    const missing = await portalRoute(call("POST", "/api/billing/create-portal-session", token, {}));
    assert.equal(missing.status, 404);
    assert.equal(await errorCode(missing), "no_customer");

    const customerId = await getOrCreateStripeCustomer(id, email);
    const response = await portalRoute(call("POST", "/api/billing/create-portal-session", token, { flow: "payment_method_update" }));
    assert.equal(response.status, 200);
    const { url } = (await response.json()) as { url: string };
    assert.match(url, /^https:\/\/billing\.stripe\.com\//);
    const sent = server.stripe.requests.filter((r) => r.path === "/v1/billing_portal/sessions").at(-1);
    assert.equal(sent?.form.get("customer"), customerId);
    assert.equal(sent?.form.get("return_url"), `${APP_URL}/billing`);
    assert.equal(sent?.form.get("flow_data[type]"), "payment_method_update");
  });
});

describe("GET /api/user/export-data", () => {
  it("downloads what billsync and Stripe hold about the person", async () => {
    const { id, email, token } = person();
    const customerId = await getOrCreateStripeCustomer(id, email);
    const response = await exportRoute(call("GET", "/api/user/export-data", token));
    assert.equal(response.status, 200);
    assert.equal(response.headers.get("content-disposition"), `attachment; filename="customer-data-${id}.json"`);
    const document = (await response.json()) as { user_profile: { id: string }; stripe_customer: { id: string } };
    assert.equal(document.user_profile.id, id);
    assert.equal(document.stripe_customer.id, customerId);

    const again = await exportRoute(call("GET", "/api/user/export-data", token));
    assert.equal(again.status, 429);
    assert.ok(Number(again.headers.get("retry-after")) > 0);
  });
});

describe("DELETE /api/user/delete-account", () => {
  it("keeps a scrubbed customer by default and deletes the app's rows", async () => {
    const { id, email, token } = person();
    const customerId = await getOrCreateStripeCustomer(id, email, { firstName: "Mary" });
    await eventually("the link at the app", async () => appDb.plans.has(id));
    const response = await deleteRoute(call("DELETE", "/api/user/delete-account", token, {}));
    assert.equal(response.status, 200);
    assert.deepEqual(await response.json(), { success: true, message: "Account deleted successfully" });
    const customer = await server.stripe.stripe("GET", `/v1/customers/${customerId}`);
    assert.notEqual(customer.deleted, true);
    assert.ok(!customer.email && !customer.name, "scrubbed");
    assert.equal(appDb.plans.has(id), false);

    // The old token cannot bring the person back.
    const replay = await profileRoute(call("PUT", "/api/user/profile", token, { firstName: "Mary" }));
    assert.equal(replay.status, 410);

    // Nor can an event about them that was already on its way.
    const late = { id: "msg_late_" + id, type: "plan.changed", timestamp: new Date().toISOString(),
      data: { user_id: id, plan: "pro", previous_plan: "free", features: ["projects"], limits: {} } };
    const body = JSON.stringify(late);
    const at = new Date(); // one instant for the signature and its header
    const signature = new Webhook(APP_WEBHOOK_SECRET).sign(late.id, at, body);
    const delivered = await eventsRoute(new Request(`${APP_URL}/api/billsync/events`, {
      method: "POST",
      headers: { "webhook-id": late.id, "webhook-timestamp": String(Math.floor(at.getTime() / 1000)), "webhook-signature": signature },
      body,
    }));
    assert.equal(delivered.status, 204);
    assert.equal(appDb.plans.has(id), false);
  });

  it("deletes the customer in Stripe when asked", async () => {
    const { id, email, token } = person();
    const customerId = await getOrCreateStripeCustomer(id, email);
    const response = await deleteRoute(call("DELETE", "/api/user/delete-account", token, { deleteFromStripe: true }));
    assert.equal(response.status, 200);
    const gone = await server.stripe.stripe("GET", `/v1/customers/${customerId}`).then(
      (c: { deleted?: boolean }) => c.deleted === true,
      () => true,
    );
    assert.ok(gone, "the customer is deleted in Stripe");
  });
});

describe("billsync's app events at /api/billsync/events", () => {
  it("tells the person once when their customer is deleted in Stripe, however often it is delivered", async () => {
    const { id, email } = person();
    const customerId = await getOrCreateStripeCustomer(id, email);
    await eventually("the link at the app", async () => appDb.plans.get(id)?.stripe_customer_id === customerId);
    await server.stripe.stripe("DELETE", `/v1/customers/${customerId}`);
    await eventually("notifyUserOfCustomerDeletion", async () => sentNotifications.some((n) => n.userId === id));
    assert.equal(appDb.plans.get(id)?.stripe_customer_id, null);

    // At least once: the same delivery again is acknowledged and changes nothing.
    const unlinked = await findDelivery((text) => text.includes('"customer.unlinked"') && text.includes(id));
    const again = await eventsRoute(unlinked.clone());
    assert.equal(again.status, 204);
    assert.equal(sentNotifications.filter((n) => n.userId === id).length, 1);
  });

  it("updates the app's plan when a subscription moves it", async () => {
    const { id, email } = person();
    const customerId = await getOrCreateStripeCustomer(id, email);
    await server.stripe.subscribe(customerId, PRO_PRICE);
    const plan = await eventually("plan.changed at the app", async () => {
      const p = appDb.plans.get(id);
      return p?.plan === "pro" ? p : undefined;
    });
    assert.deepEqual(plan.features, ["projects", "exports"]);
    assert.deepEqual(plan.limits, { projects: 50 });
  });

  it("refuses a delivery that billsync did not sign", async () => {
    const forged = new Request(`${APP_URL}/api/billsync/events`, {
      method: "POST",
      headers: { "webhook-id": "msg_forged", "webhook-timestamp": String(Math.floor(Date.now() / 1000)), "webhook-signature": "v1,AAAA" },
      body: JSON.stringify({ id: "msg_forged", type: "plan.changed", timestamp: new Date().toISOString(), data: {} }),
    });
    const response = await eventsRoute(forged);
    assert.equal(response.status, 400);
    assert.equal(appDb.handledEvents.has("msg_forged"), false);
  });
});
