//! The app backend's API (Bearer `BILLSYNC_ADMIN_API_KEY`): users and their customers.

use axum::{
    extract::{Request, State},
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
    domain::{Email, LinkSource, PersonName, Phone, UserId},
    error::ApiError,
    store::{CustomerLink, User, UserUpsert},
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

#[derive(Debug, Deserialize)]
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
        Ok(UserUpsert {
            id,
            email: Email::parse(&self.email)?,
            email_verified: self.email_verified,
            first_name: PersonName::parse_optional(self.first_name.as_deref(), "first_name")?,
            last_name: PersonName::parse_optional(self.last_name.as_deref(), "last_name")?,
            phone: self
                .phone
                .as_deref()
                .filter(|p| !p.trim().is_empty())
                .map(Phone::parse)
                .transpose()?,
        })
    }
}

#[derive(Debug, Serialize)]
pub struct UserView {
    pub id: UserId,
    pub email: String,
    pub email_verified: bool,
    pub first_name: Option<String>,
    pub last_name: Option<String>,
    pub phone: Option<String>,
    pub version: i64,
    #[serde(with = "time::serde::rfc3339")]
    pub created_at: OffsetDateTime,
    #[serde(with = "time::serde::rfc3339")]
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

#[derive(Debug, Serialize)]
pub struct LinkView {
    pub id: String,
    pub linked_via: LinkSource,
    #[serde(with = "time::serde::rfc3339")]
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

#[derive(Debug, Serialize)]
pub struct UserResponse {
    pub user: UserView,
}

#[derive(Debug, Serialize)]
pub struct UserWithCustomerResponse {
    pub user: UserView,
    pub customer: Option<LinkView>,
}

#[derive(Debug, Serialize)]
pub struct ResolveResponse {
    pub customer_id: String,
    pub source: LinkSource,
}

/// `PUT /v1/users/{user_id}`: create or replace the user's profile.
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn put_user(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
    JsonBody(body): JsonBody<UserBody>,
) -> Result<Json<UserResponse>, ApiError> {
    let upsert = body.into_upsert(user_id)?;
    let user = state.store.upsert_user(&upsert).await?;
    Ok(Json(UserResponse { user: user.into() }))
}

/// `GET /v1/users/{user_id}`: the user and their customer link.
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn get_user(
    State(state): State<AppState>,
    UserIdPath(user_id): UserIdPath,
) -> Result<Json<UserWithCustomerResponse>, ApiError> {
    let user = state
        .store
        .get_user(&user_id)
        .await?
        .ok_or(ApiError::UserNotFound)?;
    let link = state.store.get_link(&user_id).await?;
    Ok(Json(UserWithCustomerResponse {
        user: user.into(),
        customer: link.map(Into::into),
    }))
}

/// `POST /v1/users/{user_id}/customer`: resolve (find or create) the user's Stripe customer,
/// upserting the user first when a body is given.
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
    let resolved = state.resolver.resolve(&user_id).await?;
    Ok(Json(ResolveResponse {
        customer_id: resolved.customer_id.to_string(),
        source: resolved.source,
    }))
}
