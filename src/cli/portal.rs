//! `billsync portal …`: the billing portal's configuration, kept as code.

use clap::Subcommand;

use crate::{
    app::{open_store, stripe_client},
    config::Config,
};

#[derive(Debug, Subcommand)]
pub enum PortalCommand {
    /// Validate FILE and make Stripe hold it: create, update in place, or (unchanged and
    /// matching Stripe's copy) nothing.
    Apply {
        /// A TOML file like portal.example.toml.
        file: std::path::PathBuf,
        /// Change nothing: compare FILE with Stripe's current copy, print the drifted fields,
        /// and exit non-zero if there are any (or if FILE was never applied).
        #[arg(long)]
        check: bool,
    },
    /// Print what a configuration was applied as, and what Stripe holds now; with FILE, also
    /// the fields where Stripe's copy differs from it.
    Show {
        /// A TOML file like portal.example.toml (its `name` is the one shown).
        file: Option<std::path::PathBuf>,
        /// The `name` in its file.
        #[arg(long, default_value = "default", conflicts_with = "file")]
        name: String,
    },
}

/// Reads and validates a portal file; the error names the file and the key at fault.
fn portal_spec(file: &std::path::Path) -> anyhow::Result<crate::portal_config::PortalSpec> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    crate::portal_config::PortalSpec::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

pub async fn run(command: PortalCommand, config: Config) -> anyhow::Result<()> {
    use crate::portal_config::{self, Checked};
    match command {
        PortalCommand::Apply { file, check } => {
            let spec = portal_spec(&file)?;
            let stripe = stripe_client(&config)?;
            let store = open_store(&config).await?;
            if !check {
                let applied = portal_config::apply(store.as_ref(), &stripe, &spec).await?;
                println!("{}", serde_json::to_string(&applied)?);
                return Ok(());
            }
            let checked = portal_config::check(store.as_ref(), &stripe, &spec).await?;
            println!("{}", serde_json::to_string(&checked)?);
            match checked {
                Checked::InSync { .. } => Ok(()),
                Checked::Drifted { id, drifted } => anyhow::bail!(
                    "{}: Stripe's configuration {id} differs in {}",
                    file.display(),
                    drifted.join(", ")
                ),
                Checked::NotApplied { name } => anyhow::bail!(
                    "{}: no portal configuration named {name:?} was applied",
                    file.display()
                ),
            }
        }
        PortalCommand::Show { file, name } => {
            let spec = file.as_deref().map(portal_spec).transpose()?;
            let name = spec.as_ref().map_or(name, |s| s.name.clone());
            let store = open_store(&config).await?;
            let record = store.portal_config(&name).await?.ok_or_else(|| {
                anyhow::anyhow!("no portal configuration named {name:?} was applied")
            })?;
            let stripe = stripe_client(&config)?;
            let live = stripe
                .retrieve_portal_configuration(&record.stripe_configuration_id)
                .await?;
            let applied_at = record
                .applied_at
                .format(&time::format_description::well_known::Rfc3339)?;
            let mut shown = serde_json::json!({
                "name": record.name,
                "id": record.stripe_configuration_id,
                "spec_hash": record.spec_hash,
                "applied_at": applied_at,
            });
            if let Some(spec) = &spec {
                shown["drifted"] = serde_json::json!(spec.drift(&live));
            }
            shown["stripe"] = live;
            println!("{}", serde_json::to_string_pretty(&shown)?);
            Ok(())
        }
    }
}
