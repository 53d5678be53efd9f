//! billsync keeps an application's users and their Stripe customers in sync.
//!
//! The library holds the whole service; the `billsync` binary is a thin CLI over it.

pub mod app;
pub mod app_events;
pub mod auth;
pub mod billing;
pub mod cli;
pub mod config;
pub mod customers;
pub mod domain;
pub mod error;
pub mod gdpr;
pub mod http;
pub mod jobs;
pub mod keyed_lock;
pub mod plans;
pub mod portal;
pub mod portal_config;
pub mod profile;
pub mod reconcile;
pub mod retry;
pub mod standard_webhooks;
pub mod store;
pub mod stripe;
pub mod stripe_setup;
pub mod telemetry;
pub mod users_import;
pub mod webhooks;
