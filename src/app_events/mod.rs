//! Telling the app what billsync changed: app events are written with each change (see
//! `domain::app_event`), delivered as signed Standard Webhooks in per-user commit order
//! (`delivery`, signed by `standard_webhooks`), and can be pulled with a cursor that never skips (`http::app_events`).

pub mod delivery;
