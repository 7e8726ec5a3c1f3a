//! Unit and property tests of the pgoutput decoder.
//!
//! Hand-built byte strings check each layout against the documentation
//! independently of the test encoder; the encoder then drives round trips,
//! truncation at every offset, and fuzzing.

use bytes::Bytes;
use proptest::prelude::*;

use super::encode::encode;
use super::*;
use crate::lsn::Lsn;

// ---------------------------------------------------------------- helpers

/// Concatenates wire parts into one message.
fn wire(parts: &[&[u8]]) -> Bytes {
    Bytes::from(parts.concat())
}

fn be16(v: i16) -> [u8; 2] {
    v.to_be_bytes()
}
fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
fn bei32(v: i32) -> [u8; 4] {
    v.to_be_bytes()
}
fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}
fn bei64(v: i64) -> [u8; 8] {
    v.to_be_bytes()
}

/// A decoder of `version` that has just decoded a Stream Start for `xid`.
fn streaming_decoder(version: u32, xid: u32) -> Decoder {
    let mut d = Decoder::new(version);
    let start = wire(&[b"S", &be32(xid), &[1]]);
    assert_eq!(
        d.decode(start).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid,
            first_segment: true
        })
    );
    assert!(d.in_stream());
    d
}

fn decode1(version: u32, data: Bytes) -> Result<LogicalMessage, DecodeError> {
    Decoder::new(version).decode(data)
}

fn text(s: &str) -> TupleValue {
    TupleValue::Text(Bytes::copy_from_slice(s.as_bytes()))
}

/// True when `inner` points into `outer`'s memory (a zero-copy slice).
fn is_within(inner: &[u8], outer: &[u8]) -> bool {
    let outer = outer.as_ptr_range();
    let inner = inner.as_ptr_range();
    outer.start <= inner.start && inner.end <= outer.end
}

/// A tuple of text "1", NULL, unchanged TOAST and binary [0xde, 0xad].
fn tuple_wire() -> Vec<u8> {
    [
        &be16(4)[..],
        b"t",
        &bei32(1),
        b"1",
        b"n",
        b"u",
        b"b",
        &bei32(2),
        &[0xde, 0xad],
    ]
    .concat()
}

fn tuple_value() -> Tuple {
    Tuple(vec![
        text("1"),
        TupleValue::Null,
        TupleValue::UnchangedToast,
        TupleValue::Binary(Bytes::from_static(&[0xde, 0xad])),
    ])
}

// ------------------------------------------------------ message layouts

#[test]
fn begin_carries_final_lsn_commit_time_and_xid() {
    let data = wire(&[b"B", &be64(0x16_B374_D848), &bei64(-5), &be32(742)]);
    assert_eq!(
        decode1(1, data).unwrap(),
        LogicalMessage::Begin(Begin {
            final_lsn: Lsn(0x16_B374_D848),
            commit_time: -5,
            xid: 742
        })
    );
}

#[test]
fn commit_carries_flags_lsns_and_time() {
    let data = wire(&[b"C", &[0], &be64(10), &be64(20), &bei64(30)]);
    assert_eq!(
        decode1(1, data).unwrap(),
        LogicalMessage::Commit(Commit {
            flags: 0,
            commit_lsn: Lsn(10),
            end_lsn: Lsn(20),
            commit_time: 30
        })
    );
}

#[test]
fn origin_carries_commit_lsn_and_name() {
    let data = wire(&[b"O", &be64(0xABCDEF), b"upstream\0"]);
    assert_eq!(
        decode1(1, data).unwrap(),
        LogicalMessage::Origin(Origin {
            commit_lsn: Lsn(0xABCDEF),
            name: "upstream".into()
        })
    );
}

fn relation_body() -> Vec<u8> {
    [
        &be32(16392)[..],
        b"public\0",
        b"outbox\0",
        b"d",
        &be16(2),
        &[1],
        b"id\0",
        &be32(20),
        &bei32(-1),
        &[0],
        b"aggregate_type\0",
        &be32(25),
        &bei32(-1),
    ]
    .concat()
}

fn expected_relation(xid: Option<u32>) -> Relation {
    Relation {
        xid,
        id: 16392,
        namespace: "public".into(),
        name: "outbox".into(),
        replica_identity: Relation::REPLICA_IDENTITY_DEFAULT,
        columns: vec![
            RelationColumn {
                flags: RelationColumn::FLAG_KEY,
                name: "id".into(),
                type_oid: 20,
                type_modifier: -1,
            },
            RelationColumn {
                flags: 0,
                name: "aggregate_type".into(),
                type_oid: 25,
                type_modifier: -1,
            },
        ],
    }
}

#[test]
fn relation_outside_a_stream_has_no_xid_in_every_version() {
    for version in 1..=4 {
        let data = wire(&[b"R", &relation_body()]);
        let LogicalMessage::Relation(r) = decode1(version, data).unwrap() else {
            panic!("not a relation");
        };
        assert_eq!(r, expected_relation(None));
        assert!(r.columns[0].is_key() && !r.columns[1].is_key());
    }
}

#[test]
fn relation_inside_a_stream_carries_the_xid() {
    for version in 2..=4 {
        let mut d = streaming_decoder(version, 900);
        let data = wire(&[b"R", &be32(900), &relation_body()]);
        assert_eq!(
            d.decode(data).unwrap(),
            LogicalMessage::Relation(expected_relation(Some(900)))
        );
    }
}

#[test]
fn type_message_carries_oid_and_qualified_name() {
    let data = wire(&[b"Y", &be32(16400), b"app\0", b"mood\0"]);
    assert_eq!(
        decode1(1, data).unwrap(),
        LogicalMessage::Type(TypeMessage {
            xid: None,
            id: 16400,
            namespace: "app".into(),
            name: "mood".into()
        })
    );
    let mut d = streaming_decoder(2, 7);
    let data = wire(&[b"Y", &be32(7), &be32(16400), b"\0", b"mood\0"]);
    assert_eq!(
        d.decode(data).unwrap(),
        LogicalMessage::Type(TypeMessage {
            xid: Some(7),
            id: 16400,
            namespace: String::new(),
            name: "mood".into()
        })
    );
}

#[test]
fn insert_decodes_every_column_kind_as_zero_copy_slices() {
    for version in 1..=4 {
        let data = wire(&[b"I", &be32(16392), b"N", &tuple_wire()]);
        let msg = decode1(version, data.clone()).unwrap();
        let LogicalMessage::Insert(insert) = &msg else {
            panic!("not an insert: {msg:?}");
        };
        assert_eq!(insert.xid, None);
        assert_eq!(insert.relation_id, 16392);
        assert_eq!(insert.new, tuple_value());
        assert!(is_within(insert.new.0[0].as_text().unwrap(), &data));
        assert!(is_within(insert.new.0[3].as_binary().unwrap(), &data));
    }
}

#[test]
fn insert_inside_a_stream_carries_the_xid() {
    let mut d = streaming_decoder(2, 77);
    let data = wire(&[b"I", &be32(77), &be32(16392), b"N", &tuple_wire()]);
    assert_eq!(
        d.decode(data).unwrap(),
        LogicalMessage::Insert(Insert {
            xid: Some(77),
            relation_id: 16392,
            new: tuple_value()
        })
    );
}

#[test]
fn update_has_a_key_an_old_tuple_or_neither() {
    let new = tuple_wire();
    let plain = wire(&[b"U", &be32(1), b"N", &new]);
    let keyed = wire(&[b"U", &be32(1), b"K", &new, b"N", &new]);
    let full = wire(&[b"U", &be32(1), b"O", &new, b"N", &new]);
    let update = |key, old| {
        LogicalMessage::Update(Update {
            xid: None,
            relation_id: 1,
            key,
            old,
            new: tuple_value(),
        })
    };
    assert_eq!(decode1(1, plain).unwrap(), update(None, None));
    assert_eq!(
        decode1(1, keyed).unwrap(),
        update(Some(tuple_value()), None)
    );
    assert_eq!(decode1(1, full).unwrap(), update(None, Some(tuple_value())));
}

#[test]
fn delete_has_a_key_or_an_old_tuple() {
    let old = tuple_wire();
    let delete = |key, old| {
        LogicalMessage::Delete(Delete {
            xid: None,
            relation_id: 3,
            key,
            old,
        })
    };
    assert_eq!(
        decode1(1, wire(&[b"D", &be32(3), b"K", &old])).unwrap(),
        delete(Some(tuple_value()), None)
    );
    assert_eq!(
        decode1(1, wire(&[b"D", &be32(3), b"O", &old])).unwrap(),
        delete(None, Some(tuple_value()))
    );
}

#[test]
fn truncate_carries_options_and_every_relation_id() {
    let data = wire(&[b"T", &bei32(3), &[3], &be32(10), &be32(11), &be32(12)]);
    let LogicalMessage::Truncate(t) = decode1(1, data).unwrap() else {
        panic!("not a truncate");
    };
    assert_eq!(t.relation_ids, vec![10, 11, 12]);
    assert!(t.cascade() && t.restart_identity());
    assert_eq!(t.xid, None);

    let mut d = streaming_decoder(3, 5);
    let data = wire(&[b"T", &be32(5), &bei32(0), &[0]]);
    assert_eq!(
        d.decode(data).unwrap(),
        LogicalMessage::Truncate(Truncate {
            xid: Some(5),
            options: 0,
            relation_ids: vec![]
        })
    );
}

#[test]
fn message_carries_flags_lsn_prefix_and_zero_copy_content() {
    let data = wire(&[b"M", &[1], &be64(99), b"outbox\0", &bei32(5), b"hello"]);
    let msg = decode1(1, data.clone()).unwrap();
    let LogicalMessage::Message(m) = &msg else {
        panic!("not a message");
    };
    assert!(m.transactional);
    assert_eq!(
        (m.lsn, m.prefix.as_str(), &m.content[..]),
        (Lsn(99), "outbox", &b"hello"[..])
    );
    assert!(is_within(&m.content, &data));

    let data = wire(&[b"M", &[0], &be64(99), b"outbox\0", &bei32(0)]);
    let LogicalMessage::Message(m) = decode1(1, data).unwrap() else {
        panic!("not a message");
    };
    assert!(!m.transactional && m.content.is_empty());

    let mut d = streaming_decoder(2, 8);
    let data = wire(&[b"M", &be32(8), &[1], &be64(1), b"p\0", &bei32(1), b"x"]);
    let LogicalMessage::Message(m) = d.decode(data).unwrap() else {
        panic!("not a message");
    };
    assert_eq!(m.xid, Some(8));
}

#[test]
fn stream_start_and_stop_switch_the_xid_prefix_on_and_off() {
    let mut d = Decoder::new(2);
    let insert_plain = wire(&[b"I", &be32(1), b"N", &be16(0)]);
    let insert_streamed = wire(&[b"I", &be32(44), &be32(1), b"N", &be16(0)]);

    assert!(d.decode(insert_plain.clone()).is_ok());
    assert_eq!(
        d.decode(wire(&[b"S", &be32(44), &[0]])).unwrap(),
        LogicalMessage::StreamStart(StreamStart {
            xid: 44,
            first_segment: false
        })
    );
    let LogicalMessage::Insert(i) = d.decode(insert_streamed).unwrap() else {
        panic!("not an insert");
    };
    assert_eq!((i.xid, i.relation_id), (Some(44), 1));
    // Origin never carries an xid, even inside a stream.
    assert!(d.decode(wire(&[b"O", &be64(1), b"o\0"])).is_ok());
    assert_eq!(d.decode(wire(&[b"E"])).unwrap(), LogicalMessage::StreamStop);
    assert!(!d.in_stream());
    let LogicalMessage::Insert(i) = d.decode(insert_plain).unwrap() else {
        panic!("not an insert");
    };
    assert_eq!(i.xid, None);
}

#[test]
fn stream_commit_carries_xid_flags_lsns_and_time() {
    let data = wire(&[b"c", &be32(44), &[0], &be64(1), &be64(2), &bei64(3)]);
    assert_eq!(
        decode1(2, data).unwrap(),
        LogicalMessage::StreamCommit(StreamCommit {
            xid: 44,
            flags: 0,
            commit_lsn: Lsn(1),
            end_lsn: Lsn(2),
            commit_time: 3
        })
    );
}

#[test]
fn stream_abort_has_abort_lsn_and_time_only_from_protocol_4_with_parallel_streaming() {
    let short = wire(&[b"A", &be32(44), &be32(45)]);
    let long = wire(&[b"A", &be32(44), &be32(45), &be64(500), &bei64(600)]);
    for version in 2..=4 {
        assert_eq!(
            decode1(version, short.clone()).unwrap(),
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 44,
                subxid: 45,
                abort_lsn: None,
                abort_time: None
            })
        );
    }
    assert_eq!(
        decode1(4, long.clone()).unwrap(),
        LogicalMessage::StreamAbort(StreamAbort {
            xid: 44,
            subxid: 45,
            abort_lsn: Some(Lsn(500)),
            abort_time: Some(600)
        })
    );
    for version in 2..=3 {
        assert!(matches!(
            decode1(version, long.clone()),
            Err(DecodeError::TrailingBytes {
                count: 16,
                offset: 9,
                ..
            })
        ));
    }
    // An abort LSN without its timestamp is truncated, not ignored.
    let half = wire(&[b"A", &be32(44), &be32(45), &be64(500)]);
    assert!(matches!(
        decode1(4, half),
        Err(DecodeError::Truncated {
            field: "abort timestamp",
            ..
        })
    ));
}

#[test]
fn two_phase_messages_carry_lsns_times_xid_and_gid() {
    let begin = wire(&[b"b", &be64(1), &be64(2), &bei64(3), &be32(4), b"gid-1\0"]);
    assert_eq!(
        decode1(3, begin).unwrap(),
        LogicalMessage::BeginPrepare(BeginPrepare {
            prepare_lsn: Lsn(1),
            end_lsn: Lsn(2),
            prepare_time: 3,
            xid: 4,
            gid: "gid-1".into()
        })
    );
    let prepare = Prepare {
        flags: 0,
        prepare_lsn: Lsn(1),
        end_lsn: Lsn(2),
        prepare_time: 3,
        xid: 4,
        gid: "gid-1".into(),
    };
    let body = [
        &[0u8][..],
        &be64(1),
        &be64(2),
        &bei64(3),
        &be32(4),
        b"gid-1\0",
    ]
    .concat();
    assert_eq!(
        decode1(3, wire(&[b"P", &body])).unwrap(),
        LogicalMessage::Prepare(prepare.clone())
    );
    assert_eq!(
        decode1(4, wire(&[b"p", &body])).unwrap(),
        LogicalMessage::StreamPrepare(prepare)
    );
    let commit = wire(&[
        b"K",
        &[0],
        &be64(5),
        &be64(6),
        &bei64(7),
        &be32(4),
        b"gid-1\0",
    ]);
    assert_eq!(
        decode1(3, commit).unwrap(),
        LogicalMessage::CommitPrepared(CommitPrepared {
            flags: 0,
            commit_lsn: Lsn(5),
            end_lsn: Lsn(6),
            commit_time: 7,
            xid: 4,
            gid: "gid-1".into()
        })
    );
    let rollback = wire(&[
        b"r",
        &[0],
        &be64(5),
        &be64(6),
        &bei64(7),
        &bei64(8),
        &be32(4),
        b"gid-1\0",
    ]);
    assert_eq!(
        decode1(3, rollback).unwrap(),
        LogicalMessage::RollbackPrepared(RollbackPrepared {
            flags: 0,
            prepare_end_lsn: Lsn(5),
            rollback_end_lsn: Lsn(6),
            prepare_time: 7,
            rollback_time: 8,
            xid: 4,
            gid: "gid-1".into()
        })
    );
}

// ------------------------------------------------------- malformed input

#[test]
fn empty_input_is_an_error() {
    assert_eq!(decode1(1, Bytes::new()), Err(DecodeError::Empty));
}

#[test]
fn unknown_message_type_fails_closed() {
    for tag in [b'Z', b'x', 0, 0xff, b'N', b'W'] {
        assert_eq!(
            decode1(4, wire(&[&[tag]])),
            Err(DecodeError::UnknownTag { tag })
        );
    }
}

#[test]
fn message_types_newer_than_the_negotiated_version_are_rejected() {
    let cases: &[(u8, u32)] = &[
        (b'S', 2),
        (b'E', 2),
        (b'c', 2),
        (b'A', 2),
        (b'b', 3),
        (b'P', 3),
        (b'K', 3),
        (b'r', 3),
        (b'p', 3),
    ];
    for &(tag, min_version) in cases {
        for version in 1..min_version {
            match decode1(version, wire(&[&[tag]])) {
                Err(DecodeError::TagNotInProtocol {
                    tag: t,
                    min_version: m,
                    proto_version: v,
                    ..
                }) => assert_eq!((t, m, v), (tag, min_version, version)),
                other => panic!("tag {} in v{version}: {other:?}", tag as char),
            }
        }
    }
}

#[test]
fn unsupported_protocol_versions_fail_every_decode() {
    for version in [0, 5, 99] {
        let data = wire(&[b"B", &be64(1), &bei64(2), &be32(3)]);
        assert_eq!(
            decode1(version, data),
            Err(DecodeError::UnsupportedProtocolVersion(version))
        );
    }
}

#[test]
fn unknown_tuple_column_kind_is_an_error_naming_the_column() {
    let data = wire(&[b"I", &be32(1), b"N", &be16(2), b"n", b"x"]);
    assert_eq!(
        decode1(1, data),
        Err(DecodeError::UnknownTupleKind {
            message: "Insert",
            kind: b'x',
            column: 1,
            offset: 9
        })
    );
}

#[test]
fn negative_counts_and_lengths_are_rejected() {
    let cols = wire(&[b"I", &be32(1), b"N", &be16(-1)]);
    assert!(matches!(
        decode1(1, cols),
        Err(DecodeError::NegativeCount {
            field: "tuple column count",
            value: -1,
            offset: 6,
            ..
        })
    ));
    let len = wire(&[b"I", &be32(1), b"N", &be16(1), b"t", &bei32(-1)]);
    assert!(matches!(
        decode1(1, len),
        Err(DecodeError::NegativeCount {
            field: "column value length",
            value: -1,
            ..
        })
    ));
    let rels = wire(&[b"T", &bei32(i32::MIN), &[0]]);
    assert!(matches!(
        decode1(1, rels),
        Err(DecodeError::NegativeCount {
            field: "relation count",
            ..
        })
    ));
    let content = wire(&[b"M", &[0], &be64(1), b"p\0", &bei32(-7)]);
    assert!(matches!(
        decode1(1, content),
        Err(DecodeError::NegativeCount {
            field: "content length",
            value: -7,
            ..
        })
    ));
    let mut relation = wire(&[b"R", &relation_body()]).to_vec();
    let count_at = 1 + 4 + 7 + 7 + 1;
    relation[count_at..count_at + 2].copy_from_slice(&be16(-2));
    assert!(matches!(
        decode1(1, Bytes::from(relation)),
        Err(DecodeError::NegativeCount {
            field: "column count",
            value: -2,
            ..
        })
    ));
}

#[test]
fn huge_counts_fail_before_allocating_for_them() {
    // 30000 columns claimed, 10 bytes left.
    let data = wire(&[b"I", &be32(1), b"N", &be16(30000), &[b'n'; 10]]);
    assert_eq!(
        decode1(1, data),
        Err(DecodeError::ImplausibleCount {
            message: "Insert",
            field: "tuple column count",
            count: 30000,
            min_item_size: 1,
            remaining: 10,
            offset: 6
        })
    );
    let rel = wire(&[
        b"R",
        &be32(1),
        b"s\0",
        b"t\0",
        b"d",
        &be16(i16::MAX),
        &[0; 20],
    ]);
    assert!(matches!(
        decode1(1, rel),
        Err(DecodeError::ImplausibleCount {
            field: "column count",
            count: 32767,
            ..
        })
    ));
    let trunc = wire(&[b"T", &bei32(i32::MAX), &[0], &be32(1)]);
    assert!(matches!(
        decode1(1, trunc),
        Err(DecodeError::ImplausibleCount {
            field: "relation count",
            min_item_size: 4,
            ..
        })
    ));
    let value = wire(&[
        b"I",
        &be32(1),
        b"N",
        &be16(1),
        b"t",
        &bei32(i32::MAX),
        b"abc",
    ]);
    assert!(matches!(
        decode1(1, value),
        Err(DecodeError::Truncated {
            field: "text column value",
            needed: 2147483647,
            remaining: 3,
            ..
        })
    ));
}

#[test]
fn names_must_be_utf8_and_nul_terminated() {
    let bad_utf8 = wire(&[b"Y", &be32(1), b"ok\0", &[0xff, 0xfe, 0]]);
    assert_eq!(
        decode1(1, bad_utf8),
        Err(DecodeError::InvalidUtf8 {
            message: "Type",
            field: "type name",
            offset: 8
        })
    );
    let no_nul = wire(&[b"O", &be64(1), b"origin"]);
    assert_eq!(
        decode1(1, no_nul),
        Err(DecodeError::MissingNulTerminator {
            message: "Origin",
            field: "origin name",
            offset: 9
        })
    );
}

#[test]
fn trailing_bytes_after_a_complete_message_are_rejected() {
    let data = wire(&[b"B", &be64(1), &bei64(2), &be32(3), b"!"]);
    assert_eq!(
        decode1(1, data),
        Err(DecodeError::TrailingBytes {
            message: "Begin",
            count: 1,
            offset: 21
        })
    );
    assert!(matches!(
        streaming_decoder(2, 1).decode(wire(&[b"E", &[0]])),
        Err(DecodeError::TrailingBytes {
            message: "Stream Stop",
            count: 1,
            ..
        })
    ));
}

#[test]
fn wrong_tuple_markers_are_rejected() {
    let insert = wire(&[b"I", &be32(1), b"K", &be16(0)]);
    assert!(matches!(
        decode1(1, insert),
        Err(DecodeError::UnexpectedTupleMarker {
            found: b'K',
            offset: 5,
            ..
        })
    ));
    let update = wire(&[b"U", &be32(1), b"K", &be16(0), b"O", &be16(0)]);
    assert!(matches!(
        decode1(1, update),
        Err(DecodeError::UnexpectedTupleMarker {
            found: b'O',
            offset: 8,
            ..
        })
    ));
    let delete = wire(&[b"D", &be32(1), b"N", &be16(0)]);
    assert!(matches!(
        decode1(1, delete),
        Err(DecodeError::UnexpectedTupleMarker { found: b'N', .. })
    ));
}

#[test]
fn undefined_flag_bits_are_rejected() {
    let message = wire(&[b"M", &[2], &be64(1), b"p\0", &bei32(0)]);
    assert!(matches!(
        decode1(1, message),
        Err(DecodeError::InvalidFlags {
            field: "flags",
            value: 2,
            offset: 1,
            ..
        })
    ));
    let start = wire(&[b"S", &be32(1), &[7]]);
    assert!(matches!(
        decode1(2, start),
        Err(DecodeError::InvalidFlags {
            field: "first-segment flag",
            value: 7,
            ..
        })
    ));
}

#[test]
fn messages_out_of_step_with_the_stream_state_are_rejected() {
    let mut d = streaming_decoder(3, 1);
    for data in [
        wire(&[b"S", &be32(2), &[1]]),
        wire(&[b"B", &be64(1), &bei64(2), &be32(3)]),
        wire(&[b"C", &[0], &be64(1), &be64(2), &bei64(3)]),
        wire(&[b"c", &be32(1), &[0], &be64(1), &be64(2), &bei64(3)]),
        wire(&[b"A", &be32(1), &be32(1)]),
    ] {
        assert!(matches!(
            d.decode(data),
            Err(DecodeError::UnexpectedInStream { .. })
        ));
        assert!(d.in_stream(), "a failed message must not change the state");
    }
    assert_eq!(
        Decoder::new(2).decode(wire(&[b"E"])),
        Err(DecodeError::UnexpectedOutsideStream {
            message: "Stream Stop"
        })
    );
}

#[test]
fn a_failed_stream_start_does_not_enter_the_stream() {
    let mut d = Decoder::new(2);
    assert!(d.decode(wire(&[b"S", &be32(1)])).is_err());
    assert!(!d.in_stream());
    assert!(d.decode(wire(&[b"I", &be32(1), b"N", &be16(0)])).is_ok());
}

#[test]
fn error_messages_say_what_was_wrong_and_where() {
    let err = decode1(1, wire(&[b"I", &be32(1)])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "truncated Insert message: tuple marker at byte 5 needs 1 bytes, only 0 left"
    );
    let err = decode1(1, wire(&[b"S"])).unwrap_err();
    assert_eq!(
        err.to_string(),
        "Stream Start message (type 'S') needs pgoutput protocol version 2 or later, \
         but version 1 was negotiated"
    );
    let err = decode1(1, wire(&[b"I", &be32(1), b"N", &be16(30000)])).unwrap_err();
    assert!(err
        .to_string()
        .contains("tuple column count 30000 at byte 6 is implausible"));
    assert_eq!(
        decode1(1, wire(&[&[0x01]])).unwrap_err().to_string(),
        "unknown pgoutput message type 0x01 (?)"
    );
}

// ------------------------------------------ one valid message of each type

/// One realistic message of every type valid for `version`, each with
/// whether it must be decoded inside a streamed block.
fn samples(version: u32) -> Vec<(bool, LogicalMessage)> {
    let tuple = tuple_value();
    let mut out = vec![
        (
            false,
            LogicalMessage::Begin(Begin {
                final_lsn: Lsn(100),
                commit_time: 1,
                xid: 9,
            }),
        ),
        (
            false,
            LogicalMessage::Commit(Commit {
                flags: 0,
                commit_lsn: Lsn(100),
                end_lsn: Lsn(120),
                commit_time: 1,
            }),
        ),
        (
            false,
            LogicalMessage::Origin(Origin {
                commit_lsn: Lsn(5),
                name: "up".into(),
            }),
        ),
    ];
    let xids: &[Option<u32>] = if version >= 2 {
        &[None, Some(9)]
    } else {
        &[None]
    };
    for &xid in xids {
        out.extend(change_samples(xid, &tuple));
    }
    if version >= 2 {
        out.extend([
            (
                false,
                LogicalMessage::StreamStart(StreamStart {
                    xid: 9,
                    first_segment: true,
                }),
            ),
            (true, LogicalMessage::StreamStop),
            (
                false,
                LogicalMessage::StreamCommit(StreamCommit {
                    xid: 9,
                    flags: 0,
                    commit_lsn: Lsn(1),
                    end_lsn: Lsn(2),
                    commit_time: 3,
                }),
            ),
            (
                false,
                LogicalMessage::StreamAbort(StreamAbort {
                    xid: 9,
                    subxid: 10,
                    abort_lsn: None,
                    abort_time: None,
                }),
            ),
        ]);
    }
    if version >= 3 {
        out.extend(two_phase_samples());
    }
    if version >= 4 {
        out.push((
            false,
            LogicalMessage::StreamAbort(StreamAbort {
                xid: 9,
                subxid: 10,
                abort_lsn: Some(Lsn(7)),
                abort_time: Some(8),
            }),
        ));
    }
    out
}

/// One change message of each type, with `xid` (streamed when set).
fn change_samples(xid: Option<u32>, tuple: &Tuple) -> Vec<(bool, LogicalMessage)> {
    let streamed = xid.is_some();
    vec![
        (streamed, LogicalMessage::Relation(expected_relation(xid))),
        (
            streamed,
            LogicalMessage::Type(TypeMessage {
                xid,
                id: 1,
                namespace: "ns".into(),
                name: "t".into(),
            }),
        ),
        (
            streamed,
            LogicalMessage::Insert(Insert {
                xid,
                relation_id: 1,
                new: tuple.clone(),
            }),
        ),
        (
            streamed,
            LogicalMessage::Update(Update {
                xid,
                relation_id: 1,
                key: None,
                old: Some(tuple.clone()),
                new: tuple.clone(),
            }),
        ),
        (
            streamed,
            LogicalMessage::Delete(Delete {
                xid,
                relation_id: 1,
                key: Some(tuple.clone()),
                old: None,
            }),
        ),
        (
            streamed,
            LogicalMessage::Truncate(Truncate {
                xid,
                options: 1,
                relation_ids: vec![1, 2],
            }),
        ),
        (
            streamed,
            LogicalMessage::Message(Message {
                xid,
                transactional: true,
                lsn: Lsn(3),
                prefix: "outbox".into(),
                content: Bytes::from_static(b"{}"),
            }),
        ),
    ]
}

/// One message of each two-phase type (protocol 3+).
fn two_phase_samples() -> Vec<(bool, LogicalMessage)> {
    let prepare = Prepare {
        flags: 0,
        prepare_lsn: Lsn(1),
        end_lsn: Lsn(2),
        prepare_time: 3,
        xid: 9,
        gid: "g".into(),
    };
    vec![
        (
            false,
            LogicalMessage::BeginPrepare(BeginPrepare {
                prepare_lsn: Lsn(1),
                end_lsn: Lsn(2),
                prepare_time: 3,
                xid: 9,
                gid: "g".into(),
            }),
        ),
        (false, LogicalMessage::Prepare(prepare.clone())),
        (false, LogicalMessage::StreamPrepare(prepare)),
        (
            false,
            LogicalMessage::CommitPrepared(CommitPrepared {
                flags: 0,
                commit_lsn: Lsn(1),
                end_lsn: Lsn(2),
                commit_time: 3,
                xid: 9,
                gid: "g".into(),
            }),
        ),
        (
            false,
            LogicalMessage::RollbackPrepared(RollbackPrepared {
                flags: 0,
                prepare_end_lsn: Lsn(1),
                rollback_end_lsn: Lsn(2),
                prepare_time: 3,
                rollback_time: 4,
                xid: 9,
                gid: "g".into(),
            }),
        ),
    ]
}

fn decoder_for(version: u32, in_stream: bool) -> Decoder {
    if in_stream {
        streaming_decoder(version, 9)
    } else {
        Decoder::new(version)
    }
}

#[test]
fn every_sample_round_trips_in_every_version() {
    let mut seen = std::collections::BTreeSet::new();
    for version in 1..=4 {
        for (in_stream, msg) in samples(version) {
            let data = Bytes::from(encode(&msg));
            assert_eq!(decoder_for(version, in_stream).decode(data).unwrap(), msg);
            seen.insert(msg.tag());
        }
    }
    // All 19 message types are covered.
    assert_eq!(seen.len(), 19);
}

#[test]
fn truncation_at_every_offset_is_an_error_never_a_panic() {
    for version in 1..=4 {
        for (in_stream, msg) in samples(version) {
            let data = Bytes::from(encode(&msg));
            for cut in 0..data.len() {
                let result = decoder_for(version, in_stream).decode(data.slice(..cut));
                match result {
                    Err(_) => {}
                    // The only valid prefix: a protocol 4 Stream Abort
                    // without the parallel-streaming fields.
                    Ok(LogicalMessage::StreamAbort(StreamAbort {
                        abort_lsn: None, ..
                    })) if version >= 4 && cut == 9 => {}
                    Ok(other) => panic!("v{version} {msg:?} cut at {cut} decoded as {other:?}"),
                }
            }
        }
    }
}

#[test]
fn a_trailing_byte_after_any_message_is_an_error() {
    for version in 1..=4 {
        for (in_stream, msg) in samples(version) {
            let mut data = encode(&msg);
            data.push(0);
            let result = decoder_for(version, in_stream).decode(Bytes::from(data));
            assert!(
                result.is_err(),
                "v{version} {msg:?} accepted a trailing byte"
            );
        }
    }
}

// ----------------------------------------------------------- proptests

fn lsn() -> impl Strategy<Value = Lsn> {
    any::<u64>().prop_map(Lsn)
}

/// A name: any non-control characters (so never a NUL), including non-ASCII.
fn name() -> impl Strategy<Value = String> {
    "\\PC{0,12}"
}

fn payload() -> impl Strategy<Value = Bytes> {
    prop::collection::vec(any::<u8>(), 0..24).prop_map(Bytes::from)
}

fn tuple() -> impl Strategy<Value = Tuple> {
    let value = prop_oneof![
        Just(TupleValue::Null),
        Just(TupleValue::UnchangedToast),
        payload().prop_map(TupleValue::Text),
        payload().prop_map(TupleValue::Binary),
    ];
    prop::collection::vec(value, 0..16).prop_map(Tuple)
}

fn relation_column() -> impl Strategy<Value = RelationColumn> {
    (any::<u8>(), name(), any::<u32>(), any::<i32>()).prop_map(
        |(flags, name, type_oid, type_modifier)| RelationColumn {
            flags,
            name,
            type_oid,
            type_modifier,
        },
    )
}

/// A message that may appear inside a streamed block when `xid` is `Some`
/// (and outside one when it is `None`).
fn change(xid: Option<u32>) -> BoxedStrategy<LogicalMessage> {
    prop_oneof![
        (
            any::<u32>(),
            name(),
            name(),
            any::<u8>(),
            prop::collection::vec(relation_column(), 0..6)
        )
            .prop_map(move |(id, namespace, name, replica_identity, columns)| {
                LogicalMessage::Relation(Relation {
                    xid,
                    id,
                    namespace,
                    name,
                    replica_identity,
                    columns,
                })
            }),
        (any::<u32>(), name(), name()).prop_map(move |(id, namespace, name)| {
            LogicalMessage::Type(TypeMessage {
                xid,
                id,
                namespace,
                name,
            })
        }),
        (any::<u32>(), tuple()).prop_map(move |(relation_id, new)| {
            LogicalMessage::Insert(Insert {
                xid,
                relation_id,
                new,
            })
        }),
        (any::<u32>(), 0..3u8, tuple(), tuple()).prop_map(move |(relation_id, which, old, new)| {
            LogicalMessage::Update(Update {
                xid,
                relation_id,
                key: (which == 1).then(|| old.clone()),
                old: (which == 2).then_some(old),
                new,
            })
        }),
        (any::<u32>(), any::<bool>(), tuple()).prop_map(move |(relation_id, is_key, old)| {
            LogicalMessage::Delete(Delete {
                xid,
                relation_id,
                key: is_key.then(|| old.clone()),
                old: (!is_key).then_some(old),
            })
        }),
        (any::<u8>(), prop::collection::vec(any::<u32>(), 0..6)).prop_map(
            move |(options, relation_ids)| {
                LogicalMessage::Truncate(Truncate {
                    xid,
                    options,
                    relation_ids,
                })
            }
        ),
        (any::<bool>(), lsn(), name(), payload()).prop_map(
            move |(transactional, lsn, prefix, content)| {
                LogicalMessage::Message(Message {
                    xid,
                    transactional,
                    lsn,
                    prefix,
                    content,
                })
            }
        ),
        (lsn(), name())
            .prop_map(|(commit_lsn, name)| { LogicalMessage::Origin(Origin { commit_lsn, name }) }),
    ]
    .boxed()
}

/// A message that may appear outside a streamed block in `version`.
fn outside(version: u32) -> BoxedStrategy<LogicalMessage> {
    let mut options = vec![
        (lsn(), any::<i64>(), any::<u32>())
            .prop_map(|(final_lsn, commit_time, xid)| {
                LogicalMessage::Begin(Begin {
                    final_lsn,
                    commit_time,
                    xid,
                })
            })
            .boxed(),
        (any::<u8>(), lsn(), lsn(), any::<i64>())
            .prop_map(|(flags, commit_lsn, end_lsn, commit_time)| {
                LogicalMessage::Commit(Commit {
                    flags,
                    commit_lsn,
                    end_lsn,
                    commit_time,
                })
            })
            .boxed(),
        change(None),
    ];
    if version >= 2 {
        options.push(
            (any::<u32>(), any::<u8>(), lsn(), lsn(), any::<i64>())
                .prop_map(|(xid, flags, commit_lsn, end_lsn, commit_time)| {
                    LogicalMessage::StreamCommit(StreamCommit {
                        xid,
                        flags,
                        commit_lsn,
                        end_lsn,
                        commit_time,
                    })
                })
                .boxed(),
        );
        let parallel = if version >= 4 {
            prop::option::of((lsn(), any::<i64>())).boxed()
        } else {
            Just(None).boxed()
        };
        options.push(
            (any::<u32>(), any::<u32>(), parallel)
                .prop_map(|(xid, subxid, parallel)| {
                    LogicalMessage::StreamAbort(StreamAbort {
                        xid,
                        subxid,
                        abort_lsn: parallel.map(|p| p.0),
                        abort_time: parallel.map(|p| p.1),
                    })
                })
                .boxed(),
        );
    }
    if version >= 3 {
        options.extend(two_phase_strategies());
    }
    prop::strategy::Union::new(options).boxed()
}

/// One strategy per two-phase message type (protocol 3+).
fn two_phase_strategies() -> Vec<BoxedStrategy<LogicalMessage>> {
    let mut options = Vec::new();
    let prepare = || {
        (
            any::<u8>(),
            lsn(),
            lsn(),
            any::<i64>(),
            any::<u32>(),
            name(),
        )
            .prop_map(
                |(flags, prepare_lsn, end_lsn, prepare_time, xid, gid)| Prepare {
                    flags,
                    prepare_lsn,
                    end_lsn,
                    prepare_time,
                    xid,
                    gid,
                },
            )
    };
    options.push(prepare().prop_map(LogicalMessage::Prepare).boxed());
    options.push(prepare().prop_map(LogicalMessage::StreamPrepare).boxed());
    options.push(
        prepare()
            .prop_map(|p| {
                LogicalMessage::BeginPrepare(BeginPrepare {
                    prepare_lsn: p.prepare_lsn,
                    end_lsn: p.end_lsn,
                    prepare_time: p.prepare_time,
                    xid: p.xid,
                    gid: p.gid,
                })
            })
            .boxed(),
    );
    options.push(
        prepare()
            .prop_map(|p| {
                LogicalMessage::CommitPrepared(CommitPrepared {
                    flags: p.flags,
                    commit_lsn: p.prepare_lsn,
                    end_lsn: p.end_lsn,
                    commit_time: p.prepare_time,
                    xid: p.xid,
                    gid: p.gid,
                })
            })
            .boxed(),
    );
    options.push(
        (prepare(), any::<i64>())
            .prop_map(|(p, rollback_time)| {
                LogicalMessage::RollbackPrepared(RollbackPrepared {
                    flags: p.flags,
                    prepare_end_lsn: p.prepare_lsn,
                    rollback_end_lsn: p.end_lsn,
                    prepare_time: p.prepare_time,
                    rollback_time,
                    xid: p.xid,
                    gid: p.gid,
                })
            })
            .boxed(),
    );
    options
}

/// A streamed block: Stream Start, changes carrying its xid, Stream Stop.
fn stream_block() -> BoxedStrategy<Vec<LogicalMessage>> {
    (any::<u32>(), any::<bool>())
        .prop_flat_map(|(xid, first_segment)| {
            prop::collection::vec(change(Some(xid)), 0..6).prop_map(move |changes| {
                let mut block = vec![LogicalMessage::StreamStart(StreamStart {
                    xid,
                    first_segment,
                })];
                block.extend(changes);
                block.push(LogicalMessage::StreamStop);
                block
            })
        })
        .boxed()
}

/// A protocol version and a replication session valid for it: messages
/// outside streams interleaved with streamed blocks (protocol 2+).
fn session() -> impl Strategy<Value = (u32, Vec<LogicalMessage>)> {
    (1..=4u32).prop_flat_map(|version| {
        let item = if version >= 2 {
            prop_oneof![
                3 => outside(version).prop_map(|m| vec![m]),
                1 => stream_block(),
            ]
            .boxed()
        } else {
            outside(version).prop_map(|m| vec![m]).boxed()
        };
        prop::collection::vec(item, 0..12)
            .prop_map(move |items| (version, items.into_iter().flatten().collect()))
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn encoded_sessions_decode_to_the_same_messages((version, messages) in session()) {
        let mut decoder = Decoder::new(version);
        for msg in &messages {
            let data = Bytes::from(encode(msg));
            prop_assert_eq!(&decoder.decode(data).unwrap(), msg);
        }
        prop_assert!(!decoder.in_stream());
    }

    #[test]
    fn arbitrary_bytes_never_panic(
        version in 0..=5u32,
        in_stream in any::<bool>(),
        data in prop::collection::vec(any::<u8>(), 0..96),
    ) {
        let mut decoder = if in_stream && (2..=4).contains(&version) {
            streaming_decoder(version, 1)
        } else {
            Decoder::new(version)
        };
        let _ = decoder.decode(Bytes::from(data));
    }

    #[test]
    fn corrupted_valid_messages_never_panic(
        (version, messages) in session(),
        corruption in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
    ) {
        let mut decoder = Decoder::new(version);
        for msg in &messages {
            let mut data = encode(msg);
            for (at, byte) in &corruption {
                let i = at.index(data.len());
                data[i] = *byte;
            }
            data.truncate(cut.index(data.len() + 1).max(1));
            let _ = decoder.decode(Bytes::from(data));
        }
    }
}
