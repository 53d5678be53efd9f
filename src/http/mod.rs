//! The HTTP surface: `app(state)` builds the router, `server::serve` serves it on a listener
//! (both put together by `crate::app`), and `shutdown_signal` says when to stop.

mod admin;
mod app_events;
pub mod extract;
pub mod limits;
mod openapi;
mod reconcile;
pub mod server;
mod user;
mod users_batch;
mod webhooks;

use std::{future::Future, sync::Arc, time::Duration};

use axum::{
    extract::{DefaultBodyLimit, State},
    http::{HeaderName, HeaderValue, Method, Request, StatusCode},
    middleware,
    response::IntoResponse,
    routing::{delete, get, post, put},
    Json, Router,
};
use serde_json::json;
use tower_http::{
    cors::{AllowOrigin, CorsLayer},
    request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer},
    trace::TraceLayer,
};

pub use admin::{UserBody, UserView};
pub use openapi::document as openapi_document;

use crate::{
    auth::JwtVerifier,
    config::{Config, Secret},
    customers::CustomerResolver,
    error::ApiError,
    jobs::OutboxWorker,
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

/// Everything a request handler needs. Cloned per request by the `State` extractor, so it is one
/// `Arc` (the clone is a reference count, not a copy of every client and setting).
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

pub struct AppStateInner {
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
    /// What a verified event must match to be applied (mode, pinned API version).
    pub expected_events: crate::webhooks::ingest::Expected,
    pub cors_origins: Vec<HeaderValue>,
    pub stripe_rps: u32,
    pub body_read_timeout: Duration,
    /// Per-user buckets of the user routes that call Stripe.
    pub user_limits: limits::UserLimits,
    /// The plans file: what the billing read computes plans with.
    pub plans: Arc<crate::plans::Plans>,
}

impl AppState {
    pub fn new(config: &Config, store: Arc<dyn Store>, stripe: StripeClient) -> Self {
        crate::telemetry::prometheus(); // record from the first request on
        Self(Arc::new(AppStateInner {
            stripe_rps: config.stripe_rps,
            body_read_timeout: config.body_read_timeout,
            user_limits: limits::UserLimits::new(&config.user_limits),
            plans: config.app_events.plans.clone(),
            cors_origins: config
                .cors_origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o).ok())
                .collect(),
            worker: OutboxWorker::new(store.clone(), stripe.clone(), config.outbox.clone())
                .with_erasure_pepper(config.erasure_pepper.clone()),
            jwt: JwtVerifier::from_config(&config.jwt),
            app_url: config.app_url.clone(),
            webhooks: config.webhooks.clone(),
            ingestor: crate::webhooks::ingest::Ingestor::spawn(
                store.clone(),
                config.webhooks.writers,
                config.webhooks.max_batch,
            ),
            expected_events: crate::webhooks::ingest::Expected {
                livemode: config.livemode(),
                api_version: config.stripe.api_version.clone(),
            },
            applier: crate::webhooks::apply::Applier::new(
                store.clone(),
                stripe.clone(),
                config.outbox.clone(),
                config.webhooks.retention,
            )
            // A quarter of the pool: ingestion and the API keep the rest.
            .with_concurrency(config.db_max_connections as usize / 4),
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
        }))
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
            "/v1/users/batch",
            post(users_batch::import_users)
                .get(users_batch::get_user_named_batch)
                .put(users_batch::put_user_named_batch),
        )
        .route(
            "/v1/users/{user_id}/customer",
            post(admin::resolve_customer),
        )
        .route("/v1/users/{user_id}/billing", get(admin::get_user_billing))
        .route("/v1/app-events", get(app_events::list))
        .route("/v1/app-events/{id}/redeliver", post(app_events::redeliver))
        .route("/v1/outbox", get(admin::list_outbox))
        .route("/v1/events", get(admin::list_events))
        .route("/v1/events/{id}/replay", post(admin::replay_event))
        .route("/v1/outbox/{id}/retry", post(admin::retry_outbox_job))
        .route("/metrics", get(metrics))
        .route("/v1/reconcile", post(reconcile::start))
        .route("/v1/reconcile/{id}", get(reconcile::get))
        .route_layer(middleware::from_fn(stripe_interactive))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            admin::require_admin_key,
        ));

    // Called from the app's pages in a browser: the only routes with CORS.
    let user = Router::new()
        .route("/api/user/profile", put(user::update_profile))
        .route(
            "/api/billing/create-portal-session",
            post(user::create_portal_session),
        )
        .route("/api/user/billing", get(user::get_billing))
        .route("/api/user/export-data", get(user::export_data))
        .route("/api/user/delete-account", delete(user::delete_account))
        .route_layer(middleware::from_fn(stripe_interactive))
        // Set here, under the CORS layer, so a preflight of a PUT-only route reaches CORS.
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(cors(&state.cors_origins));

    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/openapi.json", get(openapi::serve))
        .route("/api/webhooks/stripe", post(webhooks::receive))
        .merge(user)
        .merge(admin)
        .fallback(|| async { ApiError::RouteNotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(extract::BODY_LIMIT))
        .layer(axum::Extension(extract::BodyReadTimeout(
            state.body_read_timeout,
        )))
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
        .layer(middleware::from_fn(crate::telemetry::track_http))
        .layer(PropagateRequestIdLayer::new(REQUEST_ID))
        .layer(SetRequestIdLayer::new(REQUEST_ID, MakeRequestUuid))
        .layer(middleware::map_request(drop_unusable_request_id))
        .with_state(state)
}

/// A person waits for the answer of a user or admin route: its Stripe calls go before
/// background work when the request budget is short. (Work a handler spawns is background
/// unless it carries the class over, as the admin resolve does.)
async fn stripe_interactive(
    request: axum::extract::Request,
    next: middleware::Next,
) -> axum::response::Response {
    crate::stripe::with_priority(crate::stripe::Priority::Interactive, next.run(request)).await
}

/// A client's `x-request-id` is kept (so a trace spans the app and billsync) only if it is a
/// short token; anything else is replaced by a generated id, so it cannot forge log content.
async fn drop_unusable_request_id<B>(mut request: Request<B>) -> Request<B> {
    let usable = request.headers().get(&REQUEST_ID).is_none_or(|v| {
        (1..=128).contains(&v.len())
            && v.as_bytes()
                .iter()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(b))
    });
    if !usable {
        request.headers_mut().remove(&REQUEST_ID);
    }
    request
}

/// CORS for the browser-facing user routes: exact origins only, with credentials (the
/// `Authorization` header); no configured origin means no cross-origin access.
fn cors(origins: &[HeaderValue]) -> CorsLayer {
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins.iter().cloned()))
        .allow_methods([Method::GET, Method::PUT, Method::POST, Method::DELETE])
        .allow_headers([
            axum::http::header::AUTHORIZATION,
            axum::http::header::CONTENT_TYPE,
            REQUEST_ID,
        ])
        .expose_headers([REQUEST_ID])
        .allow_credentials(true)
        .max_age(Duration::from_secs(600))
}

/// Prometheus text: counters and histograms recorded as things happen, and queue gauges read
/// from the database at scrape time (so every instance reports the shared queues).
#[utoipa::path(get, path = "/metrics", tag = "admin", security(("admin_key" = [])),
    responses((status = 200, description = "Prometheus text format", body = String, content_type = "text/plain"),
              (status = 401, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub(crate) async fn metrics(State(state): State<AppState>) -> Result<impl IntoResponse, ApiError> {
    let stats = state.store.queue_stats().await?;
    let age = |at: Option<time::OffsetDateTime>| {
        at.map_or(0.0, |at| {
            (time::OffsetDateTime::now_utc() - at)
                .as_seconds_f64()
                .max(0.0)
        })
    };
    metrics::gauge!("billsync_outbox_depth").set(stats.outbox_depth as f64);
    metrics::gauge!("billsync_outbox_oldest_pending_age_seconds")
        .set(age(stats.outbox_oldest_pending));
    metrics::gauge!("billsync_outbox_failed_jobs").set(stats.outbox_failed as f64);
    metrics::gauge!("billsync_webhook_events_pending").set(stats.events_pending as f64);
    metrics::gauge!("billsync_webhook_oldest_pending_age_seconds")
        .set(age(stats.events_oldest_pending));
    metrics::gauge!("billsync_webhook_events_failed").set(stats.events_failed as f64);
    let (undelivered, oldest_undelivered) = state.store.app_event_backlog().await?;
    metrics::gauge!("billsync_app_events_undelivered").set(undelivered as f64);
    metrics::gauge!("billsync_app_events_oldest_undelivered_age_seconds")
        .set(age(oldest_undelivered));
    let prometheus = crate::telemetry::prometheus();
    prometheus.run_upkeep();
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        prometheus.render(),
    ))
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

/// Takes over SIGINT and SIGTERM now, and completes when either arrives.
///
/// The handlers are registered when this is called, not when the future is first polled:
/// `serve` calls it before it binds the listener, so a SIGTERM sent as soon as the port
/// answers is a clean stop rather than the default action (death by the signal).
pub fn shutdown_signal() -> std::io::Result<impl Future<Output = ()> + Send> {
    #[cfg(unix)]
    let stopped = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut interrupt = signal(SignalKind::interrupt())?;
        let mut terminate = signal(SignalKind::terminate())?;
        async move {
            tokio::select! {
                _ = interrupt.recv() => {},
                _ = terminate.recv() => {},
            }
        }
    };
    #[cfg(not(unix))]
    let stopped = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    Ok(async move {
        stopped.await;
        tracing::info!("shutdown signal received; finishing in-flight requests");
    })
}
