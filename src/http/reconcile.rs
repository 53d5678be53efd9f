//! `POST /v1/reconcile` starts a reconciliation in the background; `GET /v1/reconcile/{id}`
//! follows its progress and, once done, returns its report. Runs live in the memory of the
//! instance that started them (the last few are kept).

use std::{
    collections::VecDeque,
    sync::{Arc, Mutex},
};

use axum::{
    extract::{Path, State},
    http::StatusCode,
    Json,
};
use serde::{Deserialize, Serialize};

use super::{extract::OptionalJsonBody, AppState};
use crate::{
    error::ApiError,
    reconcile::{self, Progress, RateLimiter, Report},
};

/// Finished runs kept for `GET` (besides a running one).
const KEPT_RUNS: usize = 20;

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ReconcileRun {
    pub id: String,
    /// `running`, `done` or `failed`.
    pub status: &'static str,
    pub apply: bool,
    #[schema(value_type = Object)]
    pub progress: Progress,
    /// The full report, once done.
    #[schema(value_type = Option<Object>)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub report: Option<Report>,
    /// Why a failed run failed (Stripe or the database was unavailable).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
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

#[derive(Default)]
pub struct Runs(VecDeque<ReconcileRun>);

pub type SharedRuns = Arc<Mutex<Runs>>;

fn update(runs: &SharedRuns, id: &str, change: impl FnOnce(&mut ReconcileRun)) {
    let mut runs = runs.lock().expect("reconcile runs lock");
    if let Some(run) = runs.0.iter_mut().find(|r| r.id == id) {
        change(run);
    }
}

/// Starts a reconciliation in the background; 409 while one runs on this instance.
#[utoipa::path(post, path = "/v1/reconcile", tag = "admin", security(("admin_key" = [])),
    request_body(content = Option<StartRequest>),
    responses((status = 202, body = RunResponse), (status = 409, body = crate::http::ErrorBody)))]
pub async fn start(
    State(state): State<AppState>,
    OptionalJsonBody(body): OptionalJsonBody<StartRequest>,
) -> Result<(StatusCode, Json<RunResponse>), ApiError> {
    let apply = body.unwrap_or_default().apply;
    let run = ReconcileRun {
        id: format!("rec_{}", uuid::Uuid::new_v4().simple()),
        status: "running",
        apply,
        progress: Progress::default(),
        report: None,
        error: None,
    };
    {
        let mut runs = state.reconcile_runs.lock().expect("reconcile runs lock");
        if runs.0.iter().any(|r| r.status == "running") {
            return Err(ApiError::ReconcileRunning);
        }
        runs.0.push_back(run.clone());
        while runs.0.len() > KEPT_RUNS {
            runs.0.pop_front();
        }
    }
    let id = run.id.clone();
    let runs = state.reconcile_runs.clone();
    tokio::spawn(async move {
        let limiter = RateLimiter::per_second(state.stripe_rps);
        let observe = |p: &Progress| update(&runs, &id, |run| run.progress = p.clone());
        let result = reconcile::run(
            state.store.as_ref(),
            &state.stripe,
            &limiter,
            apply,
            &observe,
        )
        .await;
        update(&runs, &id, |run| match result {
            Ok(report) => {
                run.status = "done";
                run.report = Some(report);
            }
            Err(err) => {
                tracing::warn!(run = %run.id, error = %err, "reconciliation failed");
                run.status = "failed";
                run.error = Some(match err {
                    reconcile::ReconcileError::Stripe(e) if e.is_unavailable() => {
                        "Stripe was unavailable; start the run again later".into()
                    }
                    reconcile::ReconcileError::Store(_) => {
                        "the database was unavailable; start the run again later".into()
                    }
                    reconcile::ReconcileError::Stripe(_) => "Stripe refused a request".into(),
                });
            }
        });
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
    let runs = state.reconcile_runs.lock().expect("reconcile runs lock");
    let run = runs
        .0
        .iter()
        .find(|r| r.id == id)
        .cloned()
        .ok_or(ApiError::ReconcileNotFound)?;
    Ok(Json(RunResponse { run }))
}
