//! `kafka.topic` and `kafka.table_topics`: the topic template grammar
//! (`{aggregate_type}.{event_type}`, `{aggregate_type}`, a fixed name) and
//! Kafka's topic naming rules. Parsing is configuration (a bad template is
//! refused at start); rendering for one event happens in the record builder
//! (`crate::pipeline::record`).

use std::fmt;

/// A placeholder in a topic template.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopicField {
    /// `{aggregate_type}`.
    AggregateType,
    /// `{event_type}`.
    EventType,
    /// `{table}`: the unqualified table name.
    Table,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Part {
    Literal(String),
    Field(TopicField),
}

/// A compiled topic template such as `{aggregate_type}.{event_type}`,
/// `{aggregate_type}` or `orders` (a fixed topic).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopicTemplate {
    parts: Vec<Part>,
}

/// Why a template or a rendered topic name is not usable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TopicError {
    /// The template has an unknown `{placeholder}` or an unclosed brace.
    #[error("invalid topic template {template:?}: {why}")]
    Template {
        /// The template text.
        template: String,
        /// What is wrong.
        why: String,
    },
    /// The rendered name is not a legal Kafka topic name.
    #[error("invalid topic name {name:?}: {why}")]
    Name {
        /// The rendered (possibly truncated) name.
        name: String,
        /// What is wrong.
        why: &'static str,
    },
}

const MAX_TOPIC_LEN: usize = 249;

fn legal_topic_byte(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-'
}

impl TopicTemplate {
    /// Compiles a template. Literal text must itself be legal in a topic name.
    pub fn parse(template: &str) -> Result<Self, TopicError> {
        let bad = |why: String| TopicError::Template {
            template: template.to_owned(),
            why,
        };
        let mut parts = Vec::new();
        let mut rest = template;
        while !rest.is_empty() {
            match rest.find('{') {
                Some(0) => {
                    let close = rest.find('}').ok_or_else(|| bad("unclosed '{'".into()))?;
                    let field = match &rest[1..close] {
                        "aggregate_type" => TopicField::AggregateType,
                        "event_type" => TopicField::EventType,
                        "table" => TopicField::Table,
                        other => {
                            return Err(bad(format!(
                                "unknown placeholder {{{other}}}; use {{aggregate_type}}, {{event_type}} or {{table}}"
                            )))
                        }
                    };
                    parts.push(Part::Field(field));
                    rest = &rest[close + 1..];
                }
                found => {
                    let end = found.unwrap_or(rest.len());
                    let lit = &rest[..end];
                    if lit.contains('}') {
                        return Err(bad("unmatched '}'".into()));
                    }
                    if !lit.bytes().all(legal_topic_byte) {
                        return Err(bad(format!(
                            "literal {lit:?} may only contain letters, digits, '.', '_' and '-'"
                        )));
                    }
                    parts.push(Part::Literal(lit.to_owned()));
                    rest = &rest[end..];
                }
            }
        }
        if parts.is_empty() {
            return Err(bad("is empty".into()));
        }
        // The literal text alone must leave room in Kafka's name limit, and a
        // fixed name must be one Kafka accepts.
        let literal_len: usize = parts
            .iter()
            .map(|p| match p {
                Part::Literal(s) => s.len(),
                Part::Field(_) => 0,
            })
            .sum();
        if literal_len > MAX_TOPIC_LEN {
            return Err(bad(format!(
                "its fixed text is {literal_len} characters; Kafka topic names are at most {MAX_TOPIC_LEN}"
            )));
        }
        if template == "." || template == ".." {
            return Err(bad("'.' and '..' are reserved topic names".into()));
        }
        Ok(TopicTemplate { parts })
    }

    /// Renders the topic, taking each placeholder's value from `field`,
    /// and checks Kafka's naming rules.
    pub fn render_with<'a>(
        &'a self,
        field: impl Fn(TopicField) -> &'a [u8],
    ) -> Result<String, TopicError> {
        let mut out = String::with_capacity(64);
        for part in &self.parts {
            let bytes: &[u8] = match part {
                Part::Literal(s) => s.as_bytes(),
                Part::Field(f) => field(*f),
            };
            if !bytes.iter().copied().all(legal_topic_byte) {
                return Err(TopicError::Name {
                    name: truncated(&out, bytes),
                    why: "only letters, digits, '.', '_' and '-' are allowed",
                });
            }
            // All bytes are ASCII here.
            out.push_str(std::str::from_utf8(bytes).unwrap_or_default());
        }
        Self::check_name(out)
    }

    /// Checks a whole topic name against Kafka's rules: legal characters,
    /// not empty, at most 249 characters, not `.` or `..`.
    pub fn check_name(out: String) -> Result<String, TopicError> {
        if !out.bytes().all(legal_topic_byte) {
            return Err(TopicError::Name {
                name: truncated("", out.as_bytes()),
                why: "only letters, digits, '.', '_' and '-' are allowed",
            });
        }
        if out.is_empty() {
            return Err(TopicError::Name {
                name: out,
                why: "is empty",
            });
        }
        if out.len() > MAX_TOPIC_LEN {
            return Err(TopicError::Name {
                name: out[..64].to_owned(),
                why: "is longer than 249 characters",
            });
        }
        if out == "." || out == ".." {
            return Err(TopicError::Name {
                name: out,
                why: "'.' and '..' are reserved",
            });
        }
        Ok(out)
    }
}

fn truncated(prefix: &str, bytes: &[u8]) -> String {
    let mut s = prefix.to_owned();
    s.push_str(&String::from_utf8_lossy(&bytes[..bytes.len().min(64)]));
    s
}

impl fmt::Display for TopicTemplate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for p in &self.parts {
            match p {
                Part::Literal(s) => f.write_str(s)?,
                Part::Field(TopicField::AggregateType) => f.write_str("{aggregate_type}")?,
                Part::Field(TopicField::EventType) => f.write_str("{event_type}")?,
                Part::Field(TopicField::Table) => f.write_str("{table}")?,
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fixed_names_longer_than_kafka_allows_are_refused_at_parse_time() {
        assert!(TopicTemplate::parse(&"t".repeat(249)).is_ok());
        let e = TopicTemplate::parse(&"t".repeat(250)).unwrap_err();
        assert!(e.to_string().contains("at most 249"), "{e}");
        assert!(TopicTemplate::parse(&format!("{}.{{event_type}}", "t".repeat(250))).is_err());
        assert!(TopicTemplate::parse("..").is_err());
    }

    #[test]
    fn bad_templates_are_rejected() {
        for t in [
            "",
            "{nope}",
            "{aggregate_type",
            "a}b",
            "a b",
            "a/{event_type}",
        ] {
            assert!(TopicTemplate::parse(t).is_err(), "{t:?}");
        }
        assert_eq!(
            TopicTemplate::parse("{aggregate_type}.{event_type}")
                .unwrap()
                .to_string(),
            "{aggregate_type}.{event_type}"
        );
    }

    #[test]
    fn placeholders_take_the_values_given() {
        let t = TopicTemplate::parse("svc.{table}.{aggregate_type}.{event_type}").unwrap();
        let got = t
            .render_with(|f| match f {
                TopicField::Table => b"outbox",
                TopicField::AggregateType => b"Order",
                TopicField::EventType => b"Created",
            })
            .unwrap();
        assert_eq!(got, "svc.outbox.Order.Created");
        assert!(t.render_with(|_| b"a b").is_err());
        assert!(
            t.render_with(|_| &[][..]).is_ok(),
            "literal text keeps it non-empty"
        );
        let bare = TopicTemplate::parse("{event_type}").unwrap();
        assert!(
            bare.render_with(|_| &[][..]).is_err(),
            "an empty name is refused"
        );
    }
}
