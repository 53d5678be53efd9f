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
        super::users_batch::import_users,
        super::admin::get_user,
        super::admin::get_user_billing,
        super::app_events::list,
        super::app_events::redeliver,
        super::user::get_billing,
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
    // Each app event type's `data`, which no route names (events carry it as an object).
    components(schemas(
        crate::domain::CustomerLinkedData,
        crate::domain::CustomerUnlinkedData,
        crate::domain::UserUpdatedData,
        crate::domain::SubscriptionChangeData,
        crate::domain::PlanChangedData,
        crate::domain::UserErasedData,
        crate::domain::SyncFailedData,
    )),
    modifiers(&Security, &CommonErrors),
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

/// The answers any route can give, added where a route does not list them itself: malformed
/// or mis-shaped input, missing credentials, an oversized or slow body, a database that is down.
struct CommonErrors;

impl Modify for CommonErrors {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::{ContentBuilder, Ref, RefOr, ResponseBuilder};
        let common = [
            (
                "400",
                "Malformed JSON (`invalid_json`) or an invalid webhook",
            ),
            ("401", "Missing or invalid credentials (`unauthorized`)"),
            ("408", "The body did not arrive in time (`request_timeout`)"),
            ("413", "The body is over 1 MiB (`payload_too_large`)"),
            (
                "422",
                "Well-formed input of the wrong shape or value (`invalid_request`, …)",
            ),
            (
                "503",
                "The database (or a configured dependency) is unavailable",
            ),
        ];
        for item in openapi.paths.paths.values_mut() {
            let operations = [
                &mut item.get,
                &mut item.put,
                &mut item.post,
                &mut item.delete,
            ];
            for operation in operations.into_iter().flatten() {
                for (status, description) in common {
                    operation
                        .responses
                        .responses
                        .entry(status.to_owned())
                        .or_insert_with(|| {
                            RefOr::T(
                                ResponseBuilder::new()
                                    .description(description)
                                    .content(
                                        "application/json",
                                        ContentBuilder::new()
                                            .schema(Some(Ref::from_schema_name("ErrorBody")))
                                            .build(),
                                    )
                                    .build(),
                            )
                        });
                }
            }
        }
    }
}

pub async fn serve() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}

/// The document `GET /openapi.json` serves, pretty-printed (`billsync openapi`: clients are
/// generated from it without a running server).
pub fn document() -> String {
    ApiDoc::openapi()
        .to_pretty_json()
        .expect("the OpenAPI document serialises")
}
