//! The real Debezium for the tests that compare pgoutbox with it
//! (tests/debezium_takeover.rs, tests/debezium_conformance.rs): whether it
//! can run here, and `scripts/debezium`.

use std::process::Command;
use std::time::Duration;

use super::harness::run_with_timeout;

/// Why Debezium cannot run here, if it cannot: Java 17+, curl and jq
/// (`scripts/debezium start` follows Kafka Connect's REST API), and the
/// jars `scripts/debezium install` fetches.
pub fn unavailable() -> Option<String> {
    let java = std::env::var("PGOUTBOX_JAVA").unwrap_or_else(|_| "java".into());
    let out = match Command::new(&java).arg("-version").output() {
        Ok(out) => out,
        Err(e) => return Some(format!("Java is not installed ({java}: {e})")),
    };
    let text = String::from_utf8_lossy(&out.stderr);
    // `openjdk version "17.0.15" …` / `java version "1.8.0_…"`.
    let major = text
        .split('"')
        .nth(1)
        .and_then(|v| v.split(['.', '-', '+']).next())
        .and_then(|m| m.parse::<u32>().ok());
    match major {
        Some(m) if m >= 17 => {}
        _ => {
            return Some(format!(
                "Kafka Connect 4 needs Java 17+; {java} -version says: {}",
                text.lines().next().unwrap_or("nothing")
            ))
        }
    }
    for tool in ["curl", "jq"] {
        let found = Command::new(tool)
            .arg("--version")
            .output()
            .map(|o| o.status.success())
            .unwrap_or(false);
        if !found {
            return Some(format!(
                "{tool} is missing (scripts/debezium start needs it)"
            ));
        }
    }
    let out = run_with_timeout(script(&["install"]), Duration::from_secs(900));
    if !out.status.success() {
        return Some(format!(
            "scripts/debezium install could not provide the jars:\n{}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    None
}

/// Why the scenario is skipped (printed), if it is; under
/// `PGOUTBOX_TEST_REQUIRE_DEBEZIUM=1` (CI) an unavailable Debezium fails it.
pub fn skip_reason() -> Option<String> {
    let reason = unavailable()?;
    if std::env::var("PGOUTBOX_TEST_REQUIRE_DEBEZIUM").as_deref() == Ok("1") {
        panic!("Debezium is required (PGOUTBOX_TEST_REQUIRE_DEBEZIUM=1) but unavailable: {reason}");
    }
    eprintln!("SKIPPED: the real Debezium cannot run here: {reason}");
    Some(reason)
}

/// `bash scripts/debezium <args>`.
pub fn script(args: &[&str]) -> Command {
    let mut c = Command::new("bash");
    c.arg(concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/debezium"))
        .args(args);
    c
}
