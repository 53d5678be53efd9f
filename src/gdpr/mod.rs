//! GDPR: export everything billsync holds about a user (`export`), and erase it
//! (`erasure`, a resumable saga run as an outbox job), leaving a keyed tombstone
//! (`tombstones`) so a token issued before the erasure cannot bring the person back.

pub mod erasure;
pub mod export;
pub mod tombstones;

pub use erasure::{run_erasure, ErasurePlan};
pub use export::{export, EXPORT_VERSION};
pub use tombstones::{subject_hash, Tombstones};
