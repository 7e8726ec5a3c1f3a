//! What the `pgoutbox` subcommands do, kept out of `main.rs` so they can be
//! tested and reused.

use tokio::sync::watch;

use crate::config::Config;
use crate::error::Error;
use crate::operate::sampler::bytes;
use crate::outbox::dead_letter::{
    self, ActionOutcome, ActionRequest, DeadLetterError, DeadLetterRow, ListFilter, Listing,
    OutboxTable, Selection,
};
use crate::outbox::{
    grant_relay_role, migrate as apply_migrations, MigrationTarget, PrivilegeError, RelayRole,
};
use crate::runner::{self, RunOptions};

pub use crate::VERSION;

/// Sets up `tracing` from the config (`RUST_LOG` wins over `log.filter`).
pub fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(&config.log.filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if config.log.format == "json" {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// `pgoutbox migrate`.
pub async fn migrate(config: &Config) -> Result<(), Error> {
    migrate_with(config, None).await
}

/// `pgoutbox migrate [--relay-role <name>]`: the migrations, then (with a
/// relay role) the least-privilege role the relay runs as, created if
/// missing and granted what the relay needs (see docs/least-privilege.md).
pub async fn migrate_with(config: &Config, relay_role: Option<&RelayRole>) -> Result<(), Error> {
    let pg = crate::database::settings(config)?;
    let mut client = crate::database::connect(&pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e))
        .map_err(|e| match e {
            Error::Transient(m) => Error::Fatal(format!(
                "{m}; check that PostgreSQL is running and reachable at the host and port in DATABASE_URL"
            )),
            other => other,
        })?;
    let target = MigrationTarget {
        schema: config.outbox.schema.clone(),
        table: config.outbox.table.clone(),
        publication: config.cdc.publication.clone(),
        message_prefix: config.cdc.message_prefix.clone(),
    };
    let applied = apply_migrations(&mut client, &target)
        .await
        .map_err(|e| Error::postgres("applying migrations", &e))?;
    if applied.is_empty() {
        tracing::info!("migrations: already up to date");
    } else {
        tracing::info!(?applied, "migrations applied");
    }
    let changed = crate::poll::schema::apply(&mut client, config)
        .await
        .map_err(|e| Error::postgres("applying the poll settings to the table", &e))?;
    for change in changed {
        tracing::info!("{change}");
    }
    // The opt-in status audit (migrate --audit / --no-audit, ENABLE_AUDIT).
    let changed = crate::outbox::audit::apply(
        &mut client,
        &config.outbox.schema,
        &config.outbox.table,
        config.outbox.audit,
    )
    .await
    .map_err(|e| Error::postgres("applying the status audit setting", &e))?;
    for change in changed {
        tracing::info!("{change}");
    }
    if let Some(role) = relay_role {
        relay_role_grants(&mut client, &target, role).await?;
    }
    Ok(())
}

/// Creates (if missing) and grants the relay role; says what was done and,
/// for a role created without a password, how to set one. Never prints the
/// password.
async fn relay_role_grants(
    client: &mut tokio_postgres::Client,
    target: &MigrationTarget,
    role: &RelayRole,
) -> Result<(), Error> {
    let report = grant_relay_role(client, target, role)
        .await
        .map_err(|e| match e {
            PrivilegeError::Database { context, source } => Error::postgres(&context, &source),
            refused @ PrivilegeError::Refused(_) => Error::Fatal(refused.to_string()),
        })?;
    let name = &role.name;
    let table = format!("{}.{}", target.schema, target.table);
    match (&role.password, report.created) {
        (Some((_, source)), true) => {
            tracing::info!(role = %name, password_from = %source, "created the relay role (LOGIN REPLICATION, no superuser)")
        }
        (None, true) => tracing::warn!(
            role = %name,
            "created the relay role without a password: set one with psql's \\password {name} \
             (or ALTER ROLE), or run migrate again with {} or --relay-password-file",
            crate::outbox::RELAY_PASSWORD_ENV
        ),
        (Some((_, source)), false) => {
            tracing::info!(role = %name, password_from = %source, "relay role exists; password updated")
        }
        (None, false) => tracing::info!(role = %name, "relay role exists; password unchanged"),
    }
    for warning in &report.warnings {
        tracing::warn!("{warning}");
    }
    tracing::info!(
        role = %name,
        table = %table,
        "granted the relay role what the relay needs on the table; run the relay with DATABASE_URL=postgres://{name}:<password>@<host>:<port>/<db> (see docs/least-privilege.md)"
    );
    Ok(())
}

/// `pgoutbox run`: the relay until SIGTERM/SIGINT.
pub async fn run(config: Config, recreate_slot: bool) -> Result<(), Error> {
    let (tx, rx) = watch::channel(false);
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown signal received");
        let _ = tx.send(true);
        wait_for_signal().await;
        tracing::warn!("second signal: exiting at once");
        std::process::exit(130);
    });
    // /metrics, /healthz, /readyz from the start (a standby answers too);
    // served until this function returns.
    let _metrics = crate::operate::serve(&config.metrics, rx.clone()).await?;
    // The gauges read from the database, for as long as the relay runs.
    let sampler = tokio::spawn(crate::operate::sampler::run(config.clone(), rx.clone()));
    let _sampler = AbortOnDrop(sampler);
    // On a worker thread rather than the runtime's main thread: the
    // replication reader hands messages to this task, and wake-ups between
    // workers are cheaper than waking the thread blocked in `block_on`.
    tokio::spawn(runner::run(config, RunOptions { recreate_slot }, rx))
        .await
        .map_err(|e| Error::Fatal(format!("the relay task failed: {e}")))?
}

/// Aborts a task when dropped.
struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

/// A `pgoutbox dle` subcommand (see `docs/dead-letters.md`).
#[derive(Clone, Debug)]
pub enum DleCommand {
    /// `dle list`: the newest dead-lettered rows and counts by error.
    List {
        /// Filters and limit.
        filter: ListFilter,
        /// JSON instead of a table.
        json: bool,
    },
    /// `dle show <tracking_id>`: one row in full.
    Show {
        /// The row's tracking id.
        tracking_id: uuid::Uuid,
        /// JSON instead of text.
        json: bool,
    },
    /// `dle redrive`: back to `PENDING` with `retry_count = 0`, audited.
    Redrive {
        /// Rows, reason, dry run.
        request: ActionRequest,
        /// JSON instead of text.
        json: bool,
    },
    /// `dle skip`: to `COMPLETED` with `processed_at = NULL`, audited.
    Skip {
        /// Rows, reason, dry run.
        request: ActionRequest,
        /// JSON instead of text.
        json: bool,
    },
}

/// `pgoutbox dle …`: inspect, redrive or skip dead-lettered rows. Output
/// goes to stdout; a refusal or a failure is an error (non-zero exit), and a
/// redrive or skip that matches no dead-lettered row is one too.
pub async fn dle(config: &Config, command: DleCommand) -> Result<(), Error> {
    let table = OutboxTable {
        schema: config.outbox.schema.clone(),
        table: config.outbox.table.clone(),
        announce_prefix: config
            .cdc
            .messages
            .then(|| config.cdc.message_prefix.clone()),
    };
    // Refuse what can be refused before connecting.
    let action = match &command {
        DleCommand::Redrive { request, .. } => Some((dead_letter::Action::Redrive, request)),
        DleCommand::Skip { request, .. } => Some((dead_letter::Action::Skip, request)),
        DleCommand::List { .. } | DleCommand::Show { .. } => None,
    };
    if let Some((action, request)) = action {
        dead_letter::check_reason(action, request.reason.as_deref()).map_err(dle_error)?;
        if let Selection::Where(w) = &request.selection {
            dead_letter::check_where(w).map_err(dle_error)?;
        }
    }
    let pg = crate::database::settings(config)?;
    let mut client = crate::database::connect(&pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e))
        .map_err(|e| match e {
            Error::Transient(m) => Error::Fatal(format!(
                "{m}; check that PostgreSQL is running and reachable at the host and port in DATABASE_URL"
            )),
            other => other,
        })?;
    match command {
        DleCommand::List { filter, json } => {
            let listing = dead_letter::list(&client, &table, &filter)
                .await
                .map_err(dle_error)?;
            if json {
                println!("{}", to_json(&listing)?);
            } else {
                print!("{}", format_listing(&listing));
            }
        }
        DleCommand::Show { tracking_id, json } => {
            let rows = dead_letter::show(&client, &table, tracking_id)
                .await
                .map_err(dle_error)?;
            if json && rows.len() == 1 {
                println!("{}", to_json(&rows[0])?);
            } else if json {
                println!("{}", to_json(&rows)?);
            } else {
                let text: Vec<String> = rows.iter().map(format_row).collect();
                print!("{}", text.join("\n"));
            }
        }
        DleCommand::Redrive { request, json } => {
            let outcome = dead_letter::redrive(&mut client, &table, &request)
                .await
                .map_err(dle_error)?;
            print_outcome(&outcome, json)?;
        }
        DleCommand::Skip { request, json } => {
            let outcome = dead_letter::skip(&mut client, &table, &request)
                .await
                .map_err(dle_error)?;
            print_outcome(&outcome, json)?;
        }
    }
    Ok(())
}

/// A dead-letter error as a relay error: database failures classified like
/// any other (with a hint for a bad `--where` or a statement timeout),
/// refusals as fatal one-liners.
fn dle_error(e: DeadLetterError) -> Error {
    match e {
        DeadLetterError::Database { context, source } => {
            let code = source
                .code()
                .map(|c| c.code().to_owned())
                .unwrap_or_default();
            let text = crate::error::postgres_text(&source);
            if code == "57014" {
                Error::Fatal(format!(
                    "{context}: {text}; narrow the selection or raise --statement-timeout"
                ))
            } else if context.contains("--where") && code.starts_with("42") && code != "42501" {
                Error::Fatal(format!(
                    "{context}: {text}; fix the --where condition (raw SQL over the outbox columns)"
                ))
            } else {
                Error::postgres(&context, &source)
            }
        }
        other => Error::Fatal(other.to_string()),
    }
}

fn to_json<T: serde::Serialize + ?Sized>(value: &T) -> Result<String, Error> {
    serde_json::to_string_pretty(value)
        .map_err(|e| Error::Fatal(format!("cannot write JSON output: {e}")))
}

/// One line, at most `max` characters (an ellipsis when cut).
fn one_line(text: &str, max: usize) -> String {
    let line = text.lines().next().unwrap_or_default().replace('\t', " ");
    let cut = text.lines().nth(1).is_some();
    if line.chars().count() > max {
        let mut s: String = line.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    } else if cut {
        format!("{line} …")
    } else {
        line
    }
}

/// `2025-01-02T03:04:05.123456Z` without the fraction.
fn short_time(ts: &str) -> String {
    match ts.split_once('.') {
        Some((whole, _)) => format!("{whole}Z"),
        None => ts.to_owned(),
    }
}

fn format_listing(listing: &Listing) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    if listing.total == 0 {
        let _ = writeln!(out, "no dead-lettered rows in {} match", listing.table);
        return out;
    }
    let header = [
        "TRACKING_ID",
        "CREATED_AT",
        "AGGREGATE_TYPE",
        "EVENT_TYPE",
        "TRIES",
        "LAST_ERROR",
    ];
    let cells: Vec<[String; 6]> = listing
        .rows
        .iter()
        .map(|r| {
            [
                r.tracking_id.to_string(),
                short_time(&r.created_at),
                r.aggregate_type.clone(),
                r.event_type.clone(),
                format!("{}/{}", r.retry_count, r.max_retries),
                one_line(r.last_error.as_deref().unwrap_or("-"), 100),
            ]
        })
        .collect();
    let mut widths = header.map(|h| h.chars().count());
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cols: &[&str]| {
        let mut l = String::new();
        for (i, c) in cols.iter().enumerate() {
            if i + 1 == cols.len() {
                l.push_str(c);
            } else {
                let pad = widths[i] - c.chars().count();
                l.push_str(c);
                l.push_str(&" ".repeat(pad + 2));
            }
        }
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(&header);
    for row in &cells {
        let cols: Vec<&str> = row.iter().map(String::as_str).collect();
        line(&cols);
    }
    let _ = writeln!(
        out,
        "\n{} dead-lettered row{} in {} match (newest {} shown)",
        listing.total,
        if listing.total == 1 { "" } else { "s" },
        listing.table,
        listing.rows.len()
    );
    let _ = writeln!(out, "\nBY ERROR\n{:>7}  ERROR", "COUNT");
    for g in &listing.by_error {
        let error = if g.error.is_empty() {
            "(no last_error)".to_owned()
        } else {
            one_line(&g.error, 160)
        };
        let _ = writeln!(out, "{:>7}  {}", g.count, error);
    }
    let more = listing.error_groups - listing.by_error.len() as i64;
    if more > 0 {
        let _ = writeln!(
            out,
            "    ...  and {more} more distinct errors (--json or narrower filters)"
        );
    }
    out
}

fn indent(text: &str) -> String {
    text.lines().map(|l| format!("  {l}\n")).collect::<String>()
}

fn format_row(row: &DeadLetterRow) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let none = "-".to_owned();
    let _ = writeln!(out, "tracking_id     {}", row.tracking_id);
    let _ = writeln!(out, "id              {}", row.id);
    let _ = writeln!(out, "status          {}", row.status);
    let _ = writeln!(out, "aggregate_type  {}", row.aggregate_type);
    let _ = writeln!(out, "aggregate_id    {}", row.aggregate_id);
    let _ = writeln!(out, "event_type      {}", row.event_type);
    let _ = writeln!(
        out,
        "attempts        {}/{}",
        row.retry_count, row.max_retries
    );
    let _ = writeln!(out, "created_at      {}", row.created_at);
    let _ = writeln!(
        out,
        "processed_at    {}",
        row.processed_at.as_ref().unwrap_or(&none)
    );
    let _ = writeln!(
        out,
        "locked_until    {}",
        row.locked_until.as_ref().unwrap_or(&none)
    );
    let _ = write!(
        out,
        "last_error\n{}",
        indent(row.last_error.as_deref().unwrap_or("-"))
    );
    let _ = write!(out, "payload\n{}", indent(&row.payload_pretty));
    let _ = write!(out, "metadata\n{}", indent(&row.metadata_pretty));
    if row.history.is_empty() {
        let _ = writeln!(out, "history         none (never redriven or skipped)");
    } else {
        let _ = writeln!(out, "history");
        for h in &row.history {
            let _ = writeln!(
                out,
                "  #{} {} {} by {} ({} row{}): {}",
                h.id,
                short_time(&h.performed_at),
                h.action,
                h.performed_by,
                h.row_count,
                if h.row_count == 1 { "" } else { "s" },
                one_line(&h.reason, 200)
            );
        }
    }
    out
}

fn print_outcome(outcome: &ActionOutcome, json: bool) -> Result<(), Error> {
    if json {
        println!("{}", to_json(outcome)?);
        return Ok(());
    }
    const SHOWN: usize = 20;
    let n = outcome.tracking_ids.len();
    let rows = if n == 1 { "row" } else { "rows" };
    let done = match outcome.action {
        dead_letter::Action::Redrive => "redrove",
        dead_letter::Action::Skip => "skipped",
    };
    match (&outcome.audit, outcome.dry_run) {
        (Some(a), false) => println!(
            "{done} {n} dead-lettered {rows} of {} (audit entry #{} by {} at {})",
            outcome.table, a.id, a.performed_by, a.performed_at
        ),
        _ => println!(
            "dry run: would {} {n} dead-lettered {rows} of {}; nothing was changed",
            outcome.action, outcome.table
        ),
    }
    for id in outcome.tracking_ids.iter().take(SHOWN) {
        println!("  {id}");
    }
    if n > SHOWN {
        println!("  … and {} more", n - SHOWN);
    }
    if !outcome.not_dead_letter.is_empty() {
        println!(
            "not {}: {} given tracking id{} with no DEAD_LETTER row (already redriven or skipped, or never dead-lettered):",
            if outcome.action == dead_letter::Action::Redrive { "redriven" } else { "skipped" },
            outcome.not_dead_letter.len(),
            if outcome.not_dead_letter.len() == 1 { "" } else { "s" },
        );
        for id in &outcome.not_dead_letter {
            println!("  {id}");
        }
    }
    Ok(())
}

/// Connects for an operator's command: a connection failure is final.
async fn connect_for_command(config: &Config) -> Result<tokio_postgres::Client, Error> {
    let pg = crate::database::settings(config)?;
    crate::database::connect(&pg)
        .await
        .map_err(|e| Error::postgres("connecting to PostgreSQL", &e).at_start())
}

/// `pgoutbox status [--json]`: mode, slot, rows and partitions of the
/// configured outbox, on one screen (see docs/status.md). Needs PostgreSQL
/// only.
pub async fn status(config: &Config, json: bool) -> Result<(), Error> {
    let client = connect_for_command(config).await?;
    let overview = crate::operate::overview::read(&client, config).await?;
    if json {
        println!("{}", to_json(&overview)?);
    } else {
        print!("{}", format_overview(&overview));
    }
    Ok(())
}

/// `3d 4h`, `5m 2s`, `12s`.
fn age(seconds: f64) -> String {
    let s = seconds.max(0.0).round() as u64;
    let (d, h, m, sec) = (s / 86_400, s % 86_400 / 3600, s % 3600 / 60, s % 60);
    if d > 0 {
        format!("{d}d {h}h")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else if m > 0 {
        format!("{m}m {sec}s")
    } else {
        format!("{sec}s")
    }
}

/// The text form of `pgoutbox status`.
pub fn format_overview(o: &crate::operate::overview::Overview) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let dash = "-";
    let _ = writeln!(out, "outbox      {}  (at {})", o.table, o.generated_at);
    let serving = match o.mode.serving.as_str() {
        "none" => "no relay serves the table".to_owned(),
        m => format!("served by {m}"),
    };
    let _ = writeln!(
        out,
        "mode        configured {}; {serving}",
        o.mode.configured
    );
    for h in &o.mode.holders {
        let _ = writeln!(
            out,
            "            {} {} pid {} {}{}{} ({}{})",
            if h.granted { "holder " } else { "waiting" },
            h.relay_mode,
            h.pid,
            h.application_name.as_deref().unwrap_or(dash),
            h.client_addr
                .as_deref()
                .map(|a| format!(" from {a}"))
                .unwrap_or_default(),
            h.user
                .as_deref()
                .map(|u| format!(" as {u}"))
                .unwrap_or_default(),
            h.lock_mode,
            h.backend_start
                .as_deref()
                .map(|t| format!(", since {t}"))
                .unwrap_or_default(),
        );
    }
    let s = &o.slot;
    if s.exists {
        let state = match (s.active, s.active_pid) {
            (Some(true), Some(pid)) => format!("active (pid {pid})"),
            (Some(true), None) => "active".to_owned(),
            _ => "inactive".to_owned(),
        };
        let _ = writeln!(
            out,
            "slot        {} {state}; confirmed {} of {} (lag {}); retains {} of WAL; wal_status {}; safe_wal_size {}",
            s.name,
            s.confirmed_flush_lsn.as_deref().unwrap_or(dash),
            s.server_wal_lsn,
            s.lag_bytes.map(bytes).unwrap_or_else(|| dash.into()),
            s.retained_wal_bytes.map(bytes).unwrap_or_else(|| dash.into()),
            s.wal_status.as_deref().unwrap_or(dash),
            s.safe_wal_size_bytes
                .map(bytes)
                .unwrap_or_else(|| "unlimited".into()),
        );
    } else {
        let _ = writeln!(
            out,
            "slot        {} does not exist (server WAL at {})",
            s.name, s.server_wal_lsn
        );
    }
    let r = &o.rows;
    let oldest = match (&r.oldest_pending_created_at, r.oldest_pending_age_s) {
        (Some(at), Some(secs)) => format!(" (oldest {} old, created {at})", age(secs)),
        _ => String::new(),
    };
    let _ = writeln!(out, "pending     {}{oldest}", r.pending);
    let _ = writeln!(out, "processing  {}", r.processing);
    if r.failed > 0 {
        let _ = writeln!(out, "failed      {}", r.failed);
    }
    let _ = writeln!(out, "dead letter {}", r.dead_letter);
    let p = &o.partitions;
    let _ = writeln!(
        out,
        "partitions  {} ({}), {}, ~{} rows (row counts are estimates from pg_class.reltuples)",
        p.count,
        p.interval,
        bytes(p.total_bytes),
        p.estimated_rows
    );
    let header = ["NAME", "FROM", "TO", "ROWS~", "SIZE"];
    let cells: Vec<[String; 5]> = p
        .list
        .iter()
        .map(|x| {
            let bound = |b: &Option<String>, open: &str| {
                if x.is_default {
                    "DEFAULT".to_owned()
                } else {
                    b.clone().unwrap_or_else(|| open.to_owned())
                }
            };
            [
                x.name.clone(),
                bound(&x.range_start, "MINVALUE"),
                bound(&x.range_end, "MAXVALUE"),
                x.estimated_rows
                    .map(|n| n.to_string())
                    .unwrap_or_else(|| "?".into()),
                bytes(x.total_bytes),
            ]
        })
        .collect();
    let mut widths = header.map(str::len);
    for row in &cells {
        for (w, c) in widths.iter_mut().zip(row) {
            *w = (*w).max(c.chars().count());
        }
    }
    let mut line = |cols: [&str; 5]| {
        let l = format!(
            "  {:<w0$}  {:<w1$}  {:<w2$}  {:>w3$}  {:>w4$}",
            cols[0],
            cols[1],
            cols[2],
            cols[3],
            cols[4],
            w0 = widths[0],
            w1 = widths[1],
            w2 = widths[2],
            w3 = widths[3],
            w4 = widths[4]
        );
        let _ = writeln!(out, "{}", l.trim_end());
    };
    line(header);
    for row in &cells {
        line([&row[0], &row[1], &row[2], &row[3], &row[4]]);
    }
    out
}

/// `pgoutbox partitions maintain`'s options.
#[derive(Clone, Debug, Default)]
pub struct MaintainArgs {
    /// Archive retired partitions here (gzip JSON lines) before dropping.
    pub archive_dir: Option<std::path::PathBuf>,
    /// Change nothing; say what would be done.
    pub dry_run: bool,
    /// How long to wait for the outbox's lock per partition.
    pub lock_timeout: std::time::Duration,
    /// JSON output.
    pub json: bool,
    /// A fake clock (any timestamptz PostgreSQL reads, e.g.
    /// `2031-05-30T12:00:00Z`); the server's `now()` when unset.
    pub now: Option<String>,
}

/// `pgoutbox partitions maintain`: partitions ahead, then retention (see
/// docs/partitioning.md). An error stops it with a non-zero exit; what was
/// done before stays done and is printed.
pub async fn partitions_maintain(config: &Config, args: MaintainArgs) -> Result<(), Error> {
    let mut client = connect_for_command(config).await?;
    let clock = match &args.now {
        None => crate::operate::partitions::Clock::Server,
        Some(text) => {
            let at: std::time::SystemTime = client
                .query_one("SELECT $1::text::timestamptz", &[text])
                .await
                .map_err(|e| {
                    Error::Fatal(format!(
                        "--now {text:?}: {}",
                        crate::error::postgres_text(&e)
                    ))
                })?
                .get(0);
            crate::operate::partitions::Clock::Fixed(at)
        }
    };
    let options = crate::operate::partitions::MaintainOptions {
        archive_dir: args.archive_dir,
        dry_run: args.dry_run,
        lock_timeout: args.lock_timeout,
        clock,
    };
    let report = crate::operate::partitions::maintain(&mut client, config, &options).await?;
    if args.json {
        println!("{}", to_json(&report)?);
    } else {
        print!("{}", format_maintain(&report));
    }
    match &report.error {
        Some(e) => Err(Error::Fatal(e.clone())),
        None => Ok(()),
    }
}

/// The text form of `pgoutbox partitions maintain`.
pub fn format_maintain(r: &crate::operate::partitions::MaintainReport) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let (would, created, retired) = if r.dry_run {
        ("dry run, nothing changed: ", "would create", "would retire")
    } else {
        ("", "created", "retired")
    };
    let _ = writeln!(
        out,
        "{would}{} at {}: {} partitions, {} ahead",
        r.table, r.now, r.interval, r.ahead
    );
    for c in &r.created {
        let _ = writeln!(
            out,
            "  {created} {} [{}, {})",
            c.name, c.range_start, c.range_end
        );
    }
    if r.created.is_empty() {
        let _ = writeln!(out, "  partitions ahead: all present");
    }
    let range = |a: &Option<String>, b: &Option<String>| {
        format!(
            "[{}, {})",
            a.as_deref().unwrap_or("MINVALUE"),
            b.as_deref().unwrap_or("MAXVALUE")
        )
    };
    match (&r.retain, &r.cutoff) {
        (Some(retain), Some(cutoff)) => {
            let _ = writeln!(
                out,
                "retention {retain}: partitions ending at or before {cutoff}"
            );
            for p in &r.retired {
                let archive = match (&p.archive, p.archived_rows) {
                    (Some(a), Some(n)) => format!(", {n} rows archived to {a}"),
                    (Some(a), None) => format!(", archived to {a}"),
                    _ => String::new(),
                };
                let _ = writeln!(
                    out,
                    "  {retired} {} {}{archive}",
                    p.name,
                    range(&p.range_start, &p.range_end)
                );
            }
            for k in &r.kept {
                let _ = writeln!(
                    out,
                    "  kept {} {}: {}",
                    k.name,
                    range(&k.range_start, &k.range_end),
                    k.reason
                );
            }
            if r.retired.is_empty() && r.kept.is_empty() {
                let _ = writeln!(out, "  nothing old enough");
            }
        }
        _ => {
            let _ = writeln!(out, "retention off (partitions.retain is not set)");
        }
    }
    if let Some(e) = &r.error {
        let _ = writeln!(out, "stopped: {e}");
    }
    out
}
