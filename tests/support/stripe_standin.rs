//! A Stripe stand-in that holds every request to the parameters the pinned API version
//! publishes — `tests/fixtures/stripe-requests.json`, generated from the official `stripe` npm
//! package by `scripts/stripe-conformance/generate.mjs` — and answers as Stripe does: a
//! parameter it does not know, a required one missing or a value outside its enum is a 400
//! `invalid_request_error` naming the parameter. Behind the rules, just enough state
//! (customers, subscriptions, portal configurations) for billsync's flows to run.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
};

use serde_json::{json, Map, Value};
use wiremock::{Mock, MockServer, Request, Respond, ResponseTemplate};

const SNAPSHOT: &str = include_str!("../fixtures/stripe-requests.json");

/// Stripe's published request parameters, per operation.
pub struct Rules {
    pub api_version: String,
    operations: Vec<Operation>,
}

struct Operation {
    name: String,
    method: String,
    path: Vec<String>,
    params: Value,
}

/// Why Stripe would refuse a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    /// Stripe's error code: `parameter_unknown`, `parameter_missing`, `parameter_invalid_*`,
    /// `resource_missing` (no such route).
    pub code: &'static str,
    /// The parameter in Stripe's notation (`features[subscription_cancel][mode]`).
    pub param: String,
    pub message: String,
}

impl std::fmt::Display for Violation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.code, self.param, self.message)
    }
}

fn violation(code: &'static str, param: &str, message: impl Into<String>) -> Violation {
    Violation {
        code,
        param: param.to_owned(),
        message: message.into(),
    }
}

/// Form pairs as a tree: `a[b][0]=v` is `a → b → 0 → "v"`.
#[derive(Debug)]
enum Node {
    Leaf(String),
    Tree(BTreeMap<String, Node>),
}

fn key_path(key: &str) -> Option<Vec<String>> {
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    let mut path = vec![head.to_owned()];
    while !rest.is_empty() {
        let inner = rest.strip_prefix('[')?;
        let close = inner.find(']')?;
        path.push(inner[..close].to_owned());
        rest = &inner[close + 1..];
    }
    path.iter().all(|p| !p.is_empty()).then_some(path)
}

fn tree(pairs: &[(String, String)]) -> Result<BTreeMap<String, Node>, Violation> {
    let mut root = BTreeMap::new();
    for (key, value) in pairs {
        let path = key_path(key)
            .ok_or_else(|| violation("parameter_invalid_format", key, "malformed key"))?;
        let mut level = &mut root;
        for (depth, segment) in path.iter().enumerate() {
            let last = depth == path.len() - 1;
            if last {
                if level
                    .insert(segment.clone(), Node::Leaf(value.clone()))
                    .is_some()
                {
                    return Err(violation("parameter_invalid", key, "sent twice"));
                }
                break;
            }
            let next = level
                .entry(segment.clone())
                .or_insert_with(|| Node::Tree(BTreeMap::new()));
            level = match next {
                Node::Tree(map) => map,
                Node::Leaf(_) => {
                    return Err(violation(
                        "parameter_invalid",
                        key,
                        "both a value and a hash",
                    ))
                }
            };
        }
    }
    Ok(root)
}

fn child(name: &str, key: &str) -> String {
    if name.is_empty() {
        key.to_owned()
    } else {
        format!("{name}[{key}]")
    }
}

fn validate(node: &Node, schema: &Value, name: &str) -> Result<(), Violation> {
    let empty_allowed = schema["emptyable"] == true || schema["nullable"] == true;
    if matches!(node, Node::Leaf(v) if v.is_empty()) && empty_allowed {
        return Ok(());
    }
    if let Some(alternatives) = schema["any_of"].as_array() {
        let mut first = None;
        for alternative in alternatives {
            match validate(node, alternative, name) {
                Ok(()) => return Ok(()),
                Err(e) => {
                    first.get_or_insert(e);
                }
            }
        }
        return Err(first.unwrap_or_else(|| violation("parameter_invalid", name, "no type")));
    }
    if let Some(allowed) = schema["enum"].as_array() {
        return match node {
            Node::Leaf(v) if allowed.iter().any(|a| a == v) => Ok(()),
            Node::Leaf(v) => Err(violation(
                "parameter_invalid_string",
                name,
                format!("{v:?} is not one of {allowed:?}"),
            )),
            Node::Tree(_) => Err(violation("parameter_invalid", name, "expected a string")),
        };
    }
    let leaf = |what: &str| match node {
        Node::Leaf(v) => Ok(v.as_str()),
        Node::Tree(_) => Err(violation(
            "parameter_invalid",
            name,
            format!("expected {what}"),
        )),
    };
    let hash = |what: &str| match node {
        Node::Tree(map) => Ok(map),
        Node::Leaf(_) => Err(violation(
            "parameter_invalid",
            name,
            format!("expected {what}"),
        )),
    };
    match schema["type"].as_str() {
        Some("string") => leaf("a string").map(drop),
        Some("number") => {
            let v = leaf("a number")?;
            v.parse::<f64>().map(drop).map_err(|_| {
                violation(
                    "parameter_invalid_integer",
                    name,
                    format!("{v:?} is not a number"),
                )
            })
        }
        Some("boolean") => match leaf("a boolean")? {
            "true" | "false" => Ok(()),
            v => Err(violation(
                "parameter_invalid_boolean",
                name,
                format!("{v:?} is not a boolean"),
            )),
        },
        Some("array") => {
            let items = hash("an array")?;
            if !(0..items.len()).all(|i| items.contains_key(&i.to_string())) {
                return Err(violation(
                    "parameter_invalid",
                    name,
                    "array indexes must be 0, 1, 2, …",
                ));
            }
            for (index, item) in items {
                validate(item, &schema["items"], &child(name, index))?;
            }
            Ok(())
        }
        Some("map") => {
            for (key, value) in hash("a hash")? {
                validate(value, &schema["values"], &child(name, key))?;
            }
            Ok(())
        }
        Some("object") => {
            let fields = hash("a hash")?;
            for (key, value) in fields {
                let rule = schema["properties"]
                    .get(key)
                    .or_else(|| schema.get("additional"))
                    .ok_or_else(|| {
                        violation(
                            "parameter_unknown",
                            &child(name, key),
                            "Received unknown parameter",
                        )
                    })?;
                validate(value, rule, &child(name, key))?;
            }
            for required in schema["required"].as_array().into_iter().flatten() {
                let required = required.as_str().unwrap_or_default();
                if !fields.contains_key(required) {
                    return Err(violation(
                        "parameter_missing",
                        &child(name, required),
                        "Missing required param",
                    ));
                }
            }
            Ok(())
        }
        other => Err(violation(
            "parameter_invalid",
            name,
            format!("the snapshot has no rule type {other:?}"),
        )),
    }
}

impl Rules {
    /// The committed snapshot.
    pub fn pinned() -> Self {
        let snapshot: Value = serde_json::from_str(SNAPSHOT).expect("stripe-requests.json");
        let operations = snapshot["operations"]
            .as_object()
            .expect("operations")
            .iter()
            .map(|(name, op)| Operation {
                name: name.clone(),
                method: op["method"].as_str().expect("method").to_owned(),
                path: op["path"]
                    .as_str()
                    .expect("path")
                    .split('/')
                    .map(str::to_owned)
                    .collect(),
                params: op["params"].clone(),
            })
            .collect();
        Self {
            api_version: snapshot["api_version"]
                .as_str()
                .expect("version")
                .to_owned(),
            operations,
        }
    }

    /// Every operation the snapshot describes.
    pub fn operation_names(&self) -> BTreeSet<String> {
        self.operations.iter().map(|o| o.name.clone()).collect()
    }

    /// The operation a request is, if Stripe would accept its parameters.
    pub fn check(
        &self,
        method: &str,
        path: &str,
        pairs: &[(String, String)],
    ) -> Result<&str, Violation> {
        let segments: Vec<&str> = path.split('/').collect();
        // The route with the most literal segments wins (`/v1/customers/search` over
        // `/v1/customers/{customer}`).
        let operation = self
            .operations
            .iter()
            .filter(|o| o.method == method && o.path.len() == segments.len())
            .filter_map(|o| {
                let mut literal = 0;
                for (template, actual) in o.path.iter().zip(&segments) {
                    if template.starts_with('{') {
                        if actual.is_empty() {
                            return None;
                        }
                    } else if template == actual {
                        literal += 1;
                    } else {
                        return None;
                    }
                }
                Some((literal, o))
            })
            .max_by_key(|(literal, _)| *literal)
            .map(|(_, o)| o)
            .ok_or_else(|| {
                violation(
                    "resource_missing",
                    path,
                    format!("Unrecognized request URL ({method} {path})"),
                )
            })?;
        validate(&Node::Tree(tree(pairs)?), &operation.params, "")?;
        Ok(&operation.name)
    }
}

/// One request the stand-in accepted.
#[derive(Debug, Clone)]
pub struct Seen {
    pub operation: String,
    pub params: Vec<(String, String)>,
}

#[derive(Default)]
struct State {
    seen: Vec<Seen>,
    refused: Vec<String>,
    customers: BTreeMap<String, Value>,
    subscriptions: BTreeMap<String, Value>,
    portal_configurations: BTreeMap<String, Value>,
    prices: BTreeMap<String, Value>,
    webhook_endpoints: BTreeMap<String, Value>,
    next_id: u64,
}

/// The stand-in: mount it on a `MockServer` with [`StripeStandIn::start`].
#[derive(Clone)]
pub struct StripeStandIn {
    rules: Arc<Rules>,
    state: Arc<Mutex<State>>,
}

/// One page of `data` as Stripe lists it: after `starting_after`, at most `limit` (10 unless
/// given), `has_more` when more follow.
fn page(mut data: Vec<Value>, params: &Value, url: &str) -> Value {
    if let Some(after) = params["starting_after"].as_str() {
        let at = data.iter().position(|c| c["id"] == after);
        data = at.map(|i| data.split_off(i + 1)).unwrap_or_default();
    }
    let limit = params["limit"]
        .as_str()
        .and_then(|l| l.parse().ok())
        .unwrap_or(10);
    let has_more = data.len() > limit;
    data.truncate(limit);
    json!({"object": "list", "data": data, "has_more": has_more, "url": url})
}

fn error(status: u16, code: &str, param: &str, message: &str) -> ResponseTemplate {
    ResponseTemplate::new(status).set_body_json(json!({"error": {
        "type": "invalid_request_error", "code": code, "param": param, "message": message,
    }}))
}

/// Form pairs as JSON: `a[b]=v` → `{"a": {"b": "v"}}`, arrays by index, `""` as null.
fn as_json(node: &Node) -> Value {
    match node {
        Node::Leaf(v) if v.is_empty() => Value::Null,
        Node::Leaf(v) => match v.as_str() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => Value::String(v.clone()),
        },
        Node::Tree(map) if !map.is_empty() && map.keys().all(|k| k.parse::<usize>().is_ok()) => {
            let mut items: Vec<(usize, Value)> = map
                .iter()
                .map(|(k, v)| (k.parse().unwrap(), as_json(v)))
                .collect();
            items.sort_by_key(|(i, _)| *i);
            Value::Array(items.into_iter().map(|(_, v)| v).collect())
        }
        Node::Tree(map) => {
            Value::Object(map.iter().map(|(k, v)| (k.clone(), as_json(v))).collect())
        }
    }
}

/// Stripe's update rule: a field sent replaces the old one, `null` unsets it; metadata keys
/// merge, a `null` key is removed.
fn merge(target: &mut Map<String, Value>, update: Map<String, Value>) {
    for (key, value) in update {
        if key == "metadata" {
            let metadata = target
                .entry("metadata")
                .or_insert_with(|| json!({}))
                .as_object_mut()
                .expect("metadata object");
            match value {
                Value::Object(entries) => {
                    for (k, v) in entries {
                        if v.is_null() {
                            metadata.remove(&k);
                        } else {
                            metadata.insert(k, v);
                        }
                    }
                }
                _ => metadata.clear(),
            }
        } else {
            target.insert(key, value);
        }
    }
}

impl StripeStandIn {
    pub fn new() -> Self {
        Self {
            rules: Arc::new(Rules::pinned()),
            state: Arc::default(),
        }
    }

    /// A wiremock server answering every path with this stand-in.
    pub async fn start() -> (MockServer, Self) {
        let server = MockServer::start().await;
        let standin = Self::new();
        Mock::given(wiremock::matchers::any())
            .respond_with(standin.clone())
            .mount(&server)
            .await;
        (server, standin)
    }

    pub fn rules(&self) -> &Rules {
        &self.rules
    }

    /// Every request accepted, in order.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// Every request refused, and why.
    pub fn refused(&self) -> Vec<String> {
        self.state.lock().unwrap().refused.clone()
    }

    /// A customer made outside billsync (the Dashboard, Checkout, the app's old code).
    pub fn add_customer(&self, email: &str, metadata: Value) -> String {
        let mut state = self.state.lock().unwrap();
        state.next_id += 1;
        let id = format!("cus_standin{}", state.next_id);
        let customer = json!({
            "id": id, "object": "customer", "created": 1_700_000_000 + state.next_id,
            "livemode": false, "email": email, "name": null, "phone": null,
            "metadata": metadata,
        });
        state.customers.insert(id.clone(), customer);
        id
    }

    /// A subscription of `customer`, as a webhook or the Dashboard would have made it.
    pub fn add_subscription(&self, customer: &str, status: &str) -> Value {
        let mut state = self.state.lock().unwrap();
        state.next_id += 1;
        let id = format!("sub_standin{}", state.next_id);
        let subscription = json!({
            "id": id, "object": "subscription", "customer": customer, "status": status,
            "cancel_at_period_end": false, "cancel_at": null, "canceled_at": null,
            "ended_at": null, "created": 1_700_000_000 + state.next_id, "livemode": false,
            "metadata": {},
            "items": {"object": "list", "has_more": false, "data": [{
                "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
                "price": {"id": "price_standin", "object": "price"},
                "current_period_end": 1_900_000_000,
            }]},
        });
        state.subscriptions.insert(id, subscription.clone());
        subscription
    }

    /// A price, as the Dashboard would have made it.
    pub fn add_price(&self, id: &str, lookup_key: Option<&str>, active: bool) {
        let price = json!({"id": id, "object": "price", "active": active, "lookup_key": lookup_key,
                           "currency": "usd", "unit_amount": 1000, "livemode": false});
        self.state
            .lock()
            .unwrap()
            .prices
            .insert(id.to_owned(), price);
    }

    /// A webhook endpoint made in the Dashboard (`api_version` `None`: the account's default).
    pub fn add_webhook_endpoint(
        &self,
        url: &str,
        events: &[&str],
        api_version: Option<&str>,
        status: &str,
    ) -> String {
        let mut state = self.state.lock().unwrap();
        state.next_id += 1;
        let id = format!("we_standin{}", state.next_id);
        let endpoint = json!({
            "id": id, "object": "webhook_endpoint", "url": url, "enabled_events": events,
            "api_version": api_version, "status": status, "description": null,
            "livemode": false, "metadata": {}, "created": 1_700_000_000 + state.next_id,
        });
        state.webhook_endpoints.insert(id.clone(), endpoint);
        id
    }

    /// A webhook endpoint as Stripe holds it now.
    pub fn webhook_endpoint(&self, id: &str) -> Option<Value> {
        self.state
            .lock()
            .unwrap()
            .webhook_endpoints
            .get(id)
            .cloned()
    }

    fn answer(&self, request: &Request) -> ResponseTemplate {
        let method = request.method.as_str();
        let path = request.url.path();
        let pairs: Vec<(String, String)> = if method == "POST" {
            serde_urlencoded::from_bytes(&request.body).unwrap_or_default()
        } else {
            request
                .url
                .query_pairs()
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect()
        };
        let header = |name: &str| request.headers.get(name).and_then(|v| v.to_str().ok());
        let mut state = self.state.lock().unwrap();
        if header("stripe-version") != Some(self.rules.api_version.as_str()) {
            state.refused.push(format!(
                "{method} {path}: Stripe-Version {:?}",
                header("stripe-version")
            ));
            return error(400, "api_version_invalid", "", "not the pinned API version");
        }
        if method == "POST" && header("idempotency-key").is_none() {
            state
                .refused
                .push(format!("{method} {path}: no Idempotency-Key"));
        }
        let operation = match self.rules.check(method, path, &pairs) {
            Ok(operation) => operation.to_owned(),
            Err(v) => {
                state.refused.push(format!("{method} {path}: {v}"));
                let status = if v.code == "resource_missing" {
                    404
                } else {
                    400
                };
                return error(status, v.code, &v.param, &v.message);
            }
        };
        state.seen.push(Seen {
            operation: operation.clone(),
            params: pairs.clone(),
        });
        let params = match tree(&pairs) {
            Ok(t) => as_json(&Node::Tree(t)),
            Err(_) => json!({}),
        };
        let last_segment = path.rsplit('/').next().unwrap_or_default().to_owned();
        let param = |name: &str| params[name].as_str().map(str::to_owned);
        match operation.as_str() {
            "customers.create" => {
                state.next_id += 1;
                let id = format!("cus_standin{}", state.next_id);
                let mut customer = json!({
                    "id": id, "object": "customer", "created": 1_700_000_000 + state.next_id,
                    "livemode": false, "email": null, "name": null, "phone": null,
                    "metadata": {},
                })
                .as_object()
                .cloned()
                .unwrap();
                merge(
                    &mut customer,
                    params.as_object().cloned().unwrap_or_default(),
                );
                let customer = Value::Object(customer);
                state.customers.insert(id, customer.clone());
                ResponseTemplate::new(200).set_body_json(customer)
            }
            "customers.retrieve" | "customers.update" => {
                let Some(customer) = state.customers.get_mut(&last_segment) else {
                    return error(404, "resource_missing", "id", "No such customer");
                };
                if operation == "customers.update" {
                    merge(
                        customer.as_object_mut().unwrap(),
                        params.as_object().cloned().unwrap_or_default(),
                    );
                }
                ResponseTemplate::new(200).set_body_json(customer.clone())
            }
            "customers.delete" => {
                state.customers.remove(&last_segment);
                ResponseTemplate::new(200).set_body_json(
                    json!({"id": last_segment, "object": "customer", "deleted": true}),
                )
            }
            "customers.list" => {
                // Stripe's `email` filter is exact and case-sensitive; newest first.
                let email = param("email");
                let mut data: Vec<Value> = state
                    .customers
                    .values()
                    .filter(|c| email.is_none() || c["email"].as_str() == email.as_deref())
                    .cloned()
                    .collect();
                data.sort_by_key(|c| std::cmp::Reverse(c["created"].as_i64()));
                ResponseTemplate::new(200).set_body_json(page(data, &params, "/v1/customers"))
            }
            "customers.search" => {
                // `email:"…"` or `metadata["key"]:"…"`, the two forms billsync asks.
                let query = param("query").unwrap_or_default();
                let (field, value) = query.split_once(':').unwrap_or_default();
                let value = value.trim_matches('"');
                let data: Vec<Value> = state
                    .customers
                    .values()
                    .filter(|c| match field.strip_prefix("metadata[\"") {
                        Some(key) => c["metadata"][key.trim_end_matches("\"]")] == value,
                        None => {
                            field == "email"
                                && c["email"]
                                    .as_str()
                                    .is_some_and(|e| e.eq_ignore_ascii_case(value))
                        }
                    })
                    .cloned()
                    .collect();
                let offset: usize = param("page")
                    .and_then(|p| p.strip_prefix("page_").and_then(|n| n.parse().ok()))
                    .unwrap_or(0);
                let limit: usize = param("limit").and_then(|l| l.parse().ok()).unwrap_or(10);
                let rest: Vec<Value> = data.into_iter().skip(offset).collect();
                let has_more = rest.len() > limit;
                let data: Vec<Value> = rest.into_iter().take(limit).collect();
                ResponseTemplate::new(200).set_body_json(json!({
                    "object": "search_result", "data": data, "has_more": has_more,
                    "next_page": has_more.then(|| format!("page_{}", offset + limit)),
                    "url": "/v1/customers/search",
                }))
            }
            "customers.payment_methods.list" | "invoices.list" => {
                ResponseTemplate::new(200).set_body_json(page(vec![], &params, path))
            }
            "subscriptions.list" => {
                let customer = param("customer");
                let data = state
                    .subscriptions
                    .values()
                    .filter(|s| customer.is_none() || s["customer"].as_str() == customer.as_deref())
                    .cloned()
                    .collect();
                ResponseTemplate::new(200).set_body_json(page(data, &params, "/v1/subscriptions"))
            }
            "subscriptions.retrieve" | "subscriptions.cancel" => {
                let Some(subscription) = state.subscriptions.get_mut(&last_segment) else {
                    return error(404, "resource_missing", "id", "No such subscription");
                };
                if operation == "subscriptions.cancel" {
                    subscription["status"] = json!("canceled");
                    subscription["canceled_at"] = json!(1_800_000_000);
                }
                ResponseTemplate::new(200).set_body_json(subscription.clone())
            }
            "billing_portal.sessions.create" => {
                state.next_id += 1;
                ResponseTemplate::new(200).set_body_json(json!({
                    "id": format!("bps_standin{}", state.next_id),
                    "object": "billing_portal.session", "customer": params["customer"],
                    "return_url": params["return_url"], "livemode": false,
                    "url": format!("https://billing.stripe.com/p/session/test_{}", state.next_id),
                }))
            }
            "billing_portal.configurations.create" => {
                state.next_id += 1;
                let id = format!("bpc_standin{}", state.next_id);
                let mut configuration = params.as_object().cloned().unwrap_or_default();
                configuration.insert("id".into(), json!(id));
                configuration.insert("object".into(), json!("billing_portal.configuration"));
                let configuration = Value::Object(configuration);
                state
                    .portal_configurations
                    .insert(id, configuration.clone());
                ResponseTemplate::new(200).set_body_json(configuration)
            }
            "billing_portal.configurations.retrieve" | "billing_portal.configurations.update" => {
                let Some(configuration) = state.portal_configurations.get_mut(&last_segment) else {
                    return error(
                        404,
                        "resource_missing",
                        "configuration",
                        "No such configuration",
                    );
                };
                if operation == "billing_portal.configurations.update" {
                    merge(
                        configuration.as_object_mut().unwrap(),
                        params.as_object().cloned().unwrap_or_default(),
                    );
                }
                ResponseTemplate::new(200).set_body_json(configuration.clone())
            }
            "prices.retrieve" => match state.prices.get(&last_segment) {
                Some(price) => ResponseTemplate::new(200).set_body_json(price.clone()),
                None => error(404, "resource_missing", "price", "No such price"),
            },
            "prices.list" => {
                // `lookup_keys[0]=…` arrives as an array (see `as_json`).
                let keys: Vec<&str> = params["lookup_keys"]
                    .as_array()
                    .map(|keys| keys.iter().filter_map(Value::as_str).collect())
                    .unwrap_or_default();
                let data = state
                    .prices
                    .values()
                    .filter(|p| keys.is_empty() || keys.iter().any(|k| p["lookup_key"] == *k))
                    .cloned()
                    .collect();
                ResponseTemplate::new(200).set_body_json(page(data, &params, "/v1/prices"))
            }
            "webhook_endpoints.create" => {
                state.next_id += 1;
                let id = format!("we_standin{}", state.next_id);
                let endpoint = json!({
                    "id": id, "object": "webhook_endpoint", "url": params["url"],
                    "enabled_events": params["enabled_events"],
                    "api_version": params["api_version"], "status": "enabled",
                    "description": params["description"], "livemode": false, "metadata": {},
                    "created": 1_700_000_000 + state.next_id,
                });
                state.webhook_endpoints.insert(id, endpoint.clone());
                // The secret is in this answer only, as Stripe does.
                let mut answer = endpoint;
                answer["secret"] = json!(format!("whsec_standin{}", state.next_id));
                ResponseTemplate::new(200).set_body_json(answer)
            }
            "webhook_endpoints.update" => {
                let Some(endpoint) = state.webhook_endpoints.get_mut(&last_segment) else {
                    return error(404, "resource_missing", "id", "No such webhook endpoint");
                };
                if params.get("enabled_events").is_some() {
                    endpoint["enabled_events"] = params["enabled_events"].clone();
                }
                if let Some(disabled) = params["disabled"].as_bool() {
                    endpoint["status"] = json!(if disabled { "disabled" } else { "enabled" });
                }
                ResponseTemplate::new(200).set_body_json(endpoint.clone())
            }
            "webhook_endpoints.list" => {
                // Newest first, as Stripe lists them.
                let mut data: Vec<Value> = state.webhook_endpoints.values().cloned().collect();
                data.sort_by_key(|e| std::cmp::Reverse(e["created"].as_i64()));
                ResponseTemplate::new(200).set_body_json(page(
                    data,
                    &params,
                    "/v1/webhook_endpoints",
                ))
            }
            other => error(
                400,
                "resource_missing",
                "",
                &format!("the stand-in does not answer {other}"),
            ),
        }
    }
}

impl Default for StripeStandIn {
    fn default() -> Self {
        Self::new()
    }
}

impl Respond for StripeStandIn {
    fn respond(&self, request: &Request) -> ResponseTemplate {
        self.answer(request)
    }
}
