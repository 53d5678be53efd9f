//! The export: everything billsync holds about a user, and their Stripe objects, streamed.

use std::collections::BTreeMap;

use axum::body::Bytes;
use futures_util::{stream, Stream, StreamExt};
use serde_json::{json, Value};
use time::{format_description::well_known::Rfc3339, OffsetDateTime};

use super::tombstones::subject_hash;
use crate::{
    store::{OutboxJob, Store, StoreError, SubscriptionMirror, UsageRecord, User},
    stripe::{CustomerList, StripeClient},
};

pub const EXPORT_VERSION: &str = "3.0";
/// Usage records are read and written this many at a time, however many there are.
const USAGE_PAGE: u32 = 500;

fn rfc3339(at: OffsetDateTime) -> String {
    at.format(&Rfc3339).expect("UTC formats as RFC 3339")
}

fn user_json(user: &User) -> Value {
    json!({
        "id": user.id,
        "email": user.email,
        // How the app (or Stripe) wrote the address, when not in its normalised form.
        "email_as_given": user.email.as_given(),
        "email_verified": user.email_verified,
        "first_name": user.first_name,
        "last_name": user.last_name,
        "phone": user.phone,
        "version": user.version,
        "created_at": rfc3339(user.created_at),
        "updated_at": rfc3339(user.updated_at),
    })
}

fn subscription_json(sub: &SubscriptionMirror) -> Value {
    json!({
        "id": sub.id,
        "stripe_customer_id": sub.customer_id,
        "status": sub.status,
        "price_id": sub.price_id,
        "cancel_at_period_end": sub.cancel_at_period_end,
        "current_period_end": sub.current_period_end.map(rfc3339),
        "cancel_at": sub.cancel_at.map(rfc3339),
        "canceled_at": sub.canceled_at.map(rfc3339),
        "ended_at": sub.ended_at.map(rfc3339),
        "items": sub.items.iter().map(|item| json!({
            "id": item.id,
            "price_id": item.price_id,
            "quantity": item.quantity,
            "current_period_end": item.current_period_end
                .and_then(|t| time::OffsetDateTime::from_unix_timestamp(t).ok())
                .map(rfc3339),
        })).collect::<Vec<_>>(),
        "updated_at": rfc3339(sub.updated_at),
    })
}

fn usage_json(record: &UsageRecord) -> Value {
    json!({
        "id": record.id,
        "metric": record.metric,
        "quantity": record.quantity,
        "recorded_at": rfc3339(record.recorded_at),
        "created_at": rfc3339(record.created_at),
    })
}

/// Stored events of the customer read per page of the streamed export.
const EVENTS_PAGE: u32 = 200;

fn job_json(job: &OutboxJob) -> Value {
    json!({
        "id": job.id,
        "kind": job.kind,
        "state": job.state,
        "attempts": job.attempts,
        "last_error": job.last_error,
        "payload": job.payload,
        "created_at": rfc3339(job.created_at),
        "updated_at": rfc3339(job.updated_at),
    })
}

/// One Stripe section of the export: Stripe's objects as they come, or `null` and a warning
/// naming the section.
fn stripe_section<T: serde::Serialize>(
    section: &str,
    fetched: Result<T, crate::stripe::StripeError>,
    warnings: &mut Vec<String>,
) -> Value {
    match fetched {
        Ok(value) => serde_json::to_value(value).unwrap_or(Value::Null),
        Err(err) => {
            tracing::warn!(error = %err, section, "export: a Stripe section is unavailable");
            warnings.push(format!("{section} could not be retrieved from Stripe"));
            Value::Null
        }
    }
}

/// A JSON array streamed page by page: `fetch(cursor)` gives a page of items and the next
/// cursor (`None` after the last page). A database failure ends the stream with the error.
fn streamed_array<C, F, Fut>(
    start: C,
    fetch: F,
) -> impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static
where
    C: Send + 'static,
    F: Fn(C) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = Result<(Vec<Value>, Option<C>), StoreError>> + Send,
{
    enum Cursor<C> {
        Next { at: C, first: bool },
        Done,
    }
    let fetch = std::sync::Arc::new(fetch);
    stream::once(async { Ok(Bytes::from_static(b"[")) }).chain(stream::unfold(
        Cursor::Next {
            at: start,
            first: true,
        },
        move |cursor| {
            let fetch = fetch.clone();
            async move {
                let Cursor::Next { at, first } = cursor else {
                    return None;
                };
                match fetch(at).await {
                    Err(err) => Some((Err(err), Cursor::Done)),
                    Ok((items, next)) => {
                        let mut chunk = String::new();
                        let mut first = first;
                        for item in &items {
                            if !first {
                                chunk.push(',');
                            }
                            first = false;
                            chunk.push_str(&item.to_string());
                        }
                        match next {
                            Some(at) if !items.is_empty() => {
                                Some((Ok(Bytes::from(chunk)), Cursor::Next { at, first }))
                            }
                            _ => {
                                chunk.push(']');
                                Some((Ok(Bytes::from(chunk)), Cursor::Done))
                            }
                        }
                    }
                }
            }
        },
    ))
}

/// The export as a stream of JSON text: everything billsync holds about the user (profile,
/// link, subscription mirror, the profile last pushed, outbox jobs, audit entries, usage
/// records, the customer's stored webhook payloads) and the customer's Stripe objects as
/// Stripe returns them (customer, subscriptions, invoices, payment methods), fetched live.
/// A Stripe section that cannot be fetched is `null` and named in `warnings`. The usage
/// records and stored events are streamed page by page, so memory stays flat however many
/// there are; a database failure mid-stream ends the body early: the document is then
/// visibly incomplete, never silently truncated.
#[tracing::instrument(skip_all, fields(user_id = %user.id))]
pub async fn export(
    store: std::sync::Arc<dyn Store>,
    stripe: &StripeClient,
    user: User,
) -> Result<impl Stream<Item = Result<Bytes, StoreError>> + Send + 'static, StoreError> {
    let link = store.get_link(&user.id).await?;
    let subscriptions = store.list_subscriptions(&user.id).await?;
    let pushed = store.last_push(&user.id).await?;
    let jobs = store.user_jobs(&user.id).await?;
    let audit = store.audit_for_subject(&subject_hash(&user.id)).await?;
    let mut warnings: Vec<String> = Vec::new();
    let [customer, stripe_subscriptions, invoices, payment_methods] = match &link {
        None => [Value::Null, Value::Null, Value::Null, Value::Null],
        Some(link) => {
            let id = link.customer_id.as_str();
            let (customer, subs, invoices, methods) = tokio::join!(
                stripe.customer_as_stripe_has_it(id),
                stripe.customer_objects(id, CustomerList::Subscriptions),
                stripe.customer_objects(id, CustomerList::Invoices),
                stripe.customer_objects(id, CustomerList::PaymentMethods),
            );
            [
                stripe_section("stripe_customer", customer, &mut warnings),
                stripe_section("stripe_subscriptions", subs, &mut warnings),
                stripe_section("stripe_invoices", invoices, &mut warnings),
                stripe_section("stripe_payment_methods", methods, &mut warnings),
            ]
        }
    };
    let head: BTreeMap<&str, Value> = BTreeMap::from([
        ("export_version", json!(EXPORT_VERSION)),
        (
            "export_timestamp",
            json!(rfc3339(OffsetDateTime::now_utc())),
        ),
        ("user_profile", user_json(&user)),
        (
            "customer_link",
            link.as_ref().map_or(Value::Null, |l| {
                json!({
                    "stripe_customer_id": l.customer_id,
                    "livemode": l.livemode,
                    "linked_via": l.linked_via,
                    "linked_at": rfc3339(l.linked_at),
                })
            }),
        ),
        (
            "subscriptions",
            subscriptions.iter().map(subscription_json).collect(),
        ),
        (
            "pushed_profile",
            pushed.map_or(Value::Null, |p| {
                json!({"email": p.email, "name": p.name, "phone": p.phone, "version": p.version})
            }),
        ),
        ("outbox_jobs", jobs.iter().map(job_json).collect()),
        (
            "audit_entries",
            audit
                .iter()
                .map(|a| {
                    json!({"at": rfc3339(a.at), "actor": a.actor, "action": a.action,
                           "detail": a.detail})
                })
                .collect(),
        ),
        ("stripe_customer", customer),
        ("stripe_subscriptions", stripe_subscriptions),
        ("stripe_invoices", invoices),
        ("stripe_payment_methods", payment_methods),
        ("warnings", json!(warnings)),
    ]);
    let mut opening = serde_json::to_string(&head).expect("JSON values serialize");
    opening.pop(); // the closing brace: the streamed sections follow
    opening.push_str(",\"usage_records\":");

    let usage = {
        let (store, user_id) = (store.clone(), user.id.clone());
        streamed_array(0_i64, move |after| {
            let (store, user_id) = (store.clone(), user_id.clone());
            async move {
                let page = store
                    .usage_records_page(&user_id, after, USAGE_PAGE)
                    .await?;
                let next = page.last().map(|r| r.id);
                Ok((page.iter().map(usage_json).collect(), next))
            }
        })
    };
    let customer_id = link.map(|l| l.customer_id.to_string());
    let events = streamed_array(None::<String>, move |after| {
        let (store, customer_id) = (store.clone(), customer_id.clone());
        async move {
            let Some(customer) = customer_id else {
                return Ok((Vec::new(), None));
            };
            let page = store
                .customer_events_page(&customer, after.as_deref(), EVENTS_PAGE)
                .await?;
            let next = page.last().map(|(id, _)| Some(id.clone()));
            let items = page
                .iter()
                .map(|(_, payload)| {
                    serde_json::from_str(payload).unwrap_or_else(|_| json!(payload))
                })
                .collect();
            Ok((items, next))
        }
    });
    Ok(stream::once(async move { Ok(Bytes::from(opening)) })
        .chain(usage)
        .chain(stream::once(async {
            Ok(Bytes::from_static(b",\"stored_webhook_events\":"))
        }))
        .chain(events)
        .chain(stream::once(async { Ok(Bytes::from_static(b"}")) })))
}
