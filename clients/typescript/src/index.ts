// billsync's HTTP API, typed. `schema.ts` is generated from the server's own OpenAPI
// document (`scripts/client-types.sh`); CI regenerates it and fails on a difference.
export type { paths, components, operations } from "./schema.js";
import type { components } from "./schema.js";

type Schemas = components["schemas"];

/** `{"error": {"code", "message"}}`: every failure billsync answers. */
export type ErrorBody = Schemas["ErrorBody"];
/** A user as the admin API returns them. */
export type User = Schemas["UserView"];
/** The billing read: customer, plan and mirrored subscriptions. */
export type Billing = Schemas["BillingView"];
/** One row's result of `POST /v1/users/batch`. */
export type UserBatchResult = Schemas["UserBatchResult"];
