//! `POST /api/webhooks/stripe`: verify the raw body, store the event durably, then answer.

use axum::{extract::State, http::HeaderMap, Json};
use serde::Serialize;

use super::{extract::RawBody, AppState};
use crate::{
    error::ApiError,
    webhooks::{ingest, signature},
};

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct Received {
    pub received: bool,
}

/// Receives a Stripe event. 2xx only once the event is stored (a redelivery is a no-op);
/// 400 with a code for what is wrong with the request; 503 while the database is down, so
/// Stripe retries.
#[utoipa::path(post, path = "/api/webhooks/stripe", tag = "webhooks",
    params(("Stripe-Signature" = String, Header, pattern = "^[ -~]*$",
        description = "t=<unix time>,v1=<hex HMAC-SHA256>[,v1=…]: visible ASCII, as every HTTP header value")),
    request_body(content = String, content_type = "application/json"),
    responses((status = 200, body = Received), (status = 400, body = crate::http::ErrorBody),
              (status = 413, body = crate::http::ErrorBody), (status = 503, body = crate::http::ErrorBody)))]
pub async fn receive(
    State(state): State<AppState>,
    headers: HeaderMap,
    RawBody(body): RawBody,
) -> Result<Json<Received>, ApiError> {
    let result = store_event(&state, &headers, &body).await;
    match &result {
        Ok(filed) => {
            metrics::counter!("billsync_webhook_events_received_total", "result" => *filed)
                .increment(1)
        }
        Err(err) => metrics::counter!("billsync_webhook_rejections_total", "code" => err.code())
            .increment(1),
    }
    result.map(|_| Json(Received { received: true }))
}

/// Verifies and stores the event; says how it was filed: `stored` (to apply), `skipped` (kept,
/// not applied) or `duplicate` (a redelivery, nothing changed).
async fn store_event(
    state: &AppState,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<&'static str, ApiError> {
    if state.webhooks.secrets.is_empty() {
        return Err(ApiError::WebhooksDisabled);
    }
    let header = headers
        .get("stripe-signature")
        .and_then(|v| v.to_str().ok());
    signature::verify(
        header,
        body,
        &state.webhooks.secrets,
        state.webhooks.tolerance_secs,
        time::OffsetDateTime::now_utc().unix_timestamp(),
    )?;
    let envelope = ingest::parse_envelope(body).map_err(ApiError::InvalidPayload)?;
    let event = ingest::file(envelope, body, &state.expected_events);
    let (id, kind) = (event.id.clone(), event.kind.clone());
    let skipped = event.state == crate::store::EventState::Skipped;
    let fresh = state
        .ingestor
        .ingest(event)
        .await
        .map_err(|err| match &*err {
            crate::store::StoreError::Unavailable(_) => ApiError::DatabaseUnavailable,
            other => ApiError::internal(anyhow::anyhow!("{other}")),
        })?;
    tracing::debug!(event_id = %id, kind, fresh, "event received");
    Ok(match (fresh, skipped) {
        (false, _) => "duplicate",
        (true, true) => "skipped",
        (true, false) => "stored",
    })
}
