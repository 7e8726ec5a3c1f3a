//! Decoder throughput on captured pgoutput traffic (the outbox inserts in
//! `tests/fixtures/pgoutput/pg15/insert.proto1.hex`, recorded from a real
//! PostgreSQL 15). Reports Insert messages decoded per second on one core,
//! plus the cost of mapping each row to an outbox event and rendering its
//! topic. Run: `cargo bench --bench decode`.

use std::time::{Duration, Instant};

use bytes::Bytes;
use pgoutbox::outbox::OutboxColumns;
use pgoutbox::pgoutput::{Decoder, LogicalMessage};
use pgoutbox::route::TopicTemplate;

fn hex(line: &str) -> Vec<u8> {
    (0..line.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&line[i..i + 2], 16).expect("hex fixture"))
        .collect()
}

fn main() {
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
    let columns = OutboxColumns::from_relation(&relation).expect("outbox relation");
    let topic = TopicTemplate::parse("{aggregate_type}.{event_type}").expect("template");

    // `cargo bench` passes --bench; `cargo test --all-targets` runs this as a
    // quick smoke test.
    let rounds = if std::env::args().any(|a| a == "--bench") {
        7
    } else {
        1
    };
    let measure = |label: &str, full: bool| {
        let mut rates = Vec::new();
        for _ in 0..rounds {
            let mut decoder = Decoder::new(1);
            let start = Instant::now();
            let mut n = 0u64;
            while start.elapsed() < Duration::from_millis(300) {
                for m in &inserts {
                    let msg = decoder.decode(m.clone()).expect("decode");
                    if full {
                        if let LogicalMessage::Insert(ins) = msg {
                            let event = columns.event(&ins.new).expect("event");
                            std::hint::black_box(topic.render(&event).expect("topic"));
                        }
                    } else {
                        std::hint::black_box(msg);
                    }
                    n += 1;
                }
            }
            rates.push(n as f64 / start.elapsed().as_secs_f64());
        }
        rates.sort_by(|a, b| a.partial_cmp(b).unwrap());
        println!(
            "{label:<34} median {:>10.0} msg/s  (min {:.0}, max {:.0}; {} bytes/insert)",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1],
            inserts[0].len()
        );
    };
    measure("decode Insert", false);
    measure("decode + map + route Insert", true);
}
