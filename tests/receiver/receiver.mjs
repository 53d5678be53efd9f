// The app's side of billsync's app-event tests: an HTTP server that verifies every delivery
// with the official Standard Webhooks library, as an app would, and remembers what came.
//
//   node receiver.mjs <port> <whsec_secret>     prints "listening <port>" once it listens
//   RECEIVER_VERIFY=0 node receiver.mjs …       benchmarks only: accept without verifying,
//                                               to tell billsync's cost from this process's
//
// POST /hook          a delivery: verified, recorded, answered as the mode says
// POST /_mode         {"mode": "ok" | "fail" | "hang" | "alternate"}: 204, 500, no answer at
//                     all, or 500 and 204 in turn (500 first); each delivery is recorded with
//                     the answer it got as its mode ("ok", "fail" or "hang")
// GET  /_received     every delivery so far: {id, type, key, verified, error, headers, body}
// POST /_verify       {"body", "headers", "shift_secs"}: verifies a recorded delivery again
//                     with the clock moved by shift_secs (a replay), or a tampered copy
// GET  /_stats        {"accepted", "distinct", "unverified", "lag_ms"}: for benchmarks; lag_ms
//                     is each accepted delivery's arrival minus its event's timestamp
import http from "node:http";
import { Webhook } from "standardwebhooks";

const [port, secret] = process.argv.slice(2);
const webhook = new Webhook(secret);
const verifying = process.env.RECEIVER_VERIFY !== "0";
const received = [];
let mode = "ok";
let alternated = 0;
// Kept as deliveries arrive: benchmarks poll /_stats while tens of thousands arrive, and a
// pass over all of them per poll would cost this process more than the deliveries do.
const totals = { accepted: 0, unverified: 0, ids: new Set(), lags: [] };

function verify(body, headers, shiftSecs = 0) {
  const realNow = Date.now;
  if (shiftSecs) Date.now = () => realNow() + shiftSecs * 1000;
  try {
    webhook.verify(body, headers);
    return { verified: true, error: null };
  } catch (err) {
    return { verified: false, error: String(err.message ?? err) };
  } finally {
    Date.now = realNow;
  }
}

function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    req.on("data", (c) => chunks.push(c));
    req.on("end", () => resolve(Buffer.concat(chunks).toString("utf8")));
    req.on("error", reject);
  });
}

function json(res, status, value) {
  res.writeHead(status, { "content-type": "application/json" });
  res.end(JSON.stringify(value));
}

const server = http.createServer(async (req, res) => {
  const body = await readBody(req);
  if (req.method === "POST" && req.url === "/hook") {
    const headers = {
      "webhook-id": req.headers["webhook-id"],
      "webhook-timestamp": req.headers["webhook-timestamp"],
      "webhook-signature": req.headers["webhook-signature"],
    };
    const check = verifying ? verify(body, headers) : { verified: true, error: null };
    let parsed = {};
    try {
      parsed = JSON.parse(body);
    } catch {}
    const data = parsed.data ?? {};
    const at = Date.now();
    const answer = mode === "alternate" ? (alternated++ % 2 === 0 ? "fail" : "ok") : mode;
    received.push({
      lag_ms: parsed.timestamp ? at - Date.parse(parsed.timestamp) : null,
      id: parsed.id ?? null,
      type: parsed.type ?? null,
      key: data.user_id ?? (data.subject ? `erased:${data.subject}` : null),
      mode: answer,
      ...check,
      headers,
      body,
    });
    if (answer === "ok") {
      totals.accepted += 1;
      totals.ids.add(parsed.id);
      totals.lags.push(received.at(-1).lag_ms);
    }
    if (!check.verified) totals.unverified += 1;
    if (answer === "hang") return; // never answered: the sender's timeout ends it
    res.writeHead(answer === "fail" ? 500 : 204);
    res.end();
    return;
  }
  if (req.method === "POST" && req.url === "/_mode") {
    mode = JSON.parse(body).mode;
    alternated = 0;
    return json(res, 200, { mode });
  }
  if (req.method === "GET" && req.url === "/_received") {
    return json(res, 200, received);
  }
  if (req.method === "GET" && req.url.startsWith("/_stats")) {
    const { accepted, unverified } = totals;
    const stats = { accepted, distinct: totals.ids.size, unverified };
    if (req.url.includes("lag=1")) stats.lag_ms = totals.lags;
    return json(res, 200, stats);
  }
  if (req.method === "POST" && req.url === "/_verify") {
    const { body: payload, headers, shift_secs } = JSON.parse(body);
    return json(res, 200, verify(payload, headers, shift_secs ?? 0));
  }
  json(res, 404, { error: "no such route" });
});

server.listen(Number(port), "127.0.0.1", () => {
  console.log(`listening ${server.address().port}`);
});
