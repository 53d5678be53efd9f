// The spec's lib/customer-sync.ts, both directions.
import type { AppEventOf, ProfileUpdate } from "@billsync/client";
import { appDb } from "./app-db.js";
import { billsync } from "./billsync.js";

/**
 * App → Stripe: the person's profile edit. billsync stores it and queues its push to Stripe in
 * one transaction, retries the push until it lands, and never lets a late echo revert it.
 */
export async function updateProfile(token: string, update: ProfileUpdate) {
  const profile = await billsync().asUser(token).updateProfile(update);
  appDb.saveUser(profile);
  return profile;
}

/**
 * Stripe → app: the spec's `handleCustomerUpdated`. billsync has already matched the customer
 * to the user, dropped its own echoes and applied the change in order; the app copies it.
 */
export function applyUserUpdated(event: AppEventOf<"user.updated">): void {
  appDb.saveUser(event.data.user);
}
