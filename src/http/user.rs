//! Routes for the app's signed-in users (Bearer JWT). The user id comes only from the
//! verified token's `sub`, so nobody can read or change another user's data here.

use axum::{
    body::Body,
    extract::{FromRequestParts, State},
    http::{header, request::Parts, HeaderValue, StatusCode},
    response::{IntoResponse, Response},
    Json,
};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use time::OffsetDateTime;

use super::{
    extract::{JsonBody, OptionalJsonBody},
    limits::Limited,
    AppState,
};
use crate::{
    auth::{AuthError, AuthenticatedUser},
    domain::ChangeOrigin,
    error::ApiError,
    gdpr,
    jobs::ErasureStatus,
    portal::{self, PortalFlow},
    profile::{self, ProfileBody},
    store::{User, UserUpsert},
};

/// The caller, as their verified token says.
pub struct CurrentUser(pub AuthenticatedUser);

impl FromRequestParts<AppState> for CurrentUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        let verifier = state.jwt.as_ref().ok_or(ApiError::AuthDisabled)?;
        let token = parts
            .headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ApiError::Unauthorized)?;
        match verifier.verify(token.trim()).await {
            Ok(user) => Ok(Self(user)),
            Err(AuthError::KeysUnavailable(reason)) => {
                tracing::warn!(%reason, "cannot verify user tokens");
                Err(ApiError::AuthUnavailable)
            }
            Err(reason) => {
                // Why, for the operator; the client only learns "unauthorized".
                tracing::info!(%reason, "user token rejected");
                Err(ApiError::Unauthorized)
            }
        }
    }
}

/// The caller's user row, created from the token's claims on their first request. A token
/// issued after the row last changed carries the newer identity (the address verified or
/// changed in Supabase Auth since): its `email` and boolean `email_verified` are written as an
/// admin `PUT` would, pushing a new address to Stripe. An older token, or one without `iat`,
/// never overwrites the row.
async fn ensure_user(state: &AppState, auth: &AuthenticatedUser) -> Result<User, ApiError> {
    if issued_before_erasure(state, auth).await? {
        return Err(ApiError::AccountErased);
    }
    if let Some(user) = state.store.get_user(&auth.id).await? {
        return refresh_identity(state, auth, user).await;
    }
    let email = auth.email.clone().ok_or(ApiError::EmailRequired)?;
    let user = state
        .store
        .upsert_user_from(
            &UserUpsert {
                id: auth.id.clone(),
                email,
                email_verified: auth.email_verified.unwrap_or(false),
                first_name: None,
                last_name: None,
                phone: None,
            },
            ChangeOrigin::App,
        )
        .await?;
    tracing::info!(user_id = %user.id, "user created from token claims");
    Ok(user)
}

/// Whether the token's `sub` was erased after the token was issued (or the token carries no
/// `iat` to tell). Supabase tokens live about an hour and cannot be revoked: without this,
/// the same token would bring the erased person back; a token issued after the erasure
/// starts a new, empty account.
async fn issued_before_erasure(
    state: &AppState,
    auth: &AuthenticatedUser,
) -> Result<bool, ApiError> {
    let erased_at = state
        .worker
        .tombstones()
        .erased_at(state.store.as_ref(), &auth.id)
        .await?;
    Ok(erased_at.is_some_and(|at| auth.issued_at.is_none_or(|iat| iat <= at.unix_timestamp())))
}

async fn refresh_identity(
    state: &AppState,
    auth: &AuthenticatedUser,
    user: User,
) -> Result<User, ApiError> {
    let issued_after_change = auth.issued_at.is_some_and(|iat| {
        i128::from(iat) * 1_000 > user.updated_at.unix_timestamp_nanos() / 1_000_000
    });
    if !issued_after_change {
        return Ok(user);
    }
    let email = auth.email.clone().unwrap_or_else(|| user.email.clone());
    let email_verified = match auth.email_verified {
        Some(verified) => verified,
        // A new address the token does not vouch for is not verified.
        None => user.email_verified && email == user.email,
    };
    if email == user.email && email_verified == user.email_verified {
        return Ok(user);
    }
    let desired = UserUpsert {
        id: user.id.clone(),
        email,
        email_verified,
        first_name: user.first_name.clone(),
        last_name: user.last_name.clone(),
        phone: user.phone.clone(),
    };
    // Only over the row as read: a concurrent change is newer than this token's view.
    match state
        .store
        .update_user_if_version(&desired, user.version)
        .await?
    {
        Some(updated) => {
            tracing::info!(user_id = %updated.id, "identity updated from a newer token");
            Ok(updated)
        }
        None => Ok(state.store.get_user(&user.id).await?.unwrap_or(user)),
    }
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProfileView {
    pub id: String,
    pub email: String,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub updated_at: OffsetDateTime,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ProfileResponse {
    pub data: ProfileView,
}

/// Updates the caller's name and phone; the change reaches Stripe through the outbox.
#[utoipa::path(put, path = "/api/user/profile", tag = "user", request_body = ProfileBody,
    security(("user_jwt" = [])),
    responses((status = 200, body = ProfileResponse), (status = 401, body = crate::http::ErrorBody), (status = 410, body = crate::http::ErrorBody),
              (status = 422, body = crate::http::ErrorBody), (status = 409, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %auth.id))]
pub async fn update_profile(
    State(state): State<AppState>,
    CurrentUser(auth): CurrentUser,
    JsonBody(body): JsonBody<ProfileBody>,
) -> Result<Json<ProfileResponse>, ApiError> {
    let patch = body.into_patch()?;
    let user = ensure_user(&state, &auth).await?;
    if state.store.active_erase(&user.id).await?.is_some() {
        return Err(ApiError::DeletionPending);
    }
    let saved = profile::update_profile(state.store.as_ref(), &user.id, &patch).await?;
    Ok(Json(ProfileResponse {
        data: ProfileView {
            id: saved.id.to_string(),
            email: saved.email.to_string(),
            first_name: saved.first_name.map(|n| n.to_string()),
            last_name: saved.last_name.map(|n| n.to_string()),
            phone: saved.phone.map(|p| p.to_string()),
            updated_at: saved.updated_at,
        },
    }))
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct PortalBody {
    pub flow: Option<PortalFlow>,
}

#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct UrlResponse {
    pub url: String,
}

/// A billing-portal session for the caller's customer; it returns to `${APP_URL}/billing`.
#[utoipa::path(post, path = "/api/billing/create-portal-session", tag = "user",
    request_body(content = Option<PortalBody>), security(("user_jwt" = [])),
    responses((status = 200, body = UrlResponse), (status = 401, body = crate::http::ErrorBody), (status = 410, body = crate::http::ErrorBody),
              (status = 404, body = crate::http::ErrorBody), (status = 409, body = crate::http::ErrorBody),
              (status = 429, body = crate::http::ErrorBody, description = "The user's limit for this route is spent (`rate_limited`)",
               headers(("Retry-After" = u64, description = "Whole seconds until the next request is allowed"))),
              (status = 503, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %auth.id))]
pub async fn create_portal_session(
    State(state): State<AppState>,
    CurrentUser(auth): CurrentUser,
    OptionalJsonBody(body): OptionalJsonBody<PortalBody>,
) -> Result<Json<UrlResponse>, ApiError> {
    state
        .user_limits
        .charge(Limited::PortalSession, auth.id.as_str())?;
    let user = ensure_user(&state, &auth).await?;
    let url = portal::create_session(
        state.store.as_ref(),
        &state.stripe,
        state.app_url.as_deref(),
        state.portal_configuration_id.as_deref(),
        &user.id,
        body.unwrap_or_default().flow,
    )
    .await?;
    Ok(Json(UrlResponse { url }))
}

/// The caller's billing: customer, plan (features and limits) and subscriptions, from
/// billsync's mirror; no Stripe call, so a feature gate may ask on every page.
#[utoipa::path(get, path = "/api/user/billing", tag = "user", security(("user_jwt" = [])),
    responses((status = 200, body = crate::billing::BillingView),
              (status = 401, body = crate::http::ErrorBody), (status = 410, body = crate::http::ErrorBody)))]
#[tracing::instrument(skip_all, fields(user_id = %auth.id))]
pub async fn get_billing(
    State(state): State<AppState>,
    CurrentUser(auth): CurrentUser,
) -> Result<Json<crate::billing::BillingView>, ApiError> {
    let user = ensure_user(&state, &auth).await?;
    let view = crate::billing::read(state.store.as_ref(), &state.plans, &user.id).await?;
    Ok(Json(view))
}

/// Everything billsync holds about the caller, as one JSON document (GDPR export).
#[utoipa::path(get, path = "/api/user/export-data", tag = "user", security(("user_jwt" = [])),
    responses((status = 200, description = "The export document", content_type = "application/json"),
              (status = 401, body = crate::http::ErrorBody), (status = 410, body = crate::http::ErrorBody),
              (status = 429, body = crate::http::ErrorBody, description = "The user's limit for this route is spent (`rate_limited`)",
               headers(("Retry-After" = u64, description = "Whole seconds until the next request is allowed")))))]
#[tracing::instrument(skip_all, fields(user_id = %auth.id))]
pub async fn export_data(
    State(state): State<AppState>,
    CurrentUser(auth): CurrentUser,
) -> Result<Response, ApiError> {
    state
        .user_limits
        .charge(Limited::Export, auth.id.as_str())?;
    let user = ensure_user(&state, &auth).await?;
    let filename = format!("customer-data-{}.json", filename_safe(user.id.as_str()));
    let stream = gdpr::export(state.store.clone(), &state.stripe, user).await?;
    let body = Body::from_stream(stream.map(|chunk| {
        chunk.map_err(|err| {
            tracing::error!(error = %err, "export aborted mid-stream");
            std::io::Error::other("export aborted")
        })
    }));
    let mut response = Response::new(body);
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(
        header::CONTENT_DISPOSITION,
        HeaderValue::from_str(&format!("attachment; filename=\"{filename}\""))
            .map_err(ApiError::internal)?,
    );
    Ok(response)
}

/// A header-safe file name part: ids may contain anything but control characters.
fn filename_safe(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "-_.".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect()
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DeleteBody {
    /// Delete the Stripe customer too; by default it is kept, scrubbed of email, name, phone,
    /// description, address, shipping and billsync's metadata. Subscriptions are cancelled
    /// either way.
    #[serde(default)]
    pub delete_from_stripe: bool,
}

/// The account is deleted: the seed app's answer.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountDeleted {
    pub success: bool,
    /// `Account deleted successfully`
    pub message: &'static str,
}

/// The account's local rows are gone; a Stripe step failed and its job retries it.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct AccountDeletionPending {
    pub success: bool,
    /// `pending`
    pub status: &'static str,
}

/// Deletes the caller's account (GDPR erasure): 200 when done, 202 when a Stripe step is queued.
#[utoipa::path(delete, path = "/api/user/delete-account", tag = "user",
    request_body(content = Option<DeleteBody>), security(("user_jwt" = [])),
    responses((status = 200, body = AccountDeleted, description = "Deleted"),
              (status = 202, body = AccountDeletionPending, description = "Queued: a Stripe step failed and is retried"),
              (status = 401, body = crate::http::ErrorBody), (status = 410, body = crate::http::ErrorBody),
              (status = 429, body = crate::http::ErrorBody, description = "The user's limit for this route is spent (`rate_limited`)",
               headers(("Retry-After" = u64, description = "Whole seconds until the next request is allowed")))))]
#[tracing::instrument(skip_all, fields(subject = %gdpr::subject_hash(&auth.id)))]
pub async fn delete_account(
    State(state): State<AppState>,
    CurrentUser(auth): CurrentUser,
    OptionalJsonBody(body): OptionalJsonBody<DeleteBody>,
) -> Result<Response, ApiError> {
    // A repeat while the erasure is pending runs its Stripe steps again, so it is limited too.
    state
        .user_limits
        .charge(Limited::DeleteAccount, auth.id.as_str())?;
    let delete_customer = body.unwrap_or_default().delete_from_stripe;
    if issued_before_erasure(&state, &auth).await? {
        // A repeat of the erasure this token asked for is done already; a token from before
        // an erasure never reaches the account made since.
        if state.store.get_user(&auth.id).await?.is_some()
            && state.store.active_erase(&auth.id).await?.is_none()
        {
            return Err(ApiError::AccountErased);
        }
    }
    let status = state.worker.erase_now(&auth.id, delete_customer).await?;
    Ok(match status {
        ErasureStatus::Completed => (
            StatusCode::OK,
            Json(AccountDeleted {
                success: true,
                message: "Account deleted successfully",
            }),
        )
            .into_response(),
        ErasureStatus::Pending => (
            StatusCode::ACCEPTED,
            Json(AccountDeletionPending {
                success: true,
                status: "pending",
            }),
        )
            .into_response(),
    })
}
