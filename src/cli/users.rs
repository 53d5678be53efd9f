//! `billsync users import FILE`: the app's users, from a JSON Lines or CSV export, into billsync.

use std::{io::BufRead, path::PathBuf, time::Duration};

use clap::Subcommand;

use crate::{
    app::open_store,
    config::Config,
    gdpr::Tombstones,
    users_import::{self, FileError, Format, Row, Rows, Summary, BATCH_SIZE},
};

#[derive(Debug, Subcommand)]
pub enum UsersCommand {
    /// Create or update users from a file (the fields of `PUT /v1/users/{id}`, and `id`):
    /// JSON Lines or CSV with a header. Idempotent; an invalid row is reported by its line and
    /// skipped, the others are imported; an erased person is never created again. Exits 1 when
    /// a row was invalid.
    Import {
        /// The file, or `-` for standard input.
        file: PathBuf,
        /// The file's format [default: by its extension, .jsonl/.ndjson or .csv].
        #[arg(long, value_enum)]
        format: Option<Format>,
    },
}

pub async fn run(command: UsersCommand, config: Config) -> anyhow::Result<()> {
    match command {
        UsersCommand::Import { file, format } => import(config, file, format).await,
    }
}

/// Rows between two plain progress lines (when stderr is not a terminal).
const PLAIN_PROGRESS_EVERY: u64 = 100_000;

/// What the reading thread hands over: a batch of rows and the bytes read so far.
type Chunk = Result<(Vec<Row>, u64), FileError>;

async fn import(config: Config, file: PathBuf, format: Option<Format>) -> anyhow::Result<()> {
    let stdin = file.as_os_str() == "-";
    let format = format.or_else(|| Format::of_path(&file)).ok_or_else(|| {
        anyhow::anyhow!(
            "cannot tell the format of {}: name it .jsonl or .csv, or pass --format jsonl|csv",
            file.display()
        )
    })?;
    let input: Box<dyn BufRead + Send> = if stdin {
        Box::new(std::io::BufReader::new(std::io::stdin()))
    } else {
        let opened = std::fs::File::open(&file)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", file.display()))?;
        Box::new(std::io::BufReader::with_capacity(256 * 1024, opened))
    };
    let size = (!stdin)
        .then(|| std::fs::metadata(&file).ok().map(|m| m.len()))
        .flatten();
    // A bad CSV header stops the import before anything is written.
    let rows = Rows::new(input, format)?;
    let store = open_store(&config).await?;
    let tombstones = Tombstones::new(config.erasure_pepper.clone());

    // The file is read and checked on a thread of its own while batches are written; the
    // channel holds a few batches, so memory stays flat however long the file.
    let (sender, mut receiver) = tokio::sync::mpsc::channel::<Chunk>(4);
    let reader = tokio::task::spawn_blocking(move || read_batches(rows, &sender));

    let progress = Progress::new(size);
    let mut summary = Summary::default();
    let mut failure = None;
    let mut store_failure = None;
    while let Some(chunk) = receiver.recv().await {
        let (batch, bytes) = match chunk {
            Ok(chunk) => chunk,
            Err(err) => {
                failure = Some(err);
                break;
            }
        };
        let mut users = Vec::with_capacity(batch.len());
        for row in batch {
            match row.user {
                Ok(user) => users.push(user),
                Err(err) => {
                    summary.invalid += 1;
                    progress.report(&format!("line {}: {}: {}", row.line, err.code, err.message));
                }
            }
        }
        match users_import::import(store.as_ref(), &tombstones, users).await {
            Ok(outcomes) => outcomes.iter().for_each(|o| summary.count(o)),
            Err(err) => {
                // What was committed before stays; say how far the import got.
                store_failure = Some(err);
                break;
            }
        }
        progress.update(&summary, bytes);
    }
    drop(receiver);
    if store_failure.is_none() {
        reader.await?;
    }
    progress.finish();
    print!("{}", summary_table(&summary));
    if let Some(err) = store_failure {
        anyhow::bail!(
            "cannot write users: {err}; the rows counted above are done: run the import again \
             to finish it (what is there already counts as unchanged)"
        );
    }
    if let Some(err) = failure {
        anyhow::bail!("{err}: the import stopped there (the rows before it were imported)");
    }
    if summary.invalid > 0 {
        let rows = if summary.invalid == 1 { "row" } else { "rows" };
        anyhow::bail!(
            "{} invalid {rows}, listed above by line, skipped; the others were imported",
            summary.invalid
        );
    }
    Ok(())
}

fn read_batches<R: BufRead>(mut rows: Rows<R>, sender: &tokio::sync::mpsc::Sender<Chunk>) {
    loop {
        let mut batch = Vec::with_capacity(BATCH_SIZE);
        let mut failure = None;
        while batch.len() < BATCH_SIZE {
            match rows.next() {
                Some(Ok(row)) => batch.push(row),
                Some(Err(err)) => {
                    failure = Some(err);
                    break;
                }
                None => break,
            }
        }
        let last = failure.is_some() || batch.len() < BATCH_SIZE;
        if !batch.is_empty()
            && sender
                .blocking_send(Ok((batch, rows.bytes_read())))
                .is_err()
        {
            return; // the importer stopped
        }
        if let Some(err) = failure {
            let _ = sender.blocking_send(Err(err));
        }
        if last {
            return;
        }
    }
}

/// What was done, one outcome a line, and whether this run changed anything.
pub fn summary_table(summary: &Summary) -> String {
    let mut table = format!(
        "created    {:>9}\nupdated    {:>9}\nunchanged  {:>9}\nerased     {:>9}   (erased earlier: not created again)\ninvalid    {:>9}\n",
        summary.created, summary.updated, summary.unchanged, summary.erased, summary.invalid
    );
    if !summary.changed_anything() {
        table.push_str("nothing changed: billsync already held every valid row as it is\n");
    }
    table
}

/// A progress bar on a terminal; otherwise a plain line every `PLAIN_PROGRESS_EVERY` rows.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain_next: std::cell::Cell<u64>,
}

impl Progress {
    fn new(size: Option<u64>) -> Self {
        let bar = std::io::IsTerminal::is_terminal(&std::io::stderr()).then(|| {
            let bar = match size {
                Some(bytes) => indicatif::ProgressBar::new(bytes).with_style(
                    indicatif::ProgressStyle::with_template(
                        "{bar:30} {percent:>3}% {msg} ({elapsed}, {eta} left)",
                    )
                    .expect("a valid template"),
                ),
                None => indicatif::ProgressBar::new_spinner(),
            };
            bar.enable_steady_tick(Duration::from_millis(120));
            bar
        });
        Self {
            bar,
            plain_next: std::cell::Cell::new(PLAIN_PROGRESS_EVERY),
        }
    }

    /// A line that stays (an invalid row), above the bar.
    fn report(&self, line: &str) {
        match &self.bar {
            Some(bar) => bar.println(line),
            None => eprintln!("{line}"),
        }
    }

    fn update(&self, summary: &Summary, bytes: u64) {
        let line = format!(
            "{} rows: {} created, {} updated, {} unchanged, {} erased, {} invalid",
            summary.rows(),
            summary.created,
            summary.updated,
            summary.unchanged,
            summary.erased,
            summary.invalid
        );
        match &self.bar {
            Some(bar) => {
                bar.set_position(bytes);
                bar.set_message(line);
            }
            None if summary.rows() >= self.plain_next.get() => {
                eprintln!("{line}");
                self.plain_next.set(
                    summary.rows() / PLAIN_PROGRESS_EVERY * PLAIN_PROGRESS_EVERY
                        + PLAIN_PROGRESS_EVERY,
                );
            }
            None => {}
        }
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}
