//! The slot's copies on the standbys of the host list: whether a failover
//! to each would find the relay's slot (PostgreSQL 17+ failover slots,
//! kept in step by the standby's slot-sync worker; docs/high-availability.md).
//!
//! Every other host of a multi-host `DATABASE_URL` is asked, one at a time
//! (5 s connect timeout); a server in recovery is a standby and reports its
//! copy of the slot: `synced`, `invalidation_reason`, `confirmed_flush_lsn`.
//! The primary is skipped. A host that cannot be reached is reported as
//! such, never an error of the caller.

use serde::Serialize;

use crate::database::{self, Settings};

/// One standby of the host list and its copy of the slot.
#[derive(Clone, Debug, Serialize)]
pub struct StandbyCopy {
    /// `host:port` as listed.
    pub host: String,
    /// The standby has a slot of that name.
    pub present: bool,
    /// The copy is kept in step by the slot-sync worker (17+; `null`
    /// before, or without a copy).
    pub synced: Option<bool>,
    /// Why the copy was invalidated (17+), if it was.
    pub invalidation_reason: Option<String>,
    /// The copy's confirmed position: where a relay resumes after a
    /// failover to this standby.
    pub confirmed_flush_lsn: Option<String>,
    /// Why the host could not be asked (unreachable, authentication, …).
    pub error: Option<String>,
}

impl StandbyCopy {
    /// A copy a failover can continue from: present, synced, not
    /// invalidated.
    pub fn usable(&self) -> bool {
        self.present && self.synced == Some(true) && self.invalidation_reason.is_none()
    }
}

/// The copies of `slot` on every standby of `pg`'s host list (empty for a
/// single host).
pub async fn copies(pg: &Settings, slot: &str) -> Vec<StandbyCopy> {
    let mut out = Vec::new();
    for (host, one) in database::each_host(pg) {
        if let Some(copy) = ask(&host, &one, slot).await {
            out.push(copy);
        }
    }
    out
}

/// Asks one host; `None` when it is the primary.
async fn ask(host: &str, one: &Settings, slot: &str) -> Option<StandbyCopy> {
    let unreachable = |why: String| StandbyCopy {
        host: host.to_owned(),
        present: false,
        synced: None,
        invalidation_reason: None,
        confirmed_flush_lsn: None,
        error: Some(why),
    };
    let client = match database::connect(one).await {
        Ok(c) => c,
        Err(e) => return Some(unreachable(crate::redact::postgres_text(&e))),
    };
    // to_jsonb: the columns exist from 17 on only.
    let row = client
        .query_one(
            "SELECT pg_is_in_recovery(), s.slot_name IS NOT NULL, \
                    (to_jsonb(s) ->> 'synced')::bool, to_jsonb(s) ->> 'invalidation_reason', \
                    s.confirmed_flush_lsn::text \
               FROM (SELECT 1) AS one \
               LEFT JOIN pg_replication_slots s ON s.slot_name = $1",
            &[&slot],
        )
        .await;
    match row {
        Err(e) => Some(unreachable(crate::redact::postgres_text(&e))),
        Ok(r) if !r.get::<_, bool>(0) => None,
        Ok(r) => Some(StandbyCopy {
            host: host.to_owned(),
            present: r.get(1),
            synced: r.get(2),
            invalidation_reason: r.get(3),
            confirmed_flush_lsn: r.get(4),
            error: None,
        }),
    }
}

/// One line on a copy, for logs and `pgoutbox status`.
pub fn describe(c: &StandbyCopy) -> String {
    if let Some(e) = &c.error {
        return format!("standby {}: not asked ({e})", c.host);
    }
    if !c.present {
        return format!(
            "standby {}: no copy of the slot (a failover there loses it)",
            c.host
        );
    }
    let mut line = format!(
        "standby {}: copy synced {}, confirmed {}",
        c.host,
        match c.synced {
            Some(true) => "yes",
            Some(false) => "no",
            None => "-",
        },
        c.confirmed_flush_lsn.as_deref().unwrap_or("-")
    );
    if let Some(why) = &c.invalidation_reason {
        line.push_str(&format!(", INVALIDATED ({why})"));
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    fn copy() -> StandbyCopy {
        StandbyCopy {
            host: "db2:5432".into(),
            present: true,
            synced: Some(true),
            invalidation_reason: None,
            confirmed_flush_lsn: Some("0/3000060".into()),
            error: None,
        }
    }

    #[test]
    fn only_a_synced_valid_copy_is_usable() {
        assert!(copy().usable());
        let mut c = copy();
        c.synced = Some(false);
        assert!(!c.usable());
        let mut c = copy();
        c.invalidation_reason = Some("wal_removed".into());
        assert!(!c.usable());
        assert!(describe(&c).ends_with("INVALIDATED (wal_removed)"));
        let mut c = copy();
        c.present = false;
        assert!(!c.usable());
        assert!(describe(&c).contains("no copy"));
    }

    #[test]
    fn each_host_of_a_list_gets_its_own_settings() {
        let pg: tokio_postgres::Config =
            "postgres://u:p@db1:5433,db2/app?target_session_attrs=read-write"
                .parse()
                .unwrap();
        let hosts = database::each_host(&Settings::from(pg));
        let labels: Vec<&str> = hosts.iter().map(|(h, _)| h.as_str()).collect();
        assert_eq!(labels, ["db1:5433", "db2:5432"]);
        let (_, second) = &hosts[1];
        assert_eq!(second.pg().get_dbname(), Some("app"));
        assert_eq!(second.pg().get_user(), Some("u"));
        assert_eq!(second.pg().get_ports(), [5432]);
        let single: tokio_postgres::Config = "postgres://u@db1/app".parse().unwrap();
        assert!(database::each_host(&Settings::from(single)).is_empty());
    }
}
