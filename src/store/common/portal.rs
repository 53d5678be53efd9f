use async_trait::async_trait;

use super::{
    dialect::{db_time, time, Time},
    Backend,
};
use crate::{
    domain::PortalConfigRecord,
    store::{traits::PortalConfigs, StoreResult},
};

#[async_trait]
impl PortalConfigs for Backend {
    async fn portal_config(&self, name: &str) -> StoreResult<Option<PortalConfigRecord>> {
        let row: Option<(String, String, String, Time)> = sqlx::query_as(
            "SELECT name, stripe_configuration_id, spec_hash, applied_at
             FROM portal_configurations WHERE name = $1",
        )
        .bind(name)
        .fetch_optional(&self.pool)
        .await?;
        row.map(|(name, id, hash, at)| {
            Ok(PortalConfigRecord {
                name,
                stripe_configuration_id: id,
                spec_hash: hash,
                applied_at: time(at)?,
            })
        })
        .transpose()
    }

    async fn save_portal_config(&self, record: &PortalConfigRecord) -> StoreResult<()> {
        sqlx::query(
            "INSERT INTO portal_configurations (name, stripe_configuration_id, spec_hash, applied_at)
             VALUES ($1, $2, $3, $4)
             ON CONFLICT (name) DO UPDATE SET stripe_configuration_id = excluded.stripe_configuration_id,
                 spec_hash = excluded.spec_hash, applied_at = excluded.applied_at",
        )
        .bind(&record.name)
        .bind(&record.stripe_configuration_id)
        .bind(&record.spec_hash)
        .bind(db_time(record.applied_at))
        .execute(&self.pool)
        .await?;
        Ok(())
    }
}
