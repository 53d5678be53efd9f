// PUT /api/user/profile: the person edits their profile; billsync stores it and pushes it to
// their Stripe customer, durably (the spec's route plus syncUserProfileToStripe).
import { updateProfile } from "../../../../lib/customer-sync.js";
import { accessToken, errorResponse, json, unauthorized } from "../../../../lib/http.js";

export async function PUT(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  let body: { firstName?: string | null; lastName?: string | null; phone?: string | null };
  try {
    body = await request.json();
  } catch {
    return json({ error: { code: "invalid_json", message: "the body is not JSON" } }, 400);
  }
  try {
    const { firstName, lastName, phone } = body;
    return json({ data: await updateProfile(token, { firstName, lastName, phone }) });
  } catch (err) {
    return errorResponse(err);
  }
}
