//! A reconciliation run as the database keeps it: any instance can answer for it.

use serde_json::Value;
use time::OffsetDateTime;

#[derive(Debug, Clone, PartialEq)]
pub struct ReconcileRunRecord {
    pub id: String,
    pub apply: bool,
    /// `running`, `done`, `failed`, or `interrupted` (its process stopped before it finished:
    /// its lease ran out).
    pub status: String,
    pub progress: Value,
    /// The report, once `done`.
    pub report: Option<Value>,
    /// Why a `failed` or `interrupted` run ended.
    pub error: Option<String>,
    pub started_at: OffsetDateTime,
    pub finished_at: Option<OffsetDateTime>,
}
