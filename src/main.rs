//! The `pgoutbox` command: a thin shell over the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};

use pgoutbox::cli;

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
    Migrate,
    /// Run the relay until SIGTERM or SIGINT.
    Run {
        /// Create a new replication slot even though the one pgoutbox created
        /// earlier was lost; rows still PENDING are backfilled first.
        #[arg(long)]
        recreate_slot: bool,
    },
}

fn main() -> ExitCode {
    let args = Args::parse();
    let config = match pgoutbox::config::Config::load(args.config.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    cli::init_logging(&config);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match args.command {
            Command::Migrate => cli::migrate(&config).await,
            Command::Run { recreate_slot } => cli::run(config, recreate_slot).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!(error = %e, "pgoutbox stopped");
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
