//! billsync as a system: the CLI, real `billsync serve` processes killed mid-work, two
//! instances at once, Stripe faults, outbox fencing and exclusive erasure.

/// The shared helpers this binary uses (`tests/support/`): only these pieces, so none is dead.
#[macro_use]
#[path = "../support"]
mod support {
    #[path = "stores.rs"]
    mod stores;
    pub use stores::*;
    #[macro_use]
    #[path = "backends.rs"]
    mod backends;
    pub use backends::*;
    #[path = "app.rs"]
    mod app;
    pub use app::*;
    #[path = "users.rs"]
    mod users;
    pub use users::*;
    #[path = "localstripe.rs"]
    mod localstripe;
    pub use localstripe::*;
    #[path = "process.rs"]
    pub mod process;
    #[path = "receiver.rs"]
    pub mod receiver;
    #[path = "receiver_faults.rs"]
    mod receiver_faults;
}

mod app_event_faults;
mod cli;
mod crash;
mod erasure_exclusive;
mod faults;
mod outbox_fencing;
mod two_instances;
mod users_import;
