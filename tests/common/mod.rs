//! Shared test support: finds (or starts) the real PostgreSQL and Kafka that
//! the integration tests run against.
//!
//! When `DATABASE_URL` and `KAFKA_BROKERS` are set, those services are used.
//! Otherwise `scripts/services up` starts the project's private services and
//! `scripts/services env` tells where they listen.
#![allow(dead_code)]

use std::process::Command;
use std::sync::OnceLock;

/// Where the test services listen.
#[derive(Clone, Debug)]
pub struct Services {
    /// libpq-style URL of a superuser-capable role with REPLICATION.
    pub database_url: String,
    /// Kafka bootstrap servers (`host:port[,host:port]`).
    pub kafka_brokers: String,
}

/// The services for this test process, started once.
pub fn services() -> &'static Services {
    static SERVICES: OnceLock<Services> = OnceLock::new();
    SERVICES.get_or_init(|| {
        if let (Ok(database_url), Ok(kafka_brokers)) = (
            std::env::var("DATABASE_URL"),
            std::env::var("KAFKA_BROKERS"),
        ) {
            return Services {
                database_url,
                kafka_brokers,
            };
        }
        let root = env!("CARGO_MANIFEST_DIR");
        let status = Command::new("bash")
            .arg(format!("{root}/scripts/services"))
            .arg("up")
            .status()
            .expect("run scripts/services up");
        assert!(status.success(), "scripts/services up failed");
        let out = Command::new("bash")
            .arg(format!("{root}/scripts/services"))
            .arg("env")
            .output()
            .expect("run scripts/services env");
        assert!(out.status.success(), "scripts/services env failed");
        let text = String::from_utf8(out.stdout).expect("utf-8 env output");
        let get = |key: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(&format!("{key}=")))
                .unwrap_or_else(|| panic!("scripts/services env printed no {key}"))
                .trim_matches('\'')
                .to_owned()
        };
        Services {
            database_url: get("DATABASE_URL"),
            kafka_brokers: get("KAFKA_BROKERS"),
        }
    })
}

pub mod control;
pub mod harness;
pub mod ledger;
