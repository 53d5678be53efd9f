// POST /api/billing/create-portal-session: a Stripe billing-portal session for the person,
// returning to ${APP_URL}/billing (billsync's setting), optionally straight into one flow.
import type { PortalFlow } from "@billsync/client";
import { billsync } from "../../../../lib/billsync.js";
import { accessToken, errorResponse, invalidBody, json, jsonObject, unauthorized } from "../../../../lib/http.js";

export async function POST(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  const body = await jsonObject(request);
  if (!body) return invalidBody();
  try {
    return json({ url: await billsync().asUser(token).createPortalSession(body.flow as PortalFlow | undefined) });
  } catch (err) {
    return errorResponse(err);
  }
}
