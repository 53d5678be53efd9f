// POST /api/billing/create-portal-session: a Stripe billing-portal session for the person,
// returning to ${APP_URL}/billing (billsync's setting), optionally straight into one flow.
import type { PortalFlow } from "@billsync/client";
import { billsync } from "../../../../lib/billsync.js";
import { accessToken, errorResponse, json, jsonBody, unauthorized } from "../../../../lib/http.js";

export async function POST(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  const body = await jsonBody(request, { nullAllowed: true });
  if (body instanceof Response) return body;
  try {
    return json({ url: await billsync().asUser(token).createPortalSession(body.flow as PortalFlow | undefined) });
  } catch (err) {
    return errorResponse(err);
  }
}
