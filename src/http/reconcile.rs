//! `POST /v1/reconcile` starts a reconciliation in the background; `GET /v1/reconcile/{id}`
//! follows its progress and, once done, returns its report. Runs are recorded in the
//! database: any instance answers for any run, one runs at a time across instances (and
//! `billsync reconcile`), and a run whose process stopped reads as `interrupted`.

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::{Deserialize, Serialize};

use super::{extract::OptionalJsonBody, AppState};
use crate::{
    domain::ReconcileRunRecord,
    error::ApiError,
    reconcile::{self, Progress, RateLimiter},
};

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReconcileRun {
    pub id: String,
    /// `running`, `done`, `failed` or `interrupted` (the process running it stopped).
    pub status: String,
    pub apply: bool,
    #[schema(value_type = HashMap<String, serde_json::Value>)]
    pub progress: serde_json::Value,
    /// The full report, once done.
    #[schema(value_type = Option<HashMap<String, serde_json::Value>>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<serde_json::Value>,
    /// Why a failed or interrupted run ended (Stripe or the database was unavailable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

impl From<ReconcileRunRecord> for ReconcileRun {
    fn from(run: ReconcileRunRecord) -> Self {
        Self {
            id: run.id,
            status: run.status,
            apply: run.apply,
            progress: run.progress,
            report: run.report,
            error: run.error,
        }
    }
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RunResponse {
    pub run: ReconcileRun,
}

#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    /// Fix what is safe to fix (default false: report only).
    #[serde(default)]
    pub apply: bool,
}

/// Starts a reconciliation in the background; 409 while one runs (on any instance).
#[utoipa::path(post, path = "/v1/reconcile", tag = "admin", security(("admin_key" = [])),
    request_body(content = Option<StartRequest>),
    responses((status = 202, body = RunResponse), (status = 409, body = crate::http::ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    OptionalJsonBody(body): OptionalJsonBody<StartRequest>,
) -> Result<(StatusCode, Json<RunResponse>), ApiError> {
    let apply = body.unwrap_or_default().apply;
    let id = reconcile::start_recorded(state.store.as_ref(), apply)
        .await?
        .ok_or(ApiError::ReconcileRunning)?;
    let run = ReconcileRun {
        id: id.clone(),
        status: "running".into(),
        apply,
        progress: serde_json::to_value(Progress::default()).unwrap_or_default(),
        report: None,
        error: None,
    };
    tokio::spawn(async move {
        let limiter = RateLimiter::per_second(state.stripe_rps);
        // A failure is recorded with the run (and logged there).
        let _ = reconcile::run_recorded(
            state.store.as_ref(),
            &state.stripe,
            &limiter,
            apply,
            &id,
            &|_| {},
        )
        .await;
    });
    Ok((StatusCode::ACCEPTED, Json(RunResponse { run })))
}

/// A run's progress, and its report once done.
#[utoipa::path(get, path = "/v1/reconcile/{id}", tag = "admin", security(("admin_key" = [])),
    params(("id" = String, Path)),
    responses((status = 200, body = RunResponse), (status = 404, body = crate::http::ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Path(id): Path<String>,
) -> Result<Json<RunResponse>, ApiError> {
    let run = state
        .store
        .reconcile_run(&id)
        .await?
        .ok_or(ApiError::ReconcileNotFound)?;
    Ok(Json(RunResponse { run: run.into() }))
}
