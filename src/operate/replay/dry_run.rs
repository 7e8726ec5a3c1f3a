//! `pgoutbox replay --dry-run`: reads the selection as the replay would and
//! builds every record with the same builder, without Kafka: how many
//! events go to which topic, which could not be published, and a sample.

use std::collections::BTreeMap;

use serde::Serialize;
use tokio_postgres::Client;

use super::{Progress, ProgressClock, Refusal, ReplayRequest, PAGE_ROWS, REFUSALS_KEPT};
use crate::error::Error;
use crate::outbox::replay::{Pages, ReplaySource, Timestamp};
use crate::pipeline::RecordBuilder;

/// Rows shown in a dry run's sample.
pub const SAMPLE_ROWS: usize = 5;

/// Characters of a sample's value shown.
const VALUE_PREVIEW: usize = 200;

/// How many events go to one topic with one event type.
#[derive(Clone, Debug, Serialize, PartialEq, Eq)]
pub struct TopicCount {
    /// The topic the record goes to.
    pub topic: String,
    /// The event type (empty when the table has none).
    pub event_type: String,
    /// Events.
    pub count: u64,
}

/// One sampled event and the record it would become.
#[derive(Clone, Debug, Serialize)]
pub struct SampleEvent {
    /// The event id.
    pub tracking_id: String,
    /// `created_at` as PostgreSQL prints it.
    pub created_at: String,
    /// The aggregate type.
    pub aggregate_type: String,
    /// The aggregate id.
    pub aggregate_id: String,
    /// The event type.
    pub event_type: String,
    /// The record's topic.
    pub topic: String,
    /// The record's key, as text.
    pub key: String,
    /// The record's value, as text, cut after 200 characters.
    pub value: String,
    /// The record's header names, in order (the replay adds
    /// `pgoutbox_replay`).
    pub headers: Vec<String>,
}

/// What a dry run found.
#[derive(Clone, Debug, Serialize)]
pub struct DryRun {
    /// `schema.table`.
    pub table: String,
    /// The row status selected.
    pub status: String,
    /// The exclusive end of the time range (`--to`, or now).
    pub until: Timestamp,
    /// `--topic`, when every event would go to it.
    pub target_topic: Option<String>,
    /// Events that would be sent.
    pub selected: u64,
    /// By topic and event type, most first.
    pub by_topic: Vec<TopicCount>,
    /// Events that could not be published (no record can be built).
    pub refused: u64,
    /// The first few of them, with why.
    pub refusals: Vec<Refusal>,
    /// The first events in replay order.
    pub sample: Vec<SampleEvent>,
    /// `--max-events`.
    pub max_events: u64,
    /// True when the replay would be refused for holding more than
    /// `--max-events` events.
    pub over_max_events: bool,
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// Reads the selection page by page and builds each record.
pub(super) async fn dry_run(
    client: &mut Client,
    source: &ReplaySource,
    builder: &RecordBuilder,
    request: &ReplayRequest,
    progress: &mut dyn FnMut(&Progress),
) -> Result<DryRun, Error> {
    let mut counts: BTreeMap<(String, String), u64> = BTreeMap::new();
    let mut sample = Vec::new();
    let mut refusals = Vec::new();
    let (mut refused, mut read) = (0u64, 0u64);
    let mut pages: Pages = source.pages(PAGE_ROWS);
    let mut clock = ProgressClock::start();
    while let Some(rows) = pages.next(source, client).await.map_err(super::error)? {
        for row in rows {
            read += 1;
            let event = &row.event;
            match builder.build(event) {
                Ok(record) => {
                    *counts
                        .entry((record.topic.clone(), text(&event.event_type)))
                        .or_default() += 1;
                    if sample.len() < SAMPLE_ROWS {
                        sample.push(SampleEvent {
                            tracking_id: text(&event.tracking_id),
                            created_at: text(&event.created_at),
                            aggregate_type: text(&event.aggregate_type),
                            aggregate_id: text(&event.aggregate_id),
                            event_type: text(&event.event_type),
                            topic: record.topic.clone(),
                            key: text(&record.key),
                            value: text(&record.value).chars().take(VALUE_PREVIEW).collect(),
                            headers: record.headers.iter().map(|(k, _)| k.to_string()).collect(),
                        });
                    }
                }
                Err(e) => {
                    refused += 1;
                    if refusals.len() < REFUSALS_KEPT {
                        refusals.push(Refusal::of(event, e.to_string()));
                    }
                }
            }
        }
        clock.tick(progress, |elapsed| Progress {
            done: read,
            total: None,
            refused,
            elapsed,
            dry_run: true,
        });
    }
    let mut by_topic: Vec<TopicCount> = counts
        .into_iter()
        .map(|((topic, event_type), count)| TopicCount {
            topic,
            event_type,
            count,
        })
        .collect();
    by_topic.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.topic.cmp(&b.topic)));
    let selected = read - refused;
    clock.finish(progress, |elapsed| Progress {
        done: read,
        total: Some(read),
        refused,
        elapsed,
        dry_run: true,
    });
    Ok(DryRun {
        table: source.table().to_owned(),
        status: source.status().to_owned(),
        until: source.until(),
        target_topic: request.target_topic.clone(),
        selected,
        by_topic,
        refused,
        refusals,
        sample,
        max_events: request.max_events,
        over_max_events: read > request.max_events,
    })
}
