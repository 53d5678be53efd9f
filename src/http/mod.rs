//! The HTTP surface: `app(state)` builds the router (tests call it directly); `serve` binds it.

mod admin;
pub mod extract;
mod openapi;
mod user;
mod webhooks;

use std::{sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, State},
    http::{HeaderName, Request, StatusCode},
    middleware,
    response::IntoResponse,
    routing::{delete, get, post, put},
    Json, Router,
};
use serde_json::json;
use tower_http::{
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

pub use admin::{UserBody, UserView};

use crate::{
    auth::JwtVerifier,
    config::{Config, Secret},
    customers::CustomerResolver,
    error::ApiError,
    outbox::OutboxWorker,
    store::Store,
    stripe::StripeClient,
};

/// The error document every failure answers with.
#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(serde::Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    /// Stable, machine-readable: `unauthorized`, `invalid_json`, `user_not_found`, …
    pub code: String,
    pub message: String,
}

/// Everything a request handler needs; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub stripe: StripeClient,
    pub resolver: CustomerResolver,
    pub worker: OutboxWorker,
    pub jwt: Option<Arc<JwtVerifier>>,
    pub admin_api_key: Option<Secret>,
    pub app_url: Option<String>,
    pub portal_configuration_id: Option<String>,
    pub webhooks: crate::config::WebhookConfig,
    pub ingestor: crate::webhooks::ingest::Ingestor,
    pub applier: crate::webhooks::apply::Applier,
    /// Whether the configured Stripe key is a live one; events of the other mode are skipped.
    pub livemode: bool,
}

impl AppState {
    pub fn new(config: &Config, store: Arc<dyn Store>, stripe: StripeClient) -> Self {
        Self {
            worker: OutboxWorker::new(store.clone(), stripe.clone(), config.outbox.clone()),
            jwt: JwtVerifier::from_config(&config.jwt),
            app_url: config.app_url.clone(),
            webhooks: config.webhooks.clone(),
            ingestor: crate::webhooks::ingest::Ingestor::spawn(
                store.clone(),
                config.webhooks.writers,
                config.webhooks.max_batch,
            ),
            livemode: config.livemode(),
            applier: crate::webhooks::apply::Applier::new(
                store.clone(),
                stripe.clone(),
                config.outbox.clone(),
                config.webhooks.retention,
            ),
            portal_configuration_id: config.portal_configuration_id.clone(),
            resolver: CustomerResolver::new(
                store.clone(),
                stripe.clone(),
                config.resolve_lease,
                config.livemode(),
            ),
            store,
            stripe,
            admin_api_key: config.admin_api_key.clone(),
        }
    }
}

const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route(
            "/v1/users/{user_id}",
            get(admin::get_user).put(admin::put_user),
        )
        .route(
            "/v1/users/{user_id}/customer",
            post(admin::resolve_customer),
        )
        .route("/v1/outbox", get(admin::list_outbox))
        .route("/v1/events", get(admin::list_events))
        .route("/v1/events/{id}/replay", post(admin::replay_event))
        .route("/v1/outbox/{id}/retry", post(admin::retry_outbox_job))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin_key,
        ));

    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi::serve))
        .route("/api/user/profile", put(user::update_profile))
        .route(
            "/api/billing/create-portal-session",
            post(user::create_portal_session),
        )
        .route("/api/user/export-data", get(user::export_data))
        .route("/api/user/delete-account", delete(user::delete_account))
        .route("/api/webhooks/stripe", post(webhooks::receive))
        .merge(admin)
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(
            TraceLayer::new_for_http().make_span_with(|request: &Request<_>| {
                let request_id = request
                    .headers()
                    .get(&REQUEST_ID)
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or("");
                tracing::info_span!(
                    "request",
                    method = %request.method(),
                    path = %request.uri().path(),
                    request_id,
                )
            }),
        )
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .with_state(state)
}

/// The process is up.
#[utoipa::path(get, path = "/healthz", tag = "health", responses((status = 200, description = "Up")))]
async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

/// The process can serve: its database answers.
#[utoipa::path(get, path = "/readyz", tag = "health",
    responses((status = 200, description = "Ready"), (status = 503, body = ErrorBody)))]
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    match tokio::time::timeout(Duration::from_secs(2), state.store.ping()).await {
        Ok(Ok(())) => (
            StatusCode::OK,
            Json(json!({"status": "ready", "database": state.store.backend()})),
        )
            .into_response(),
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "readiness check failed");
            ApiError::DatabaseUnavailable.into_response()
        }
        Err(_) => {
            tracing::warn!("readiness check timed out");
            ApiError::DatabaseUnavailable.into_response()
        }
    }
}

/// Serves until SIGINT or SIGTERM, then lets in-flight requests finish.
pub async fn serve(listener: tokio::net::TcpListener, router: Router) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown_signal())
        .await
}

pub async fn shutdown_signal() {
    let interrupt = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut signal) => {
                signal.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = interrupt => {},
        () = terminate => {},
    }
    tracing::info!("shutdown signal received; finishing in-flight requests");
}
