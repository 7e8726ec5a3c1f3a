//! `pgoutbox status`: mode, slot, rows and partitions of the configured
//! outbox on one screen (see docs/status.md), and its text form.

use std::fmt::Write;

use crate::config::Config;
use crate::database::standby;
use crate::error::Error;
use crate::operate::overview::{
    ModeOverview, Overview, PartitionsOverview, RowsOverview, SlotOverview,
};
use crate::operate::sampler::bytes;

use super::{connect_for_command, to_json};

/// Shown for a value that is not known.
const DASH: &str = "-";

/// `pgoutbox status [--json]`: mode, slot, rows and partitions of the
/// configured outbox, on one screen (see docs/status.md). Needs PostgreSQL,
/// and Kafka too with exactly-once delivery (the last line: what the
/// progress topic records; a Kafka it cannot reach is shown, not fatal).
pub async fn status(config: &Config, json: bool) -> Result<(), Error> {
    let client = connect_for_command(config).await?;
    let mut overview = crate::operate::overview::read(&client, config).await?;
    if overview.slot.failover == Some(true) {
        let pg = crate::database::settings(config)?;
        overview.slot.standbys = standby::copies(&pg, &config.cdc.slot).await;
        if !overview.slot.standbys.is_empty()
            && !overview
                .slot
                .standbys
                .iter()
                .any(standby::StandbyCopy::usable)
        {
            overview.slot.failover_warning.get_or_insert_with(|| {
                "no standby of DATABASE_URL holds a synced, valid copy of the slot: a failover now loses it (the relay then recreates it and backfills)".to_owned()
            });
        }
    }
    if config.kafka.delivery == crate::config::Delivery::ExactlyOnce {
        let database: String = client
            .query_one("SELECT current_database()::text", &[])
            .await
            .map_err(|e| Error::postgres("reading the database name", &e))?
            .get(0);
        // Readable by superusers and pg_monitor members only; without it
        // the record is matched by database and slot.
        let system_identifier: Option<String> = client
            .query_one(
                "SELECT system_identifier::text FROM pg_control_system()",
                &[],
            )
            .await
            .ok()
            .map(|r| r.get(0));
        let config = config.clone();
        overview.delivery = tokio::task::spawn_blocking(move || {
            crate::operate::kafka_progress::read(&config, &database, system_identifier.as_deref())
        })
        .await
        .map_err(|e| Error::Transient(format!("reading the progress topic: {e}")))?;
    }
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
pub fn format_overview(o: &Overview) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "outbox      {}  (at {})", o.table, o.generated_at);
    let _ = writeln!(out, "health      {}", o.health);
    write_mode(&mut out, &o.mode);
    write_slot(&mut out, &o.slot);
    match &o.rows {
        Some(rows) => write_rows(&mut out, rows),
        None => out.push_str(
            "rows        not tracked: the table has no status column (delivery is recorded by the slot's position only)\n",
        ),
    }
    write_partitions(&mut out, &o.partitions);
    write_delivery(&mut out, &o.delivery);
    for line in crate::operate::leftovers::lines(&o.leftovers) {
        let _ = writeln!(out, "leftover    {line}");
    }
    out
}

/// The `delivery` line: the guarantee and, with exactly-once, the last
/// position Kafka holds.
fn write_delivery(out: &mut String, d: &crate::operate::kafka_progress::DeliveryOverview) {
    let topic = d.progress_topic.as_deref().unwrap_or(DASH);
    match (&d.committed, &d.error) {
        (_, Some(e)) => {
            let _ = writeln!(
                out,
                "delivery    {}; progress topic {topic} unreadable: {e}",
                d.guarantee
            );
        }
        (Some(r), None) => {
            let position = r
                .position()
                .map(|p| p.to_string())
                .unwrap_or_else(|| "none (backfill only)".into());
            let _ = writeln!(
                out,
                "delivery    {}; Kafka holds up to {position} (timeline {}, progress topic {topic}, key {}){}",
                d.guarantee,
                r.timeline,
                d.key.as_deref().unwrap_or(DASH),
                r.backfill
                    .as_ref()
                    .map(|b| format!("; backfill from {} committed {} rows", b.consistent_point, b.rows))
                    .unwrap_or_default(),
            );
        }
        (None, None) if d.progress_topic.is_some() => {
            let _ = writeln!(
                out,
                "delivery    {}; nothing committed yet (progress topic {topic})",
                d.guarantee
            );
        }
        (None, None) => {
            let _ = writeln!(out, "delivery    {}", d.guarantee);
        }
    }
}

/// The `mode` line, then one line per relay holding or waiting for the
/// serving lock.
fn write_mode(out: &mut String, mode: &ModeOverview) {
    let serving = match mode.serving.as_str() {
        "none" => "no relay serves the table".to_owned(),
        m => format!("served by {m}"),
    };
    let _ = writeln!(out, "mode        configured {}; {serving}", mode.configured);
    for h in &mode.holders {
        let _ = writeln!(
            out,
            "            {} {} pid {} {}{}{} ({}{})",
            if h.granted { "holder " } else { "waiting" },
            h.relay_mode,
            h.pid,
            h.application_name.as_deref().unwrap_or(DASH),
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
}

/// The `slot` line.
fn write_slot(out: &mut String, s: &SlotOverview) {
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
            s.confirmed_flush_lsn.as_deref().unwrap_or(DASH),
            s.server_wal_lsn,
            s.lag_bytes.map(bytes).unwrap_or_else(|| DASH.into()),
            s.retained_wal_bytes.map(bytes).unwrap_or_else(|| DASH.into()),
            s.wal_status.as_deref().unwrap_or(DASH),
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
    if let Some(failover) = s.failover {
        let _ = writeln!(
            out,
            "            failover slot: {}; synchronized_standby_slots: {}",
            if failover { "yes" } else { "no" },
            match s.synchronized_standby_slots.as_deref() {
                None | Some("") => "(empty)",
                Some(v) => v,
            }
        );
    }
    if let Some(why) = &s.invalidation_reason {
        let _ = writeln!(out, "            INVALIDATED: {why}");
    }
    for copy in &s.standbys {
        let _ = writeln!(out, "            {}", standby::describe(copy));
    }
    if let Some(w) = &s.failover_warning {
        let _ = writeln!(out, "            WARNING: {w}");
    }
    if let (Some(at), reason) = (&s.last_recovery_at, &s.last_recovery_reason) {
        let _ = writeln!(
            out,
            "            last recovered {at}: {}",
            reason.as_deref().unwrap_or(DASH)
        );
    }
}

/// The row counts by status (`failed` only when there are any).
fn write_rows(out: &mut String, r: &RowsOverview) {
    let oldest = match (&r.oldest_pending_created_at, r.oldest_pending_age_s) {
        (Some(at), Some(secs)) => format!(" (oldest {} old, created {at})", age(secs)),
        _ => String::new(),
    };
    let _ = writeln!(out, "pending     {}{oldest}", r.pending);
    if let Some(n) = r.journaled.filter(|n| *n > 0) {
        let _ = writeln!(
            out,
            "journaled   {n} (delivered, not yet folded into COMPLETED)"
        );
    }
    let _ = writeln!(out, "processing  {}", r.processing);
    if r.failed > 0 {
        let _ = writeln!(out, "failed      {}", r.failed);
    }
    match r.dead_letters_recent {
        Some(n) if n > 0 => {
            let _ = writeln!(out, "dead letter {} ({n} recent)", r.dead_letter);
        }
        _ => {
            let _ = writeln!(out, "dead letter {}", r.dead_letter);
        }
    }
}

/// The `partitions` line, then a table with one line per partition.
fn write_partitions(out: &mut String, p: &PartitionsOverview) {
    let made = match p.created_by.as_str() {
        "pgoutbox" => format!("{}, created ahead by pgoutbox", p.interval),
        "not partitioned" => "the table is not partitioned".to_owned(),
        other => format!("created by {other}; the relay leaves them to it"),
    };
    let _ = writeln!(
        out,
        "partitions  {} ({made}), {}, ~{} rows (row counts are estimates from pg_class.reltuples)",
        p.count,
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
}
