//! Golden pgoutput fixtures: bytes captured from real PostgreSQL servers by
//! `scripts/capture-pgoutput-fixtures`, one directory per major version
//! (`tests/fixtures/pgoutput/pg<major>/<scenario>.proto<N>.hex`, one hex
//! message per line).
//!
//! Each test decodes a scenario with the protocol version in its file name
//! and checks what the script did: the order of message kinds, relation
//! columns, the values inserted, message prefixes and contents. Relation
//! and Type messages are left out of the order checks because when
//! PostgreSQL sends them (and whether it also describes the partition next
//! to the root) is an implementation detail that differs between majors.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use pgoutbox::pgoutput::{Decoder, LogicalMessage, Relation, Truncate, Tuple, TupleValue, Update};
use pgoutbox::Lsn;

/// Every scenario the capture script writes, by file name.
const SCENARIOS: &[&str] = &[
    "insert.proto1.hex",
    "update_delete_default.proto1.hex",
    "update_delete_full.proto1.hex",
    "toast.proto1.hex",
    "truncate.proto1.hex",
    "rollback.proto1.hex",
    "origin.proto1.hex",
    "binary.proto1.hex",
    "binary.proto2.hex",
    "stream_commit.proto2.hex",
    "stream_abort.proto2.hex",
    // PostgreSQL 15+
    "two_phase.proto3.hex",
    "stream_prepare.proto3.hex",
    // PostgreSQL 16+
    "stream_abort_parallel.proto4.hex",
    "stream_commit.proto4.hex",
];

/// Scenarios every major version (14+) has.
const ALWAYS: usize = 11;

const OUTBOX_COLUMNS: [&str; 15] = [
    "id",
    "tracking_id",
    "aggregate_id",
    "aggregate_type",
    "event_type",
    "payload",
    "metadata",
    "status",
    "retry_count",
    "max_retries",
    "created_at",
    "processed_at",
    "locked_until",
    "lock_token",
    "last_error",
];

const AGGREGATE_ID: &str = "6f1c0a52-3d2e-4c1b-9b7a-0d6c2f1e8a01";

fn fixture_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/pgoutput")
}

/// The `pg<major>` directories, in order.
fn major_dirs() -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = std::fs::read_dir(fixture_root())
        .expect("tests/fixtures/pgoutput exists")
        .map(|e| e.expect("readable dir entry").path())
        .filter(|p| p.is_dir())
        .collect();
    dirs.sort();
    assert!(
        dirs.iter().any(|d| d.ends_with("pg15")),
        "the PostgreSQL 15 fixtures are missing"
    );
    dirs
}

fn hex(line: &str) -> Bytes {
    assert!(line.len() % 2 == 0, "odd hex length");
    let digit = |c: u8| match c {
        b'0'..=b'9' => c - b'0',
        b'a'..=b'f' => c - b'a' + 10,
        b'A'..=b'F' => c - b'A' + 10,
        _ => panic!("not a hex digit: {}", c as char),
    };
    line.as_bytes()
        .chunks(2)
        .map(|p| digit(p[0]) << 4 | digit(p[1]))
        .collect::<Vec<u8>>()
        .into()
}

fn proto_version(file: &str) -> u32 {
    let proto = file
        .split('.')
        .find_map(|part| part.strip_prefix("proto"))
        .unwrap_or_else(|| panic!("{file}: no .proto<N> in the name"));
    proto.parse().expect("protocol version number")
}

/// Decodes a fixture file with the version in its name, or None if this
/// major has no such file.
fn load(dir: &Path, file: &str) -> Option<Vec<LogicalMessage>> {
    let path = dir.join(file);
    let text = std::fs::read_to_string(&path).ok()?;
    let mut decoder = Decoder::new(proto_version(file));
    let messages = text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.is_empty() && !l.starts_with('#'))
        .map(|(i, l)| {
            decoder
                .decode(hex(l))
                .unwrap_or_else(|e| panic!("{}:{}: {e}", path.display(), i + 1))
        })
        .collect();
    assert!(
        !decoder.in_stream(),
        "{}: ends inside a streamed block",
        path.display()
    );
    Some(messages)
}

/// Runs `check` on the scenario in every major that has it; at least one must.
fn each_major(file: &str, check: impl Fn(&Path, &[LogicalMessage])) {
    let mut found = 0;
    for dir in major_dirs() {
        if let Some(messages) = load(&dir, file) {
            check(&dir, &messages);
            found += 1;
        }
    }
    assert!(found > 0, "no fixture {file} in any major");
}

/// The message kinds as type characters, without Relation and Type.
fn kinds(messages: &[LogicalMessage]) -> String {
    messages
        .iter()
        .map(|m| m.tag() as char)
        .filter(|&c| c != 'R' && c != 'Y')
        .collect()
}

/// Relations by id, as last described.
fn relations(messages: &[LogicalMessage]) -> HashMap<u32, Relation> {
    let mut rels = HashMap::new();
    for m in messages {
        if let LogicalMessage::Relation(r) = m {
            rels.insert(r.id, r.clone());
        }
    }
    rels
}

/// A row as column name -> value, using its relation.
struct Row<'a> {
    relation: &'a Relation,
    tuple: &'a Tuple,
}

impl<'a> Row<'a> {
    fn new(rels: &'a HashMap<u32, Relation>, relation_id: u32, tuple: &'a Tuple) -> Self {
        let relation = rels
            .get(&relation_id)
            .expect("a Relation message came first");
        assert_eq!(relation.columns.len(), tuple.len(), "tuple width");
        Row { relation, tuple }
    }

    fn value(&self, column: &str) -> &'a TupleValue {
        let i = self
            .relation
            .columns
            .iter()
            .position(|c| c.name == column)
            .unwrap_or_else(|| panic!("no column {column}"));
        &self.tuple.0[i]
    }

    fn text(&self, column: &str) -> Option<&'a str> {
        match self.value(column) {
            TupleValue::Text(b) => Some(std::str::from_utf8(b).expect("UTF-8 text value")),
            TupleValue::Null => None,
            other => panic!("column {column} is {other:?}, not text or null"),
        }
    }
}

fn inserts(messages: &[LogicalMessage]) -> Vec<&pgoutbox::pgoutput::Insert> {
    messages
        .iter()
        .filter_map(|m| match m {
            LogicalMessage::Insert(i) => Some(i),
            _ => None,
        })
        .collect()
}

fn updates(messages: &[LogicalMessage]) -> Vec<&Update> {
    messages
        .iter()
        .filter_map(|m| match m {
            LogicalMessage::Update(u) => Some(u),
            _ => None,
        })
        .collect()
}

fn logical_messages(messages: &[LogicalMessage]) -> Vec<&pgoutbox::pgoutput::Message> {
    messages
        .iter()
        .filter_map(|m| match m {
            LogicalMessage::Message(x) => Some(x),
            _ => None,
        })
        .collect()
}

fn relation_name(rels: &HashMap<u32, Relation>, id: u32) -> &str {
    &rels.get(&id).expect("described relation").name
}

/// Checks Begin/Commit pairs: every transaction opens and closes, and the
/// Commit is at the Begin's final LSN.
fn check_transactions(where_: &Path, messages: &[LogicalMessage]) {
    let mut open: Option<(Lsn, u32)> = None;
    for m in messages {
        match m {
            LogicalMessage::Begin(b) => {
                assert!(open.is_none(), "{}: nested Begin", where_.display());
                assert!(b.xid != 0 && !b.final_lsn.is_zero());
                open = Some((b.final_lsn, b.xid));
            }
            LogicalMessage::Commit(c) => {
                let (final_lsn, _) = open.take().expect("Commit without Begin");
                assert_eq!(c.commit_lsn, final_lsn, "{}", where_.display());
                assert!(c.end_lsn > c.commit_lsn);
                assert_eq!(c.flags, 0);
            }
            _ => {}
        }
    }
    assert!(
        open.is_none(),
        "{}: unterminated transaction",
        where_.display()
    );
}

/// Checks streamed blocks: every change inside one carries an xid (the
/// block's, or that of the subtransaction that made the change), and none
/// outside does; returns the xids of the streamed transactions in order of
/// first segment.
fn check_streams(where_: &Path, messages: &[LogicalMessage]) -> Vec<u32> {
    let mut block: Option<u32> = None;
    let mut xids = Vec::new();
    for m in messages {
        let change_xid = match m {
            LogicalMessage::StreamStart(s) => {
                assert!(block.is_none());
                if s.first_segment && !xids.contains(&s.xid) {
                    xids.push(s.xid);
                }
                assert!(
                    xids.contains(&s.xid),
                    "a stream's first segment is marked first"
                );
                block = Some(s.xid);
                continue;
            }
            LogicalMessage::StreamStop => {
                block.take().expect("Stream Stop closes a block");
                continue;
            }
            LogicalMessage::Relation(r) => r.xid,
            LogicalMessage::Type(t) => t.xid,
            LogicalMessage::Insert(i) => i.xid,
            LogicalMessage::Update(u) => u.xid,
            LogicalMessage::Delete(d) => d.xid,
            LogicalMessage::Truncate(t) => t.xid,
            LogicalMessage::Message(x) => x.xid,
            _ => continue,
        };
        assert_eq!(
            change_xid.is_some(),
            block.is_some(),
            "{}: {m:?}",
            where_.display()
        );
    }
    xids
}

#[test]
fn every_fixture_file_is_a_known_scenario_and_decodes() {
    for dir in major_dirs() {
        let mut count = 0;
        for entry in std::fs::read_dir(&dir).unwrap() {
            let name = entry.unwrap().file_name().into_string().unwrap();
            assert!(
                SCENARIOS.contains(&name.as_str()),
                "{name}: add a test for it"
            );
            assert!(!load(&dir, &name).unwrap().is_empty(), "{name} is empty");
            count += 1;
        }
        assert!(count >= ALWAYS, "{}: only {count} fixtures", dir.display());
    }
}

#[test]
fn insert_fixture_has_the_outbox_columns_rows_and_messages() {
    each_major("insert.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "BIIMCM", "{}", dir.display());
        check_transactions(dir, msgs);
        let rels = relations(msgs);

        let ins = inserts(msgs);
        let outbox = &rels[&ins[0].relation_id];
        // Published through the partition root: the changes name the root.
        assert_eq!(
            (outbox.namespace.as_str(), outbox.name.as_str()),
            ("pgoutbox_fixture", "outbox")
        );
        let names: Vec<&str> = outbox.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names, OUTBOX_COLUMNS);
        let keys: Vec<&str> = outbox
            .columns
            .iter()
            .filter(|c| c.is_key())
            .map(|c| c.name.as_str())
            .collect();
        assert_eq!(keys, ["id", "created_at"]);
        assert_eq!(outbox.replica_identity, Relation::REPLICA_IDENTITY_DEFAULT);
        let oids: Vec<u32> = outbox.columns.iter().map(|c| c.type_oid).collect();
        // int8, uuid, uuid, text, text, jsonb, jsonb, text, int4, int4,
        // timestamptz x3, int8, text
        assert_eq!(
            oids,
            [20, 2950, 2950, 25, 25, 3802, 3802, 25, 23, 23, 1184, 1184, 1184, 20, 25]
        );

        let first = Row::new(&rels, ins[0].relation_id, &ins[0].new);
        assert_eq!(first.text("aggregate_type"), Some("order"));
        assert_eq!(first.text("event_type"), Some("OrderPlaced"));
        assert_eq!(first.text("aggregate_id"), Some(AGGREGATE_ID));
        assert_eq!(
            first.text("payload"),
            Some(r#"{"total": "12.50", "order_id": 1}"#)
        );
        assert_eq!(first.text("metadata"), Some(r#"{"source": "fixture"}"#));
        assert_eq!(first.text("status"), Some("pending"));
        assert_eq!(first.text("retry_count"), Some("0"));
        assert_eq!(first.text("max_retries"), Some("5"));
        assert_eq!(first.text("created_at"), Some("2024-01-15 10:00:00+00"));
        assert_eq!(first.text("processed_at"), None);
        assert_eq!(first.text("lock_token"), None);
        assert_eq!(first.text("tracking_id").map(str::len), Some(36));
        let id: u64 = first.text("id").unwrap().parse().unwrap();

        let second = Row::new(&rels, ins[1].relation_id, &ins[1].new);
        assert_eq!(second.text("aggregate_type"), Some("invoice"));
        assert_eq!(second.text("event_type"), Some("InvoiceIssued"));
        assert_eq!(second.text("id").unwrap().parse::<u64>().unwrap(), id + 1);

        let ms = logical_messages(msgs);
        assert_eq!(ms.len(), 2);
        assert!(ms[0].transactional && !ms[1].transactional);
        assert_eq!(ms[0].prefix, "outbox");
        assert_eq!(&ms[0].content[..], b"transactional hello");
        assert_eq!(ms[1].prefix, "outbox");
        assert_eq!(&ms[1].content[..], b"non-transactional hello");
        assert!(ms[0].lsn < ms[1].lsn);
        assert_eq!(ms[0].xid, None);
    });
}

#[test]
fn default_identity_updates_send_a_key_only_when_the_key_changes() {
    each_major("update_delete_default.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "BICBUCBUCBDC", "{}", dir.display());
        check_transactions(dir, msgs);
        let rels = relations(msgs);
        let ins = inserts(msgs);
        let inserted = Row::new(&rels, ins[0].relation_id, &ins[0].new);
        assert_eq!(inserted.text("aggregate_type"), Some("customer"));
        let id: u64 = inserted.text("id").unwrap().parse().unwrap();

        let ups = updates(msgs);
        assert!(ups[0].key.is_none() && ups[0].old.is_none());
        let new = Row::new(&rels, ups[0].relation_id, &ups[0].new);
        assert_eq!(new.text("status"), Some("processing"));
        assert_eq!(new.text("retry_count"), Some("1"));
        assert_eq!(new.text("lock_token"), Some("42"));

        // The id (part of the key) changed: the old key comes along, with
        // only the key columns set.
        let key = ups[1].key.as_ref().expect("old key");
        assert!(ups[1].old.is_none());
        let key = Row::new(&rels, ups[1].relation_id, key);
        assert_eq!(key.text("id"), Some(id.to_string().as_str()));
        assert_eq!(key.text("created_at"), Some("2024-01-15 10:00:00+00"));
        assert_eq!(key.text("aggregate_type"), None);
        let new = Row::new(&rels, ups[1].relation_id, &ups[1].new);
        assert_eq!(new.text("id"), Some((id + 1000).to_string().as_str()));

        let LogicalMessage::Delete(del) = &msgs[msgs.len() - 2] else {
            panic!("expected a Delete before the last Commit");
        };
        assert!(del.old.is_none());
        let key = Row::new(&rels, del.relation_id, del.key.as_ref().expect("key"));
        assert_eq!(key.text("id"), Some((id + 1000).to_string().as_str()));
        assert_eq!(key.text("status"), None);
    });
}

#[test]
fn full_identity_updates_and_deletes_send_the_old_row() {
    each_major("update_delete_full.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "BICBUCBDC", "{}", dir.display());
        check_transactions(dir, msgs);
        let rels = relations(msgs);
        let ups = updates(msgs);
        let outbox = &rels[&ups[0].relation_id];
        assert_eq!(outbox.name, "outbox");
        assert_eq!(outbox.replica_identity, Relation::REPLICA_IDENTITY_FULL);
        assert!(outbox.columns.iter().all(|c| c.is_key()));

        assert!(ups[0].key.is_none());
        let old = Row::new(
            &rels,
            ups[0].relation_id,
            ups[0].old.as_ref().expect("old row"),
        );
        assert_eq!(old.text("status"), Some("pending"));
        assert_eq!(old.text("aggregate_type"), Some("shipment"));
        assert_eq!(old.text("processed_at"), None);
        let new = Row::new(&rels, ups[0].relation_id, &ups[0].new);
        assert_eq!(new.text("status"), Some("done"));
        assert_eq!(new.text("processed_at"), Some("2024-01-15 10:05:00+00"));
        assert_eq!(new.text("payload"), Some(r#"{"parcel": "P-9"}"#));

        let LogicalMessage::Delete(del) = &msgs[msgs.len() - 2] else {
            panic!("expected a Delete before the last Commit");
        };
        assert!(del.key.is_none());
        let old = Row::new(&rels, del.relation_id, del.old.as_ref().expect("old row"));
        assert_eq!(old.text("status"), Some("done"));
        assert_eq!(old.text("event_type"), Some("ShipmentSent"));
    });
}

#[test]
fn an_update_that_leaves_a_toasted_value_alone_sends_it_as_unchanged() {
    each_major("toast.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "BICBUC", "{}", dir.display());
        let rels = relations(msgs);
        let ins = inserts(msgs);
        let row = Row::new(&rels, ins[0].relation_id, &ins[0].new);
        let error = row.text("last_error").expect("last_error");
        assert_eq!(error.len(), 200 * 32);
        assert!(error.starts_with("c4ca4238a0b923820dcc509a6f75849b")); // md5('1')

        let ups = updates(msgs);
        let new = Row::new(&rels, ups[0].relation_id, &ups[0].new);
        assert_eq!(new.value("last_error"), &TupleValue::UnchangedToast);
        assert_eq!(new.text("status"), Some("failed"));
        assert_eq!(new.text("retry_count"), Some("2"));
    });
}

#[test]
fn truncate_fixture_carries_options_and_relation_ids() {
    each_major("truncate.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "BICBICBTCBTC", "{}", dir.display());
        check_transactions(dir, msgs);
        let rels = relations(msgs);
        let mood = msgs
            .iter()
            .find_map(|m| match m {
                LogicalMessage::Type(t) => Some(t),
                _ => None,
            })
            .expect("a Type message for the enum");
        assert_eq!(
            (mood.namespace.as_str(), mood.name.as_str()),
            ("pgoutbox_fixture", "fixture_mood")
        );
        let extra = rels.values().find(|r| r.name == "fixture_extra").unwrap();
        assert_eq!(extra.columns[1].type_oid, mood.id);

        let truncates: Vec<&Truncate> = msgs
            .iter()
            .filter_map(|m| match m {
                LogicalMessage::Truncate(t) => Some(t),
                _ => None,
            })
            .collect();
        let mut names: Vec<&str> = truncates[0]
            .relation_ids
            .iter()
            .map(|&id| relation_name(&rels, id))
            .collect();
        names.sort();
        assert_eq!(names, ["fixture_extra", "outbox"]);
        assert!(truncates[0].cascade() && truncates[0].restart_identity());
        assert_eq!(truncates[1].relation_ids, [extra.id]);
        assert_eq!(truncates[1].options, 0);
    });
}

#[test]
fn a_rolled_back_transaction_sends_only_its_non_transactional_message() {
    each_major("rollback.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "MBIC", "{}", dir.display());
        let ms = logical_messages(msgs);
        assert_eq!(ms.len(), 1);
        assert!(!ms[0].transactional);
        assert_eq!(
            &ms[0].content[..],
            b"emitted inside a rolled-back transaction"
        );
        let rels = relations(msgs);
        let ins = inserts(msgs);
        let row = Row::new(&rels, ins[0].relation_id, &ins[0].new);
        assert_eq!(row.text("aggregate_type"), Some("after_rollback"));
    });
}

#[test]
fn origin_fixture_names_the_replication_origin() {
    each_major("origin.proto1.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "BOIC", "{}", dir.display());
        let LogicalMessage::Origin(origin) = &msgs[1] else {
            panic!("expected Origin after Begin");
        };
        assert_eq!(origin.name, "pgoutbox_fixture_origin");
        assert_eq!(origin.commit_lsn, "0/ABCDEF".parse().unwrap());
    });
}

fn check_binary(dir: &Path, msgs: &[LogicalMessage], updates_expected: usize) {
    let expected = format!("BICBICB{}C", "U".repeat(updates_expected));
    assert_eq!(kinds(msgs), expected, "{}", dir.display());
    let rels = relations(msgs);
    let ins = inserts(msgs);
    let row = Row::new(&rels, ins[0].relation_id, &ins[0].new);
    assert!(row
        .tuple
        .0
        .iter()
        .all(|v| matches!(v, TupleValue::Binary(_) | TupleValue::Null)));
    assert_eq!(row.value("aggregate_type").as_binary(), Some(&b"order"[..]));
    assert_eq!(
        row.value("retry_count").as_binary(),
        Some(&0i32.to_be_bytes()[..])
    );
    assert_eq!(
        row.value("max_retries").as_binary(),
        Some(&5i32.to_be_bytes()[..])
    );
    let uuid = row.value("aggregate_id").as_binary().unwrap();
    assert_eq!(uuid[..4], [0x6f, 0x1c, 0x0a, 0x52]);
    // jsonb's binary format is a version byte, then the text.
    assert_eq!(
        row.value("metadata").as_binary(),
        Some(&b"\x01{\"source\": \"fixture\"}"[..])
    );
    let extra = Row::new(&rels, ins[1].relation_id, &ins[1].new);
    assert_eq!(extra.value("mood").as_binary(), Some(&b"calm"[..]));
    for up in updates(msgs) {
        let new = Row::new(&rels, up.relation_id, &up.new);
        assert_eq!(
            new.value("retry_count").as_binary(),
            Some(&3i32.to_be_bytes()[..])
        );
        assert_eq!(
            new.value("lock_token").as_binary(),
            Some(&9001i64.to_be_bytes()[..])
        );
    }
}

#[test]
fn binary_option_sends_values_in_binary_format_in_protocol_1_and_2() {
    each_major("binary.proto1.hex", |dir, msgs| check_binary(dir, msgs, 1));
    // The protocol 2 capture updates its own row and protocol 1's.
    each_major("binary.proto2.hex", |dir, msgs| check_binary(dir, msgs, 2));
}

fn check_stream_commit(dir: &Path, msgs: &[LogicalMessage], bulk_rows: usize, has_truncate: bool) {
    let xids = check_streams(dir, msgs);
    assert_eq!(xids.len(), 1, "{}: one streamed transaction", dir.display());
    let k = kinds(msgs);
    assert!(
        k.starts_with('S') && k.ends_with("Ec"),
        "{}: {k}",
        dir.display()
    );
    assert!(k.matches('S').count() >= 1, "{}: streamed", dir.display());
    let LogicalMessage::StreamCommit(commit) = msgs.last().unwrap() else {
        panic!("ends with Stream Commit");
    };
    assert_eq!(commit.xid, xids[0]);
    assert!(commit.end_lsn > commit.commit_lsn);

    let rels = relations(msgs);
    assert!(rels.values().all(|r| r.xid == Some(xids[0])));
    let ins = inserts(msgs);
    let mut outbox_rows = Vec::new();
    let mut bulk = 0;
    for i in &ins {
        let row = Row::new(&rels, i.relation_id, &i.new);
        match row.relation.name.as_str() {
            "outbox" => outbox_rows.push(row.text("aggregate_type").unwrap()),
            "fixture_extra" => {
                assert_eq!(row.text("note"), Some("bulk"));
                bulk += 1;
            }
            other => panic!("insert into {other}"),
        }
    }
    assert_eq!(bulk, bulk_rows);
    let want: &[&str] = if has_truncate {
        &["stream_first", "stream_last"]
    } else {
        &["stream_first"]
    };
    assert_eq!(outbox_rows, want);
    assert_eq!(k.matches('T').count(), usize::from(has_truncate));
}

#[test]
fn a_large_transaction_is_streamed_in_blocks_whose_changes_carry_its_xid() {
    each_major("stream_commit.proto2.hex", |dir, msgs| {
        check_stream_commit(dir, msgs, 1400, true);
        let blocks = kinds(msgs).matches('S').count();
        assert!(
            blocks >= 2,
            "{}: streamed in {blocks} block(s)",
            dir.display()
        );
        let ms = logical_messages(msgs);
        assert_eq!(ms.len(), 1);
        assert!(ms[0].transactional && ms[0].xid.is_some());
        assert_eq!(&ms[0].content[..], b"inside a streamed transaction");
        assert!(msgs
            .iter()
            .any(|m| matches!(m, LogicalMessage::Type(t) if t.xid.is_some())));
    });
    // PostgreSQL 16+: protocol 4 streams the same way.
    for dir in major_dirs() {
        if let Some(msgs) = load(&dir, "stream_commit.proto4.hex") {
            check_stream_commit(&dir, &msgs, 1000, false);
        }
    }
}

#[test]
fn aborted_streamed_subtransactions_and_transactions_send_stream_abort() {
    each_major("stream_abort.proto2.hex", |dir, msgs| {
        let xids = check_streams(dir, msgs);
        assert_eq!(xids.len(), 1);
        let xid = xids[0];
        let aborts: Vec<_> = msgs
            .iter()
            .filter_map(|m| match m {
                LogicalMessage::StreamAbort(a) => Some(a),
                _ => None,
            })
            .collect();
        assert!(aborts.len() >= 2, "{}: {}", dir.display(), kinds(msgs));
        assert!(aborts.iter().all(|a| a.xid == xid && a.abort_lsn.is_none()));
        // Subtransactions first, the whole transaction last.
        assert!(aborts[..aborts.len() - 1].iter().all(|a| a.subxid != xid));
        assert_eq!(aborts.last().unwrap().subxid, xid);
        assert!(matches!(msgs.last(), Some(LogicalMessage::StreamAbort(_))));
        // Inside a block, a change made in a subtransaction carries the
        // subtransaction's xid, so the subscriber can drop it on its abort.
        let change_xids: Vec<u32> = inserts(msgs).iter().filter_map(|i| i.xid).collect();
        assert!(change_xids.contains(&xid));
        assert!(change_xids.contains(&aborts[0].subxid));
        assert!(!kinds(msgs).contains('c'));
        let rels = relations(msgs);
        let tops = inserts(msgs)
            .iter()
            .filter(|i| rels[&i.relation_id].name == "outbox")
            .map(|i| {
                Row::new(&rels, i.relation_id, &i.new)
                    .text("aggregate_type")
                    .unwrap()
            })
            .collect::<Vec<_>>();
        assert!(tops.contains(&"stream_top"), "{tops:?}");
    });
}

#[test]
fn two_phase_transactions_are_prepared_then_committed_or_rolled_back() {
    each_major("two_phase.proto3.hex", |dir, msgs| {
        assert_eq!(kinds(msgs), "bIPKbIPr", "{}", dir.display());
        let gids: Vec<(char, &str, u32)> = msgs
            .iter()
            .filter_map(|m| match m {
                LogicalMessage::BeginPrepare(b) => Some(('b', b.gid.as_str(), b.xid)),
                LogicalMessage::Prepare(p) => Some(('P', p.gid.as_str(), p.xid)),
                LogicalMessage::CommitPrepared(c) => Some(('K', c.gid.as_str(), c.xid)),
                LogicalMessage::RollbackPrepared(r) => Some(('r', r.gid.as_str(), r.xid)),
                _ => None,
            })
            .collect();
        let names: Vec<(char, &str)> = gids.iter().map(|g| (g.0, g.1)).collect();
        assert_eq!(
            names,
            [
                ('b', "fx_commit"),
                ('P', "fx_commit"),
                ('K', "fx_commit"),
                ('b', "fx_rollback"),
                ('P', "fx_rollback"),
                ('r', "fx_rollback"),
            ]
        );
        assert!(gids[..3].iter().all(|g| g.2 == gids[0].2));
        assert!(gids[3..].iter().all(|g| g.2 == gids[3].2));
        let rels = relations(msgs);
        let ins = inserts(msgs);
        let row = Row::new(&rels, ins[0].relation_id, &ins[0].new);
        assert_eq!(row.text("aggregate_type"), Some("prepared"));
    });
}

#[test]
fn a_large_prepared_transaction_is_streamed_then_stream_prepared() {
    each_major("stream_prepare.proto3.hex", |dir, msgs| {
        let xids = check_streams(dir, msgs);
        assert_eq!(xids.len(), 1);
        assert!(kinds(msgs).ends_with("EpK"), "{}", dir.display());
        let n = msgs.len();
        let (LogicalMessage::StreamPrepare(p), LogicalMessage::CommitPrepared(c)) =
            (&msgs[n - 2], &msgs[n - 1])
        else {
            panic!("ends with Stream Prepare, Commit Prepared");
        };
        assert_eq!((p.gid.as_str(), p.xid), ("fx_stream", xids[0]));
        assert_eq!((c.gid.as_str(), c.xid), ("fx_stream", xids[0]));
        assert_eq!(inserts(msgs).len(), 801);
    });
}

#[test]
fn parallel_streaming_aborts_carry_the_abort_lsn_and_time() {
    // PostgreSQL 16+ only; nothing to check until those are captured.
    for dir in major_dirs() {
        let Some(msgs) = load(&dir, "stream_abort_parallel.proto4.hex") else {
            continue;
        };
        let xids = check_streams(&dir, &msgs);
        let Some(LogicalMessage::StreamAbort(abort)) = msgs.last() else {
            panic!("{}: ends with Stream Abort", dir.display());
        };
        assert_eq!((abort.xid, abort.subxid), (xids[0], xids[0]));
        assert!(abort.abort_lsn.is_some_and(|l| !l.is_zero()));
        assert!(abort.abort_time.is_some());
    }
}
