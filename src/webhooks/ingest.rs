//! Durable ingestion: a verified event is written to the inbox before Stripe gets its 2xx.
//! Concurrent deliveries are group-committed: writers take every event waiting at that moment
//! and insert them in one transaction, and each request is answered only after its batch
//! committed. Several writers pipeline (one gathers while another commits).

use std::sync::Arc;

use serde::Deserialize;
use tokio::sync::{mpsc, oneshot, Mutex};

use crate::store::{EventState, NewEvent, Store, StoreError};

/// Event types billsync applies; every other type is stored as `skipped`.
pub const HANDLED_TYPES: [&str; 6] = [
    "customer.created",
    "customer.updated",
    "customer.deleted",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
];

/// The fields of an event's envelope billsync needs to file it.
#[derive(Debug, Clone, PartialEq)]
pub struct Envelope {
    pub id: String,
    pub kind: String,
    pub created: i64,
    pub livemode: bool,
    /// The customer the event is about: the object itself, or its `customer`.
    pub customer_id: Option<String>,
    /// The connected account a Connect event concerns (`account`); `None` for the
    /// platform's own events.
    pub account: Option<String>,
    /// The API version Stripe rendered the event's object in.
    pub api_version: Option<String>,
}

/// What a verified event must match to be applied.
#[derive(Debug, Clone, PartialEq)]
pub struct Expected {
    /// Whether the configured Stripe key is a live one; events of the other mode are skipped.
    pub livemode: bool,
    /// The pinned `Stripe-Version`; events of another version are applied (parsed
    /// leniently) but counted and warned about.
    pub api_version: String,
}

#[derive(Deserialize)]
struct RawEnvelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    #[serde(default)]
    livemode: bool,
    #[serde(default)]
    account: Option<String>,
    #[serde(default)]
    api_version: Option<String>,
    data: RawData,
}

#[derive(Deserialize)]
struct RawData {
    object: RawObject,
}

#[derive(Deserialize)]
struct RawObject {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    object: Option<String>,
    #[serde(default)]
    customer: Option<serde_json::Value>,
}

/// Reads the envelope of a verified body; the error says what is wrong, for the client.
pub fn parse_envelope(body: &[u8]) -> Result<Envelope, String> {
    let raw: RawEnvelope =
        serde_json::from_slice(body).map_err(|e| format!("not a Stripe event: {e}"))?;
    let valid_id = |id: &str| {
        !id.is_empty()
            && id.len() <= 255
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_')
    };
    if !raw.id.starts_with("evt_") || !valid_id(&raw.id) {
        return Err("the event id must look like evt_…".into());
    }
    if raw.kind.is_empty() || raw.kind.len() > 255 || raw.created < 0 {
        return Err("the event needs a type and a non-negative created".into());
    }
    let customer_id = if raw.data.object.object.as_deref() == Some("customer") {
        raw.data.object.id
    } else {
        match raw.data.object.customer {
            Some(serde_json::Value::String(id)) => Some(id),
            Some(serde_json::Value::Object(expanded)) => expanded
                .get("id")
                .and_then(|v| v.as_str())
                .map(str::to_owned),
            _ => None,
        }
    };
    if customer_id
        .as_deref()
        .is_some_and(|c| !c.starts_with("cus_") || !valid_id(c))
    {
        return Err("the event's customer id must look like cus_…".into());
    }
    Ok(Envelope {
        id: raw.id,
        kind: raw.kind,
        created: raw.created,
        livemode: raw.livemode,
        customer_id,
        account: raw.account.filter(|a| !a.is_empty()),
        api_version: raw.api_version.filter(|v| !v.is_empty()),
    })
}

/// Counts an event of another API version than the pinned one, and warns once per version
/// (per process): its objects may lack or rename fields billsync reads.
fn note_api_version(version: &str, pinned: &str) {
    static WARNED: std::sync::OnceLock<std::sync::Mutex<std::collections::HashSet<String>>> =
        std::sync::OnceLock::new();
    // Signed by Stripe, so a handful of values at most; clipped all the same.
    let version: String = version
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || *c == '-' || *c == '.')
        .take(32)
        .collect();
    metrics::counter!("billsync_webhook_api_version_mismatches_total", "version" => version.clone())
        .increment(1);
    let first = WARNED
        .get_or_init(Default::default)
        .lock()
        .expect("api version set")
        .insert(version.clone());
    if first {
        tracing::warn!(
            event_api_version = %version,
            pinned = %pinned,
            "webhook events of another API version than the pinned one: they are parsed \
             leniently; pin the webhook endpoint's version to {pinned} (Dashboard → Webhooks)"
        );
    }
}

/// How an event is filed: applied later if billsync handles its type, it belongs to the
/// configured mode and to the platform's own account (not a connected account's, under
/// Connect) and it names a customer, otherwise kept as `skipped`.
pub fn file(envelope: Envelope, body: &[u8], expected: &Expected) -> NewEvent {
    let handled = HANDLED_TYPES.contains(&envelope.kind.as_str());
    let mut applies = handled;
    if let Some(version) = envelope
        .api_version
        .as_deref()
        .filter(|v| *v != expected.api_version)
    {
        note_api_version(version, &expected.api_version);
    }
    if envelope.livemode != expected.livemode {
        applies = false;
        tracing::warn!(
            event_id = %envelope.id,
            event_livemode = envelope.livemode,
            "event from the other mode than the configured key: stored as skipped"
        );
    } else if envelope.account.is_some() {
        // A connected account's customer, not one of the platform's: never ours to change.
        applies = false;
        metrics::counter!("billsync_webhook_connect_events_total").increment(1);
        tracing::info!(
            event_id = %envelope.id,
            kind = %envelope.kind,
            "Connect event (a connected account's object): stored as skipped"
        );
    } else if handled && envelope.customer_id.is_none() {
        applies = false;
        tracing::warn!(
            event_id = %envelope.id,
            kind = %envelope.kind,
            "event names no customer: stored as skipped"
        );
    }
    NewEvent {
        state: if applies {
            EventState::Pending
        } else {
            EventState::Skipped
        },
        id: envelope.id,
        kind: envelope.kind,
        created: envelope.created,
        livemode: envelope.livemode,
        customer_id: envelope.customer_id,
        // A parsed body is UTF-8 but for bytes inside strings serde_json skipped; the
        // validating copy is the fast path, the lossy one only for such a body.
        payload: match std::str::from_utf8(body) {
            Ok(text) => text.to_owned(),
            Err(_) => String::from_utf8_lossy(body).into_owned(),
        },
    }
}

type Reply = oneshot::Sender<Result<bool, Arc<StoreError>>>;

/// The group-commit front of the inbox.
#[derive(Clone)]
pub struct Ingestor {
    queue: mpsc::Sender<(NewEvent, Reply)>,
}

impl Ingestor {
    /// Starts `writers` writer tasks, each committing up to `max_batch` events at a time.
    pub fn spawn(store: Arc<dyn Store>, writers: usize, max_batch: usize) -> Self {
        let (queue, receiver) = mpsc::channel::<(NewEvent, Reply)>(max_batch * writers * 4);
        let receiver = Arc::new(Mutex::new(receiver));
        for _ in 0..writers.max(1) {
            tokio::spawn(write_batches(
                store.clone(),
                receiver.clone(),
                max_batch.max(1),
            ));
        }
        Self { queue }
    }

    /// Stores the event durably; `Ok(false)` when it was stored already (a redelivery).
    pub async fn ingest(&self, event: NewEvent) -> Result<bool, Arc<StoreError>> {
        let (reply, answer) = oneshot::channel();
        self.queue
            .send((event, reply))
            .await
            .map_err(|_| Arc::new(StoreError::Corrupt("the event writer stopped".into())))?;
        answer
            .await
            .map_err(|_| Arc::new(StoreError::Corrupt("the event writer stopped".into())))?
    }
}

async fn write_batches(
    store: Arc<dyn Store>,
    receiver: Arc<Mutex<mpsc::Receiver<(NewEvent, Reply)>>>,
    max_batch: usize,
) {
    loop {
        let mut batch = Vec::with_capacity(max_batch);
        {
            let mut receiver = receiver.lock().await;
            let Some(first) = receiver.recv().await else {
                return;
            };
            batch.push(first);
            while batch.len() < max_batch {
                match receiver.try_recv() {
                    Ok(next) => batch.push(next),
                    Err(_) => break,
                }
            }
        }
        let (events, replies): (Vec<NewEvent>, Vec<Reply>) = batch.into_iter().unzip();
        match store.insert_events(&events).await {
            Ok(fresh) => {
                for (reply, fresh) in replies.into_iter().zip(fresh) {
                    let _ = reply.send(Ok(fresh));
                }
            }
            Err(err) => {
                tracing::warn!(error = %err, events = events.len(), "event batch not stored");
                let err = Arc::new(err);
                for reply in replies {
                    let _ = reply.send(Err(err.clone()));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelopes_name_their_customer() {
        let customer = parse_envelope(
            br#"{"id":"evt_1","type":"customer.updated","created":10,"livemode":false,
                 "data":{"object":{"id":"cus_A","object":"customer","email":"x@y.z"}}}"#,
        )
        .unwrap();
        assert_eq!(customer.customer_id.as_deref(), Some("cus_A"));
        let subscription = parse_envelope(
            br#"{"id":"evt_2","type":"customer.subscription.updated","created":11,
                 "data":{"object":{"id":"sub_1","object":"subscription","customer":"cus_B"}}}"#,
        )
        .unwrap();
        assert_eq!(subscription.customer_id.as_deref(), Some("cus_B"));
        let expanded = parse_envelope(
            br#"{"id":"evt_3","type":"invoice.paid","created":12,
                 "data":{"object":{"id":"in_1","object":"invoice","customer":{"id":"cus_C"}}}}"#,
        )
        .unwrap();
        assert_eq!(expanded.customer_id.as_deref(), Some("cus_C"));
    }

    #[test]
    fn malformed_envelopes_are_refused() {
        for body in [
            &b"not json"[..],
            br#"{"id":"evt_1"}"#,
            br#"{"id":"nope","type":"customer.updated","created":1,"data":{"object":{}}}"#,
            br#"{"id":"evt_1","type":"","created":1,"data":{"object":{}}}"#,
            br#"{"id":"evt_1","type":"x","created":-1,"data":{"object":{}}}"#,
            br#"{"id":"evt_1","type":"x","created":1,"data":{"object":{"object":"customer","id":"cus_'; --"}}}"#,
        ] {
            assert!(parse_envelope(body).is_err(), "{}", String::from_utf8_lossy(body));
        }
    }

    fn expect(livemode: bool) -> Expected {
        Expected {
            livemode,
            api_version: "2025-08-27.basil".into(),
        }
    }

    #[test]
    fn connect_events_are_skipped_and_other_versions_applied() {
        let body = br#"{"id":"evt_c","type":"customer.updated","created":1,"account":"acct_1",
                        "api_version":"2025-08-27.basil",
                        "data":{"object":{"object":"customer","id":"cus_1"}}}"#;
        let envelope = parse_envelope(body).unwrap();
        assert_eq!(envelope.account.as_deref(), Some("acct_1"));
        assert_eq!(
            file(envelope, body, &expect(false)).state,
            EventState::Skipped,
            "a connected account's customer is not ours"
        );
        let body = br#"{"id":"evt_v","type":"customer.updated","created":1,
                        "api_version":"2017-08-15",
                        "data":{"object":{"object":"customer","id":"cus_1"}}}"#;
        let envelope = parse_envelope(body).unwrap();
        assert_eq!(envelope.api_version.as_deref(), Some("2017-08-15"));
        assert_eq!(
            file(envelope, body, &expect(false)).state,
            EventState::Pending,
            "another version is applied, leniently"
        );
    }

    #[test]
    fn unknown_types_and_the_other_mode_are_skipped() {
        let body = br#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":{}}}"#;
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, &expect(false)).state,
            EventState::Skipped
        );
        let body = br#"{"id":"evt_2","type":"customer.updated","created":1,"livemode":true,
                        "data":{"object":{"object":"customer","id":"cus_1"}}}"#;
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, &expect(false)).state,
            EventState::Skipped
        );
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, &expect(true)).state,
            EventState::Pending
        );
        let body = br#"{"id":"evt_3","type":"customer.subscription.updated","created":1,
                        "data":{"object":{"object":"subscription","id":"sub_1"}}}"#;
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, &expect(false)).state,
            EventState::Skipped,
            "nothing to apply an event to without a customer"
        );
    }
}
