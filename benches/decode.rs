//! Decoder throughput on captured pgoutput traffic (the outbox inserts in
//! `tests/fixtures/pgoutput/pg15/insert.proto1.hex`, recorded from a real
//! PostgreSQL 15), with criterion: Insert messages decoded per second on one
//! core, and the same plus mapping the row to an outbox event and building
//! its Kafka record. Run: `cargo bench --bench decode`.

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use pgoutbox::config::TopicTemplate;
use pgoutbox::outbox::OutboxColumns;
use pgoutbox::pgoutput::{Decoder, LogicalMessage};
use pgoutbox::pipeline::RecordBuilder;

fn hex(line: &str) -> Vec<u8> {
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

fn captured() -> (Vec<Bytes>, OutboxColumns) {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/pgoutput/pg15/insert.proto1.hex"
    );
    let text = std::fs::read_to_string(path).expect("read fixture");
    let messages: Vec<Bytes> = text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| Bytes::from(hex(l.trim())))
        .collect();
    let relation = messages
        .iter()
        .find_map(|m| match Decoder::new(1).decode(m.clone()) {
            Ok(LogicalMessage::Relation(r)) => Some(r),
            _ => None,
        })
        .expect("fixture has a Relation message");
    let inserts: Vec<Bytes> = messages
        .into_iter()
        .filter(|m| m.first() == Some(&b'I'))
        .collect();
    assert!(!inserts.is_empty(), "fixture has Insert messages");
    (
        inserts,
        OutboxColumns::from_relation(
            &relation,
            &pgoutbox::config::ColumnMap::pgoutbox(),
            (&relation.namespace, &relation.name),
        )
        .expect("outbox relation"),
    )
}

fn decode(c: &mut Criterion) {
    let (inserts, columns) = captured();
    let builder = RecordBuilder::new(
        TopicTemplate::parse("{aggregate_type}.{event_type}").expect("template"),
        vec![],
    );
    let mut group = c.benchmark_group("pgoutput");
    group.throughput(Throughput::Elements(inserts.len() as u64));
    group.bench_function("decode_insert", |b| {
        let mut decoder = Decoder::new(1);
        b.iter(|| {
            for m in &inserts {
                std::hint::black_box(decoder.decode(m.clone()).expect("decode"));
            }
        })
    });
    group.bench_function("decode_map_route_insert", |b| {
        let mut decoder = Decoder::new(1);
        b.iter(|| {
            for m in &inserts {
                if let LogicalMessage::Insert(ins) = decoder.decode(m.clone()).expect("decode") {
                    let event = columns.event(&ins.new).expect("event");
                    std::hint::black_box(builder.build(&event).expect("record"));
                }
            }
        })
    });
    group.finish();

    // One event as the e2e benchmark writes it (a traced application's:
    // `metadata` holds a traceparent), built into its Kafka record.
    let mut group = c.benchmark_group("record");
    group.throughput(Throughput::Elements(1));
    let event = pgoutbox::outbox::OutboxEvent {
        table: Bytes::from_static(b"outbox"),
        id: Bytes::from_static(b"1234567"),
        created_at: Bytes::from_static(b"2026-12-04 19:20:00.123456+00"),
        tracking_id: Bytes::from_static(b"7d1f4b52-9a3e-4c1b-8f0e-2b6a5c9d0e11"),
        aggregate_id: Bytes::from_static(b"0b7f5e4c-1d2a-4e3b-9c8d-7f6e5d4c3b2a"),
        aggregate_type: Bytes::from_static(b"BenchOrder"),
        event_type: Bytes::from_static(b"OrderPlaced"),
        payload: Bytes::from_static(
            br#"{"t_us": 1764876000123456, "items": [{"qty": 2, "sku": "SKU-01234", "price_cents": 4321}], "status": "PLACED", "currency": "EUR", "order_id": "5c0e8a7b-2f4d-4b6a-9e1c-3d2f1a0b9c8d", "total_cents": 8642}"#,
        ),
        payload_null: false,
        metadata: Some(Bytes::from_static(
            br#"{"traceparent": "00-5f2b8c1d9e3a4f6b7c8d9e0f1a2b3c4d-1a2b3c4d5e6f7a8b-01"}"#,
        )),
        additional: Vec::new(),
    };
    group.bench_function("build_traced_event", |b| {
        b.iter(|| std::hint::black_box(builder.build_owned(event.clone()).expect("record")))
    });
    group.finish();
}

criterion_group!(benches, decode);
criterion_main!(benches);
