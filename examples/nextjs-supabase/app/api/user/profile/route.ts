// PUT /api/user/profile: the person edits their profile; billsync stores it and pushes it to
// their Stripe customer, durably (the spec's route plus syncUserProfileToStripe).
import { updateProfile } from "../../../../lib/customer-sync.js";
import type { ProfileUpdate } from "@billsync/client";
import { accessToken, errorResponse, json, jsonBody, unauthorized } from "../../../../lib/http.js";

export async function PUT(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  const body = await jsonBody(request, { nullAllowed: false });
  if (body instanceof Response) return body;
  try {
    // billsync checks each field (types, E.164, lengths) and names the one it refuses.
    const { firstName, lastName, phone } = body as ProfileUpdate;
    return json({ data: await updateProfile(token, { firstName, lastName, phone }) });
  } catch (err) {
    return errorResponse(err);
  }
}
