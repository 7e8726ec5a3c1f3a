//! `pgoutbox import-debezium`: a Debezium PostgreSQL connector's
//! configuration (a `.properties` file, or the JSON posted to Kafka
//! Connect's REST API) turned into the equivalent pgoutbox configuration.
//!
//! Every option is accounted for: mapped into the TOML, or named in a
//! warning that says why it is not carried over. The database password is
//! never copied: the output points `database.password_file` at a file the
//! operator fills. Malformed input is an error naming its line.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// The Outbox Event Router's class.
const EVENT_ROUTER: &str = "io.debezium.transforms.outbox.EventRouter";

/// The router options pgoutbox honours, under their Debezium names.
const ROUTER_OPTIONS: &[&str] = &[
    "table.field.event.id",
    "table.field.event.key",
    "table.field.event.type",
    "table.field.event.payload",
    "table.field.event.timestamp",
    "table.fields.additional.placement",
    "table.expand.json.payload",
    "route.by.field",
    "route.topic.regex",
    "route.topic.replacement",
    "route.tombstone.on.empty.payload",
    "tracing.span.context.field",
];

/// Why an input cannot be imported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImportError {
    /// A line of a `.properties` file that is not `key=value`.
    #[error("line {line}: {text:?} is not key=value (nor a comment)")]
    Malformed {
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
    /// JSON that is not a connector configuration.
    #[error("not a Debezium connector configuration: {0}")]
    NotAConnector(String),
    /// A setting pgoutbox cannot work with at all.
    #[error("{option}: {why}")]
    Unsupported {
        /// The connector option.
        option: String,
        /// Why, and what to do.
        why: String,
    },
}

/// The converted configuration and what could not be carried over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Imported {
    /// The pgoutbox configuration file, TOML.
    pub toml: String,
    /// One line per option not carried over, with the reason.
    pub warnings: Vec<String>,
}

/// Reads a connector configuration: JSON (`{"name", "config": {...}}` or
/// the bare `config` object) when the text starts with `{`, else Java
/// `.properties`.
pub fn parse(text: &str) -> Result<BTreeMap<String, String>, ImportError> {
    if text.trim_start().starts_with('{') {
        parse_json(text)
    } else {
        parse_properties(text)
    }
}

fn parse_json(text: &str) -> Result<BTreeMap<String, String>, ImportError> {
    let value: serde_json::Value = serde_json::from_str(text).map_err(|e| {
        ImportError::NotAConnector(format!("invalid JSON at line {}: {e}", e.line()))
    })?;
    let config = value.get("config").unwrap_or(&value);
    let object = config.as_object().ok_or_else(|| {
        ImportError::NotAConnector("expected an object of connector options".into())
    })?;
    object
        .iter()
        .map(|(k, v)| {
            let v = match v {
                serde_json::Value::String(s) => s.clone(),
                serde_json::Value::Number(_) | serde_json::Value::Bool(_) => v.to_string(),
                other => {
                    return Err(ImportError::NotAConnector(format!(
                        "option {k:?} has a {} value; connector options are strings",
                        match other {
                            serde_json::Value::Null => "null",
                            serde_json::Value::Array(_) => "list",
                            _ => "object",
                        }
                    )))
                }
            };
            Ok((k.clone(), v))
        })
        .collect()
}

/// Java `.properties` as connector files write them: `key=value` or
/// `key: value`; `#` and `!` comments; a trailing `\` continues the line.
/// (Java also takes a bare space as the separator; a line without `=` or
/// `:` is far more often a mistake, so it is refused with its number.)
fn parse_properties(text: &str) -> Result<BTreeMap<String, String>, ImportError> {
    let mut out = BTreeMap::new();
    let mut lines = text.lines().enumerate();
    while let Some((i, raw)) = lines.next() {
        let mut line = raw.trim_start().to_owned();
        if line.is_empty() || line.starts_with('#') || line.starts_with('!') {
            continue;
        }
        while line.ends_with('\\') && !line.ends_with("\\\\") {
            line.pop();
            match lines.next() {
                Some((_, next)) => line.push_str(next.trim_start()),
                None => break,
            }
        }
        let split = line
            .find(['=', ':'])
            .ok_or_else(|| ImportError::Malformed {
                line: i + 1,
                text: raw.to_owned(),
            })?;
        let key = line[..split].trim();
        if key.is_empty() {
            return Err(ImportError::Malformed {
                line: i + 1,
                text: raw.to_owned(),
            });
        }
        let value = line[split + 1..].trim().replace("\\\\", "\\");
        out.insert(key.to_owned(), value);
    }
    Ok(out)
}

/// A TOML string literal.
fn quoted(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Converts a connector's options.
pub fn convert(options: &BTreeMap<String, String>) -> Result<Imported, ImportError> {
    let mut used: Vec<&'static str> = Vec::new();
    let mut warnings = Vec::new();
    let get = |k: &str| options.get(k).map(String::as_str);
    match get("connector.class") {
        Some(c) if c.ends_with("PostgresConnector") => used.push("connector.class"),
        Some(c) => {
            return Err(ImportError::Unsupported {
                option: "connector.class".into(),
                why: format!("{c} is not Debezium's PostgreSQL connector (io.debezium.connector.postgresql.PostgresConnector)"),
            })
        }
        None => warnings.push("connector.class is not set; assuming Debezium's PostgreSQL connector".into()),
    }
    match get("plugin.name") {
        Some("pgoutput") => used.push("plugin.name"),
        other => {
            return Err(ImportError::Unsupported {
                option: "plugin.name".into(),
                why: format!(
                    "is {}; pgoutbox reads only pgoutput (PostgreSQL's built-in plugin): switch the connector to plugin.name=pgoutput (with a new slot) before moving to pgoutbox",
                    other.map_or("unset (Debezium's default, decoderbufs)".to_owned(), |p| format!("{p:?}"))
                ),
            })
        }
    }
    let mut toml = String::from(
        "# Converted by `pgoutbox import-debezium` from a Debezium PostgreSQL connector configuration.\n",
    );
    database_section(options, &mut used, &mut warnings, &mut toml);
    outbox_section(options, &mut used, &mut warnings, &mut toml)?;
    kafka_section(options, &mut used, &mut warnings, &mut toml)?;
    explained(options, &mut used, &mut warnings);
    // The router's own options were each mapped or warned about above.
    let router = find_router(options).map(|alias| format!("transforms.{alias}."));
    for key in options.keys() {
        let routers = router.as_deref().is_some_and(|p| key.starts_with(p));
        if !routers && !used.iter().any(|u| u == key) {
            warnings.push(format!(
                "{key}: not carried over (pgoutbox has no equivalent)"
            ));
        }
    }
    Ok(Imported { toml, warnings })
}

fn database_section(
    options: &BTreeMap<String, String>,
    used: &mut Vec<&'static str>,
    warnings: &mut Vec<String>,
    toml: &mut String,
) {
    let get = |k: &str| options.get(k).map(String::as_str);
    let host = get("database.hostname").unwrap_or("localhost");
    let port = get("database.port").unwrap_or("5432");
    let user = get("database.user").unwrap_or("postgres");
    let db = get("database.dbname").unwrap_or("postgres");
    used.extend([
        "database.hostname",
        "database.port",
        "database.user",
        "database.dbname",
    ]);
    let mut url = format!("postgres://{user}@{host}:{port}/{db}");
    if let Some(mode) = get("database.sslmode") {
        used.push("database.sslmode");
        let _ = write!(url, "?sslmode={mode}");
    }
    let _ = write!(toml, "\n[database]\nurl = {}\n", quoted(&url));
    if options.contains_key("database.password") {
        used.push("database.password");
        warnings.push(
            "database.password: not copied; write it into the file named by database.password_file (or set DATABASE_URL)".into(),
        );
        toml.push_str("password_file = \"/run/secrets/pgoutbox-database-password\"  # put the password here\n");
    }
}

fn outbox_section(
    options: &BTreeMap<String, String>,
    used: &mut Vec<&'static str>,
    warnings: &mut Vec<String>,
    toml: &mut String,
) -> Result<(), ImportError> {
    let get = |k: &str| options.get(k).map(String::as_str);
    let tables = get("table.include.list").or(get("table.whitelist"));
    used.extend(["table.include.list", "table.whitelist"]);
    let Some(tables) = tables else {
        return Err(ImportError::Unsupported {
            option: "table.include.list".into(),
            why: "is not set; name the outbox table (schema.table) so pgoutbox knows which table to relay".into(),
        });
    };
    let list: Vec<&str> = tables
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .collect();
    let first = list.first().copied().unwrap_or_default();
    if list.len() > 1 {
        warnings.push(format!(
            "table.include.list: {} tables; the first, {first}, is the outbox table (the publication relays the others only if they have the outbox columns)",
            list.len()
        ));
    }
    let (schema, table) = first.split_once('.').unwrap_or(("public", first));
    if table.contains(['*', '[', '(', '|', '\\']) {
        return Err(ImportError::Unsupported {
            option: "table.include.list".into(),
            why: format!("{first:?} is a pattern; name the outbox table itself (schema.table)"),
        });
    }
    let _ = write!(
        toml,
        "\n[outbox]\nschema = {}\ntable = {}\n",
        quoted(schema),
        quoted(table)
    );
    toml.push_str("mark_completed = false  # Debezium's table has no status column to mark\n");
    columns_section(options, toml);
    let _ = write!(toml, "\n[cdc]\n");
    if let Some(slot) = get("slot.name") {
        used.push("slot.name");
        let _ = writeln!(toml, "slot = {}", quoted(slot));
    } else {
        toml.push_str("slot = \"debezium\"  # Debezium's default slot.name\n");
    }
    if let Some(publication) = get("publication.name") {
        used.push("publication.name");
        let _ = writeln!(toml, "publication = {}", quoted(publication));
    } else {
        toml.push_str("publication = \"dbz_publication\"  # Debezium's default publication.name\n");
    }
    Ok(())
}

/// The router's field options and the role each names in
/// `[outbox.columns]`.
const ROLE_FIELDS: [(&str, &str); 6] = [
    ("table.field.event.id", "event_id"),
    ("route.by.field", "aggregate_type"),
    ("table.field.event.key", "aggregate_id"),
    ("table.field.event.type", "event_type"),
    ("table.field.event.payload", "payload"),
    ("tracing.span.context.field", "trace_context"),
];

/// `[outbox.columns]`: Debezium's default table, with each role the
/// connector's router renames mapped to its column.
fn columns_section(options: &BTreeMap<String, String>, toml: &mut String) {
    toml.push_str("\n[outbox.columns]\npreset = \"debezium\"  # id, aggregatetype, aggregateid, type, payload\n");
    let Some(alias) = find_router(options) else {
        return;
    };
    for (field, role) in ROLE_FIELDS {
        if let Some(column) = options.get(&format!("transforms.{alias}.{field}")) {
            let _ = writeln!(toml, "{role} = {}  # {field}", quoted(column.trim()));
        }
    }
}

fn kafka_section(
    options: &BTreeMap<String, String>,
    used: &mut Vec<&'static str>,
    warnings: &mut Vec<String>,
    toml: &mut String,
) -> Result<(), ImportError> {
    toml.push_str("\n[kafka]\n# brokers = \"host:9092\"  # KAFKA_BROKERS: the Connect worker's bootstrap.servers\n");
    let router = find_router(options);
    let Some(alias) = router else {
        warnings.push("transforms: no Outbox Event Router (io.debezium.transforms.outbox.EventRouter); records keep pgoutbox's own format".into());
        return Ok(());
    };
    used.push("transforms");
    toml.push_str("format = \"debezium\"\n");
    let converter = converter(options, used, warnings);
    let _ = write!(
        toml,
        "\n[kafka.debezium]\nconverter = {}\n",
        quoted(converter)
    );
    let prefix = format!("transforms.{alias}.");
    for (key, value) in options.range(prefix.clone()..) {
        let Some(option) = key.strip_prefix(&prefix) else {
            break;
        };
        let Some(&known) = ROUTER_OPTIONS.iter().find(|o| **o == option) else {
            if option != "type" {
                warnings.push(format!(
                    "{key}: not carried over (the router option is not supported by pgoutbox)"
                ));
            }
            continue;
        };
        let value = if matches!(
            known,
            "route.tombstone.on.empty.payload" | "table.expand.json.payload"
        ) {
            value.trim().eq_ignore_ascii_case("true").to_string()
        } else {
            quoted(value)
        };
        let _ = writeln!(toml, "{} = {value}", quoted(known));
    }
    Ok(())
}

/// The alias of the first Outbox Event Router in `transforms`.
fn find_router(options: &BTreeMap<String, String>) -> Option<String> {
    options
        .get("transforms")?
        .split(',')
        .map(str::trim)
        .find(|alias| {
            options
                .get(&format!("transforms.{alias}.type"))
                .map(String::as_str)
                == Some(EVENT_ROUTER)
        })
        .map(str::to_owned)
}

/// The converter the records must match, from the connector's overrides
/// (Kafka Connect's worker default, the JSON converter with schemas, is not
/// reproduced).
fn converter(
    options: &BTreeMap<String, String>,
    used: &mut Vec<&'static str>,
    warnings: &mut Vec<String>,
) -> &'static str {
    used.extend([
        "key.converter",
        "value.converter",
        "key.converter.schemas.enable",
        "value.converter.schemas.enable",
    ]);
    let value = options.get("value.converter").map(String::as_str);
    let schemas = options
        .get("value.converter.schemas.enable")
        .is_none_or(|v| v.trim().eq_ignore_ascii_case("true"));
    match value {
        Some(c) if c.ends_with("StringConverter") => "string",
        Some(c) if c.ends_with("JsonConverter") && !schemas => "json",
        Some(c) => {
            warnings.push(format!("value.converter: {c}{} is not reproduced; pgoutbox writes what the string converter writes", if schemas && c.ends_with("JsonConverter") { " with schemas" } else { "" }));
            "string"
        }
        None => {
            warnings.push("value.converter: set on the Connect worker, not in this file; assuming StringConverter (set kafka.debezium.converter = \"json\" for JsonConverter with schemas.enable=false)".into());
            "string"
        }
    }
}

/// Options pgoutbox has no setting for because it needs none, each with
/// the reason.
fn explained(
    options: &BTreeMap<String, String>,
    used: &mut Vec<&'static str>,
    warnings: &mut Vec<String>,
) {
    const REASONS: &[(&str, &str)] = &[
        ("heartbeat.interval.ms", "pgoutbox confirms the server's WAL end whenever it is idle, so WAL of other tables does not pile up behind the slot without heartbeats"),
        ("heartbeat.action.query", "not needed: pgoutbox confirms idle WAL itself"),
        ("topic.prefix", "the Outbox Event Router routes by a column, not by the connector's topic prefix"),
        ("database.server.name", "the Outbox Event Router routes by a column, not by the connector's topic prefix"),
        ("snapshot.mode", "pgoutbox continues from the slot's confirmed position; on a slot it creates itself it backfills rows still PENDING"),
        ("publication.autocreate.mode", "`pgoutbox migrate` creates the publication for its own table; an existing one is used as it is"),
        ("slot.drop.on.stop", "pgoutbox keeps its slot across restarts"),
        ("tasks.max", "pgoutbox runs one relay per slot (a standby waits for the serving lock)"),
        ("name", "the connector's name"),
        ("tombstones.on.delete", "pgoutbox relays inserts only; deletes of outbox rows are never published"),
    ];
    for (option, why) in REASONS {
        if options.contains_key(*option) {
            used.push(*option);
            warnings.push(format!("{option}: not carried over: {why}"));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const CONNECTOR: &str = "\
# Debezium outbox connector
name=outbox-connector
connector.class=io.debezium.connector.postgresql.PostgresConnector
database.hostname=db.internal
database.port=5433
database.user=debezium
database.password=s3cret-Pa55
database.dbname=shop
database.sslmode=verify-full
plugin.name=pgoutput
slot.name=outbox_slot
publication.name=outbox_pub
table.include.list=public.outboxevent
topic.prefix=shop
heartbeat.interval.ms=10000
transforms=outbox
transforms.outbox.type=io.debezium.transforms.outbox.EventRouter
transforms.outbox.route.topic.replacement=events.${routedByValue}
transforms.outbox.table.fields.additional.placement=type:header:eventType
transforms.outbox.table.expand.json.payload=true
value.converter=org.apache.kafka.connect.storage.StringConverter
key.converter=org.apache.kafka.connect.storage.StringConverter
";

    #[test]
    fn a_connector_becomes_a_pgoutbox_configuration_without_its_password() {
        let imported = convert(&parse(CONNECTOR).unwrap()).unwrap();
        let t = &imported.toml;
        assert!(!t.contains("s3cret"), "{t}");
        let cfg: toml::Value = toml::from_str(t).expect("valid TOML");
        let config = crate::config::Config::from_toml(t).expect("pgoutbox reads it");
        assert_eq!(config.kafka.format, crate::config::RecordFormat::Debezium);
        assert!(!config.outbox.mark_completed);
        assert_eq!(
            cfg["database"]["url"].as_str(),
            Some("postgres://debezium@db.internal:5433/shop?sslmode=verify-full")
        );
        assert_eq!(cfg["cdc"]["slot"].as_str(), Some("outbox_slot"));
        assert_eq!(cfg["cdc"]["publication"].as_str(), Some("outbox_pub"));
        assert_eq!(cfg["outbox"]["table"].as_str(), Some("outboxevent"));
        assert_eq!(cfg["kafka"]["format"].as_str(), Some("debezium"));
        let router = &cfg["kafka"]["debezium"];
        assert_eq!(
            router["route.topic.replacement"].as_str(),
            Some("events.${routedByValue}")
        );
        assert_eq!(
            router["table.fields.additional.placement"].as_str(),
            Some("type:header:eventType")
        );
        assert_eq!(router["converter"].as_str(), Some("string"));
        let w = imported.warnings.join("\n");
        assert_eq!(
            router["table.expand.json.payload"].as_bool(),
            Some(true),
            "carried over, now that pgoutbox reproduces it"
        );
        assert_eq!(
            cfg["outbox"]["columns"]["preset"].as_str(),
            Some("debezium")
        );
        for option in ["database.password", "heartbeat.interval.ms", "topic.prefix"] {
            assert!(w.contains(option), "{option} is not in the warnings:\n{w}");
        }
        assert!(!w.contains("s3cret"));
        assert!(
            !w.contains("transforms.outbox.type"),
            "the router itself is carried over:\n{w}"
        );
    }

    #[test]
    fn the_rest_api_json_imports_the_same() {
        let options = parse(CONNECTOR).unwrap();
        let json = serde_json::json!({"name": "outbox-connector", "config": options});
        let from_json = convert(&parse(&json.to_string()).unwrap()).unwrap();
        assert_eq!(from_json, convert(&options).unwrap());
    }

    #[test]
    fn other_plugins_and_malformed_lines_are_clear_errors() {
        let decoderbufs = CONNECTOR.replace("plugin.name=pgoutput\n", "");
        let e = convert(&parse(&decoderbufs).unwrap()).unwrap_err();
        assert!(e.to_string().starts_with("plugin.name: is unset"), "{e}");
        let e = parse("a=b\nthis line has no separator\n").unwrap_err();
        assert!(matches!(e, ImportError::Malformed { line: 2, .. }), "{e}");
        let e = parse("{\"config\": [1]}").unwrap_err();
        assert!(e.to_string().contains("expected an object"), "{e}");
        let e = parse("{\"config\": ").unwrap_err();
        assert!(e.to_string().contains("invalid JSON"), "{e}");
    }

    #[test]
    fn properties_continuations_and_separators() {
        let p = parse("a = 1\nb: two\nd=x,\\\n   y\n! comment\n").unwrap();
        assert_eq!(p["a"], "1");
        assert_eq!(p["b"], "two");
        assert_eq!(p["d"], "x,y");
    }
}
