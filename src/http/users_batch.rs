//! `POST /v1/users/batch`: up to 1,000 users created or updated in one request, each as
//! `PUT /v1/users/{user_id}` would, with a result per row in the order given.

use axum::{extract::State, Json};
use serde::{Deserialize, Serialize};

use super::{
    admin::{read_user, write_user, UserBody, UserResponse, UserView, UserWithCustomerResponse},
    extract::JsonBody,
    AppState,
};
use crate::{
    domain::{ImportOutcome, UserId},
    error::ApiError,
    users_import::{self, RowError, Summary, BATCH_SIZE},
};

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserBatchBody {
    /// At most 1,000 users. Each row is checked on its own: a row that is not a valid user is
    /// answered `invalid` in its place, and the others are written.
    #[schema(value_type = Vec<UserBatchRow>, max_items = 1000)]
    pub users: Vec<serde_json::Value>,
}

/// A user of a batch: the body of `PUT /v1/users/{user_id}`, with its `id`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[allow(dead_code)] // the schema of a row; rows are read one by one (`user_from_json`)
pub struct UserBatchRow {
    pub id: String,
    pub email: String,
    pub email_verified: Option<bool>,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RowStatus {
    Created,
    /// A field changed: a push to the user's customer is queued, and `user.updated` written.
    Updated,
    Unchanged,
    /// Erased earlier and without an account since: not created again.
    Erased,
    Invalid,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserBatchResult {
    /// The row's `id`, when it has one that is a string.
    pub id: Option<String>,
    pub status: RowStatus,
    /// The user as stored (created, updated or unchanged).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<UserView>,
    /// Why an `invalid` row was not written: the codes of `PUT /v1/users/{user_id}`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<RowError>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UserBatchResponse {
    /// One per row, in the order of the request.
    pub results: Vec<UserBatchResult>,
    pub summary: Summary,
}

/// `POST /v1/users/batch`: create or update up to 1,000 users.
#[utoipa::path(post, path = "/v1/users/batch", tag = "admin", security(("admin_key" = [])),
    request_body = UserBatchBody,
    responses((status = 200, body = UserBatchResponse), (status = 400, body = crate::http::ErrorBody),
              (status = 401, body = crate::http::ErrorBody), (status = 422, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(rows))]
pub async fn import_users(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<UserBatchBody>,
) -> Result<Json<UserBatchResponse>, ApiError> {
    tracing::Span::current().record("rows", body.users.len());
    if body.users.len() > BATCH_SIZE {
        return Err(ApiError::InvalidRequest(format!(
            "a batch holds at most {BATCH_SIZE} users; this one has {}",
            body.users.len()
        )));
    }
    // Each row's error, or `None` for a valid row, whose user moves into `valid` (in order).
    let mut valid = Vec::with_capacity(body.users.len());
    let parsed = body
        .users
        .iter()
        .map(|row| match users_import::user_from_json(row) {
            Ok(user) => {
                valid.push(user);
                None
            }
            Err(error) => Some(error),
        })
        .collect::<Vec<_>>();
    let tombstones = state.worker.tombstones();
    let mut outcomes = users_import::import(state.store.as_ref(), tombstones, valid)
        .await?
        .into_iter();
    let mut summary = Summary::default();
    let results = body
        .users
        .iter()
        .zip(parsed)
        .map(|(row, parsed)| {
            let id = users_import::id_of(row).map(str::to_owned);
            let (status, user, error) = match parsed {
                Some(error) => {
                    summary.invalid += 1;
                    (RowStatus::Invalid, None, Some(error))
                }
                None => {
                    let outcome = outcomes.next().expect("an outcome per valid row");
                    summary.count(&outcome);
                    match outcome {
                        ImportOutcome::Created(user) => (RowStatus::Created, Some(user), None),
                        ImportOutcome::Updated(user) => (RowStatus::Updated, Some(user), None),
                        ImportOutcome::Unchanged(user) => (RowStatus::Unchanged, Some(user), None),
                        ImportOutcome::Erased => (RowStatus::Erased, None, None),
                    }
                }
            };
            UserBatchResult {
                id,
                status,
                user: user.map(Into::into),
                error,
            }
        })
        .collect();
    Ok(Json(UserBatchResponse { results, summary }))
}

/// The user whose id is `batch`: `/v1/users/batch` is this route's path, so its `GET` and
/// `PUT` are still that user's.
fn user_named_batch() -> UserId {
    UserId::parse("batch").expect("a valid user id")
}

pub async fn get_user_named_batch(
    State(state): State<AppState>,
) -> Result<Json<UserWithCustomerResponse>, ApiError> {
    read_user(&state, user_named_batch()).await
}

pub async fn put_user_named_batch(
    State(state): State<AppState>,
    JsonBody(body): JsonBody<UserBody>,
) -> Result<Json<UserResponse>, ApiError> {
    write_user(&state, user_named_batch(), body).await
}
