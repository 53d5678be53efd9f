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
}

#[derive(Deserialize)]
struct RawEnvelope {
    id: String,
    #[serde(rename = "type")]
    kind: String,
    created: i64,
    #[serde(default)]
    livemode: bool,
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
    })
}

/// How an event is filed: applied later if billsync handles its type, it belongs to the
/// configured mode and it names a customer, otherwise kept as `skipped`.
pub fn file(envelope: Envelope, body: &[u8], livemode: bool) -> NewEvent {
    let handled = HANDLED_TYPES.contains(&envelope.kind.as_str());
    if envelope.livemode != livemode {
        tracing::warn!(
            event_id = %envelope.id,
            event_livemode = envelope.livemode,
            "event from the other mode than the configured key: stored as skipped"
        );
    } else if handled && envelope.customer_id.is_none() {
        tracing::warn!(
            event_id = %envelope.id,
            kind = %envelope.kind,
            "event names no customer: stored as skipped"
        );
    }
    NewEvent {
        state: if handled && envelope.livemode == livemode && envelope.customer_id.is_some() {
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

    #[test]
    fn unknown_types_and_the_other_mode_are_skipped() {
        let body = br#"{"id":"evt_1","type":"invoice.paid","created":1,"data":{"object":{}}}"#;
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, false).state,
            EventState::Skipped
        );
        let body = br#"{"id":"evt_2","type":"customer.updated","created":1,"livemode":true,
                        "data":{"object":{"object":"customer","id":"cus_1"}}}"#;
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, false).state,
            EventState::Skipped
        );
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, true).state,
            EventState::Pending
        );
        let body = br#"{"id":"evt_3","type":"customer.subscription.updated","created":1,
                        "data":{"object":{"object":"subscription","id":"sub_1"}}}"#;
        assert_eq!(
            file(parse_envelope(body).unwrap(), body, false).state,
            EventState::Skipped,
            "nothing to apply an event to without a customer"
        );
    }
}
