//! The billing-portal configuration as code, against a Stripe stand-in that enforces what
//! Stripe enforces: the exact form fields Stripe documents on create and update, explicit
//! empties that clear what the file no longer says, no write for an unchanged file, drift
//! named field by field, and validation that names the key before anything is sent.

use crate::support;

use std::{
    collections::HashMap,
    process::Command,
    sync::{Arc, Mutex},
};

use billsync::portal_config::{apply, Applied, PortalSpec};
use serde_json::{json, Value};
use support::Backend;
use wiremock::{matchers::path_regex, Mock, MockServer, Request, Respond, ResponseTemplate};

const EXAMPLE: &str = include_str!("../../portal.example.toml");
const CONFIGURATIONS: &str = "/v1/billing_portal/configurations";

/// Billing-portal configurations as Stripe keeps them (API 2025-08-27.basil; the parameters
/// of stripe-node 18.5.0's `ConfigurationCreateParams` / `ConfigurationUpdateParams`, the
/// object of `Configuration`), with the rules billsync's first applies broke:
/// - create needs `features`; every feature sent needs `enabled` on create (only the two
///   toggles on update); a `cancellation_reason` needs `enabled`, and on create `options`
///   (an empty list is `options=`);
/// - an enabled `subscription_update` needs `products`, at most 10, each with `prices`;
/// - a parameter Stripe does not know is refused (`parameter_unknown`), and so is `key=` on a
///   field that is not `Emptyable` (the policy URLs on create);
/// - an update changes only what it sends, and `key=` clears a field (a list to `[]`, a
///   string to `null`).
///
/// A refused request changes nothing and answers Stripe's 400 error envelope.
#[derive(Clone, Default)]
struct StandIn(Arc<Mutex<StandInState>>);

#[derive(Default)]
struct StandInState {
    configurations: HashMap<String, Value>,
    /// Idempotency key → the configuration it created.
    created_by_key: HashMap<String, String>,
}

struct Refusal {
    code: &'static str,
    param: String,
    message: String,
}

fn refuse(code: &'static str, param: &str, message: impl Into<String>) -> Refusal {
    Refusal {
        code,
        param: param.to_owned(),
        message: message.into(),
    }
}

/// Top-level parameters each call takes (`expand` aside, which billsync does not send).
const CREATE_PARAMS: [&str; 5] = [
    "business_profile",
    "default_return_url",
    "features",
    "metadata",
    "name",
];
const UPDATE_PARAMS: [&str; 6] = [
    "active",
    "business_profile",
    "default_return_url",
    "features",
    "metadata",
    "name",
];
/// Where `key=` is accepted (`Stripe.Emptyable`); update adds the policy URLs and metadata.
const EMPTYABLE_ON_CREATE: [&str; 7] = [
    "default_return_url",
    "name",
    "business_profile[headline]",
    "features[customer_update][allowed_updates]",
    "features[subscription_cancel][cancellation_reason][options]",
    "features[subscription_update][default_allowed_updates]",
    "features[subscription_update][products]",
];
const EMPTYABLE_ON_UPDATE_TOO: [&str; 3] = [
    "business_profile[privacy_policy_url]",
    "business_profile[terms_of_service_url]",
    "metadata",
];

/// A new configuration: every feature off, lists empty, Stripe's defaults.
fn new_configuration(id: &str) -> Value {
    json!({
        "id": id,
        "object": "billing_portal.configuration",
        "active": true,
        "application": null,
        "business_profile": {"headline": null, "privacy_policy_url": null, "terms_of_service_url": null},
        "created": 1_764_633_600,
        "default_return_url": null,
        "features": {
            "customer_update": {"allowed_updates": [], "enabled": false},
            "invoice_history": {"enabled": false},
            "payment_method_update": {"enabled": false},
            "subscription_cancel": {
                "cancellation_reason": {"enabled": false, "options": []},
                "enabled": false,
                "mode": "at_period_end",
                "proration_behavior": "none",
            },
            "subscription_update": {
                "default_allowed_updates": [],
                "enabled": false,
                "products": [],
                "proration_behavior": "none",
                "schedule_at_period_end": {"conditions": []},
            },
        },
        "is_default": false,
        "livemode": false,
        "login_page": {"enabled": false, "url": null},
        "metadata": {},
        "name": null,
        "updated": 1_764_633_600,
    })
}

/// `features[a][0]=x` → `{"features": {"a": ["x"]}}`; every leaf a string, as sent.
fn unflatten(pairs: &[(String, String)]) -> Value {
    fn insert(target: &mut Value, segments: &[&str], value: &str) {
        let Some((first, rest)) = segments.split_first() else {
            *target = json!(value);
            return;
        };
        if let Ok(index) = first.parse::<usize>() {
            if !target.is_array() {
                *target = json!([]);
            }
            let items = target.as_array_mut().unwrap();
            items.resize(items.len().max(index + 1), Value::Null);
            insert(&mut items[index], rest, value);
        } else {
            if !target.is_object() {
                *target = json!({});
            }
            let entry = target.as_object_mut().unwrap().entry(first.to_string());
            insert(entry.or_insert(Value::Null), rest, value);
        }
    }
    let mut root = json!({});
    for (key, value) in pairs {
        let segments: Vec<&str> = key.split('[').map(|s| s.trim_end_matches(']')).collect();
        insert(&mut root, &segments, value);
    }
    root
}

impl StandIn {
    async fn start() -> (Self, MockServer) {
        let stand_in = Self::default();
        let server = MockServer::start().await;
        Mock::given(path_regex(format!("^{CONFIGURATIONS}")))
            .respond_with(stand_in.clone())
            .mount(&server)
            .await;
        (stand_in, server)
    }

    fn configuration(&self, id: &str) -> Value {
        self.0.lock().unwrap().configurations[id].clone()
    }

    /// An edit made in the Dashboard, behind billsync's back.
    fn edit(&self, id: &str, edit: impl FnOnce(&mut Value)) {
        edit(self.0.lock().unwrap().configurations.get_mut(id).unwrap());
    }

    fn create(&self, request: &Request, params: &Value) -> Result<Value, Refusal> {
        let mut state = self.0.lock().unwrap();
        let key = request
            .headers
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned());
        if let Some(id) = key.as_ref().and_then(|k| state.created_by_key.get(k)) {
            return Ok(state.configurations[id].clone());
        }
        let features = params.get("features").ok_or_else(|| {
            refuse(
                "parameter_missing",
                "features",
                "Missing required param: features.",
            )
        })?;
        for (feature, given) in features.as_object().into_iter().flatten() {
            require(given, "enabled", &format!("features[{feature}]"))?;
        }
        if let Some(reason) = params.pointer("/features/subscription_cancel/cancellation_reason") {
            let param = "features[subscription_cancel][cancellation_reason]";
            require(reason, "enabled", param)?;
            require(reason, "options", param)?;
        }
        let id = format!("bpc_{}", state.configurations.len() + 1);
        let mut configuration = new_configuration(&id);
        merge(&mut configuration, params, "", &CREATE_PARAMS, false)?;
        check_rules(&configuration)?;
        state
            .configurations
            .insert(id.clone(), configuration.clone());
        if let Some(key) = key {
            state.created_by_key.insert(key, id);
        }
        Ok(configuration)
    }

    fn update(&self, id: &str, params: &Value) -> Result<Value, Refusal> {
        let mut state = self.0.lock().unwrap();
        let Some(current) = state.configurations.get(id) else {
            return Err(refuse(
                "resource_missing",
                "id",
                format!("No such configuration: '{id}'"),
            ));
        };
        for feature in ["invoice_history", "payment_method_update"] {
            if let Some(given) = params.pointer(&format!("/features/{feature}")) {
                require(given, "enabled", &format!("features[{feature}]"))?;
            }
        }
        if let Some(reason) = params.pointer("/features/subscription_cancel/cancellation_reason") {
            require(
                reason,
                "enabled",
                "features[subscription_cancel][cancellation_reason]",
            )?;
        }
        let mut configuration = current.clone();
        merge(&mut configuration, params, "", &UPDATE_PARAMS, true)?;
        check_rules(&configuration)?;
        state
            .configurations
            .insert(id.to_owned(), configuration.clone());
        Ok(configuration)
    }
}

fn require(given: &Value, key: &str, param: &str) -> Result<(), Refusal> {
    match given.get(key) {
        Some(_) => Ok(()),
        None => {
            let param = format!("{param}[{key}]");
            Err(refuse(
                "parameter_missing",
                &param,
                format!("Missing required param: {param}."),
            ))
        }
    }
}

fn child(parent: &str, key: &str) -> String {
    if parent.is_empty() {
        key.to_owned()
    } else {
        format!("{parent}[{key}]")
    }
}

/// Applies the request's `given` params onto `current`, whose shape says what exists: a field
/// not in it is unknown, `key=` empties a list or nulls a string where that is allowed, a list
/// sent replaces the list held.
fn merge(
    current: &mut Value,
    given: &Value,
    param: &str,
    top_level: &[&str],
    update: bool,
) -> Result<(), Refusal> {
    let emptyable = EMPTYABLE_ON_CREATE.contains(&param)
        || (update && EMPTYABLE_ON_UPDATE_TOO.contains(&param));
    if given == "" {
        return match current {
            Value::Array(items) if emptyable => {
                items.clear();
                Ok(())
            }
            Value::Object(map) if emptyable => {
                map.clear();
                Ok(())
            }
            Value::String(_) | Value::Null if emptyable => {
                *current = Value::Null;
                Ok(())
            }
            _ => Err(refuse(
                "parameter_invalid_empty",
                param,
                format!("You passed an empty string for '{param}'. We assume empty values are an attempt to unset a parameter; however '{param}' cannot be unset."),
            )),
        };
    }
    let invalid = || {
        refuse(
            "parameter_invalid",
            param,
            format!("Invalid value for {param}."),
        )
    };
    match current {
        Value::Object(map) if param == "metadata" => {
            for (key, value) in given.as_object().ok_or_else(invalid)? {
                match value.as_str().ok_or_else(invalid)? {
                    "" => map.remove(key),
                    v => map.insert(key.clone(), json!(v)),
                };
            }
        }
        Value::Object(map) => {
            for (key, value) in given.as_object().ok_or_else(invalid)? {
                let name = child(param, key);
                let known = if param.is_empty() {
                    top_level.contains(&key.as_str()) && map.contains_key(key)
                } else {
                    map.contains_key(key) && !(param == "login_page" && key == "url")
                };
                if !known {
                    return Err(refuse(
                        "parameter_unknown",
                        &name,
                        format!("Received unknown parameter: {name}"),
                    ));
                }
                merge(map.get_mut(key).unwrap(), value, &name, top_level, update)?;
            }
        }
        Value::Array(items) if param.ends_with("[products]") => {
            let mut products = Vec::new();
            for (i, product) in given.as_array().ok_or_else(invalid)?.iter().enumerate() {
                let name = format!("{param}[{i}]");
                let mut held = json!({
                    "adjustable_quantity": {"enabled": false, "maximum": null, "minimum": 1},
                    "prices": [],
                    "product": null,
                });
                require(product, "product", &name)?;
                require(product, "prices", &name)?;
                merge(&mut held, product, &name, &[], update)?;
                products.push(held);
            }
            *items = products;
        }
        Value::Array(items) => {
            let given = given.as_array().ok_or_else(invalid)?;
            if given.iter().any(|v| !v.is_string()) {
                return Err(invalid());
            }
            *items = given.clone();
        }
        Value::Bool(b) => {
            *b = match given.as_str() {
                Some("true") => true,
                Some("false") => false,
                _ => return Err(invalid()),
            }
        }
        Value::Number(_) => {
            let n: i64 = given
                .as_str()
                .and_then(|s| s.parse().ok())
                .ok_or_else(invalid)?;
            *current = json!(n);
        }
        Value::String(_) | Value::Null => *current = json!(given.as_str().ok_or_else(invalid)?),
    }
    Ok(())
}

/// The rules Stripe checks on the configuration a request would leave.
fn check_rules(configuration: &Value) -> Result<(), Refusal> {
    let update = &configuration["features"]["subscription_update"];
    let products = update["products"].as_array().unwrap();
    let param = "features[subscription_update][products]";
    if update["enabled"] == true && products.is_empty() {
        return Err(refuse(
            "parameter_missing",
            param,
            "Missing required param: features[subscription_update][products]. An enabled subscription update needs at least one product.",
        ));
    }
    if products.len() > 10 {
        return Err(refuse(
            "parameter_invalid",
            param,
            "You can pass at most 10 products.",
        ));
    }
    if let Some(i) = products
        .iter()
        .position(|p| p["prices"].as_array().unwrap().is_empty())
    {
        return Err(refuse(
            "parameter_missing",
            &format!("{param}[{i}][prices]"),
            "Each product needs at least one price.",
        ));
    }
    Ok(())
}

impl Respond for StandIn {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        let pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
        let params = unflatten(&pairs);
        let id = request
            .url
            .path()
            .strip_prefix(CONFIGURATIONS)
            .unwrap()
            .trim_start_matches('/');
        let answer = match (request.method.as_str(), id) {
            ("POST", "") => self.create(request, &params),
            ("POST", id) => self.update(id, &params),
            ("GET", id) if !id.is_empty() => self
                .0
                .lock()
                .unwrap()
                .configurations
                .get(id)
                .cloned()
                .ok_or_else(|| {
                    refuse(
                        "resource_missing",
                        "id",
                        format!("No such configuration: '{id}'"),
                    )
                }),
            _ => Err(refuse("unknown_route", "", "Unrecognized request URL.")),
        };
        match answer {
            Ok(configuration) => ResponseTemplate::new(200).set_body_json(configuration),
            Err(Refusal {
                code,
                param,
                message,
            }) => {
                let status = if code == "resource_missing" || code == "unknown_route" {
                    404
                } else {
                    400
                };
                ResponseTemplate::new(status).set_body_json(json!({"error": {
                    "type": "invalid_request_error", "code": code, "param": param, "message": message,
                }}))
            }
        }
    }
}

fn form(request: &wiremock::Request) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = serde_urlencoded::from_bytes(&request.body).unwrap();
    pairs.sort();
    pairs
}

fn pairs(expected: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut pairs: Vec<(String, String)> = expected
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    pairs.sort();
    pairs
}

/// What the shipped example sends on create (`update` false) or on every update (`update`
/// true: the fields it leaves out, as explicit empties, too).
fn example_fields(headline: &str, update: bool) -> Vec<(String, String)> {
    let mut fields = vec![
        ("business_profile[headline]", headline),
        ("features[payment_method_update][enabled]", "true"),
        ("features[invoice_history][enabled]", "true"),
        ("features[customer_update][enabled]", "true"),
        ("features[customer_update][allowed_updates][0]", "email"),
        ("features[customer_update][allowed_updates][1]", "name"),
        ("features[customer_update][allowed_updates][2]", "phone"),
        ("features[customer_update][allowed_updates][3]", "address"),
        ("features[customer_update][allowed_updates][4]", "tax_id"),
        ("features[subscription_cancel][enabled]", "true"),
        ("features[subscription_cancel][mode]", "at_period_end"),
        ("features[subscription_cancel][proration_behavior]", "none"),
        (
            "features[subscription_cancel][cancellation_reason][enabled]",
            "true",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][0]",
            "too_expensive",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][1]",
            "missing_features",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][2]",
            "switched_service",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][3]",
            "unused",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options][4]",
            "other",
        ),
        ("features[subscription_update][enabled]", "false"),
        (
            "features[subscription_update][default_allowed_updates][0]",
            "price",
        ),
        (
            "features[subscription_update][proration_behavior]",
            "create_prorations",
        ),
        ("metadata[billsync_name]", "default"),
    ];
    if update {
        fields.extend([
            ("business_profile[privacy_policy_url]", ""),
            ("business_profile[terms_of_service_url]", ""),
            ("default_return_url", ""),
            ("features[subscription_update][products]", ""),
        ]);
    }
    pairs(&fields)
}

/// The modeled part of a configuration as the stand-in holds it.
fn held(stand_in: &StandIn, id: &str) -> Value {
    let c = stand_in.configuration(id);
    json!({
        "business_profile": c["business_profile"],
        "default_return_url": c["default_return_url"],
        "features": c["features"],
        "metadata": c["metadata"],
    })
}

/// The example as the stand-in holds it after an apply (Stripe's own defaults included).
fn example_held(headline: Value) -> Value {
    json!({
        "business_profile": {"headline": headline, "privacy_policy_url": null, "terms_of_service_url": null},
        "default_return_url": null,
        "features": {
            "customer_update": {"allowed_updates": ["email", "name", "phone", "address", "tax_id"], "enabled": true},
            "invoice_history": {"enabled": true},
            "payment_method_update": {"enabled": true},
            "subscription_cancel": {
                "cancellation_reason": {"enabled": true, "options": ["too_expensive", "missing_features", "switched_service", "unused", "other"]},
                "enabled": true,
                "mode": "at_period_end",
                "proration_behavior": "none",
            },
            "subscription_update": {
                "default_allowed_updates": ["price"],
                "enabled": false,
                "products": [],
                "proration_behavior": "create_prorations",
                "schedule_at_period_end": {"conditions": []},
            },
        },
        "metadata": {"billsync_name": "default"},
    })
}

type Form<'a> = &'a [(&'a str, &'a str)];

fn as_strs(form: &[(String, String)]) -> Vec<(&str, &str)> {
    form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// Posts a raw form to the stand-in: its status and Stripe's `error` (or the object).
async fn post(server: &MockServer, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
    let (status, body) = support::status_and_json(
        reqwest::Client::new()
            .post(format!("{}{path}", server.uri()))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(serde_urlencoded::to_string(form).unwrap()),
    )
    .await;
    (status, body.get("error").cloned().unwrap_or(body))
}

/// The stand-in refuses what Stripe refuses, so the tests below can fail for billsync's sake.
#[tokio::test]
async fn the_stand_in_refuses_what_stripe_refuses() {
    let (stand_in, server) = StandIn::start().await;
    let reasons_off = [
        ("features[subscription_cancel][enabled]", "true"),
        (
            "features[subscription_cancel][cancellation_reason][enabled]",
            "false",
        ),
    ];
    // (form, Stripe's error code, the param it names)
    let refused: [(Form, &str, &str); 7] = [
        (
            &[("business_profile[headline]", "x")],
            "parameter_missing",
            "features",
        ),
        (
            &reasons_off,
            "parameter_missing",
            "features[subscription_cancel][cancellation_reason][options]",
        ),
        (
            &[
                ("features[invoice_history][enabled]", "true"),
                ("features[invoice_history][show]", "true"),
            ],
            "parameter_unknown",
            "features[invoice_history][show]",
        ),
        (
            &[("features[subscription_pause][enabled]", "false")],
            "parameter_unknown",
            "features[subscription_pause]",
        ),
        (
            &[
                ("features[subscription_update][enabled]", "true"),
                (
                    "features[subscription_update][default_allowed_updates][0]",
                    "price",
                ),
            ],
            "parameter_missing",
            "features[subscription_update][products]",
        ),
        (
            &[
                ("features[invoice_history][enabled]", "true"),
                ("business_profile[privacy_policy_url]", ""),
            ],
            "parameter_invalid_empty",
            "business_profile[privacy_policy_url]",
        ),
        (
            &[("features[customer_update][allowed_updates][0]", "email")],
            "parameter_missing",
            "features[customer_update][enabled]",
        ),
    ];
    for (form, code, param) in refused {
        let (status, error) = post(&server, CONFIGURATIONS, form).await;
        assert_eq!(status, 400, "{form:?}: {error}");
        assert_eq!(
            (error["code"].as_str(), error["param"].as_str()),
            (Some(code), Some(param)),
            "{form:?}: {error}"
        );
        assert_eq!(error["type"], "invalid_request_error");
    }
    assert!(stand_in.0.lock().unwrap().configurations.is_empty());

    let mut with_options = reasons_off.to_vec();
    with_options.push((
        "features[subscription_cancel][cancellation_reason][options]",
        "",
    ));
    let (status, created) = post(&server, CONFIGURATIONS, &with_options).await;
    assert_eq!(status, 200, "{created}");
    assert_eq!(
        created["features"]["subscription_cancel"]["cancellation_reason"],
        json!({"enabled": false, "options": []})
    );
    let id = created["id"].as_str().unwrap();
    let configuration = format!("{CONFIGURATIONS}/{id}");

    // Products: at most ten, each with prices; a refused update changes nothing.
    let products = |n: usize| -> Vec<(String, String)> {
        let mut form = vec![(
            "features[subscription_update][enabled]".to_owned(),
            "true".to_owned(),
        )];
        for i in 0..n {
            form.push((
                format!("features[subscription_update][products][{i}][product]"),
                format!("prod_{i}"),
            ));
            form.push((
                format!("features[subscription_update][products][{i}][prices][0]"),
                format!("price_{i}"),
            ));
        }
        form
    };
    let (status, error) = post(&server, &configuration, &as_strs(&products(11))).await;
    assert_eq!(
        (status, error["code"].as_str()),
        (400, Some("parameter_invalid")),
        "{error}"
    );
    assert_eq!(stand_in.configuration(id), created);
    let (status, updated) = post(&server, &configuration, &as_strs(&products(10))).await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        updated["features"]["subscription_update"]["products"][9],
        json!({"product": "prod_9", "prices": ["price_9"], "adjustable_quantity": {"enabled": false, "maximum": null, "minimum": 1}})
    );

    // An update changes only what it sends; `key=` clears, on update the policy URLs too.
    let (status, updated) = post(
        &server,
        &configuration,
        &[
            (
                "business_profile[privacy_policy_url]",
                "https://x.example/privacy",
            ),
            ("features[subscription_update][enabled]", "false"),
            ("features[subscription_update][products]", ""),
        ],
    )
    .await;
    assert_eq!(status, 200, "{updated}");
    assert_eq!(
        updated["features"]["subscription_update"]["products"],
        json!([])
    );
    assert_eq!(updated["features"]["subscription_cancel"]["enabled"], true);
    let (_, updated) = post(
        &server,
        &configuration,
        &[("business_profile[privacy_policy_url]", "")],
    )
    .await;
    assert_eq!(
        updated["business_profile"]["privacy_policy_url"],
        Value::Null
    );
    assert_eq!(stand_in.configuration(id), updated);
}

/// `(method, path, sorted form)` of each request the stand-in received since `from`.
async fn requests_since(
    server: &MockServer,
    from: usize,
) -> Vec<(String, String, Vec<(String, String)>)> {
    server.received_requests().await.unwrap()[from..]
        .iter()
        .map(|r| (r.method.to_string(), r.url.path().to_owned(), form(r)))
        .collect()
}

fn get(id: &str) -> (String, String, Vec<(String, String)>) {
    ("GET".into(), format!("{CONFIGURATIONS}/{id}"), vec![])
}

/// Applies an unchanged `spec`: `unchanged`, after one read of Stripe's copy and no write.
async fn unchanged(
    store: &dyn billsync::store::Store,
    client: &billsync::stripe::StripeClient,
    spec: &PortalSpec,
    stripe: &MockServer,
) {
    let before = stripe.received_requests().await.unwrap().len();
    assert_eq!(
        apply(store, client, spec).await.unwrap(),
        Applied::Unchanged { id: "bpc_1".into() }
    );
    assert_eq!(requests_since(stripe, before).await, [get("bpc_1")]);
}

async fn create_update_and_no_op(backend: Backend) {
    let Some(store) = backend.store("portal_create_update_and_no_op").await else {
        return;
    };
    let (stand_in, stripe) = StandIn::start().await;
    let config = support::test_config(&stripe.uri());
    let client =
        billsync::stripe::StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap())
            .unwrap();
    let store = store.store.as_ref();

    let spec = PortalSpec::parse(EXAMPLE).unwrap();
    assert_eq!(
        apply(store, &client, &spec).await.unwrap(),
        Applied::Created { id: "bpc_1".into() }
    );
    let requests = stripe.received_requests().await.unwrap();
    assert_eq!(requests.len(), 1);
    assert!(requests[0].headers.get("idempotency-key").is_some());
    assert_eq!(
        requests_since(&stripe, 0).await,
        [(
            "POST".to_owned(),
            CONFIGURATIONS.to_owned(),
            example_fields("Manage your subscription and billing details", false)
        )]
    );
    let recorded = store.portal_config("default").await.unwrap().unwrap();
    assert_eq!(recorded.stripe_configuration_id, "bpc_1");
    assert_eq!(
        held(&stand_in, "bpc_1"),
        example_held(json!("Manage your subscription and billing details"))
    );

    // Unchanged: one read of Stripe's copy, no write.
    unchanged(store, &client, &spec, &stripe).await;

    // Changed: updated in place, with the whole configuration.
    let changed = PortalSpec::parse(&EXAMPLE.replace(
        "headline = \"Manage your subscription and billing details\"",
        "headline = \"Your plan and invoices\"",
    ))
    .unwrap();
    assert_eq!(
        apply(store, &client, &changed).await.unwrap(),
        Applied::Updated { id: "bpc_1".into() }
    );
    assert_eq!(
        requests_since(&stripe, 2).await,
        [(
            "POST".to_owned(),
            format!("{CONFIGURATIONS}/bpc_1"),
            example_fields("Your plan and invoices", true)
        )]
    );
    let requests = stripe.received_requests().await.unwrap();
    assert!(
        requests[2].headers.get("idempotency-key").is_some(),
        "every POST carries a key"
    );
    assert_ne!(
        store
            .portal_config("default")
            .await
            .unwrap()
            .unwrap()
            .spec_hash,
        recorded.spec_hash
    );
    assert_eq!(
        held(&stand_in, "bpc_1"),
        example_held(json!("Your plan and invoices"))
    );
    unchanged(store, &client, &changed, &stripe).await;

    // Edited in the Dashboard: the unchanged file puts it back.
    stand_in.edit("bpc_1", |c| {
        c["features"]["invoice_history"]["enabled"] = json!(false);
    });
    assert_eq!(
        apply(store, &client, &changed).await.unwrap(),
        Applied::Repaired {
            id: "bpc_1".into(),
            drifted: vec!["features.invoice_history.enabled".into()]
        }
    );
    assert_eq!(
        held(&stand_in, "bpc_1"),
        example_held(json!("Your plan and invoices"))
    );
    assert_eq!(stand_in.0.lock().unwrap().configurations.len(), 1);
}

on_every_store!(create_update_and_no_op);

/// The first apply of a file whose reason prompt is off: Stripe still requires the options
/// on create, as an explicit empty list, and the stand-in refuses a create without them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_apply_with_reasons_off_sends_the_required_empty_options() {
    let store = support::sqlite_store().await;
    let (stand_in, stripe) = StandIn::start().await;
    let config = support::test_config(&stripe.uri());
    let client =
        billsync::stripe::StripeClient::new(&config.stripe, config.stripe_secret_key().unwrap())
            .unwrap();
    let text = EXAMPLE
        .replace(
            "[features.subscription_cancel.cancellation_reason]\nenabled = true",
            "[features.subscription_cancel.cancellation_reason]\nenabled = false",
        )
        .replace(
            "options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]",
            "options = []",
        );
    let spec = PortalSpec::parse(&text).unwrap();
    assert_eq!(
        apply(store.store.as_ref(), &client, &spec).await.unwrap(),
        Applied::Created { id: "bpc_1".into() }
    );
    let sent = &requests_since(&stripe, 0).await[0].2;
    let options = "features[subscription_cancel][cancellation_reason]";
    assert!(
        sent.contains(&(format!("{options}[options]"), String::new())),
        "{sent:?}"
    );
    assert!(!sent
        .iter()
        .any(|(k, _)| k.starts_with(&format!("{options}[options]["))));
    assert_eq!(
        stand_in.configuration("bpc_1")["features"]["subscription_cancel"]["cancellation_reason"],
        json!({"enabled": false, "options": []})
    );
}

fn rejected(text: &str) -> String {
    PortalSpec::parse(text)
        .expect_err("must be rejected")
        .to_string()
}

#[test]
fn invalid_files_are_refused_naming_the_key() {
    let cases: [(&str, &str, &str); 11] = [
        (
            "[features.subscription_cancel]\nenabled = true",
            "[features.subscription_cancel]\nenabled = true\nproration_behavior = \"create_prorations\"",
            "features.subscription_cancel.proration_behavior",
        ),
        (
            "[features.subscription_cancel]\nenabled = true",
            "[features.subscription_cancel]\nenabled = true\nproration_behavior = \"always_invoice\"",
            "features.subscription_cancel.proration_behavior",
        ),
        (
            "mode = \"at_period_end\"",
            "mode = \"whenever\"",
            "features.subscription_cancel.mode",
        ),
        (
            "options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]",
            "options = []",
            "features.subscription_cancel.cancellation_reason.options",
        ),
        (
            "options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]",
            "options = [\"too_expensive\", \"bored\"]",
            "features.subscription_cancel.cancellation_reason.options[1]",
        ),
        (
            "allowed_updates = [\"email\", \"name\", \"phone\", \"address\", \"tax_id\"]",
            "allowed_updates = []",
            "features.customer_update.allowed_updates",
        ),
        (
            "enabled = false\n# price, quantity, promotion_code\ndefault_allowed_updates = [\"price\"]",
            "enabled = true\ndefault_allowed_updates = []",
            "features.subscription_update.default_allowed_updates",
        ),
        // The shipped example, switched on without listing products.
        (
            "enabled = false\n# price, quantity, promotion_code",
            "enabled = true",
            "features.subscription_update.products: an enabled subscription update needs",
        ),
        (
            "proration_behavior = \"create_prorations\"",
            "proration_behavior = \"sometimes\"",
            "features.subscription_update.proration_behavior",
        ),
        (
            "[features.invoice_history]\nenabled = true",
            "[features.invoice_history]\nenabled = true\nshow_amounts = true",
            "show_amounts",
        ),
        (
            "name = \"default\"",
            "name = \"a b\"",
            "name: use 1 to 64",
        ),
    ];
    for (from, to, key) in cases {
        assert!(EXAMPLE.contains(from), "{from}");
        let error = rejected(&EXAMPLE.replacen(from, to, 1));
        assert!(error.contains(key), "{key} not named in: {error}");
    }
    // Immediate cancellation may prorate.
    PortalSpec::parse(&EXAMPLE.replace(
        "mode = \"at_period_end\"",
        "mode = \"immediately\"\nproration_behavior = \"create_prorations\"",
    ))
    .unwrap();
    // An unknown feature, and a spec key Stripe no longer takes, are named too.
    let error = rejected(&format!(
        "{EXAMPLE}\n[features.subscription_pause]\nenabled = false\n"
    ));
    assert!(error.contains("subscription_pause"), "{error}");
    // A `[features]` table with nothing in it.
    let error = rejected("[business_profile]\n[features]\n");
    assert!(
        error.starts_with("features: the table names no feature"),
        "{error}"
    );
}

/// What §2 must show, with the real binary against the stand-in: the shipped example applies
/// cleanly, a second apply is `unchanged`, `--check` and `show` name a Dashboard edit (and
/// `--check` changes nothing and fails), an apply repairs it, and a setting removed from the
/// file is cleared in Stripe. An invalid file stops before Stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cli_applies_the_example_checks_drift_and_clears_what_the_file_drops() {
    let (stand_in, stripe) = StandIn::start().await;
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, EXAMPLE.replace("options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]", "options = []")).unwrap();
    let file = dir.path().join("portal.example.toml");
    std::fs::write(&file, EXAMPLE).unwrap();
    let file = file.to_str().unwrap();
    let database = format!("sqlite://{}", dir.path().join("b.db").display());
    let billsync = |args: &[&str]| {
        let out = tokio::task::block_in_place(|| {
            Command::new(env!("CARGO_BIN_EXE_billsync"))
                .args(args)
                .env("DATABASE_URL", &database)
                .env("STRIPE_SECRET_KEY", support::STRIPE_KEY)
                .env("BILLSYNC_STRIPE_API_BASE", stripe.uri())
                .env("RUST_LOG", "warn")
                .output()
                .unwrap()
        });
        let stdout = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        (
            out.status.success(),
            stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };

    let (ok, _, stderr) = billsync(&["portal", "apply", bad.to_str().unwrap()]);
    assert!(!ok);
    assert!(
        stderr.contains("features.subscription_cancel.cancellation_reason.options"),
        "{stderr}"
    );
    assert!(stripe.received_requests().await.unwrap().is_empty());

    let (ok, stdout, stderr) = billsync(&["portal", "apply", file]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, r#"{"action":"created","id":"bpc_1"}"#);
    let headline = json!("Manage your subscription and billing details");
    assert_eq!(held(&stand_in, "bpc_1"), example_held(headline.clone()));
    let (ok, stdout, stderr) = billsync(&["portal", "apply", file]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, r#"{"action":"unchanged","id":"bpc_1"}"#);
    let (ok, stdout, stderr) = billsync(&["portal", "apply", "--check", file]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, r#"{"status":"in_sync","id":"bpc_1"}"#);
    assert_eq!(
        requests_since(&stripe, 1).await,
        [get("bpc_1"), get("bpc_1")]
    );

    // Someone edits the portal in the Dashboard.
    stand_in.edit("bpc_1", |c| {
        c["business_profile"]["headline"] = json!("Edited in the Dashboard");
        c["features"]["customer_update"]["allowed_updates"] = json!(["email", "shipping"]);
        c["features"]["subscription_update"]["schedule_at_period_end"] =
            json!({"conditions": [{"type": "shortening_interval"}]});
    });
    let drifted = r#"["business_profile.headline","features.customer_update.allowed_updates"]"#;
    let (ok, stdout, stderr) = billsync(&["portal", "apply", "--check", file]);
    assert!(!ok, "drift fails the check");
    assert_eq!(
        stdout,
        format!(r#"{{"status":"drifted","id":"bpc_1","drifted":{drifted}}}"#)
    );
    assert!(
        stderr.contains(
            "differs in business_profile.headline, features.customer_update.allowed_updates"
        ),
        "{stderr}"
    );
    let (ok, stdout, stderr) = billsync(&["portal", "show", file]);
    assert!(ok, "{stderr}");
    let shown: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(shown["id"], "bpc_1");
    assert_eq!(shown["drifted"].to_string(), drifted);
    assert_eq!(shown["stripe"], stand_in.configuration("bpc_1"));
    assert_eq!(
        requests_since(&stripe, 3).await,
        [get("bpc_1"), get("bpc_1")],
        "no write"
    );

    // An apply puts the file back; what the file does not model is left as it is.
    let (ok, stdout, stderr) = billsync(&["portal", "apply", file]);
    assert!(ok, "{stderr}");
    assert_eq!(
        stdout,
        format!(r#"{{"action":"repaired","id":"bpc_1","drifted":{drifted}}}"#)
    );
    let mut expected = example_held(headline);
    expected["features"]["subscription_update"]["schedule_at_period_end"] =
        json!({"conditions": [{"type": "shortening_interval"}]});
    assert_eq!(held(&stand_in, "bpc_1"), expected);

    // Settings removed from the file are cleared by the next apply.
    let trimmed = EXAMPLE
        .replace("headline = \"Manage your subscription and billing details\"\n", "")
        .replace("[features.invoice_history]\nenabled = true\n", "")
        .replace(
            "[features.subscription_cancel.cancellation_reason]\nenabled = true\n",
            "",
        )
        .replace("options = [\"too_expensive\", \"missing_features\", \"switched_service\", \"unused\", \"other\"]\n", "");
    assert_eq!(trimmed.matches("\nenabled = true").count(), 3, "{trimmed}");
    std::fs::write(file, &trimmed).unwrap();
    let before = stripe.received_requests().await.unwrap().len();
    let (ok, stdout, stderr) = billsync(&["portal", "apply", file]);
    assert!(ok, "{stderr}");
    assert_eq!(stdout, r#"{"action":"updated","id":"bpc_1"}"#);
    let sent = &requests_since(&stripe, before).await[0].2;
    for cleared in [
        ("business_profile[headline]", ""),
        ("features[invoice_history][enabled]", "false"),
        (
            "features[subscription_cancel][cancellation_reason][enabled]",
            "false",
        ),
        (
            "features[subscription_cancel][cancellation_reason][options]",
            "",
        ),
    ] {
        assert!(
            sent.contains(&(cleared.0.into(), cleared.1.into())),
            "{cleared:?} not in {sent:?}"
        );
    }
    expected["business_profile"]["headline"] = Value::Null;
    expected["features"]["invoice_history"]["enabled"] = json!(false);
    expected["features"]["subscription_cancel"]["cancellation_reason"] =
        json!({"enabled": false, "options": []});
    assert_eq!(held(&stand_in, "bpc_1"), expected);
    let (ok, stdout, _) = billsync(&["portal", "apply", file]);
    assert!(ok);
    assert_eq!(stdout, r#"{"action":"unchanged","id":"bpc_1"}"#);

    // A name never applied: the check fails, and show says so.
    std::fs::write(
        file,
        trimmed.replace("name = \"default\"", "name = \"other\""),
    )
    .unwrap();
    let (ok, stdout, stderr) = billsync(&["portal", "apply", "--check", file]);
    assert!(!ok);
    assert_eq!(stdout, r#"{"status":"not_applied","name":"other"}"#);
    assert!(
        stderr.contains("no portal configuration named \"other\" was applied"),
        "{stderr}"
    );
    let (ok, _, stderr) = billsync(&["portal", "show", "--name", "other"]);
    assert!(!ok);
    assert!(stderr.contains("\"other\""), "{stderr}");
    assert_eq!(stand_in.0.lock().unwrap().configurations.len(), 1);
}
