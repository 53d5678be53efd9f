//! Erasure tombstones, and the hash that names an erased subject in logs and the audit trail.

use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::{
    config::Secret,
    domain::UserId,
    store::{Store, StoreError},
};

/// Erasure tombstones: a keyed hash (HMAC-SHA256) of each erased user id, so a token issued
/// before the erasure cannot bring the person back, while the table names nobody. The key is
/// `BILLSYNC_ERASURE_PEPPER` or, unset, one generated at first use and kept in the database
/// (every instance then uses the same).
pub struct Tombstones {
    configured: Option<Secret>,
    pepper: tokio::sync::OnceCell<Secret>,
}

impl Tombstones {
    pub fn new(configured: Option<Secret>) -> Self {
        Self {
            configured,
            pepper: tokio::sync::OnceCell::new(),
        }
    }

    async fn pepper(&self, store: &dyn Store) -> Result<&Secret, StoreError> {
        if let Some(configured) = &self.configured {
            return Ok(configured);
        }
        self.pepper
            .get_or_try_init(|| async {
                let fresh = hex::encode(rand_bytes());
                let kept = store.setting_or_init("erasure_pepper", &fresh).await?;
                Ok(Secret::new(kept))
            })
            .await
    }

    /// The keyed hash of a user id, as the tombstones hold it.
    pub async fn subject(&self, store: &dyn Store, user: &UserId) -> Result<String, StoreError> {
        use hmac::Mac;
        let pepper = self.pepper(store).await?;
        let mut mac = hmac::Hmac::<Sha256>::new_from_slice(pepper.expose().as_bytes())
            .expect("HMAC takes a key of any length");
        mac.update(user.as_str().as_bytes());
        Ok(hex::encode(mac.finalize().into_bytes()))
    }

    pub async fn record(&self, store: &dyn Store, user: &UserId) -> Result<(), StoreError> {
        store
            .record_tombstone(&self.subject(store, user).await?)
            .await
    }

    /// When the user was erased, if they were.
    pub async fn erased_at(
        &self,
        store: &dyn Store,
        user: &UserId,
    ) -> Result<Option<OffsetDateTime>, StoreError> {
        store.tombstone(&self.subject(store, user).await?).await
    }
}

/// 32 random bytes, from two v4 UUIDs (the OS's random source).
fn rand_bytes() -> Vec<u8> {
    let (a, b) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    a.as_bytes().iter().chain(b.as_bytes()).copied().collect()
}

/// The id as it may appear in logs and the audit trail: a hash, not the id.
pub fn subject_hash(user: &UserId) -> String {
    hex::encode(Sha256::digest(user.as_str().as_bytes()))
}
