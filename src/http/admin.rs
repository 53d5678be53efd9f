//! The app backend's API (Bearer `BILLSYNC_ADMIN_API_KEY`): users and their customers.

use axum::{
    extract::{Path, RawQuery, Request, State},
    http::header::AUTHORIZATION,
    middleware::Next,
    response::Response,
    Json,
};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use time::OffsetDateTime;

use super::{
    extract::{JsonBody, OptionalJsonBody, UserIdPath},
    AppState,
};
use crate::{
    domain::{LinkSource, UserId},
    error::ApiError,
    store::{
        CustomerLink, EventState, JobKind, JobState, OutboxJob, StoredEvent, User, UserUpsert,
    },
};

/// Admin routes need the API key; a user's token never works here.
pub async fn require_admin_key(
    State(state): State<AppState>,
    request: Request,
    next: Next,
) -> Result<Response, ApiError> {
    let Some(expected) = &state.admin_api_key else {
        return Err(ApiError::AdminDisabled);
    };
    let presented = request
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .ok_or(ApiError::Unauthorized)?;
    // Compare digests so neither the content nor the length of the key leaks through timing.
    let matches: bool = Sha256::digest(presented.as_bytes())
        .ct_eq(&Sha256::digest(expected.expose().as_bytes()))
        .into();
    if !matches {
        return Err(ApiError::Unauthorized);
    }
    Ok(next.run(request).await)
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBody {
    pub email: String,
    #[serde(default)]
    pub email_verified: bool,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    /// An empty string clears the phone.
    pub phone: Option<String>,
}

impl UserBody {
    pub fn into_upsert(self, id: UserId) -> Result<UserUpsert, ApiError> {
        Ok(UserUpsert::parse(
            id,
            &self.email,
            self.email_verified,
            self.first_name.as_deref(),
            self.last_name.as_deref(),
            self.phone.as_deref(),
        )?)
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserView {
    #[schema(value_type = String)]
    pub id: UserId,
    pub email: String,
    pub email_verified: bool,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

impl From<User> for UserView {
    fn from(user: User) -> Self {
        Self {
            id: user.id,
            email: user.email.to_string(),
            email_verified: user.email_verified,
            first_name: user.first_name.map(|n| n.to_string()),
            last_name: user.last_name.map(|n| n.to_string()),
            phone: user.phone.map(|p| p.to_string()),
            version: user.version,
            created_at: user.created_at,
            updated_at: user.updated_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct LinkView {
    pub id: String,
    pub linked_via: LinkSource,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub linked_at: OffsetDateTime,
}

impl From<CustomerLink> for LinkView {
    fn from(link: CustomerLink) -> Self {
        Self {
            id: link.customer_id.to_string(),
            linked_via: link.linked_via,
            linked_at: link.linked_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserResponse {
    pub user: UserView,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserWithCustomerResponse {
    pub user: UserView,
    pub customer: Option<LinkView>,
    /// The mirrored subscriptions, as the billing read shows them.
    pub subscriptions: Vec<crate::billing::SubscriptionView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ResolveResponse {
    pub customer_id: String,
    pub source: LinkSource,
}

/// `PUT /v1/users/{user_id}`: create or replace the user's profile.
#[utoipa::path(put, path = "/v1/users/{user_id}", tag = "admin", security(("admin_key" = [])),
    params(("user_id" = String, Path)), request_body = UserBody,
    responses((status = 200, body = UserResponse), (status = 400, body = crate::http::ErrorBody),
              (status = 401, body = crate::http::ErrorBody), (status = 422, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn put_user(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
    JsonBody(body): JsonBody<UserBody>,
) -> Result<Json<UserResponse>, ApiError> {
    write_user(&state, user_id, body).await
}

pub(super) async fn write_user(
    state: &AppState,
    user_id: UserId,
    body: UserBody,
) -> Result<Json<UserResponse>, ApiError> {
    let upsert = body.into_upsert(user_id)?;
    let user = state.store.upsert_user(&upsert).await?;
    Ok(Json(UserResponse { user: user.into() }))
}

/// `GET /v1/users/{user_id}`: the user and their customer link.
#[utoipa::path(get, path = "/v1/users/{user_id}", tag = "admin", security(("admin_key" = [])),
    params(("user_id" = String, Path)),
    responses((status = 200, body = UserWithCustomerResponse), (status = 401, body = crate::http::ErrorBody),
              (status = 404, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn get_user(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
) -> Result<Json<UserWithCustomerResponse>, ApiError> {
    read_user(&state, user_id).await
}

pub(super) async fn read_user(
    state: &AppState,
    user_id: UserId,
) -> Result<Json<UserWithCustomerResponse>, ApiError> {
    let user = state
        .store
        .get_user(&user_id)
        .await?
        .ok_or(ApiError::UserNotFound)?;
    let link = state.store.get_link(&user_id).await?;
    let subscriptions = state.store.list_subscriptions(&user_id).await?;
    Ok(Json(UserWithCustomerResponse {
        user: user.into(),
        customer: link.map(Into::into),
        subscriptions: subscriptions
            .iter()
            .map(|s| crate::billing::SubscriptionView::new(s, &state.plans))
            .collect(),
    }))
}

/// `GET /v1/users/{user_id}/billing`: the user's customer, plan and subscriptions, from the
/// mirror (no Stripe call).
#[utoipa::path(get, path = "/v1/users/{user_id}/billing", tag = "admin", security(("admin_key" = [])),
    params(("user_id" = String, Path)),
    responses((status = 200, body = crate::billing::BillingView), (status = 401, body = crate::http::ErrorBody),
              (status = 404, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn get_user_billing(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
) -> Result<Json<crate::billing::BillingView>, ApiError> {
    if state.store.get_user(&user_id).await?.is_none() {
        return Err(ApiError::UserNotFound);
    }
    let view = crate::billing::read(state.store.as_ref(), &state.plans, &user_id).await?;
    Ok(Json(view))
}

/// `POST /v1/users/{user_id}/customer`: resolve (find or create) the user's Stripe customer,
/// upserting the user first when a body is given.
#[utoipa::path(post, path = "/v1/users/{user_id}/customer", tag = "admin", security(("admin_key" = [])),
    params(("user_id" = String, Path)), request_body(content = Option<UserBody>),
    responses((status = 200, body = ResolveResponse), (status = 401, body = crate::http::ErrorBody),
              (status = 404, body = crate::http::ErrorBody), (status = 409, body = crate::http::ErrorBody),
              (status = 503, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn resolve_customer(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
    OptionalJsonBody(body): OptionalJsonBody<UserBody>,
) -> Result<Json<ResolveResponse>, ApiError> {
    if let Some(body) = body {
        let upsert = body.into_upsert(user_id.clone())?;
        state.store.upsert_user(&upsert).await?;
    }
    // Detached: a client that hangs up must not cancel a resolve half-way (its claim would
    // block the user until the lease runs out); the work finishes and the next call is fast.
    // Its Stripe calls keep the request's class: the admin waits for them.
    let resolver = state.resolver.clone();
    let priority = crate::stripe::current_priority();
    let resolved = tokio::spawn(crate::stripe::with_priority(priority, async move {
        resolver.resolve(&user_id).await
    }))
    .await
    .map_err(ApiError::internal)??;
    Ok(Json(ResolveResponse {
        customer_id: resolved.customer_id.to_string(),
        source: resolved.source,
    }))
}

/// `?state=&limit=` of the admin list routes (outbox jobs, webhook events).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    state: Option<String>,
    limit: Option<u32>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobView {
    pub id: i64,
    pub kind: JobKind,
    pub user_id: String,
    pub state: JobState,
    pub attempts: i32,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub next_attempt_at: OffsetDateTime,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

impl From<OutboxJob> for JobView {
    fn from(job: OutboxJob) -> Self {
        Self {
            id: job.id,
            kind: job.kind,
            user_id: job.user_id,
            state: job.state,
            attempts: job.attempts,
            next_attempt_at: job.next_attempt_at,
            last_error: job.last_error,
            created_at: job.created_at,
            updated_at: job.updated_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobsResponse {
    pub jobs: Vec<JobView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct JobResponse {
    pub job: JobView,
}

/// `GET /v1/outbox?state=failed|pending|in_flight|done&limit=`: jobs towards Stripe, newest first.
#[utoipa::path(get, path = "/v1/outbox", tag = "admin", security(("admin_key" = [])),
    params(("state" = Option<String>, Query, description = "pending, in_flight, done or failed"),
           ("limit" = Option<u32>, Query, description = "at most 1000; default 100")),
    responses((status = 200, body = JobsResponse), (status = 401, body = crate::http::ErrorBody),
              (status = 422, body = crate::http::ErrorBody)))]
pub async fn list_outbox(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<JobsResponse>, ApiError> {
    let query: ListQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))?;
    let job_state = query
        .state
        .as_deref()
        .map(|s| {
            JobState::parse(s).ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "state must be pending, in_flight, done or failed, not {s:?}"
                ))
            })
        })
        .transpose()?;
    let limit = query.limit.unwrap_or(100).clamp(1, 1000);
    let jobs = state.store.list_jobs(job_state, limit).await?;
    Ok(Json(JobsResponse {
        jobs: jobs.into_iter().map(Into::into).collect(),
    }))
}

/// `POST /v1/outbox/{id}/retry`: puts a failed job back in the queue, due now.
#[utoipa::path(post, path = "/v1/outbox/{id}/retry", tag = "admin", security(("admin_key" = [])),
    params(("id" = i64, Path)),
    responses((status = 200, body = JobResponse), (status = 404, body = crate::http::ErrorBody),
              (status = 409, body = crate::http::ErrorBody)))]
pub async fn retry_outbox_job(
    State(state): State<AppState>,
    Path(raw): Path<String>,
) -> Result<Json<JobResponse>, ApiError> {
    let id: i64 = raw.parse().map_err(|_| ApiError::JobNotFound)?;
    match state.store.retry_job(id).await? {
        Some(job) => Ok(Json(JobResponse { job: job.into() })),
        None if state.store.get_job(id).await?.is_some() => Err(ApiError::JobNotFailed),
        None => Err(ApiError::JobNotFound),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventView {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: String,
    pub created: i64,
    pub livemode: bool,
    pub customer_id: Option<String>,
    pub state: EventState,
    pub attempts: i32,
    pub last_error: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub received_at: OffsetDateTime,
}

impl From<StoredEvent> for EventView {
    fn from(event: StoredEvent) -> Self {
        Self {
            id: event.id,
            kind: event.kind,
            created: event.created,
            livemode: event.livemode,
            customer_id: event.customer_id,
            state: event.state,
            attempts: event.attempts,
            last_error: event.last_error,
            received_at: event.received_at,
        }
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventsResponse {
    pub events: Vec<EventView>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct EventResponse {
    pub event: EventView,
}

/// `GET /v1/events?state=pending|applied|skipped|failed&limit=`: the webhook inbox, newest first.
#[utoipa::path(get, path = "/v1/events", tag = "admin", security(("admin_key" = [])),
    params(("state" = Option<String>, Query, description = "pending, applied, skipped or failed"),
           ("limit" = Option<u32>, Query, description = "at most 1000; default 100")),
    responses((status = 200, body = EventsResponse), (status = 422, body = crate::http::ErrorBody)))]
pub async fn list_events(
    State(state): State<AppState>,
    RawQuery(query): RawQuery,
) -> Result<Json<EventsResponse>, ApiError> {
    let query: ListQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::InvalidRequest(format!("query: {e}")))?;
    let event_state = query
        .state
        .as_deref()
        .map(|s| {
            EventState::parse(s).ok_or_else(|| {
                ApiError::InvalidRequest(format!(
                    "state must be pending, applied, skipped or failed, not {s:?}"
                ))
            })
        })
        .transpose()?;
    let events = state
        .store
        .list_events(event_state, query.limit.unwrap_or(100).clamp(1, 1000))
        .await?;
    Ok(Json(EventsResponse {
        events: events.into_iter().map(Into::into).collect(),
    }))
}

/// `POST /v1/events/{id}/replay`: applies a stored event again.
#[utoipa::path(post, path = "/v1/events/{id}/replay", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = EventResponse), (status = 404, body = crate::http::ErrorBody)))]
pub async fn replay_event(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<EventResponse>, ApiError> {
    let event = state
        .store
        .replay_event(&id)
        .await?
        .ok_or(ApiError::EventNotFound)?;
    Ok(Json(EventResponse {
        event: event.into(),
    }))
}
