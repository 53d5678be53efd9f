//! Profile updates from the app's signed-in users: validated at the edge, written with the
//! outbox push in one transaction, retried on a concurrent edit (optimistic versioning).

use serde::{Deserialize, Deserializer};

use crate::{
    domain::{PersonName, Phone, UserId},
    store::{Store, StoreError, User, UserUpsert},
};

/// `PUT /api/user/profile`'s body, as the seed app sends it. An absent field is left as is;
/// `null` or `""` clears it.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ProfileBody {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 100)]
    pub first_name: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, max_length = 100)]
    pub last_name: Option<Option<String>>,
    /// E.164: `+` and 7–15 digits; `""` clears it.
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>)]
    pub phone: Option<Option<String>>,
}

/// Tells an absent field (`None`, via `default`) from an explicit `null` (`Some(None)`).
fn present<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct ProfilePatch {
    pub first_name: Option<Option<PersonName>>,
    pub last_name: Option<Option<PersonName>>,
    pub phone: Option<Option<Phone>>,
}

#[derive(Debug, thiserror::Error)]
#[error("{field}: {message}")]
pub struct InvalidProfile {
    pub field: &'static str,
    pub message: String,
}

impl ProfileBody {
    pub fn into_patch(self) -> Result<ProfilePatch, InvalidProfile> {
        let name = |value: Option<Option<String>>, field: &'static str| {
            value
                .map(|v| PersonName::parse_optional(v.as_deref(), field))
                .transpose()
                .map_err(|e| InvalidProfile {
                    field,
                    message: e.message,
                })
        };
        Ok(ProfilePatch {
            first_name: name(self.first_name, "firstName")?,
            last_name: name(self.last_name, "lastName")?,
            phone: self
                .phone
                .map(|p| match p.as_deref().map(str::trim) {
                    None | Some("") => Ok(None),
                    Some(raw) => Phone::parse(raw).map(Some).map_err(|e| InvalidProfile {
                        field: "phone",
                        message: e.message,
                    }),
                })
                .transpose()?,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ProfileError {
    #[error("user not found")]
    UserNotFound,
    #[error("the profile kept changing concurrently")]
    Contended,
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Applies the patch to the user's current profile. The write and its Stripe push job commit
/// together; nothing here waits on Stripe.
#[tracing::instrument(skip_all, fields(user_id = %user_id))]
pub async fn update_profile(
    store: &dyn Store,
    user_id: &UserId,
    patch: &ProfilePatch,
) -> Result<User, ProfileError> {
    for _ in 0..5 {
        let current = store
            .get_user(user_id)
            .await?
            .ok_or(ProfileError::UserNotFound)?;
        let desired = UserUpsert {
            id: current.id.clone(),
            email: current.email.clone(),
            email_verified: current.email_verified,
            first_name: patch
                .first_name
                .clone()
                .unwrap_or(current.first_name.clone()),
            last_name: patch.last_name.clone().unwrap_or(current.last_name.clone()),
            phone: patch.phone.clone().unwrap_or(current.phone.clone()),
        };
        if let Some(saved) = store
            .update_user_if_version(&desired, current.version)
            .await?
        {
            return Ok(saved);
        }
    }
    Err(ProfileError::Contended)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn body(json: &str) -> ProfileBody {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn absent_null_and_empty_are_told_apart() {
        let patch = body(r#"{"firstName": "Ada"}"#).into_patch().unwrap();
        assert_eq!(patch.first_name.unwrap().unwrap().as_str(), "Ada");
        assert_eq!(patch.last_name, None, "absent: unchanged");
        let patch = body(r#"{"lastName": null, "phone": ""}"#)
            .into_patch()
            .unwrap();
        assert_eq!(patch.last_name, Some(None), "null clears");
        assert_eq!(patch.phone, Some(None), "empty clears");
    }

    #[test]
    fn invalid_fields_are_named() {
        let err = body(r#"{"phone": "12345"}"#).into_patch().unwrap_err();
        assert_eq!(err.field, "phone");
        let long = format!(r#"{{"lastName": "{}"}}"#, "x".repeat(101));
        assert_eq!(body(&long).into_patch().unwrap_err().field, "lastName");
        assert!(serde_json::from_str::<ProfileBody>(r#"{"email": "x@y.z"}"#).is_err());
    }
}
