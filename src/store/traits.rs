//! What the store offers, one trait per aggregate. [`Store`] is all of them together, so
//! `Arc<dyn Store>` is what the service passes around; `use crate::store::prelude::*` brings
//! every method into scope.

use std::time::Duration;

use async_trait::async_trait;
use time::OffsetDateTime;

use super::{QueueStats, StoreResult};
use crate::domain::{
    AppEvent, AppEventOutcome, AppEventState, AuditEntry, ChangeOrigin, CustomerLink,
    CustomerUpdate, Erased, EventOutcome, EventState, EventToApply, ImportOutcome, JobOutcome,
    JobState, LinkOutcome, LinkSource, NewEvent, OutboxJob, PortalConfigRecord, PushedProfile,
    ReconcileRunRecord, ResolveClaim, StoredEvent, StripeCustomerId, SubscriptionMirror,
    UnlinkReason, UpdateContext, UsageRecord, User, UserId, UserImport, UserUpsert,
};

/// `Store` is every aggregate's trait, and everything that implements them all is one.
macro_rules! store_of {
    ($($aggregate:ident),*) => {
        /// Every aggregate's store, behind one object.
        pub trait Store: $($aggregate +)* {}
        impl<T: $($aggregate +)*> Store for T {}
    };
}

store_of!(
    Operations,
    Users,
    Links,
    ResolveClaims,
    OutboxJobs,
    Erasure,
    Subscriptions,
    PlanAnnouncements,
    EventInbox,
    Leases,
    PortalConfigs,
    AppEvents,
    ReconcileRuns
);

/// The database itself: its schema, its health, its settings.
#[async_trait]
pub trait Operations: Send + Sync + 'static {
    /// `postgres` or `sqlite`, for logs and metrics.
    fn backend(&self) -> &'static str;
    async fn migrate(&self) -> StoreResult<()>;
    /// A round trip to the database, for readiness.
    async fn ping(&self) -> StoreResult<()>;
    /// Queue depths and ages, for the metrics gauges.
    async fn queue_stats(&self) -> StoreResult<QueueStats>;
    /// The setting `name`, written as `value` first if it has none; returns what is stored
    /// (the first writer wins when instances race).
    async fn setting_or_init(&self, name: &str, value: &str) -> StoreResult<String>;
}

#[async_trait]
pub trait Users: Send + Sync + 'static {
    /// Creates the user or replaces its profile; `version` increases only when a field changed,
    /// and a change of an existing user queues a profile push and writes `user.updated` (from
    /// `origin`) in the same transaction.
    async fn upsert_user_from(&self, user: &UserUpsert, origin: ChangeOrigin) -> StoreResult<User>;
    /// [`upsert_user_from`](Self::upsert_user_from) by an operator (the admin API, the CLI).
    async fn upsert_user(&self, user: &UserUpsert) -> StoreResult<User> {
        self.upsert_user_from(user, ChangeOrigin::Admin).await
    }
    /// Like `upsert_user` for an existing user, but only if its version is still `expected`
    /// (optimistic concurrency for read-modify-write); `None` when it is not (or is gone).
    async fn update_user_if_version(
        &self,
        user: &UserUpsert,
        expected: i64,
    ) -> StoreResult<Option<User>>;
    /// Writes a change that came from Stripe: like `update_user_if_version`, but queues no
    /// push (the change is Stripe's already), and records the values as what Stripe holds.
    async fn apply_remote_profile(
        &self,
        user: &UserUpsert,
        expected: i64,
        pushed: &PushedProfile,
    ) -> StoreResult<Option<User>>;
    /// Bulk import: each user as [`upsert_user`](Self::upsert_user) writes them, except that
    /// an erased person is never created; one transaction per run of distinct ids (a repeated
    /// id is written after the rows before it). The outcomes are in the order of `users`.
    async fn import_users(&self, users: &[UserImport]) -> StoreResult<Vec<ImportOutcome>>;
    async fn get_user(&self, id: &UserId) -> StoreResult<Option<User>>;
    /// Those of these users that exist (a reconciliation's page at a time).
    async fn users_by_ids(&self, ids: &[String]) -> StoreResult<Vec<User>>;
    /// Queues a push of the user's current profile to Stripe (none if one is pending).
    async fn queue_profile_push(&self, user: &UserId) -> StoreResult<()>;
    async fn insert_usage_record(
        &self,
        user: &UserId,
        metric: &str,
        quantity: i64,
        recorded_at: OffsetDateTime,
    ) -> StoreResult<i64>;
    /// Records with `id > after`, oldest first, at most `limit`: pages for streaming.
    async fn usage_records_page(
        &self,
        user: &UserId,
        after: i64,
        limit: u32,
    ) -> StoreResult<Vec<UsageRecord>>;
}

#[async_trait]
pub trait Links: Send + Sync + 'static {
    async fn get_link(&self, user: &UserId) -> StoreResult<Option<CustomerLink>>;
    async fn get_link_by_customer(
        &self,
        customer: &StripeCustomerId,
    ) -> StoreResult<Option<CustomerLink>>;
    /// The links of these customers, and of these users (a reconciliation's page at a time).
    async fn links_of(
        &self,
        customers: &[String],
        users: &[String],
    ) -> StoreResult<Vec<CustomerLink>>;
    /// Links a user to a customer unless either side is already linked or the customer is
    /// known deleted in Stripe.
    async fn insert_link(
        &self,
        user: &UserId,
        customer: &StripeCustomerId,
        livemode: bool,
        via: LinkSource,
    ) -> StoreResult<LinkOutcome>;
    /// Unlinks the user, writing `customer.unlinked` with `reason`; returns the link that was
    /// removed.
    async fn remove_link(
        &self,
        user: &UserId,
        reason: UnlinkReason,
    ) -> StoreResult<Option<CustomerLink>>;
    /// Remembers that Stripe deleted this customer (`created` of the `customer.deleted`
    /// event), so it is never linked again, whatever arrives late.
    async fn record_deleted_customer(&self, customer: &str, created: i64) -> StoreResult<()>;
    /// Records what was last pushed to the user's customer; the push stamped
    /// `pushed.version` into the customer's metadata.
    async fn record_push(&self, user: &UserId, pushed: &PushedProfile) -> StoreResult<()>;
    async fn last_push(&self, user: &UserId) -> StoreResult<Option<PushedProfile>>;
    /// Raises the link's watermark to this customer snapshot (`created`, event id), never
    /// lowers it.
    async fn raise_link_watermark(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<()>;
}

/// The claim on creating a user's customer, so two requests never create two.
#[async_trait]
pub trait ResolveClaims: Send + Sync + 'static {
    /// Takes the user's resolve claim if nobody holds an unexpired one. Re-taking an expired
    /// claim keeps its `started_at`.
    async fn try_claim_resolve(
        &self,
        user: &UserId,
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Option<ResolveClaim>>;
    /// Records the create request of the claim's first attempt (kept if one is recorded).
    async fn save_claim_params(&self, user: &UserId, holder: &str, params: &str)
        -> StoreResult<()>;
    /// Ends a claim held by `holder`: `completed` deletes it, otherwise it is expired at once
    /// (keeping `started_at` for the next attempt).
    async fn release_resolve(
        &self,
        user: &UserId,
        holder: &str,
        completed: bool,
    ) -> StoreResult<()>;
}

#[async_trait]
pub trait OutboxJobs: Send + Sync + 'static {
    /// Claims up to `limit` due jobs (pending and due, or in flight with an expired lease, or
    /// on Postgres whose holder's session is gone), never two in flight at once for one user
    /// (a unique index makes it atomic). Each claim gets a new `claim_token`; each claimed
    /// job's `attempts` counts this attempt.
    async fn claim_jobs(&self, limit: u32, lease: Duration) -> StoreResult<Vec<OutboxJob>>;
    /// Claims one job now, whatever its due time, if it is pending and no other job of its
    /// user is in flight.
    async fn claim_job(&self, id: i64, lease: Duration) -> StoreResult<Option<OutboxJob>>;
    /// Ends a claim. Fenced: `false` (and nothing written) when the job no longer carries
    /// `job.claim_token` (its lease was lost and another worker re-claimed it).
    async fn finish_job(&self, job: &OutboxJob, outcome: &JobOutcome) -> StoreResult<bool>;
    /// Saves a job's progress (the erasure saga's completed steps); fenced like `finish_job`.
    async fn save_job_payload(
        &self,
        job: &OutboxJob,
        payload: &serde_json::Value,
    ) -> StoreResult<bool>;
    async fn get_job(&self, id: i64) -> StoreResult<Option<OutboxJob>>;
    /// Newest first.
    async fn list_jobs(&self, state: Option<JobState>, limit: u32) -> StoreResult<Vec<OutboxJob>>;
    /// Every outbox job of the user, oldest first.
    async fn user_jobs(&self, user: &UserId) -> StoreResult<Vec<OutboxJob>>;
    /// Puts a failed job back in the queue, due now, with its attempts reset; `None` when the
    /// job does not exist or is not failed.
    async fn retry_job(&self, id: i64) -> StoreResult<Option<OutboxJob>>;
}

/// The GDPR erasure saga's storage, its audit trail, and what an export reads besides.
#[async_trait]
pub trait Erasure: Send + Sync + 'static {
    /// The user's erasure job if one is pending or in flight; otherwise a new pending one,
    /// due in 30 s: the caller runs it now (`claim_job`), and the delay keeps workers from
    /// racing it for it; they take it over only if the caller dies first.
    async fn enqueue_erase(
        &self,
        user: &UserId,
        payload: &serde_json::Value,
    ) -> StoreResult<OutboxJob>;
    async fn active_erase(&self, user: &UserId) -> StoreResult<Option<OutboxJob>>;
    /// The erasure's last step, in one transaction: deletes the user (links, subscriptions,
    /// usage and claims go with it), drops their pending pushes, deletes the stored webhook
    /// events of `handled_customer`, renames their jobs to `erased:<subject_hash>`, and
    /// writes the audit entry. Re-plans first, with the user's
    /// row locked (no link can be made meanwhile): if the user is now linked to a customer
    /// other than `handled_customer` (a resolve or a `customer.created` since the saga's
    /// plan), nothing is deleted and that customer is returned, for the saga to handle.
    async fn erase_user(
        &self,
        user: &UserId,
        handled_customer: Option<&str>,
        subject_hash: &str,
        audit_detail: &serde_json::Value,
    ) -> StoreResult<Erased>;
    async fn append_audit(
        &self,
        actor: &str,
        action: &str,
        subject_hash: Option<&str>,
        detail: &serde_json::Value,
    ) -> StoreResult<()>;
    /// The audit entries about a subject (its hash), oldest first.
    async fn audit_for_subject(&self, subject_hash: &str) -> StoreResult<Vec<AuditEntry>>;
    /// Records that the person behind `subject` (a keyed hash of their id) was erased now.
    async fn record_tombstone(&self, subject: &str) -> StoreResult<()>;
    /// When the person behind `subject` was erased, if they were.
    async fn tombstone(&self, subject: &str) -> StoreResult<Option<OffsetDateTime>>;
    /// The raw stored events of a customer with `id > after`, by id, at most `limit`: pages
    /// for the GDPR export. `(id, payload)`.
    async fn customer_events_page(
        &self,
        customer: &str,
        after: Option<&str>,
        limit: u32,
    ) -> StoreResult<Vec<(String, String)>>;
}

#[async_trait]
pub trait Subscriptions: Send + Sync + 'static {
    async fn list_subscriptions(&self, user: &UserId) -> StoreResult<Vec<SubscriptionMirror>>;
    /// Those of these subscriptions that are mirrored (a reconciliation's page at a time).
    async fn subscriptions_by_ids(&self, ids: &[String]) -> StoreResult<Vec<SubscriptionMirror>>;
    /// Upserts the mirror unless it already holds a newer snapshot (`created` below its
    /// watermark); returns whether it wrote.
    async fn upsert_subscription_if_newer(
        &self,
        subscription: &SubscriptionMirror,
        created: i64,
        event_id: &str,
    ) -> StoreResult<bool>;
    /// The `created` and event id of the newest event applied to this subscription.
    async fn subscription_watermark(&self, id: &str) -> StoreResult<Option<(i64, Option<String>)>>;
    /// After `customer.deleted` (its `created` and event id): the customer's subscriptions
    /// become canceled at period end, and their watermark rises to the deletion, so an older
    /// subscription event cannot bring them back.
    async fn cancel_customer_subscriptions(
        &self,
        customer: &str,
        created: i64,
        event_id: &str,
    ) -> StoreResult<u64>;
}

/// `plan.changed` after the plans file changed: at start-up, a pass over every user tells
/// each one whose computed plan differs from what they were last told.
#[async_trait]
pub trait PlanAnnouncements: Send + Sync + 'static {
    /// Whether everyone has been told their plan under this store's plans file.
    async fn plans_file_announced(&self) -> StoreResult<bool>;
    /// One page of the pass: the users after `after` (by id, at most `limit`) whose plan
    /// differs from what they were told hear `plan.changed`, each once, however many
    /// instances run the pass at the same time. The page's last user; `None` past the end.
    async fn announce_plans_page(
        &self,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Option<UserId>>;
    /// Records the plans file as announced to everyone (after the last page).
    async fn record_plans_file_announced(&self) -> StoreResult<()>;
}

/// Verified Stripe events: stored once, queued per customer, applied in order.
#[async_trait]
pub trait EventInbox: Send + Sync + 'static {
    /// Writes verified events in one transaction; for each, whether it was new (a
    /// redelivery of a stored event changes nothing).
    async fn insert_events(&self, events: &[NewEvent]) -> StoreResult<Vec<bool>>;
    /// Newest first.
    async fn list_events(
        &self,
        state: Option<EventState>,
        limit: u32,
    ) -> StoreResult<Vec<StoredEvent>>;
    /// Queues a stored event to be applied again; `None` if there is no such event.
    async fn replay_event(&self, id: &str) -> StoreResult<Option<StoredEvent>>;
    /// Queues every failed event to be applied again; returns how many.
    async fn replay_failed_events(&self) -> StoreResult<u64>;
    /// Deletes applied, skipped and parked (failed for good) events received before `cutoff`;
    /// returns how many. Events waiting for a retry stay.
    async fn prune_events(&self, cutoff: OffsetDateTime) -> StoreResult<u64>;
    /// Customers with events due to be applied (pending, or failed and due for a retry),
    /// oldest arrival first, leaving out those held back by an event waiting for its retry.
    /// Only the oldest due events are looked at, so the query stays cheap however long the
    /// backlog is.
    async fn due_event_customers(&self, limit: u32) -> StoreResult<Vec<String>>;
    /// Each customer's applicable events in order (Stripe's `created`, then arrival), up to
    /// `limit` per customer, in one query; customers without any are left out.
    async fn customers_events(
        &self,
        customers: &[String],
        limit: u32,
    ) -> StoreResult<Vec<(String, Vec<EventToApply>)>>;
    /// The linked user of each customer, with what applying a snapshot to them needs;
    /// customers not linked to a user are left out.
    async fn update_contexts(&self, customers: &[String]) -> StoreResult<Vec<UpdateContext>>;
    /// Writes a batch of applied `customer.updated` events in one transaction: per customer,
    /// the profile change (if the user is still at its expected version), the watermark, and
    /// the events finished. A customer whose user changed meanwhile is left untouched and
    /// returned, to be applied again. An error writes nothing.
    async fn commit_customer_updates(&self, updates: &[CustomerUpdate])
        -> StoreResult<Vec<String>>;
    /// Records how applying these events ended, in one statement.
    async fn finish_events(&self, ids: &[String], outcome: &EventOutcome) -> StoreResult<()>;
    async fn finish_event(&self, id: &str, outcome: &EventOutcome) -> StoreResult<()> {
        self.finish_events(&[id.to_owned()], outcome).await
    }
}

/// Who works on what: the serving process, and each customer's applier.
#[async_trait]
pub trait Leases: Send + Sync + 'static {
    /// Takes this process's claim on serving the database, for `serve`. On SQLite (one
    /// serving process per file) an exclusive lock on `<file>.lock`, held until the process
    /// ends, refuses a second one with [`super::StoreError::InUse`]; holding it, the leases
    /// left by a process that died are freed. A no-op on Postgres, where instances share the
    /// work and locks die with their connection.
    async fn claim_serving(&self) -> StoreResult<()>;
    /// Takes the lease on applying each customer's events that nobody holds; returns the
    /// customers leased. One round trip however many customers.
    async fn try_lease_customers(
        &self,
        customers: &[String],
        holder: &str,
        lease: Duration,
    ) -> StoreResult<Vec<String>>;
    async fn release_customers(&self, customers: &[String], holder: &str) -> StoreResult<()>;
}

/// Billing-portal configurations kept as code.
#[async_trait]
pub trait PortalConfigs: Send + Sync + 'static {
    async fn portal_config(&self, name: &str) -> StoreResult<Option<PortalConfigRecord>>;
    /// Records (or replaces) what `name` was last applied as.
    async fn save_portal_config(&self, record: &PortalConfigRecord) -> StoreResult<()>;
}

/// The outbox towards the app. Events are written by the other aggregates' methods, in the
/// transactions of the changes they announce; these are for putting them in order, delivering
/// them, and reading them.
#[async_trait]
pub trait AppEvents: Send + Sync + 'static {
    /// Gives up to `limit` committed events without a position the next positions, oldest
    /// first; one sequencer at a time, so positions become visible in increasing order.
    /// Returns how many it positioned.
    async fn sequence_app_events(&self, limit: u32) -> StoreResult<u64>;
    /// Claims events to deliver for up to `keys` keys: each key's first pending event, if it
    /// is due and nobody's lease holds it, with the key's next pending events after it, up to
    /// `per_key` in all (sent one after the other, each once the one before got through).
    /// Each claim gets a new `claim_token` and counts an attempt. By position.
    async fn claim_app_events(
        &self,
        keys: u32,
        per_key: u32,
        lease: Duration,
    ) -> StoreResult<Vec<AppEvent>>;
    /// Records how claimed deliveries ended, in one transaction; one whose claim was lost
    /// (its lease ran out and another deliverer took it) changes nothing.
    async fn finish_app_events(&self, finished: &[(AppEvent, AppEventOutcome)]) -> StoreResult<()>;
    /// Positioned events with `position > after`, in order, at most `limit`.
    async fn app_events_after(&self, after: i64, limit: u32) -> StoreResult<Vec<AppEvent>>;
    /// Events in `state`, newest first.
    async fn list_app_events(&self, state: AppEventState, limit: u32)
        -> StoreResult<Vec<AppEvent>>;
    /// Makes the event pending and due now, its attempts reset; `None` if there is none.
    async fn redeliver_app_event(&self, id: &str) -> StoreResult<Option<AppEvent>>;
    /// Deletes events created before `cutoff`: delivered and failed ones, and pending ones
    /// too when `with_pending` (nothing delivers them; they were kept for the pull API).
    async fn prune_app_events(
        &self,
        cutoff: OffsetDateTime,
        with_pending: bool,
    ) -> StoreResult<u64>;
    /// How many events wait for delivery, and when the oldest of them was made.
    async fn app_event_backlog(&self) -> StoreResult<(i64, Option<OffsetDateTime>)>;
}

/// Reconciliation runs: one live at a time across instances, each holding a lease it renews;
/// their reports kept for any instance to serve.
#[async_trait]
pub trait ReconcileRuns: Send + Sync + 'static {
    /// Records a new live run holding a lease of `lease`, unless another one is live: `false`
    /// then. A live run whose lease ran out is marked `interrupted` first. Only the newest
    /// `keep` finished runs are kept.
    async fn start_reconcile_run(
        &self,
        id: &str,
        apply: bool,
        lease: Duration,
        keep: u32,
    ) -> StoreResult<bool>;
    /// Saves the run's progress and renews its lease; `false` when it is no longer live
    /// (its lease ran out and another start marked it interrupted).
    async fn renew_reconcile_run(
        &self,
        id: &str,
        progress: &serde_json::Value,
        lease: Duration,
    ) -> StoreResult<bool>;
    /// Ends a live run as `done` (with its report) or `failed` (with why); `false` when it was
    /// no longer live.
    async fn finish_reconcile_run(
        &self,
        id: &str,
        progress: &serde_json::Value,
        outcome: Result<&serde_json::Value, &str>,
    ) -> StoreResult<bool>;
    /// The run; a live one whose lease ran out reads as `interrupted`.
    async fn reconcile_run(&self, id: &str) -> StoreResult<Option<ReconcileRunRecord>>;
    /// Notes which of these customers (a page of Stripe's list) are linked, as met by `run`.
    async fn mark_linked_seen(&self, run: &str, customers: &[String]) -> StoreResult<()>;
    /// Links whose customer `run` did not meet, with `user_id > after`, by user id, at most
    /// `limit`.
    async fn links_not_seen(
        &self,
        run: &str,
        after: Option<&UserId>,
        limit: u32,
    ) -> StoreResult<Vec<CustomerLink>>;
    /// Forgets what `run` met, and what runs no longer live met (a run starts with this).
    async fn forget_seen(&self, run: &str) -> StoreResult<()>;
    /// How many users and links there are.
    async fn user_and_link_counts(&self) -> StoreResult<(u64, u64)>;
}
