//! The HTTP API, its flows and the Stripe client: a real billsync server (`TestApp`) against
//! wiremock, a Stripe stand-in or localstripe — admin and user routes, auth, webhooks and
//! their application, reconcile, portal configuration, injection, HTTP edges, and the client's
//! requests and faults. One binary, one module per former test file.

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
    #[path = "logs.rs"]
    mod logs;
    pub use logs::*;
    #[path = "proxy.rs"]
    mod proxy;
    pub use proxy::*;
    #[path = "../api/helpers.rs"]
    mod helpers;
    #[path = "receiver.rs"]
    pub mod receiver;
    #[path = "stripe_standin.rs"]
    pub mod stripe_standin;
    pub use helpers::*;
}

mod admin_api;
mod app_events;
mod auth;
mod customers_e2e;
mod http_edges;
mod injection;
mod portal_config;
mod reconcile;
mod stripe_client;
mod stripe_flows;
mod user_routes_e2e;
mod users_batch;
mod webhooks;
mod webhooks_apply;
mod webhooks_e2e;
