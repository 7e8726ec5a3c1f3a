//! An idempotent Kafka consumer of pgoutbox events.
//!
//! It subscribes to the topics given, and for each record reads the event id
//! from the `tracking_id` header and applies the event with
//! [`IdempotencyStore::process_once`]: in one PostgreSQL transaction it
//! records the id in `<schema>.processed_events` and inserts a row into
//! `<schema>.consumer_demo_applied` (the stand-in for real business work).
//! Only after that transaction commits does it commit the record's Kafka
//! offset, so a crash anywhere redelivers the record, and a redelivered
//! record is skipped instead of applied twice.
//!
//! It reads with `isolation.level=read_committed`, which exactly-once
//! delivery (`kafka.delivery = "exactly-once"`, docs/exactly-once.md)
//! requires: the relay then writes in Kafka transactions, and only a
//! `read_committed` reader is spared the records of aborted ones. The
//! idempotency store is still needed then, for the crash between the
//! database commit and the offset commit.
//!
//! Run it against the project's services:
//!
//! ```text
//! scripts/services up
//! eval "$(scripts/services env | sed 's/^/export /')"   # DATABASE_URL, KAFKA_BROKERS
//! cargo run -- migrate                                  # outbox, processed_events in public
//! cargo run -- run &                                    # the relay (default topics
//!                                                       # {aggregate_type}.{event_type})
//! psql "$DATABASE_URL" -c "SELECT outbox_publish('Order', gen_random_uuid(), 'OrderCreated', '{\"total\": 42}')"
//! cargo run --example consumer -- Order.OrderCreated --schema public --max-events 1
//! psql "$DATABASE_URL" -c "TABLE consumer_demo_applied" -c "TABLE processed_events"
//! ```
//!
//! Topics can also come from `CONSUMER_TOPICS` (comma-separated); see
//! `--help` for the rest. It runs until `--max-events` records were handled
//! or no record arrived for `--idle-exit-ms`, or forever without either. A
//! record without a valid `tracking_id` header, or a failed transaction,
//! stops it with an error and without committing that record's offset.

use std::time::Duration;

use clap::Parser;
use pgoutbox::config::quote_ident;
use pgoutbox::idempotency::{IdempotencyStore, Processed};
use pgoutbox::pipeline::header;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use tokio::time::Instant;
use tokio_postgres::NoTls;
use uuid::Uuid;

/// Any error, for an example.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// Command line.
#[derive(Debug, Parser)]
#[command(about = "Consume pgoutbox events from Kafka, applying each exactly once")]
pub struct Args {
    /// Topics to subscribe to.
    #[arg(env = "CONSUMER_TOPICS", value_delimiter = ',', required = true)]
    pub topics: Vec<String>,
    /// PostgreSQL connection URL (the consumer's own database).
    #[arg(long, env = "DATABASE_URL", hide_env_values = true)]
    pub database_url: String,
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BROKERS")]
    pub brokers: String,
    /// Kafka consumer group, also the `consumer_group` of the markers.
    #[arg(long, env = "CONSUMER_GROUP", default_value = "pgoutbox-consumer-demo")]
    pub group: String,
    /// Schema of `processed_events` and `consumer_demo_applied` (created if missing).
    #[arg(long, default_value = "public")]
    pub schema: String,
    /// Exit after handling this many records.
    #[arg(long)]
    pub max_events: Option<u64>,
    /// Exit when no record arrived for this long (milliseconds).
    #[arg(long)]
    pub idle_exit_ms: Option<u64>,
}

/// What a run did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Summary {
    /// Records applied by this run.
    pub applied: u64,
    /// Records skipped because their event was already processed.
    pub duplicates: u64,
}

/// Consumes until `--max-events` or `--idle-exit-ms` says stop.
pub async fn run(args: &Args) -> Result<Summary, BoxError> {
    let (mut client, connection) = tokio_postgres::connect(&args.database_url, NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("consumer: postgres connection: {e}");
        }
    });
    let store = IdempotencyStore::new(&args.schema)?;
    store.create_table(&client).await?;
    let applied_table = format!("{}.consumer_demo_applied", quote_ident(&args.schema));
    client
        .batch_execute(&format!(
            "CREATE TABLE IF NOT EXISTS {applied_table} (\
               id bigserial PRIMARY KEY, \
               tracking_id uuid NOT NULL, \
               topic text NOT NULL, \
               kafka_partition int NOT NULL, \
               kafka_offset bigint NOT NULL, \
               event_key text, \
               payload text, \
               applied_at timestamptz NOT NULL DEFAULT now())"
        ))
        .await?;
    let insert = format!(
        "INSERT INTO {applied_table} \
         (tracking_id, topic, kafka_partition, kafka_offset, event_key, payload) \
         VALUES ($1, $2, $3, $4, $5, $6)"
    );

    let consumer: StreamConsumer = ClientConfig::new()
        .set("bootstrap.servers", &args.brokers)
        .set("group.id", &args.group)
        // Offsets are committed by hand, after the database commit.
        .set("enable.auto.commit", "false")
        // Only records of committed Kafka transactions. librdkafka's default
        // already, but set here on purpose: with exactly-once delivery the
        // relay's aborted transactions hold events it sends again, and a
        // read_uncommitted reader (the Java client's default) would see
        // both. Without transactions (at-least-once) it changes nothing.
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .create()?;
    let topics: Vec<&str> = args.topics.iter().map(String::as_str).collect();
    consumer.subscribe(&topics)?;

    let idle = args.idle_exit_ms.map(Duration::from_millis);
    let mut idle_deadline = idle.map(|d| Instant::now() + d);
    let mut summary = Summary::default();
    while args
        .max_events
        .is_none_or(|max| summary.applied + summary.duplicates < max)
    {
        let received = match idle_deadline {
            Some(deadline) => match tokio::time::timeout_at(deadline, consumer.recv()).await {
                Ok(received) => received,
                Err(_) => break,
            },
            None => consumer.recv().await,
        };
        let msg = match received {
            Ok(msg) => msg,
            Err(e) => {
                // Mostly transient (a rebalance, a broker restart); librdkafka recovers.
                eprintln!("consumer: kafka: {e}");
                continue;
            }
        };
        let tracking_id = tracking_id(&msg)?;
        let (topic, partition, offset) = (msg.topic(), msg.partition(), msg.offset());
        let key = msg.key().map(String::from_utf8_lossy);
        let payload = msg.payload().map(String::from_utf8_lossy);
        let insert = insert.as_str();
        let outcome = store
            .process_once(&mut client, tracking_id, &args.group, |tx| {
                Box::pin(async move {
                    tx.execute(
                        insert,
                        &[&tracking_id, &topic, &partition, &offset, &key, &payload],
                    )
                    .await?;
                    Ok::<_, tokio_postgres::Error>(())
                })
            })
            .await?;
        // The event's effects are durable: only now may Kafka forget it.
        consumer.commit_message(&msg, CommitMode::Sync)?;
        let what = match outcome {
            Processed::Applied(()) => {
                summary.applied += 1;
                "applied"
            }
            Processed::AlreadyProcessed => {
                summary.duplicates += 1;
                "duplicate"
            }
        };
        println!("{what} {tracking_id} {topic}[{partition}]@{offset}");
        idle_deadline = idle.map(|d| Instant::now() + d);
    }
    Ok(summary)
}

/// The event id from the record's `tracking_id` header.
fn tracking_id(msg: &BorrowedMessage<'_>) -> Result<Uuid, BoxError> {
    let value = msg
        .headers()
        .and_then(|h| h.iter().find(|h| h.key == header::TRACKING_ID))
        .and_then(|h| h.value)
        .ok_or_else(|| {
            format!(
                "{}[{}]@{}: no {} header; not a pgoutbox record?",
                msg.topic(),
                msg.partition(),
                msg.offset(),
                header::TRACKING_ID
            )
        })?;
    let text = std::str::from_utf8(value).map_err(|e| format!("tracking_id header: {e}"))?;
    Ok(Uuid::parse_str(text).map_err(|e| format!("tracking_id header {text:?}: {e}"))?)
}

#[tokio::main]
async fn main() {
    let args = Args::parse();
    match run(&args).await {
        Ok(s) => println!("done: {} applied, {} duplicates", s.applied, s.duplicates),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
