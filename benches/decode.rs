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
}

criterion_group!(benches, decode);
criterion_main!(benches);
