//! Events towards the app: what billsync changed, written in the same transaction as the
//! change (a transactional outbox), then delivered as Standard Webhooks or pulled.

use serde_json::{json, Value};
use time::OffsetDateTime;

use super::{
    app_event_data::{
        CustomerLinkedData, CustomerUnlinkedData, PlanChangedData, SubscriptionChangeData,
        SyncFailedData, UserErasedData, UserSnapshot, UserUpdatedData,
    },
    failure_code, previous_values, LinkSource, OutboxJob, SubscriptionMirror, User, UserId,
};

// `$text` is a `tt`, not a `literal`: a `literal` fragment reaches utoipa's derive wrapped in
// an invisible group it does not read, and the OpenAPI document then named the variants
// (`Pending`) instead of their serialized names (`pending`).
macro_rules! names {
    ($(#[$meta:meta])* pub enum $name:ident { $($(#[$vmeta:meta])* $variant:ident = $text:tt,)* }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, utoipa::ToSchema)]
        pub enum $name { $($(#[$vmeta])* #[serde(rename = $text)] $variant,)* }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),*];
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text,)* }
            }
            pub fn parse(raw: &str) -> Option<Self> {
                Self::ALL.iter().copied().find(|v| v.as_str() == raw)
            }
        }
    };
}

names! {
    /// What happened.
    pub enum AppEventType {
        CustomerLinked = "customer.linked",
        CustomerUnlinked = "customer.unlinked",
        /// A real change of the user's profile; never billsync's own echo from Stripe.
        UserUpdated = "user.updated",
        SubscriptionCreated = "subscription.created",
        SubscriptionUpdated = "subscription.updated",
        SubscriptionDeleted = "subscription.deleted",
        PlanChanged = "plan.changed",
        /// Names the person by a keyed hash only.
        UserErased = "user.erased",
        /// A job towards Stripe was parked for an operator.
        SyncFailed = "sync.failed",
    }
}

names! {
    /// Where a profile change came from.
    pub enum ChangeOrigin {
        /// The billing portal or the Dashboard, through a webhook.
        Stripe = "stripe",
        /// The person, through the user routes.
        App = "app",
        /// The admin API or the CLI.
        Admin = "admin",
    }
}

names! {
    /// Why a customer is no longer linked.
    pub enum UnlinkReason {
        DeletedInStripe = "deleted_in_stripe",
        Reconcile = "reconcile",
    }
}

names! {
    /// How far an app event got.
    pub enum AppEventState {
        Pending = "pending",
        Delivered = "delivered",
        /// Retried until the retry window closed; `POST /v1/app-events/{id}/redeliver` sends it again.
        Failed = "failed",
    }
}

/// An app event about to be written, with the change it announces.
#[derive(Debug, Clone, PartialEq)]
pub struct NewAppEvent {
    pub kind: AppEventType,
    /// Events of one key are delivered in commit order: the user's id, or for `user.erased`
    /// the erased subject's hash.
    pub key: String,
    pub data: Value,
}

/// The profile fields `user.updated` names in `changed`.
pub const PROFILE_FIELDS: &[&str] = &[
    "email",
    "email_verified",
    "first_name",
    "last_name",
    "phone",
];

impl NewAppEvent {
    fn about(kind: AppEventType, user: &UserId, data: impl serde::Serialize) -> Self {
        Self::keyed(kind, user.to_string(), data)
    }

    fn keyed(kind: AppEventType, key: String, data: impl serde::Serialize) -> Self {
        Self {
            kind,
            key,
            data: serde_json::to_value(data).expect("app event data serializes"),
        }
    }

    pub fn customer_linked(user: &UserId, customer: &str, source: LinkSource) -> Self {
        let data = CustomerLinkedData {
            user_id: user.clone(),
            customer_id: customer.to_owned(),
            source,
        };
        Self::about(AppEventType::CustomerLinked, user, data)
    }

    pub fn customer_unlinked(user: &UserId, customer: &str, reason: UnlinkReason) -> Self {
        let data = CustomerUnlinkedData {
            user_id: user.clone(),
            customer_id: customer.to_owned(),
            reason,
        };
        Self::about(AppEventType::CustomerUnlinked, user, data)
    }

    /// `None` when no profile field differs: nothing happened that the app needs to hear.
    pub fn user_updated(origin: ChangeOrigin, before: Option<&User>, after: &User) -> Option<Self> {
        let changed = changed_fields(before, after);
        if changed.is_empty() {
            return None;
        }
        let data = UserUpdatedData {
            user_id: after.id.clone(),
            origin,
            changed,
            user: user_snapshot(after),
        };
        Some(Self::about(AppEventType::UserUpdated, &after.id, data))
    }

    /// What a subscription's change tells the app: `subscription.created` for a new one,
    /// `.deleted` when it has just ended, `.updated` otherwise, with the changed fields' old
    /// values; `None` when no field the app sees changed, or it belongs to no user.
    pub fn subscription_change(
        before: Option<&SubscriptionMirror>,
        after: &SubscriptionMirror,
    ) -> Option<Self> {
        let user = after.user_id.as_ref()?;
        let snapshot = after.snapshot();
        let current = serde_json::to_value(&snapshot).expect("a snapshot serializes");
        let kind = match before {
            _ if after.has_ended() && !before.is_some_and(SubscriptionMirror::has_ended) => {
                AppEventType::SubscriptionDeleted
            }
            None => AppEventType::SubscriptionCreated,
            Some(_) => AppEventType::SubscriptionUpdated,
        };
        let previous =
            before.map_or_else(|| json!({}), |b| previous_values(&b.to_json(), &current));
        let changed = before.is_none() || previous.as_object().is_some_and(|p| !p.is_empty());
        let data = SubscriptionChangeData {
            user_id: user.clone(),
            customer_id: after.customer_id.clone(),
            subscription: snapshot,
            previous,
        };
        changed.then(|| Self::about(kind, user, data))
    }

    pub fn plan_changed(user: &UserId, plan: Option<&Value>, previous_plan: Option<&str>) -> Self {
        let field = |name: &str| {
            plan.and_then(|p| p.get(name))
                .cloned()
                .unwrap_or(Value::Null)
        };
        let data = PlanChangedData {
            user_id: user.clone(),
            plan: plan.and_then(|p| p["id"].as_str()).map(str::to_owned),
            previous_plan: previous_plan.map(str::to_owned),
            features: field("features"),
            limits: field("limits"),
        };
        Self::about(AppEventType::PlanChanged, user, data)
    }

    pub fn user_erased(subject: &str) -> Self {
        let data = UserErasedData {
            subject: subject.to_owned(),
        };
        Self::keyed(AppEventType::UserErased, format!("erased:{subject}"), data)
    }

    /// `sync.failed`, for a job parked for an operator after `error`: its code, never its text.
    pub fn sync_failed(job: &OutboxJob, error: &str) -> Self {
        // An erasure's job names `erased:<hash>` once the person's rows are gone, which is a
        // user id too; `unknown` only for a row no id parses from.
        let user = UserId::parse(&job.user_id)
            .unwrap_or_else(|_| UserId::parse("unknown").expect("a valid user id"));
        let data = SyncFailedData {
            user_id: user.clone(),
            job_id: job.id,
            kind: job.kind,
            attempts: job.attempts,
            error_code: failure_code(error),
        };
        Self::about(AppEventType::SyncFailed, &user, data)
    }
}

/// The profile fields that differ between two versions of a user (all of them for a new one).
pub fn changed_fields(before: Option<&User>, after: &User) -> Vec<&'static str> {
    let Some(before) = before else {
        return PROFILE_FIELDS.to_vec();
    };
    let name = |n: &Option<super::PersonName>| n.as_ref().map(|n| n.as_str().to_owned());
    let mut changed = Vec::new();
    if before.email != after.email {
        changed.push("email");
    }
    if before.email_verified != after.email_verified {
        changed.push("email_verified");
    }
    if name(&before.first_name) != name(&after.first_name) {
        changed.push("first_name");
    }
    if name(&before.last_name) != name(&after.last_name) {
        changed.push("last_name");
    }
    if before.phone != after.phone {
        changed.push("phone");
    }
    changed
}

/// The user as `user.updated` shows it (the admin API's shape).
fn user_snapshot(user: &User) -> UserSnapshot {
    UserSnapshot {
        id: user.id.clone(),
        email: user.email.as_str().to_owned(),
        email_verified: user.email_verified,
        first_name: user.first_name.as_ref().map(|n| n.as_str().to_owned()),
        last_name: user.last_name.as_ref().map(|n| n.as_str().to_owned()),
        phone: user.phone.as_ref().map(|p| p.as_str().to_owned()),
        version: user.version,
    }
}

/// A stored app event.
#[derive(Debug, Clone, PartialEq)]
pub struct AppEvent {
    /// Its place in the total order the pull API pages by; assigned once it committed.
    pub position: i64,
    /// The `webhook-id`: the same on every delivery of this event.
    pub id: String,
    pub kind: AppEventType,
    pub key: String,
    pub data: Value,
    pub created_at: OffsetDateTime,
    pub state: AppEventState,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub next_attempt_at: OffsetDateTime,
    pub delivered_at: Option<OffsetDateTime>,
    /// Set while a deliverer holds it; finishing needs it (a deliverer whose lease ran out and
    /// whose event another one took drops its result).
    pub claim_token: Option<String>,
}

/// How one delivery attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum AppEventOutcome {
    Delivered,
    Retry {
        at: OffsetDateTime,
        error: String,
    },
    /// The retry window closed: parked until an operator redelivers it.
    Failed {
        error: String,
    },
    /// Claimed behind an earlier event of its key that did not get through (or with too
    /// little of the lease left), so never sent: handed back, its attempt not counted.
    Released,
}

/// An app event as it is delivered and pulled: `{"id", "type", "timestamp", "data"}`.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct AppEventBody {
    /// The `webhook-id`: the same on every delivery of this event; dedup on it.
    pub id: String,
    #[serde(rename = "type")]
    pub kind: AppEventType,
    /// When the change committed.
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub timestamp: OffsetDateTime,
    /// What changed; its fields depend on `type` (README, "App events").
    #[schema(value_type = HashMap<String, Value>)]
    pub data: Value,
}

impl AppEvent {
    /// What is delivered and pulled.
    pub fn body(&self) -> AppEventBody {
        AppEventBody {
            id: self.id.clone(),
            kind: self.kind,
            timestamp: self.created_at,
            data: self.data.clone(),
        }
    }
}

/// A new event's id: unique, and stable across every delivery of it.
pub fn new_app_event_id() -> String {
    format!("msg_{}", uuid::Uuid::new_v4().simple())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{Email, PersonName};

    fn mirror(status: &str, cancel_at_period_end: bool) -> SubscriptionMirror {
        SubscriptionMirror {
            id: "sub_1".into(),
            user_id: Some(UserId::parse("u1").unwrap()),
            customer_id: "cus_1".into(),
            status: status.into(),
            price_id: Some("price_pro".into()),
            cancel_at_period_end,
            current_period_end: None,
            updated_at: OffsetDateTime::UNIX_EPOCH,
            cancel_at: None,
            canceled_at: None,
            ended_at: None,
            items: Vec::new(),
        }
    }

    #[test]
    fn a_subscription_change_is_announced_by_what_it_did() {
        let active = mirror("active", false);
        let cancelling = mirror("active", true);
        let canceled = mirror("canceled", false);
        let expired = mirror("incomplete_expired", false);
        // (before, after, the event's type and `previous`, or no event)
        let cases = [
            (None, &active, Some(("subscription.created", json!({})))),
            (None, &canceled, Some(("subscription.deleted", json!({})))),
            (Some(&active), &active, None),
            (
                Some(&active),
                &cancelling,
                Some((
                    "subscription.updated",
                    json!({"cancel_at_period_end": false}),
                )),
            ),
            (
                Some(&active),
                &canceled,
                Some(("subscription.deleted", json!({"status": "active"}))),
            ),
            // Ended already: a later change of an ended one is an update, not a second deletion.
            (
                Some(&canceled),
                &expired,
                Some(("subscription.updated", json!({"status": "canceled"}))),
            ),
            (Some(&canceled), &canceled, None),
        ];
        for (i, (before, after, expected)) in cases.into_iter().enumerate() {
            let event = NewAppEvent::subscription_change(before, after);
            let got = event.map(|e| (e.kind.as_str(), e.data["previous"].clone()));
            assert_eq!(got, expected, "case {i}");
        }

        let mut unowned = active.clone();
        unowned.user_id = None;
        assert_eq!(NewAppEvent::subscription_change(None, &unowned), None);
        let created = NewAppEvent::subscription_change(None, &active).unwrap();
        assert_eq!(created.key, "u1");
        assert_eq!(created.data["subscription"], active.to_json());
    }

    /// The OpenAPI document (and the TypeScript client generated from it) names each value as
    /// it is serialized: `pending`, not the variant's name.
    #[test]
    fn documented_names_are_the_serialized_names() {
        fn documented<T: utoipa::PartialSchema>() -> Value {
            serde_json::to_value(T::schema()).unwrap()["enum"].clone()
        }
        fn serialized<T: serde::Serialize>(all: &[T]) -> Value {
            serde_json::to_value(all).unwrap()
        }
        assert_eq!(
            documented::<AppEventState>(),
            serialized(AppEventState::ALL)
        );
        assert_eq!(documented::<AppEventType>(), serialized(AppEventType::ALL));
        assert_eq!(documented::<ChangeOrigin>(), serialized(ChangeOrigin::ALL));
        assert_eq!(documented::<UnlinkReason>(), serialized(UnlinkReason::ALL));
        assert_eq!(documented::<AppEventState>()[0], "pending");
    }

    fn user(first: Option<&str>, version: i64) -> User {
        User {
            id: UserId::parse("u1").unwrap(),
            email: Email::parse("ada@example.com").unwrap(),
            email_verified: true,
            first_name: PersonName::parse_optional(first, "first_name").unwrap(),
            last_name: None,
            phone: None,
            version,
            created_at: OffsetDateTime::UNIX_EPOCH,
            updated_at: OffsetDateTime::UNIX_EPOCH,
        }
    }

    #[test]
    fn user_updated_names_what_changed_and_is_none_for_no_change() {
        let before = user(Some("Ada"), 1);
        assert_eq!(
            NewAppEvent::user_updated(ChangeOrigin::App, Some(&before), &user(Some("Ada"), 2)),
            None
        );
        let event =
            NewAppEvent::user_updated(ChangeOrigin::Stripe, Some(&before), &user(None, 2)).unwrap();
        assert_eq!(event.kind, AppEventType::UserUpdated);
        assert_eq!(event.key, "u1");
        assert_eq!(event.data["origin"], "stripe");
        assert_eq!(event.data["changed"], json!(["first_name"]));
        assert_eq!(event.data["user"]["first_name"], Value::Null);
        assert_eq!(event.data["user"]["version"], 2);
        let created = NewAppEvent::user_updated(ChangeOrigin::Admin, None, &before).unwrap();
        assert_eq!(created.data["changed"], json!(PROFILE_FIELDS));
    }

    #[test]
    fn names_round_trip() {
        for kind in AppEventType::ALL {
            assert_eq!(AppEventType::parse(kind.as_str()), Some(*kind));
            assert_eq!(serde_json::to_value(kind).unwrap(), kind.as_str());
        }
        assert_eq!(AppEventType::parse("user.created"), None);
        assert_eq!(AppEventState::parse("failed"), Some(AppEventState::Failed));
    }

    #[test]
    fn erased_events_carry_only_the_subject() {
        let event = NewAppEvent::user_erased("3f9a");
        assert_eq!(event.data, json!({"subject": "3f9a"}));
        assert_eq!(event.key, "erased:3f9a");
    }

    #[test]
    fn the_body_is_the_standard_webhooks_shape() {
        let event = AppEvent {
            position: 7,
            id: "msg_1".into(),
            kind: AppEventType::CustomerLinked,
            key: "u1".into(),
            data: json!({"user_id": "u1"}),
            created_at: OffsetDateTime::from_unix_timestamp(1_700_000_000).unwrap(),
            state: AppEventState::Pending,
            attempts: 0,
            last_error: None,
            next_attempt_at: OffsetDateTime::UNIX_EPOCH,
            delivered_at: None,
            claim_token: None,
        };
        assert_eq!(
            serde_json::to_value(event.body()).unwrap(),
            json!({"id": "msg_1", "type": "customer.linked",
                   "timestamp": "2023-11-14T22:13:20Z", "data": {"user_id": "u1"}})
        );
    }
}
