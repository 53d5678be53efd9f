// billsync's HTTP API, typed. `schema.ts` is generated from the server's own OpenAPI
// document (`scripts/client-types.sh`); CI regenerates it and fails on a difference.
export { Billsync, BillsyncUser } from "./client.js";
export type {
  AccountDeletion,
  AppEventsPage,
  Billing,
  BillsyncOptions,
  CallOptions,
  PortalFlow,
  Profile,
  ProfileUpdate,
  ResolvedCustomer,
  User,
  UserBatchResponse,
  UserBatchRow,
  UserBody,
  UserWithCustomer,
} from "./client.js";
export { BillsyncError } from "./errors.js";
export { AppEventVerificationError, receiveAppEvent, verifyAppEvent } from "./events.js";
export type {
  AppEvent,
  AppEventData,
  AppEventOf,
  AppEventType,
  HeadersLike,
  LinkSource,
  ProfileField,
  SubscriptionChange,
  SubscriptionSnapshot,
  UserSnapshot,
  VerificationFailure,
} from "./events.js";
export type { components, operations, paths } from "./schema.js";
import type { components } from "./schema.js";

/** `{"error": {"code", "message"}}`: every failure billsync answers. */
export type ErrorBody = components["schemas"]["ErrorBody"];
