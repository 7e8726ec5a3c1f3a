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
        let status = services_script("up")
            .status()
            .expect("run scripts/services up");
        assert!(status.success(), "scripts/services up failed");
        let env = ServicesEnv::read();
        let get = |key: &str| {
            env.get(key)
                .unwrap_or_else(|| panic!("scripts/services env printed no {key}"))
        };
        Services {
            database_url: get("DATABASE_URL"),
            kafka_brokers: get("KAFKA_BROKERS"),
        }
    })
}

/// `bash scripts/services <cmd>`, to be run.
pub fn services_script(cmd: &str) -> Command {
    let root = env!("CARGO_MANIFEST_DIR");
    let mut c = Command::new("bash");
    c.arg(format!("{root}/scripts/services")).arg(cmd);
    c
}

/// What `scripts/services env` prints: `KEY=value` lines. It follows
/// `PGOUTBOX_SERVICES_DIR` (scripts/pg-matrix runs the tests against
/// services of its own) and, with external services, echoes the variables
/// given to it.
pub struct ServicesEnv(String);

impl ServicesEnv {
    /// Runs `scripts/services env`; panics if it fails.
    pub fn read() -> ServicesEnv {
        let out = services_script("env")
            .output()
            .expect("run scripts/services env");
        assert!(out.status.success(), "scripts/services env failed");
        ServicesEnv(String::from_utf8(out.stdout).expect("utf-8 env output"))
    }

    /// The value printed for `key` (surrounding single quotes removed), if
    /// one was.
    pub fn get(&self, key: &str) -> Option<String> {
        self.0
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .map(|v| v.trim_matches('\'').to_owned())
    }
}

pub mod control;
pub mod debezium;
pub mod harness;
pub mod ledger;
pub mod pki;
