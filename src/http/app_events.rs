//! `GET /v1/app-events`: app events pulled in their total order, for apps that cannot receive
//! webhooks, and the operator's view of deliveries that failed.

use axum::{
    extract::{Path, RawQuery, State},
    Json,
};
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::AppState;
use crate::{
    domain::{AppEvent, AppEventBody, AppEventState},
    error::ApiError,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEventsQuery {
    after: Option<String>,
    limit: Option<u32>,
    state: Option<String>,
}

/// How far a delivery got, for the operator's listing.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct DeliveryView {
    pub state: AppEventState,
    pub attempts: i32,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub next_attempt_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub delivered_at: Option<OffsetDateTime>,
}

/// An app event as it is delivered (`id`, `type`, `timestamp`, `data`), with its delivery
/// when listed by state.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AppEventView {
    #[serde(flatten)]
    pub event: AppEventBody,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub delivery: Option<DeliveryView>,
}

impl AppEventView {
    fn delivered(event: &AppEvent) -> Self {
        Self {
            event: event.body(),
            delivery: None,
        }
    }

    fn with_delivery(event: &AppEvent) -> Self {
        Self {
            event: event.body(),
            delivery: Some(DeliveryView {
                state: event.state,
                attempts: event.attempts,
                last_error: event.last_error.clone(),
                next_attempt_at: event.next_attempt_at,
                delivered_at: event.delivered_at,
            }),
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AppEventsResponse {
    pub events: Vec<AppEventView>,
    /// Pass as `after` for the events that follow; `null` when this page is empty (ask again
    /// later with the same cursor).
    pub next_cursor: Option<String>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AppEventResponse {
    pub event: AppEventView,
}

/// Events sequenced per page read at most.
const PULL_SEQUENCE_BATCH: u32 = 10_000;

/// `GET /v1/app-events?after=&limit=`: events after the cursor, in their total order; a
/// reader that follows `next_cursor` sees every event exactly once, whatever order their
/// transactions committed in. `?state=pending|delivered|failed&limit=` lists by delivery
/// state instead, newest first.
#[utoipa::path(get, path = "/v1/app-events", tag = "admin", security(("admin_key" = [])),
    params(("after" = Option<String>, Query, description = "a next_cursor; from the oldest kept event when absent"),
           ("state" = Option<String>, Query, description = "pending, delivered or failed; not with after"),
           ("limit" = Option<u32>, Query, description = "at most 1000; default 100")),
    responses((status = 200, body = AppEventsResponse), (status = 401, body = crate::http::ErrorBody),
              (status = 422, body = crate::http::ErrorBody)))]
pub async fn list(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<AppEventsResponse>, ApiError> {
    let query: AppEventsQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    if let Some(raw) = query.state.as_deref() {
        if query.after.is_some() {
            return Err(ApiError::InvalidRequest(
                "state and after cannot be combined: after pages the total order".into(),
            ));
        }
        let wanted = AppEventState::parse(raw).ok_or_else(|| {
            ApiError::InvalidRequest(format!(
                "state must be pending, delivered or failed, not {raw:?}"
            ))
        })?;
        let events = state.store.list_app_events(wanted, limit).await?;
        return Ok(Json(AppEventsResponse {
            events: events.iter().map(AppEventView::with_delivery).collect(),
            next_cursor: None,
        }));
    }
    let after = match query.after.as_deref() {
        None => 0,
        Some(raw) => raw.parse::<i64>().ok().filter(|p| *p >= 0).ok_or_else(|| {
            ApiError::InvalidRequest("after is not a cursor from next_cursor".into())
        })?,
    };
    // Whatever committed since the deliverer last ran gets its place first, so a pull never
    // waits for it.
    state.store.sequence_app_events(PULL_SEQUENCE_BATCH).await?;
    let events = state.store.app_events_after(after, limit).await?;
    Ok(Json(AppEventsResponse {
        next_cursor: events.last().map(|e| e.position.to_string()),
        events: events.iter().map(AppEventView::delivered).collect(),
    }))
}

/// `POST /v1/app-events/{id}/redeliver`: sends an event again, due now, with its attempts
/// reset (a delivered one too: the receiver dedups on `webhook-id`).
#[utoipa::path(post, path = "/v1/app-events/{id}/redeliver", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = AppEventResponse), (status = 404, body = crate::http::ErrorBody)))]
pub async fn redeliver(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<AppEventResponse>, ApiError> {
    let event = state
        .store
        .redeliver_app_event(&id)
        .await?
        .ok_or(ApiError::AppEventNotFound)?;
    Ok(Json(AppEventResponse {
        event: AppEventView::with_delivery(&event),
    }))
}
