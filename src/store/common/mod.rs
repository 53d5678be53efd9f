//! The statements both backends run, written once. `postgres/mod.rs` and `sqlite/mod.rs` each
//! mount this folder, so it compiles once per backend, against that backend's store
//! (`Backend`) and its `dialect`: the database type, how a timestamp is stored, the clock,
//! and the `sql` that renders a statement's `{pieces}` (see `store::sql`). Clippy's
//! `duplicate_mod`, which guards against mounting a file twice by mistake, is allowed there.

pub(crate) mod app_events;
mod erasure;
pub(crate) mod events;
pub(crate) mod jobs;
pub(crate) mod links;
mod operations;
mod portal;
mod reconcile_runs;
mod resolve_claims;
pub(crate) mod rows;
mod subscriptions;
pub(crate) mod users;

use super::{dialect, Backend};
