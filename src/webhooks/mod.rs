//! Stripe webhooks: verified (`signature`), durably ingested before they are acknowledged
//! (`ingest`), then applied in order per customer.

pub mod apply;
pub mod ingest;
pub mod signature;
