//! The `pgoutbox` command: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{ArgGroup, Parser, Subcommand};
use uuid::Uuid;

use pgoutbox::cli;
use pgoutbox::outbox::dead_letter;

/// PostgreSQL transactional-outbox relay: outbox rows to Apache Kafka, at
/// least once, in per-aggregate order.
#[derive(Parser, Debug)]
#[command(name = "pgoutbox", version = cli::VERSION, about, long_about = None)]
struct Args {
    /// TOML configuration file (environment variables override it).
    #[arg(long, short, global = true, env = "PGOUTBOX_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Apply the SQL migrations (outbox table, publication, outbox_publish).
    Migrate {
        /// Also create this least-privilege role for the relay if missing
        /// (LOGIN REPLICATION, no superuser) and grant it exactly what the
        /// relay needs on the outbox table (see docs/least-privilege.md).
        /// Its password comes from PGOUTBOX_RELAY_PASSWORD or
        /// --relay-password-file; without one it is created without a
        /// password.
        #[arg(long, value_name = "ROLE")]
        relay_role: Option<String>,
        /// A file whose first line is the relay role's password (wins over
        /// PGOUTBOX_RELAY_PASSWORD).
        #[arg(long, value_name = "PATH", requires = "relay_role")]
        relay_password_file: Option<PathBuf>,
        /// Record every status change of the outbox rows in
        /// <table>_status_audit (trigger; overrides outbox.audit and
        /// ENABLE_AUDIT; see docs/audit.md).
        #[arg(long, conflicts_with = "no_audit")]
        audit: bool,
        /// Drop the status audit trigger (the audit table and its rows are
        /// kept).
        #[arg(long)]
        no_audit: bool,
    },
    /// Check an outbox table pgoutbox did not create (Debezium's, your
    /// own) against [outbox.columns], report what it lacks for relaying,
    /// marking and poll mode, and make the relay's own tables and the
    /// publication beside it. Never drops or rewrites anything (see
    /// docs/migrating-from-debezium.md).
    Adopt {
        /// Only report; change nothing.
        #[arg(long)]
        check: bool,
        /// Also add the columns poll mode and marking need (status,
        /// retry_count, …; constant defaults, no table rewrite; rows
        /// already there become COMPLETED) and their indexes, built
        /// concurrently.
        #[arg(long, conflicts_with = "check")]
        add_poll_columns: bool,
        /// Also create this least-privilege role for the relay if missing
        /// and grant it what the relay needs on the adopted table (SELECT,
        /// UPDATE of the status columns it has, the relay's own tables).
        #[arg(long, value_name = "ROLE", conflicts_with = "check")]
        relay_role: Option<String>,
        /// A file whose first line is the relay role's password (wins over
        /// PGOUTBOX_RELAY_PASSWORD).
        #[arg(long, value_name = "PATH", requires = "relay_role")]
        relay_password_file: Option<PathBuf>,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// Create a new replication slot even though the one pgoutbox created
        /// earlier was lost; rows still PENDING are backfilled first.
        #[arg(long)]
        recreate_slot: bool,
        /// Exactly-once delivery: start even though the progress topic's
        /// record belongs to another stream (the slot, database or server
        /// was replaced on purpose). Events the slot still holds are then
        /// sent again; the first commit records the new stream.
        #[arg(long)]
        reset_progress: bool,
        /// `cdc` (logical replication), `poll` (leases on the table) or
        /// `auto` (CDC when the server allows it); overrides `mode` and
        /// OUTBOX_MODE.
        #[arg(long, value_parser = ["cdc", "poll", "auto"])]
        mode: Option<String>,
    },
    /// Dead letters: list, show, redrive or skip rows in status DEAD_LETTER
    /// (see docs/dead-letters.md).
    Dle {
        #[command(subcommand)]
        command: DleCommand,
    },
    /// Publish again events already delivered (COMPLETED) or dead-lettered,
    /// chosen by time range, aggregate and event type, to their own topics
    /// or to another one. Never changes a row, so the live relay and its
    /// slot are not disturbed. Requires --reason; recorded in
    /// <schema>.pgoutbox_replays; every record carries the header
    /// pgoutbox_replay = the audit id (see docs/replay.md).
    Replay(ReplayArgs),
    /// One screen: the mode and who serves the table, the replication slot,
    /// rows pending / processing / dead-lettered, the partitions (needs
    /// PostgreSQL only; see docs/status.md).
    Status {
        /// JSON output (stable keys, see docs/status.md).
        #[arg(long)]
        json: bool,
    },
    /// Partition lifecycle (see docs/partitioning.md).
    Partitions {
        #[command(subcommand)]
        command: PartitionsCommand,
    },
    /// Print the pgoutbox configuration equivalent to a Debezium PostgreSQL
    /// connector's (a .properties file, or the JSON posted to Kafka
    /// Connect; `-` reads stdin). Options not carried over are listed on
    /// stderr with the reason; the password is never copied (see
    /// docs/migrating-from-debezium.md).
    ImportDebezium {
        /// The connector configuration.
        #[arg(value_name = "FILE")]
        file: PathBuf,
    },
    /// Print the Kafka Connect offset (the body of PATCH
    /// /connectors/<name>/offsets) that makes Debezium resume the
    /// configured slot exactly where pgoutbox stopped: the way back to
    /// Debezium (see docs/migrating-from-debezium.md). pgoutbox must be
    /// stopped.
    DebeziumOffset {
        /// The connector's `topic.prefix` (Debezium's offset partition).
        #[arg(long, value_name = "PREFIX")]
        topic_prefix: String,
    },
}

#[derive(Subcommand, Debug)]
enum PartitionsCommand {
    /// Create partitions ahead (partitions.interval, partitions.ahead) and
    /// retire those older than partitions.retain whose rows are all done:
    /// archived (with --archive-dir), detached and dropped. Run as the
    /// table's owner (or a superuser).
    Maintain {
        /// Export each retired partition first to a gzip JSON-lines file in
        /// this directory (fsynced; nothing is dropped if it fails). Needed
        /// to retire partitions holding DEAD_LETTER rows.
        #[arg(long, value_name = "DIR")]
        archive_dir: Option<PathBuf>,
        /// Only say what would be created and retired.
        #[arg(long)]
        dry_run: bool,
        /// How long to wait for the outbox's lock before keeping a
        /// partition for the next run (e.g. 5s, 1m).
        #[arg(long, value_name = "DURATION", default_value = "5s", value_parser = pgoutbox::config::parse_duration)]
        lock_timeout: Duration,
        /// JSON output.
        #[arg(long)]
        json: bool,
        /// A fake clock for tests: maintain as if it were this time.
        #[arg(long, hide = true, value_name = "TIMESTAMP")]
        now: Option<String>,
    },
    /// Make an adopted, unpartitioned outbox table partitioned, online: it
    /// becomes the first partition (every created_at up to the next period
    /// boundary a day ahead) of a partitioned table of the same name, and
    /// pgoutbox creates the partitions after it. Inserts go on; the table
    /// is locked once, briefly. Run as the table's owner (or a superuser).
    Convert {
        /// Check, and print the statements of the swap, changing nothing.
        #[arg(long)]
        dry_run: bool,
        /// How long the swap waits for the table's lock before trying again
        /// (inserts queue behind a waiting lock: keep it short).
        #[arg(long, value_name = "DURATION", default_value = "2s", value_parser = pgoutbox::config::parse_duration)]
        lock_timeout: Duration,
        /// How many times the swap is tried.
        #[arg(long, default_value_t = 10)]
        attempts: u32,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
}

#[derive(clap::Args, Debug)]
struct ReplayArgs {
    /// Only events created at or after this instant (RFC 3339, e.g.
    /// 2026-12-03T10:00:00Z, or a date: midnight UTC).
    #[arg(long, value_name = "TIME")]
    from: Option<String>,
    /// Only events created before this instant (RFC 3339); default: when
    /// the replay starts.
    #[arg(long, value_name = "TIME")]
    to: Option<String>,
    /// Only this aggregate type (repeat for several).
    #[arg(long, value_name = "TYPE")]
    aggregate_type: Vec<String>,
    /// Only this aggregate (repeat for several).
    #[arg(long, value_name = "ID")]
    aggregate_id: Vec<String>,
    /// Only this event type (repeat for several).
    #[arg(long, value_name = "TYPE")]
    event_type: Vec<String>,
    /// Which rows: completed (delivered) or dead-letter.
    #[arg(long, value_name = "STATUS", default_value = "completed")]
    status: String,
    /// Also an SQL condition over the outbox columns, e.g.
    /// "payload->>'region' = 'eu'". Raw SQL, run as you in a read-only
    /// transaction.
    #[arg(long = "where", value_name = "SQL")]
    condition: Option<String>,
    /// Send every event to this topic instead of its own.
    #[arg(long, value_name = "TOPIC")]
    topic: Option<String>,
    /// At most this many events per second (default: as fast as Kafka
    /// acknowledges).
    #[arg(long, value_name = "EVENTS_PER_SECOND")]
    rate: Option<String>,
    /// Refuse a selection of more events than this (a --dry-run shows the
    /// count).
    #[arg(long, value_name = "N", default_value_t = 100_000)]
    max_events: u64,
    /// Why these events are published again (required: no blind replay).
    #[arg(long)]
    reason: Option<String>,
    /// Only count the events by topic and event type and show a sample;
    /// sends and records nothing (needs no Kafka).
    #[arg(long)]
    dry_run: bool,
    /// statement_timeout of each read (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = pgoutbox::config::parse_duration)]
    statement_timeout: Duration,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

impl From<ReplayArgs> for cli::ReplayArgs {
    fn from(a: ReplayArgs) -> cli::ReplayArgs {
        cli::ReplayArgs {
            from: a.from,
            to: a.to,
            aggregate_types: a.aggregate_type,
            aggregate_ids: a.aggregate_id,
            event_types: a.event_type,
            status: a.status,
            condition: a.condition,
            topic: a.topic,
            rate: a.rate,
            max_events: a.max_events,
            reason: a.reason,
            dry_run: a.dry_run,
            statement_timeout: a.statement_timeout,
            json: a.json,
        }
    }
}

#[derive(Subcommand, Debug)]
enum DleCommand {
    /// The newest dead-lettered rows, and how many share each error.
    List {
        /// Only this aggregate type.
        #[arg(long)]
        aggregate_type: Option<String>,
        /// Only this event type.
        #[arg(long)]
        event_type: Option<String>,
        /// Only rows created longer ago than this (e.g. 30m, 2h, 7d).
        #[arg(long, value_name = "AGE", value_parser = pgoutbox::config::parse_duration)]
        older_than: Option<Duration>,
        /// At most this many rows, newest first.
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// One dead-lettered row in full: payload, metadata, attempts, last error.
    Show {
        /// The event's tracking id.
        tracking_id: Uuid,
        /// JSON output.
        #[arg(long)]
        json: bool,
    },
    /// Back to PENDING with retry_count = 0, so the relay publishes them
    /// again. Requires --reason; recorded in the audit table.
    Redrive(ActionArgs),
    /// Mark COMPLETED without publishing (processed_at stays NULL), which
    /// unblocks the aggregate. Requires --reason; recorded in the audit table.
    Skip(ActionArgs),
}

#[derive(clap::Args, Debug)]
#[command(group(ArgGroup::new("selection").required(true).args(["tracking_ids", "condition"])))]
struct ActionArgs {
    /// Tracking ids of the dead-lettered rows.
    #[arg(value_name = "TRACKING_ID")]
    tracking_ids: Vec<Uuid>,
    /// Instead of ids: an SQL condition over the outbox columns, e.g.
    /// "event_type = 'OrderShipped' AND last_error LIKE '%too large%'".
    /// Raw SQL, run as you; only DEAD_LETTER rows are ever touched.
    #[arg(long = "where", value_name = "SQL")]
    condition: Option<String>,
    /// The root cause and its fix (required: no blind redrive).
    #[arg(long)]
    reason: Option<String>,
    /// Only show which rows would change.
    #[arg(long)]
    dry_run: bool,
    /// statement_timeout for the transaction (e.g. 30s, 5m).
    #[arg(long, value_name = "DURATION", default_value = "60s", value_parser = pgoutbox::config::parse_duration)]
    statement_timeout: Duration,
    /// JSON output.
    #[arg(long)]
    json: bool,
}

impl ActionArgs {
    fn into_request(self) -> (dead_letter::ActionRequest, bool) {
        let selection = match self.condition {
            Some(w) => dead_letter::Selection::Where(w),
            None => dead_letter::Selection::Ids(self.tracking_ids),
        };
        let request = dead_letter::ActionRequest {
            selection,
            reason: self.reason,
            dry_run: self.dry_run,
            statement_timeout: self.statement_timeout,
        };
        (request, self.json)
    }
}

impl From<DleCommand> for cli::DleCommand {
    fn from(c: DleCommand) -> cli::DleCommand {
        match c {
            DleCommand::List {
                aggregate_type,
                event_type,
                older_than,
                limit,
                json,
            } => cli::DleCommand::List {
                filter: dead_letter::ListFilter {
                    aggregate_type,
                    event_type,
                    older_than,
                    limit,
                },
                json,
            },
            DleCommand::Show { tracking_id, json } => cli::DleCommand::Show { tracking_id, json },
            DleCommand::Redrive(args) => {
                let (request, json) = args.into_request();
                cli::DleCommand::Redrive { request, json }
            }
            DleCommand::Skip(args) => {
                let (request, json) = args.into_request();
                cli::DleCommand::Skip { request, json }
            }
        }
    }
}

fn main() -> ExitCode {
    let args = Args::parse();
    // Needs neither a configuration nor a database.
    if let Command::ImportDebezium { file } = &args.command {
        return match cli::import_debezium(file) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::from(2)
            }
        };
    }
    let mut config = match pgoutbox::config::Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    if let Command::Run {
        mode,
        reset_progress,
        ..
    } = &args.command
    {
        config.kafka.reset_progress = *reset_progress;
        if let Some(mode) = mode {
            // Already restricted by clap to a valid name.
            config.mode = mode.parse().unwrap_or(config.mode);
        }
        if let Err(e) = config.require_kafka() {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    // The relay role is checked (and its password read) before connecting.
    let relay_role = match &args.command {
        Command::Migrate {
            relay_role: Some(name),
            relay_password_file,
            ..
        }
        | Command::Adopt {
            relay_role: Some(name),
            relay_password_file,
            ..
        } => match pgoutbox::outbox::RelayRole::new(
            name,
            relay_password_file.as_deref(),
            std::env::var(pgoutbox::outbox::RELAY_PASSWORD_ENV).ok(),
        ) {
            Ok(role) => Some(role),
            Err(e) => {
                eprintln!("error: {e}");
                return ExitCode::from(2);
            }
        },
        _ => None,
    };
    if let Command::Migrate {
        audit, no_audit, ..
    } = &args.command
    {
        if *audit || *no_audit {
            config.outbox.audit = Some(*audit);
        }
        if let Err(e) = config.validate() {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    }
    cli::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.runtime.worker_threads)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(dispatch(args.command, config, relay_role));
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pgoutbox stopped");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Runs a command that needs the configuration and a runtime.
async fn dispatch(
    command: Command,
    config: pgoutbox::config::Config,
    relay_role: Option<pgoutbox::outbox::RelayRole>,
) -> Result<(), pgoutbox::error::Error> {
    match command {
        Command::Migrate { .. } => cli::migrate_with(&config, relay_role.as_ref()).await,
        Command::Adopt {
            check,
            add_poll_columns,
            json,
            ..
        } => {
            let args = cli::AdoptArgs {
                check,
                add_poll_columns,
                json,
            };
            cli::adopt(&config, args, relay_role.as_ref()).await
        }
        Command::Run { recreate_slot, .. } => cli::run(config, recreate_slot).await,
        Command::Dle { command } => cli::dle(&config, command.into()).await,
        Command::Replay(args) => cli::replay(&config, args.into()).await,
        Command::Status { json } => cli::status(&config, json).await,
        Command::ImportDebezium { .. } => unreachable!("handled before the runtime starts"),
        Command::DebeziumOffset { topic_prefix } => {
            cli::debezium_offset(&config, &topic_prefix).await
        }
        Command::Partitions {
            command:
                PartitionsCommand::Maintain {
                    archive_dir,
                    dry_run,
                    lock_timeout,
                    json,
                    now,
                },
        } => {
            let args = cli::MaintainArgs {
                archive_dir,
                dry_run,
                lock_timeout,
                json,
                now,
            };
            cli::partitions_maintain(&config, args).await
        }
        Command::Partitions {
            command:
                PartitionsCommand::Convert {
                    dry_run,
                    lock_timeout,
                    attempts,
                    json,
                },
        } => {
            let args = cli::ConvertArgs {
                dry_run,
                lock_timeout,
                attempts,
                json,
            };
            cli::partitions_convert(&config, args).await
        }
    }
}
