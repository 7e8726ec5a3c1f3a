//! The `[cdc]` section: the replication slot and publication, the
//! replication stream's timing and buffers, logical messages and the
//! fallback to polling.

use serde::Deserialize;

use super::{range, validate_identifier, validate_slot_name, ConfigError};

/// Logical replication settings.
#[derive(Clone, Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CdcConfig {
    /// Replication slot name (env `OUTBOX_SLOT`).
    pub slot: String,
    /// Publication name (env `OUTBOX_PUBLICATION`).
    pub publication: String,
    /// How often to send a standby status update, in milliseconds; capped at
    /// half the server's `wal_sender_timeout`.
    pub status_interval_ms: u64,
    /// XLogData messages buffered between the socket and the decoder.
    pub read_buffer: usize,
    /// Seconds a graceful shutdown waits for Kafka acks before giving up.
    pub shutdown_timeout_s: u64,
    /// Upper bound of the reconnect backoff, in milliseconds.
    pub max_backoff_ms: u64,
    /// Rows per `COMPLETED` / `DEAD_LETTER` update statement.
    pub mark_batch_size: usize,
    /// How long the status writer gathers marks before an update statement
    /// that would carry fewer than `mark_batch_size` rows, in milliseconds.
    /// Fewer, larger statements cost PostgreSQL far less per row (one commit
    /// and one plan per statement); the price is this much more time before
    /// the slot's flush LSN passes an event, never on Kafka delivery. At
    /// least once only: exactly-once hands over a commit's rows at once and
    /// they are written without lingering.
    pub mark_linger_ms: u64,
    /// How a delivered row is recorded (env `OUTBOX_MARK_WITH`):
    /// `journal` (the default) inserts one row per batch into the delivery
    /// journal `pgoutbox_delivered` and folds it into the rows' statuses
    /// off the stream's critical path; `update` sets every row `COMPLETED`
    /// before the slot may pass it, as poll mode does. Either way a crash
    /// never leaves a delivered row undelivered in the table's eyes
    /// (ARCHITECTURE.md, invariant 14).
    pub mark_with: MarkWith,
    /// Relay table-less events written with `pg_logical_emit_message`
    /// (env `OUTBOX_MESSAGES`).
    pub messages: bool,
    /// The logical message prefix that marks an outbox event
    /// (env `OUTBOX_MESSAGE_PREFIX`).
    pub message_prefix: String,
    /// Further prefixes whose logical messages are outbox events (env
    /// `OUTBOX_MESSAGE_PREFIXES`, comma-separated): each exact, or ending
    /// in `*` for every prefix that starts with what comes before it —
    /// `"outbox.*"` relays the polling framework's
    /// `outbox.<AggregateType>.<EventType>` messages.
    pub message_prefixes: Vec<String>,
    /// Also relay non-transactional messages. Off by default: any role can
    /// emit them, and they are sent even when the writer's transaction
    /// rolls back.
    pub non_transactional_messages: bool,
    /// `any` relays changes from every origin; `none` (PostgreSQL 16+) only
    /// changes made locally, not those applied by logical replication.
    pub origin: String,
    /// Ask the server to stream large in-progress transactions. Their changes
    /// are held in memory until Stream Commit (dropped on Stream Abort) and
    /// never published early; off by default.
    pub streaming: bool,
    /// Force a pgoutput protocol version (1-4); by default the highest the
    /// server supports.
    pub protocol_version: Option<u32>,
    /// With `mode = "auto"`: when the replication slot is lost (dropped or
    /// invalidated), keep delivering by polling instead of stopping
    /// (env `OUTBOX_FALLBACK_TO_POLL`). The older spelling of
    /// `on_slot_lost = "poll"`.
    pub fallback_to_poll: bool,
    /// What to do when the slot pgoutbox created is gone or invalidated —
    /// after a failover to a standby that has no copy of it, or when
    /// `max_slot_wal_keep_size` invalidated it (env `OUTBOX_ON_SLOT_LOST`):
    /// `stop` for an operator, `recreate` (a new slot, the rows still
    /// PENDING backfilled from its snapshot), or `poll`. Unset: `recreate`
    /// when rows are marked COMPLETED (the table then says what is still
    /// to deliver), else `stop`. See docs/high-availability.md.
    pub on_slot_lost: Option<SlotLostPolicy>,
    /// Create the slot as a failover slot (PostgreSQL 17+), so a standby
    /// with `sync_replication_slots` keeps a copy a failover can continue
    /// from (env `OUTBOX_FAILOVER_SLOT`). Unset: on where the server
    /// supports it.
    pub failover_slot: Option<bool>,
}

/// `cdc.mark_with`: how the CDC relay records a delivered row.
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum MarkWith {
    /// A journal row per batch, folded into the rows later.
    #[default]
    Journal,
    /// `status = 'COMPLETED'` on every row, at once.
    Update,
}

impl std::str::FromStr for MarkWith {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "journal" => Ok(MarkWith::Journal),
            "update" => Ok(MarkWith::Update),
            other => Err(format!(
                "{other:?} is not a way of marking delivered rows: use \"journal\" or \"update\""
            )),
        }
    }
}

/// `cdc.on_slot_lost`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum SlotLostPolicy {
    /// Stop, for an operator (`pgoutbox run --recreate-slot`).
    Stop,
    /// Create a new slot and backfill every row not yet COMPLETED.
    Recreate,
    /// Deliver by polling from now on.
    Poll,
}

impl std::str::FromStr for SlotLostPolicy {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "stop" => Ok(SlotLostPolicy::Stop),
            "recreate" => Ok(SlotLostPolicy::Recreate),
            "poll" => Ok(SlotLostPolicy::Poll),
            other => Err(format!(
                "{other:?} is not a slot-lost policy: use \"stop\", \"recreate\" or \"poll\""
            )),
        }
    }
}

impl Default for CdcConfig {
    fn default() -> Self {
        CdcConfig {
            slot: "pgoutbox".into(),
            publication: "outbox_pub".into(),
            status_interval_ms: 1000,
            read_buffer: 4096,
            shutdown_timeout_s: 30,
            max_backoff_ms: 30_000,
            mark_batch_size: 2000,
            mark_linger_ms: 20,
            mark_with: MarkWith::Journal,
            messages: true,
            message_prefix: "outbox".into(),
            message_prefixes: Vec::new(),
            non_transactional_messages: false,
            origin: "any".into(),
            streaming: false,
            protocol_version: None,
            fallback_to_poll: false,
            on_slot_lost: None,
            failover_slot: None,
        }
    }
}

impl CdcConfig {
    /// What a lost slot leads to: `on_slot_lost`, else `poll` with
    /// `fallback_to_poll` in `mode = "auto"`, else `recreate` when rows are
    /// marked, else `stop`.
    pub fn slot_lost_policy(&self, mark_completed: bool, auto: bool) -> SlotLostPolicy {
        match (self.on_slot_lost, self.fallback_to_poll && auto) {
            (Some(p), _) => p,
            (None, true) => SlotLostPolicy::Poll,
            (None, false) if mark_completed => SlotLostPolicy::Recreate,
            (None, false) => SlotLostPolicy::Stop,
        }
    }

    /// Refuses `on_slot_lost = "recreate"` without marking.
    pub(super) fn validate_policy(&self, mark_completed: bool) -> Result<(), ConfigError> {
        if self.on_slot_lost == Some(SlotLostPolicy::Recreate) && !mark_completed {
            return Err(ConfigError::new(
                "cdc.on_slot_lost",
                "\"recreate\" backfills the rows not yet COMPLETED from a new slot, which needs delivered rows marked (outbox.mark_completed = true); without marking every row would be sent again. Set mark_completed = true, or on_slot_lost = \"stop\"",
            ));
        }
        Ok(())
    }

    /// Checks the names that end up in SQL: the slot and the publication.
    pub(super) fn validate_names(&self) -> Result<(), ConfigError> {
        validate_slot_name("cdc.slot", &self.slot)?;
        validate_identifier("cdc.publication", &self.publication)?;
        for p in &self.message_prefixes {
            let stem = p.strip_suffix('*').unwrap_or(p);
            if stem.is_empty() || stem.contains('*') {
                return Err(ConfigError::new(
                    "cdc.message_prefixes",
                    format!("{p:?} is not a prefix: give one exactly, or its start followed by a single trailing * (e.g. \"outbox.*\")"),
                ));
            }
        }
        Ok(())
    }

    /// Checks the timing and buffer settings.
    pub(super) fn validate_limits(&self) -> Result<(), ConfigError> {
        range(
            "cdc.status_interval_ms",
            self.status_interval_ms,
            10,
            600_000,
        )?;
        range("cdc.read_buffer", self.read_buffer as u64, 1, 1_000_000)?;
        range("cdc.shutdown_timeout_s", self.shutdown_timeout_s, 0, 3600)?;
        range("cdc.max_backoff_ms", self.max_backoff_ms, 10, 3_600_000)?;
        range(
            "cdc.mark_batch_size",
            self.mark_batch_size as u64,
            1,
            100_000,
        )?;
        range("cdc.mark_linger_ms", self.mark_linger_ms, 0, 1000)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::test_support::valid;
    use super::super::Config;

    #[test]
    fn message_prefixes_are_exact_or_end_in_one_star() {
        let mut c = valid();
        c.cdc.message_prefixes = vec!["outbox.*".into(), "orders".into()];
        c.validate().unwrap();
        for bad in ["*", "out*box", ""] {
            c.cdc.message_prefixes = vec![bad.into()];
            let e = c.validate().unwrap_err();
            assert_eq!(e.field, "cdc.message_prefixes", "{bad:?}");
        }
    }

    #[test]
    fn a_lost_slot_is_recreated_only_with_marking() {
        use super::SlotLostPolicy::*;
        let mut c = valid();
        assert_eq!(c.cdc.slot_lost_policy(true, false), Recreate);
        assert_eq!(c.cdc.slot_lost_policy(false, false), Stop);
        c.cdc.fallback_to_poll = true;
        assert_eq!(c.cdc.slot_lost_policy(true, true), Poll);
        assert_eq!(c.cdc.slot_lost_policy(true, false), Recreate, "auto only");
        c.cdc.on_slot_lost = Some(Recreate);
        c.outbox.mark_completed = false;
        let e = c.validate().unwrap_err();
        assert_eq!(e.field, "cdc.on_slot_lost");
        assert!(e.problem.contains("mark_completed = true"), "{e}");
        assert!("never".parse::<super::SlotLostPolicy>().is_err());
    }

    #[test]
    fn mark_linger_is_bounded() {
        let mut c = valid();
        assert_eq!(c.cdc.mark_linger_ms, 20);
        c.cdc = Config::from_toml("[cdc]\nmark_linger_ms = 0\n")
            .unwrap()
            .cdc;
        c.validate().unwrap();
        c.cdc.mark_linger_ms = 5000;
        assert_eq!(c.validate().unwrap_err().field, "cdc.mark_linger_ms");
    }
}
