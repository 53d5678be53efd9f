//! A test's users: unique ids, the tokens they sign in with, and requests as them.

use serde_json::Value;

use super::{encode, TestApp, JWT_SECRET};

pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

/// An HS256 user token as Supabase issues them, valid for an hour.
pub fn user_token(sub: &str, email: Option<&str>, verified: Option<Value>) -> String {
    let mut claims = serde_json::json!({
        "sub": sub,
        "aud": "authenticated",
        "role": "authenticated",
        "exp": time::OffsetDateTime::now_utc().unix_timestamp() + 3600,
        "iat": time::OffsetDateTime::now_utc().unix_timestamp(),
    });
    if let Some(email) = email {
        claims["email"] = email.into();
    }
    if let Some(verified) = verified {
        claims["email_verified"] = verified;
    }
    sign_hs256(&claims)
}

pub fn sign_hs256(claims: &Value) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(jsonwebtoken::Algorithm::HS256),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(JWT_SECRET.as_bytes()),
    )
    .expect("sign token")
}
impl TestApp {
    /// A request as a signed-in user.
    pub fn as_user(
        &self,
        method: reqwest::Method,
        path: &str,
        token: &str,
    ) -> reqwest::RequestBuilder {
        self.http.request(method, self.url(path)).bearer_auth(token)
    }

    /// `POST /v1/users/{id}/customer`; the status and the JSON body.
    pub async fn resolve(&self, user_id: &str) -> (u16, Value) {
        let response = self
            .admin(
                reqwest::Method::POST,
                &format!("/v1/users/{}/customer", encode(user_id)),
            )
            .send()
            .await
            .expect("POST customer");
        let status = response.status().as_u16();
        (status, response.json().await.expect("json"))
    }
}
