// App events: what billsync changed, delivered to the app as Standard Webhooks or pulled with
// `Billsync.listAppEvents`. Each type's `data` is the server's declaration, from the generated
// schema; the set of types is checked against the server's at compile time, so a type the
// server adds fails this package's type check until it is paired with its data here.
import { Webhook, WebhookVerificationError } from "standardwebhooks";
import type { components } from "./schema.js";

type Schemas = components["schemas"];

/** How a user came to be linked to their Stripe customer. */
export type LinkSource = Schemas["LinkSource"];

/** A subscription as billsync mirrors it, in `subscription.*` events. */
export type SubscriptionSnapshot = Schemas["SubscriptionSnapshot"];

/** The user as `user.updated` shows them (the admin API's shape, without timestamps). */
export type UserSnapshot = Schemas["UserSnapshot"];

/** A field of the profile billsync syncs: `user.updated`'s `changed` names them. */
export type ProfileField = Exclude<keyof UserSnapshot, "id" | "version">;

/** `subscription.created`, `.updated` and `.deleted`. */
export type SubscriptionChange = Omit<Schemas["SubscriptionChangeData"], "previous"> & {
  /** The old values of the fields of `subscription` that changed (empty for a new one). */
  previous: Partial<SubscriptionSnapshot>;
};

/**
 * Every app event type with its `data`: the shapes are the server's own declarations, from
 * the generated schema; only the pairing of type and shape is written here.
 */
export interface AppEventData {
  "customer.linked": Schemas["CustomerLinkedData"];
  /** `reason: "deleted_in_stripe"`: the customer was deleted in Stripe (the Dashboard, the API). */
  "customer.unlinked": Schemas["CustomerUnlinkedData"];
  /** A real change of a profile field; never the echo of billsync's own push to Stripe. */
  "user.updated": Omit<Schemas["UserUpdatedData"], "changed"> & { changed: ProfileField[] };
  "subscription.created": SubscriptionChange;
  "subscription.updated": SubscriptionChange;
  "subscription.deleted": SubscriptionChange;
  /** The plan computed from the user's subscriptions moved. */
  "plan.changed": Schemas["PlanChangedData"];
  /** A person was erased: named only by a keyed hash of their id. */
  "user.erased": Schemas["UserErasedData"];
  /** A job towards Stripe was parked after its last attempt; an operator can retry it. */
  "sync.failed": Schemas["SyncFailedData"];
}

export type AppEventType = keyof AppEventData;

/** One app event: narrow on `type` to get its `data`. */
export type AppEvent = {
  [T in AppEventType]: {
    /** The `webhook-id`: the same on every delivery of this event; dedup on it. */
    id: string;
    type: T;
    /** When the change committed (RFC 3339). */
    timestamp: string;
    data: AppEventData[T];
  };
}[AppEventType];

/** An app event of one type. */
export type AppEventOf<T extends AppEventType> = Extract<AppEvent, { type: T }>;

// The server's list of types and this one must be the same set.
type Same<A, B> = [A] extends [B] ? ([B] extends [A] ? true : false) : false;
const sameTypesAsServer: Same<AppEventType, Schemas["AppEventType"]> = true;
void sameTypesAsServer;

/** Why a delivery was refused. */
export type VerificationFailure = "headers" | "timestamp" | "signature" | "payload";

/**
 * A delivery that is not billsync's: forged, altered, replayed after the five-minute
 * tolerance, or missing its headers. Answer it with a 4xx and do not act on it.
 */
export class AppEventVerificationError extends Error {
  override readonly name = "AppEventVerificationError";
  constructor(
    readonly reason: VerificationFailure,
    message: string,
    options?: { cause?: unknown },
  ) {
    super(message, options);
  }
}

/** Request headers in any of the usual shapes: `Headers`, or Node's `IncomingHttpHeaders`. */
export type HeadersLike = Headers | Record<string, string | string[] | undefined>;

const SIGNED_HEADERS = ["webhook-id", "webhook-timestamp", "webhook-signature"] as const;

function signedHeaders(headers: HeadersLike): Record<string, string> {
  // Duck-typed: a `Headers` from another realm or a polyfill is not `instanceof Headers`.
  const get =
    typeof headers.get === "function"
      ? (name: string) => (headers as Headers).get(name)
      : (name: string) => {
          for (const [key, value] of Object.entries(headers as Record<string, string | string[] | undefined>)) {
            if (key.toLowerCase() !== name) continue;
            // A repeated signature header carries more signatures; an id or timestamp has one.
            if (Array.isArray(value)) return name === "webhook-signature" ? value.join(" ") : (value[0] ?? null);
            return value ?? null;
          }
          return null;
        };
  const out: Record<string, string> = {};
  for (const name of SIGNED_HEADERS) {
    const value = get(name);
    if (value !== null) out[name] = value;
  }
  return out;
}

function reasonOf(message: string): VerificationFailure {
  if (message.includes("timestamp")) return "timestamp";
  if (message.includes("headers") || message.includes("Headers")) return "headers";
  return "signature";
}

/**
 * Verifies a delivery of billsync's app events with the official Standard Webhooks library
 * and returns the event, typed. `payload` is the raw body exactly as received (parse nothing
 * before this). `secret` is `BILLSYNC_APP_WEBHOOK_SECRET`'s `whsec_…` value, or several during
 * a rotation (the delivery is genuine when one of them signed it).
 *
 * Throws `AppEventVerificationError` for anything not signed by billsync within the last
 * five minutes. Deliveries are at least once: dedup on `event.id`.
 */
export function verifyAppEvent(
  payload: string | Uint8Array,
  headers: HeadersLike,
  secret: string | readonly string[],
): AppEvent {
  const secrets = typeof secret === "string" ? [secret] : secret;
  if (secrets.length === 0) throw new TypeError("verifyAppEvent needs at least one secret");
  // A secret that is not one is the app's configuration error: said loudly, whatever the delivery.
  const webhooks = secrets.map((key, i) => {
    try {
      return new Webhook(key);
    } catch (err) {
      throw new TypeError(`verifyAppEvent: secret ${i + 1} is not a Standard Webhooks secret (whsec_ and base64)`, { cause: err });
    }
  });
  const signed = signedHeaders(headers);
  let failure: unknown;
  for (const webhook of webhooks) {
    let parsed: unknown;
    try {
      parsed = webhook.verify(payload, signed);
    } catch (err) {
      if (!(err instanceof WebhookVerificationError)) {
        if (err instanceof SyntaxError) {
          throw new AppEventVerificationError("payload", "the signed body is not JSON", { cause: err });
        }
        throw err;
      }
      const reason = reasonOf(err.message);
      // The headers and the timestamp are the same whichever key is tried.
      if (reason !== "signature") throw new AppEventVerificationError(reason, err.message, { cause: err });
      failure = err;
      continue;
    }
    if (!isAppEvent(parsed)) {
      throw new AppEventVerificationError("payload", "the signed body is not an app event");
    }
    return parsed;
  }
  throw new AppEventVerificationError("signature", "no signature matches the secret", { cause: failure });
}

/**
 * `verifyAppEvent` for a route handler's `Request` (Next.js, Remix, workers, Deno): reads the
 * raw body once and verifies it.
 */
export async function receiveAppEvent(
  request: Request,
  secret: string | readonly string[],
): Promise<AppEvent> {
  const body = new Uint8Array(await request.arrayBuffer());
  return verifyAppEvent(body, request.headers, secret);
}

function isAppEvent(value: unknown): value is AppEvent {
  if (typeof value !== "object" || value === null) return false;
  const event = value as Record<string, unknown>;
  return (
    typeof event.id === "string" &&
    typeof event.type === "string" &&
    typeof event.timestamp === "string" &&
    typeof event.data === "object" &&
    event.data !== null
  );
}
