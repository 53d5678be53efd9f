// DELETE /api/user/delete-account: the person's erasure (GDPR). billsync cancels their
// subscriptions, deletes or scrubs their customer, deletes its rows and keeps a tombstone;
// the app deletes its own rows and signs the person out.
import { appDb } from "../../../../lib/app-db.js";
import { billsync } from "../../../../lib/billsync.js";
import { accessToken, errorResponse, json, jsonBody, subjectOf, unauthorized } from "../../../../lib/http.js";

export async function DELETE(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  const body = await jsonBody(request, { nullAllowed: true });
  if (body instanceof Response) return body;
  try {
    const deleteFromStripe = body.deleteFromStripe as boolean | undefined;
    const { status } = await billsync().asUser(token).deleteAccount({ deleteFromStripe });
    appDb.forget(subjectOf(token));
    // With @supabase/ssr: await supabase.auth.signOut()
    return status === "deleted"
      ? json({ success: true, message: "Account deleted successfully" })
      : json({ success: true, status: "pending" }, 202);
  } catch (err) {
    return errorResponse(err);
  }
}
