//! The `billsync` command line. Every flag also reads its environment variable.

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use crate::{
    config::{Config, ConfigArgs},
    domain::{Email, UserId},
    http::{self, AppState},
    store::{self, Store, UserUpsert},
    stripe::StripeClient,
};

#[derive(Debug, Parser)]
#[command(
    name = "billsync",
    version,
    about = "Keeps your users and their Stripe customers in sync"
)]
pub struct Cli {
    #[command(flatten)]
    pub config: ConfigArgs,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server (migrates the database first).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Customer operations.
    #[command(subcommand)]
    Customer(CustomerCommand),
    /// Webhook events.
    #[command(subcommand)]
    Events(EventsCommand),
    /// Compare every Stripe customer with every user and link; report, and with --apply fix
    /// what is safe (link, unlink dangling, push drifted profiles). Never deletes a customer.
    Reconcile {
        /// Fix what is safe to fix.
        #[arg(long)]
        apply: bool,
        /// Write the full report (every finding) to this file as JSON.
        #[arg(long)]
        json: Option<std::path::PathBuf>,
    },
    /// The billing-portal configuration, kept as code.
    #[command(subcommand)]
    Portal(PortalCommand),
    /// Print everything billsync holds about a user as JSON (the GDPR export).
    Export {
        #[arg(long, env = "BILLSYNC_USER_ID")]
        user: String,
    },
    /// Erase a user: cancel subscriptions, scrub (or delete) the Stripe customer, delete local data.
    Erase {
        #[arg(long, env = "BILLSYNC_USER_ID")]
        user: String,
        /// Delete the Stripe customer instead of scrubbing it.
        #[arg(long, env = "BILLSYNC_DELETE_STRIPE_CUSTOMER")]
        delete_stripe_customer: bool,
    },
}

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

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Queue stored events to be applied again (by a running `billsync serve`).
    Replay {
        /// Every failed event.
        #[arg(long, conflicts_with = "id", required_unless_present = "id")]
        failed: bool,
        /// One event, by id (evt_…).
        #[arg(long)]
        id: Option<String>,
    },
}

#[derive(Debug, Subcommand)]
pub enum CustomerCommand {
    /// Find or create the user's Stripe customer and print its id.
    Resolve {
        /// The application's user id.
        #[arg(long, env = "BILLSYNC_USER_ID")]
        user: String,
        /// Creates the user with this (unverified) email if missing; updates it if it differs.
        #[arg(long, env = "BILLSYNC_USER_EMAIL")]
        email: Option<String>,
    },
}

/// Parses arguments, runs the command, and turns any failure into one clear line on stderr.
pub async fn run() -> ExitCode {
    let cli = Cli::parse();
    let config = match Config::load(&cli.config) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("billsync: {err}");
            return ExitCode::FAILURE;
        }
    };
    crate::telemetry::init_logs(config.log_format, config.secret_values());
    match execute(cli.command, config).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("billsync: {err:#}");
            ExitCode::FAILURE
        }
    }
}

async fn execute(command: Command, config: Config) -> anyhow::Result<()> {
    match command {
        Command::Serve => serve(config).await,
        Command::Migrate => {
            let store = open_store(&config).await?;
            tracing::info!(backend = store.backend(), "migrations applied");
            Ok(())
        }
        Command::Customer(CustomerCommand::Resolve { user, email }) => {
            let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
            let user_id = UserId::parse(&user)?;
            let email = email.as_deref().map(Email::parse).transpose()?;
            let store = open_store(&config).await?;
            ensure_user(store.as_ref(), &user_id, email).await?;
            let state = AppState::new(&config, store, stripe);
            let resolved = state
                .resolver
                .resolve(&user_id)
                .await
                .map_err(|e| match e {
                    crate::customers::ResolveError::UserNotFound => {
                        anyhow::anyhow!("user {user_id} not found (pass --email to create it)")
                    }
                    other => other.into(),
                })?;
            println!("{}", resolved.customer_id);
            tracing::info!(source = resolved.source.as_str(), "resolved");
            Ok(())
        }
        Command::Events(EventsCommand::Replay { failed, id }) => {
            let store = open_store(&config).await?;
            if failed {
                let count = store.replay_failed_events().await?;
                println!("{count} failed events queued again");
            } else if let Some(id) = id {
                store
                    .replay_event(&id)
                    .await?
                    .ok_or_else(|| anyhow::anyhow!("no event {id}"))?;
                println!("{id} queued again");
            }
            Ok(())
        }
        Command::Reconcile { apply, json } => reconcile(config, apply, json).await,
        Command::Portal(command) => portal(command, config).await,
        Command::Export { user } => {
            let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
            let user_id = UserId::parse(&user)?;
            let store = open_store(&config).await?;
            let found = store
                .get_user(&user_id)
                .await?
                .ok_or_else(|| anyhow::anyhow!("user {user_id} not found"))?;
            let mut chunks = Box::pin(crate::gdpr::export(store, &stripe, found).await?);
            let mut stdout = tokio::io::stdout();
            while let Some(chunk) = futures_util::StreamExt::next(&mut chunks).await {
                tokio::io::AsyncWriteExt::write_all(&mut stdout, &chunk?).await?;
            }
            tokio::io::AsyncWriteExt::write_all(&mut stdout, b"\n").await?;
            tokio::io::AsyncWriteExt::flush(&mut stdout).await?;
            Ok(())
        }
        Command::Erase {
            user,
            delete_stripe_customer,
        } => {
            let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
            let user_id = UserId::parse(&user)?;
            let store = open_store(&config).await?;
            let state = AppState::new(&config, store, stripe);
            match state
                .worker
                .erase_now(&user_id, delete_stripe_customer)
                .await?
            {
                crate::jobs::ErasureStatus::Completed => println!("erased"),
                crate::jobs::ErasureStatus::Pending => {
                    println!("pending: a Stripe step failed; `billsync serve` will retry it");
                }
            }
            Ok(())
        }
    }
}

/// Reads and validates a portal file; the error names the file and the key at fault.
fn portal_spec(file: &std::path::Path) -> anyhow::Result<crate::portal_config::PortalSpec> {
    let text = std::fs::read_to_string(file)
        .map_err(|e| anyhow::anyhow!("cannot read {}: {e}", file.display()))?;
    crate::portal_config::PortalSpec::parse(&text)
        .map_err(|e| anyhow::anyhow!("{}: {e}", file.display()))
}

async fn portal(command: PortalCommand, config: Config) -> anyhow::Result<()> {
    use crate::portal_config::{self, Checked};
    match command {
        PortalCommand::Apply { file, check } => {
            let spec = portal_spec(&file)?;
            let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
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
            let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
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

async fn reconcile(
    config: Config,
    apply: bool,
    json: Option<std::path::PathBuf>,
) -> anyhow::Result<()> {
    use crate::reconcile::{self, Progress, RateLimiter};
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
    let store = open_store(&config).await?;
    let limiter = RateLimiter::per_second(config.stripe_rps);
    let terminal = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let bar = if terminal {
        let bar = indicatif::ProgressBar::new_spinner();
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
        Some(bar)
    } else {
        None
    };
    let last_phase = std::sync::Mutex::new("");
    let observe = |p: &Progress| {
        let line = format!(
            "{}: {} Stripe customers in {} pages, {} users",
            p.phase, p.stripe_customers, p.stripe_pages, p.users
        );
        match &bar {
            Some(bar) => bar.set_message(line),
            None => {
                // Plain lines for logs: each phase, and every 10th page.
                let mut last = last_phase.lock().expect("progress lock");
                if *last != p.phase || (p.phase == "stripe" && p.stripe_pages.is_multiple_of(10)) {
                    eprintln!("{line}");
                    *last = p.phase;
                }
            }
        }
    };
    let report = reconcile::run(store.as_ref(), &stripe, &limiter, apply, &observe).await?;
    if let Some(bar) = &bar {
        bar.finish_and_clear();
    }
    if let Some(path) = &json {
        std::fs::write(path, serde_json::to_vec_pretty(&report)?)
            .map_err(|e| anyhow::anyhow!("cannot write {}: {e}", path.display()))?;
    }
    print!("{}", report.table());
    let pushes = reconcile::queued_pushes(&report);
    if !pushes.is_empty() {
        // No server may be running: deliver the queued pushes now, at the same rate limit.
        let worker =
            crate::jobs::OutboxWorker::new(store.clone(), stripe.clone(), config.outbox.clone());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
        loop {
            limiter.acquire().await;
            worker.tick().await?;
            let waiting = store.queue_stats().await?.outbox_depth;
            if waiting == 0 {
                println!("{} profile pushes delivered", pushes.len());
                break;
            }
            if std::time::Instant::now() > deadline {
                println!(
                    "{waiting} outbox jobs still queued; a running billsync serve delivers them"
                );
                break;
            }
            tokio::time::sleep(config.outbox.poll_interval).await;
        }
    }
    Ok(())
}

async fn ensure_user(store: &dyn Store, id: &UserId, email: Option<Email>) -> anyhow::Result<()> {
    let Some(email) = email else { return Ok(()) };
    let existing = store.get_user(id).await?;
    let upsert = match existing {
        Some(user) if user.email == email => return Ok(()),
        // A changed email is no longer verified.
        Some(user) => UserUpsert {
            id: id.clone(),
            email,
            email_verified: false,
            first_name: user.first_name,
            last_name: user.last_name,
            phone: user.phone,
        },
        None => UserUpsert {
            id: id.clone(),
            email,
            email_verified: false,
            first_name: None,
            last_name: None,
            phone: None,
        },
    };
    store.upsert_user(&upsert).await?;
    Ok(())
}

async fn open_store(config: &Config) -> anyhow::Result<std::sync::Arc<dyn Store>> {
    let store = store::connect_with(config.database_url.expose(), &config.store_options())
        .await
        .map_err(|e| anyhow::anyhow!("cannot open the database: {e}"))?;
    store
        .migrate()
        .await
        .map_err(|e| anyhow::anyhow!("cannot migrate the database: {e}"))?;
    Ok(store)
}

async fn serve(config: Config) -> anyhow::Result<()> {
    // Validate everything before touching the database or the network.
    let stripe = StripeClient::new(&config.stripe, config.stripe_secret_key()?)?;
    let store = open_store(&config).await?;
    store
        .claim_serving()
        .await
        .map_err(|e| anyhow::anyhow!("cannot serve the database: {e}"))?;
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|e| anyhow::anyhow!("cannot listen on {}: {e}", config.listen))?;
    if config.admin_api_key.is_none() {
        tracing::warn!("BILLSYNC_ADMIN_API_KEY is not set: admin routes answer 503");
    }
    if config.jwt.secret.is_none() && config.jwt.jwks_url.is_none() {
        tracing::warn!(
            "neither BILLSYNC_JWT_SECRET nor BILLSYNC_JWKS_URL is set: user routes answer 503"
        );
    } else if config.app_url.is_none() {
        tracing::warn!("APP_URL is not set: portal sessions answer 503");
    }
    tracing::info!(
        listen = %config.listen,
        database = store.backend(),
        stripe_api = %config.stripe.api_base,
        "billsync serving"
    );
    let limits = config.server;
    let state = AppState::new(&config, store, stripe);
    let (stop_worker, worker_stopping) = tokio::sync::watch::channel(false);
    let (worker, applier) = if config.run_workers {
        (
            tokio::spawn(state.worker.clone().run(worker_stopping.clone())),
            tokio::spawn(state.applier.clone().run(worker_stopping)),
        )
    } else {
        tracing::info!(
            "BILLSYNC_RUN_WORKERS=false: serving HTTP only; events are stored for other \
             instances to apply, profile pushes for them to send"
        );
        (tokio::spawn(async {}), tokio::spawn(async {}))
    };
    http::serve(listener, http::app(state), limits).await?;
    // Let the job in hand finish; an unfinished one is reclaimed when its lease runs out.
    let _ = stop_worker.send(true);
    let both = async {
        let _ = worker.await;
        let _ = applier.await;
    };
    if tokio::time::timeout(std::time::Duration::from_secs(15), both)
        .await
        .is_err()
    {
        tracing::warn!("background workers did not stop in time");
    }
    tracing::info!("stopped");
    Ok(())
}
