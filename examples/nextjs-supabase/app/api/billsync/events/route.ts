// POST /api/billsync/events: billsync's app events (BILLSYNC_APP_WEBHOOK_URL), verified with
// the official Standard Webhooks library. They replace the spec's Stripe webhook handlers:
// billsync receives Stripe's webhooks, matches customers to users, drops its own echoes and
// orders them; the app hears what changed, per user in commit order.
import { AppEventVerificationError, receiveAppEvent, type AppEvent } from "@billsync/client";
import { appDb } from "../../../../lib/app-db.js";
import { applyUserUpdated } from "../../../../lib/customer-sync.js";
import { notifyUserOfCustomerDeletion } from "../../../../lib/notifications.js";

export async function POST(request: Request): Promise<Response> {
  const secret = process.env.BILLSYNC_APP_WEBHOOK_SECRET;
  if (!secret) throw new Error("BILLSYNC_APP_WEBHOOK_SECRET is not set");
  let event: AppEvent;
  try {
    event = await receiveAppEvent(request, secret);
  } catch (err) {
    if (err instanceof AppEventVerificationError) return new Response(`refused: ${err.reason}`, { status: 400 });
    throw err;
  }
  // At least once: an event already handled is acknowledged again.
  if (appDb.handledEvents.has(event.id)) return new Response(null, { status: 204 });
  // A failure here answers 500 and billsync delivers the event again, after a backoff.
  await handle(event);
  appDb.handledEvents.add(event.id);
  return new Response(null, { status: 204 });
}

async function handle(event: AppEvent): Promise<void> {
  // billsync deletes an erased person's events, but one may already be on its way.
  if ("user_id" in event.data && appDb.erased.has(event.data.user_id)) return;
  switch (event.type) {
    case "user.updated":
      // The spec's handleCustomerUpdated: an edit in the portal or the Dashboard.
      if (event.data.origin === "stripe") applyUserUpdated(event);
      return;
    case "customer.linked": {
      const { user_id, customer_id } = event.data;
      appDb.updatePlan(user_id, { stripe_customer_id: customer_id });
      return;
    }
    case "customer.unlinked": {
      // The spec's handleCustomerDeleted.
      const { user_id, reason } = event.data;
      if (appDb.plans.has(user_id)) appDb.updatePlan(user_id, { stripe_customer_id: null });
      if (reason === "deleted_in_stripe") await notifyUserOfCustomerDeletion(user_id);
      return;
    }
    case "plan.changed": {
      const { user_id, plan, features, limits } = event.data;
      appDb.updatePlan(user_id, { plan, features: features ?? [], limits: limits ?? {} });
      return;
    }
    default:
      // subscription.*, user.erased, sync.failed: nothing this app keeps.
      return;
  }
}
