// DELETE /api/user/delete-account: the person's erasure (GDPR). billsync cancels their
// subscriptions, deletes or scrubs their customer, deletes its rows and keeps a tombstone;
// the app deletes its own rows and signs the person out.
import { appDb } from "../../../../lib/app-db.js";
import { billsync } from "../../../../lib/billsync.js";
import { accessToken, errorResponse, json, subjectOf, unauthorized } from "../../../../lib/http.js";

export async function DELETE(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  const { deleteFromStripe = false } = (await request.json().catch(() => ({}))) as { deleteFromStripe?: boolean };
  try {
    const { status } = await billsync().asUser(token).deleteAccount({ deleteFromStripe });
    const userId = subjectOf(token);
    appDb.users.delete(userId);
    appDb.plans.delete(userId);
    // With @supabase/ssr: await supabase.auth.signOut()
    return status === "deleted"
      ? json({ success: true, message: "Account deleted successfully" })
      : json({ success: true, status: "pending" }, 202);
  } catch (err) {
    return errorResponse(err);
  }
}
