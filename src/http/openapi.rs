//! `GET /openapi.json`, generated from the handlers' annotations.

use axum::Json;
use utoipa::{
    openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme},
    Modify, OpenApi,
};

#[derive(OpenApi)]
#[openapi(
    info(title = "billsync", description = "Keeps your users and their Stripe customers in sync"),
    paths(
        super::healthz,
        super::readyz,
        super::admin::put_user,
        super::admin::get_user,
        super::admin::resolve_customer,
        super::admin::list_outbox,
        super::admin::retry_outbox_job,
        super::user::update_profile,
        super::user::create_portal_session,
        super::user::export_data,
        super::user::delete_account,
        super::webhooks::receive,
        super::admin::list_events,
        super::admin::replay_event,
        super::metrics,
        super::reconcile::start,
        super::reconcile::get,
    ),
    modifiers(&Security),
)]
pub struct ApiDoc;

struct Security;

impl Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "admin_key",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components.add_security_scheme(
            "user_jwt",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("JWT")
                    .build(),
            ),
        );
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
