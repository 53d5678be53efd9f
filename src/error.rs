//! The one error type of the HTTP API. Every failure a client can cause has a stable code and
//! a clear message; everything else is a 500 "internal error" whose cause goes to the log,
//! inside the request's span, never to the client.

use axum::{
    http::StatusCode,
    response::{IntoResponse, Response},
    Json,
};
use serde_json::json;

use crate::{
    customers::ResolveError, domain::ValidationError, store::StoreError, stripe::StripeError,
};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("missing or invalid credentials")]
    Unauthorized,
    #[error("the admin API is disabled: set BILLSYNC_ADMIN_API_KEY to enable it")]
    AdminDisabled,
    #[error("request body is not valid JSON: {0}")]
    InvalidJson(String),
    #[error("{0}")]
    InvalidRequest(String),
    #[error("{0}")]
    Validation(#[from] ValidationError),
    #[error("request body is larger than {limit} bytes")]
    PayloadTooLarge { limit: usize },
    #[error("user not found")]
    UserNotFound,
    #[error("no route for this path")]
    RouteNotFound,
    #[error("method not allowed for this path")]
    MethodNotAllowed,
    #[error("Stripe is unavailable; nothing was changed, try again later")]
    StripeUnavailable,
    #[error("another request is resolving this user's customer; try again shortly")]
    ResolveBusy,
    #[error("the database is unavailable; try again later")]
    DatabaseUnavailable,
    #[error("user authentication is not configured: set BILLSYNC_JWT_SECRET or BILLSYNC_JWKS_URL")]
    AuthDisabled,
    #[error("the token's signing keys cannot be fetched right now; try again later")]
    AuthUnavailable,
    #[error("the token carries no email claim; billsync needs one to create the user")]
    EmailRequired,
    #[error("{0}")]
    InvalidProfile(#[from] crate::profile::InvalidProfile),
    #[error("no Stripe customer is linked to this user")]
    NoCustomer,
    #[error("this portal flow needs an active subscription, and the user has none")]
    NoSubscription,
    #[error("the billing portal is not configured: set APP_URL")]
    PortalNotConfigured,
    #[error("this account is being deleted")]
    DeletionPending,
    #[error("this account was deleted; sign in again to start a new one")]
    AccountErased,
    #[error("the profile changed concurrently too often; try again")]
    Contended,
    #[error("no such outbox job")]
    JobNotFound,
    #[error("only failed jobs can be retried")]
    JobNotFailed,
    #[error("{0}")]
    WebhookSignature(#[from] crate::webhooks::signature::SignatureError),
    #[error("the event is not valid: {0}")]
    InvalidPayload(String),
    #[error("webhooks are not configured: set STRIPE_WEBHOOK_SECRET")]
    WebhooksDisabled,
    #[error("no such event")]
    EventNotFound,
    #[error("no such app event")]
    AppEventNotFound,
    #[error("the request body did not arrive in time")]
    RequestTimeout,
    #[error("no such reconciliation run (the newest 20 finished runs are kept)")]
    ReconcileNotFound,
    #[error("a reconciliation is already running (here, on another instance, or a `billsync reconcile`)")]
    ReconcileRunning,
    /// The signed-in user's bucket for this route is empty (see `http::limits`).
    #[error("too many requests of this kind; try again in {retry_after_secs} s")]
    RateLimited { retry_after_secs: u64 },
    /// Stripe refused the request (its validation is stricter than ours somewhere).
    #[error("Stripe refused the request: {message}")]
    StripeRejected {
        code: Option<String>,
        message: String,
    },
    /// Anything else: logged with its cause, answered as "internal error".
    #[error("internal error")]
    Internal(#[source] anyhow::Error),
}

impl ApiError {
    pub fn internal(err: impl Into<anyhow::Error>) -> Self {
        Self::Internal(err.into())
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::InvalidJson(_) | Self::WebhookSignature(_) | Self::InvalidPayload(_) => {
                StatusCode::BAD_REQUEST
            }
            Self::InvalidRequest(_) | Self::Validation(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Self::PayloadTooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UserNotFound | Self::RouteNotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::AccountErased => StatusCode::GONE,
            Self::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ResolveBusy
            | Self::NoSubscription
            | Self::DeletionPending
            | Self::Contended
            | Self::JobNotFailed
            | Self::ReconcileRunning => StatusCode::CONFLICT,
            Self::EmailRequired | Self::InvalidProfile(_) | Self::StripeRejected { .. } => {
                StatusCode::UNPROCESSABLE_ENTITY
            }
            Self::NoCustomer
            | Self::JobNotFound
            | Self::EventNotFound
            | Self::AppEventNotFound
            | Self::ReconcileNotFound => StatusCode::NOT_FOUND,
            Self::AdminDisabled
            | Self::StripeUnavailable
            | Self::DatabaseUnavailable
            | Self::AuthDisabled
            | Self::AuthUnavailable
            | Self::PortalNotConfigured
            | Self::WebhooksDisabled => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthorized => "unauthorized",
            Self::AdminDisabled => "admin_disabled",
            Self::InvalidJson(_) => "invalid_json",
            Self::InvalidRequest(_) => "invalid_request",
            Self::Validation(v) => v.code,
            Self::PayloadTooLarge { .. } => "payload_too_large",
            Self::UserNotFound => "user_not_found",
            Self::RouteNotFound => "not_found",
            Self::MethodNotAllowed => "method_not_allowed",
            Self::StripeUnavailable => "stripe_unavailable",
            Self::ResolveBusy => "resolve_in_progress",
            Self::DatabaseUnavailable => "database_unavailable",
            Self::AuthDisabled => "auth_disabled",
            Self::AuthUnavailable => "auth_unavailable",
            Self::EmailRequired => "email_required",
            Self::InvalidProfile(_) => "invalid_profile",
            Self::NoCustomer => "no_customer",
            Self::NoSubscription => "no_subscription",
            Self::PortalNotConfigured => "portal_not_configured",
            Self::DeletionPending => "account_deletion_pending",
            Self::AccountErased => "account_erased",
            Self::Contended => "conflict",
            Self::JobNotFound => "job_not_found",
            Self::JobNotFailed => "job_not_failed",
            Self::WebhookSignature(e) => e.code(),
            Self::InvalidPayload(_) => "invalid_payload",
            Self::WebhooksDisabled => "webhooks_disabled",
            Self::EventNotFound => "event_not_found",
            Self::AppEventNotFound => "app_event_not_found",
            Self::RequestTimeout => "request_timeout",
            Self::ReconcileNotFound => "reconcile_not_found",
            Self::ReconcileRunning => "reconcile_in_progress",
            Self::RateLimited { .. } => "rate_limited",
            Self::StripeRejected { .. } => "stripe_rejected",
            Self::Internal(_) => "internal_error",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = self.status();
        match &self {
            Self::Internal(cause) => tracing::error!(error = ?cause, "request failed"),
            Self::DatabaseUnavailable | Self::StripeUnavailable => {
                tracing::warn!(code = self.code(), "dependency unavailable")
            }
            _ => tracing::debug!(
                code = self.code(),
                status = status.as_u16(),
                "request rejected"
            ),
        }
        let body = json!({"error": {"code": self.code(), "message": self.to_string()}});
        let mut response = (status, Json(body)).into_response();
        if let Self::RateLimited { retry_after_secs } = self {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from(retry_after_secs),
            );
        }
        if matches!(
            self,
            Self::DatabaseUnavailable | Self::StripeUnavailable | Self::ResolveBusy
        ) {
            response.headers_mut().insert(
                axum::http::header::RETRY_AFTER,
                axum::http::HeaderValue::from_static("1"),
            );
        }
        response
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                Self::DatabaseUnavailable
            }
            other => Self::internal(other),
        }
    }
}

impl From<StripeError> for ApiError {
    fn from(err: StripeError) -> Self {
        match &err {
            // The client has logged the failure with its operation and attempts.
            e if e.is_unavailable() => Self::StripeUnavailable,
            StripeError::Api(api) if api.status == 401 || api.status == 403 => {
                // billsync's own key is wrong or lacks a permission: an operator's problem.
                tracing::error!(error = %err, "Stripe refused billsync's key");
                Self::StripeUnavailable
            }
            StripeError::Api(api) if (400..500).contains(&api.status) && api.status != 404 => {
                Self::StripeRejected {
                    code: api.code.clone(),
                    message: api.code.clone().unwrap_or_else(|| api.kind.clone()),
                }
            }
            _ => Self::internal(err),
        }
    }
}

impl From<ResolveError> for ApiError {
    fn from(err: ResolveError) -> Self {
        match err {
            ResolveError::UserNotFound => Self::UserNotFound,
            ResolveError::Busy => Self::ResolveBusy,
            ResolveError::ErasurePending => Self::DeletionPending,
            ResolveError::Stripe(e) => e.into(),
            ResolveError::Store(e) => e.into(),
            other @ ResolveError::BadCustomerId(_) => Self::internal(other),
        }
    }
}

impl From<crate::profile::ProfileError> for ApiError {
    fn from(err: crate::profile::ProfileError) -> Self {
        use crate::profile::ProfileError;
        match err {
            ProfileError::UserNotFound => Self::UserNotFound,
            ProfileError::Contended => Self::Contended,
            ProfileError::Store(e) => e.into(),
        }
    }
}

impl From<crate::portal::PortalError> for ApiError {
    fn from(err: crate::portal::PortalError) -> Self {
        use crate::portal::PortalError;
        match err {
            PortalError::NoCustomer => Self::NoCustomer,
            PortalError::NoSubscription => Self::NoSubscription,
            PortalError::NotConfigured => Self::PortalNotConfigured,
            PortalError::Stripe(e) => e.into(),
            PortalError::Store(e) => e.into(),
        }
    }
}
