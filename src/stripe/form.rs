//! Stripe's form encoding: nested objects as `parent[child]=v`, arrays as `list[0]=v`, the
//! shape stripe-node and stripe-go send.

use serde_json::Value;

/// Flattens a JSON object into Stripe's form pairs. `null` becomes an empty value, which
/// Stripe reads as "unset".
pub fn form_pairs(params: &Value) -> Vec<(String, String)> {
    let mut pairs = Vec::new();
    if let Value::Object(map) = params {
        for (key, value) in map {
            flatten(key.clone(), value, &mut pairs);
        }
    }
    pairs
}

fn flatten(prefix: String, value: &Value, out: &mut Vec<(String, String)>) {
    match value {
        Value::Object(map) => {
            for (key, inner) in map {
                flatten(format!("{prefix}[{key}]"), inner, out);
            }
        }
        Value::Array(items) => {
            for (index, inner) in items.iter().enumerate() {
                flatten(format!("{prefix}[{index}]"), inner, out);
            }
        }
        Value::Null => out.push((prefix, String::new())),
        Value::String(s) => out.push((prefix, s.clone())),
        Value::Bool(b) => out.push((prefix, b.to_string())),
        Value::Number(n) => out.push((prefix, n.to_string())),
    }
}

/// URL-encodes the pairs; brackets stay readable, as Stripe's own libraries send them.
pub fn encode(pairs: &[(String, String)]) -> String {
    serde_urlencoded::to_string(pairs)
        .expect("string pairs always encode")
        .replace("%5B", "[")
        .replace("%5D", "]")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn nested_objects_and_arrays_flatten_like_stripe_node() {
        let params = json!({
            "email": "a+b@example.com",
            "metadata": {"userId": "u 1", "source": "billsync"},
            "features": {"customer_update": {"allowed_updates": ["email", "name"], "enabled": true}},
            "phone": null,
        });
        let body = encode(&form_pairs(&params));
        assert_eq!(
            body,
            "email=a%2Bb%40example.com\
             &features[customer_update][allowed_updates][0]=email\
             &features[customer_update][allowed_updates][1]=name\
             &features[customer_update][enabled]=true\
             &metadata[source]=billsync&metadata[userId]=u+1&phone="
        );
    }

    /// Stripe clears an `Emptyable` field (a list included) only when it is sent as `key=`:
    /// callers that mean "clear" pass `""`. An empty array sends nothing at all (so Stripe
    /// keeps the list it has); that stays so, other callers build their params with it.
    #[test]
    fn an_explicit_empty_is_sent_and_an_empty_array_is_not() {
        let params = json!({"a": {"list": "", "kept": []}, "b": ""});
        assert_eq!(encode(&form_pairs(&params)), "a[list]=&b=");
    }

    #[test]
    fn metacharacters_in_values_stay_inside_their_value() {
        let params = json!({"name": "a&b=c[d]", "metadata": {"k": "%5B"}});
        let body = encode(&form_pairs(&params));
        let decoded: Vec<(String, String)> = serde_urlencoded::from_str(&body).unwrap();
        assert_eq!(
            decoded,
            vec![
                ("metadata[k]".to_owned(), "%5B".to_owned()),
                ("name".to_owned(), "a&b=c[d]".to_owned())
            ]
        );
    }
}
