// GET /api/user/export-data: everything billsync and Stripe hold about the person, streamed
// through as billsync answers it (a download named customer-data-<id>.json).
import { billsync } from "../../../../lib/billsync.js";
import { accessToken, errorResponse, unauthorized } from "../../../../lib/http.js";

export async function GET(request: Request): Promise<Response> {
  const token = accessToken(request);
  if (!token) return unauthorized();
  try {
    const exported = await billsync().asUser(token).exportData();
    return new Response(exported.body, {
      headers: {
        "content-type": "application/json",
        "content-disposition": exported.headers.get("content-disposition") ?? "attachment",
      },
    });
  } catch (err) {
    return errorResponse(err);
  }
}
