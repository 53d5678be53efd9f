//! Background jobs: durable work towards Stripe (profile pushes, erasure sagas), kept in the
//! database's outbox so several instances share it. One `worker` claims due jobs and runs
//! each with the handler registered for its kind (`push_profile`, `erase`), retried with the
//! shared policy of `crate::retry` (exponential backoff with jitter, honouring
//! `Retry-After`) and parked as `failed` after the configured attempts. `outbox` assembles
//! the worker with all of billsync's jobs. Beside them, `plan_announcements`: the start-up
//! pass that tells users about a changed plans file (a one-off task, not an outbox job).

pub mod erase;
pub mod outbox;
pub mod plan_announcements;
pub mod push_profile;
pub mod worker;

pub use erase::ErasureStatus;
pub use outbox::OutboxWorker;
pub use worker::{JobHandler, Worker};
