// The spec's lib/customer-management.ts. billsync looks in its links, then Stripe's metadata,
// then by email (exact, verified addresses only), and creates the customer only then: once,
// however many requests race, with an idempotency key. The link is billsync's to keep.
import { BillsyncError } from "@billsync/client";
import { billsync } from "./billsync.js";

export async function getOrCreateStripeCustomer(
  userId: string,
  userEmail: string,
  // Supabase: `emailVerified: user.email_confirmed_at != null`. billsync links an existing
  // customer by email only for a verified address: anyone can type someone else's.
  userProfile?: { firstName?: string; lastName?: string; emailVerified?: boolean },
): Promise<string> {
  try {
    // A user billsync knows keeps the profile it holds.
    return (await billsync().resolveCustomer(userId)).customer_id;
  } catch (err) {
    if (!(err instanceof BillsyncError) || err.code !== "user_not_found") throw err;
  }
  const user = {
    email: userEmail,
    email_verified: userProfile?.emailVerified ?? false,
    first_name: userProfile?.firstName,
    last_name: userProfile?.lastName,
  };
  return (await billsync().resolveCustomer(userId, user)).customer_id;
}
