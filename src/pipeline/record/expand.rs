//! `table.expand.json.payload`: the payload's JSON turned into a Kafka
//! Connect value the way Debezium's Outbox Event Router does it (Jackson
//! parses the text, a Connect schema is inferred from it, the value is
//! built against that schema), then printed as the converter prints it.
//!
//! Debezium's inference, reproduced:
//! - strings, booleans: optional STRING / BOOLEAN; integers: INT32 when
//!   they fit, else INT64; other numbers FLOAT64;
//! - an object: a struct of its fields in order (a repeated name keeps its
//!   first place), without the fields whose schema is absent: `null` and
//!   empty arrays;
//! - an array: of its first non-null element's schema; every non-null
//!   element must have the same JSON type (and numbers the same schema);
//!   an array of objects gets the merge of their structs (fields in order
//!   of first appearance).
//!
//! When the inference fails (a mixed array), Debezium leaves the payload a
//! string: so does pgoutbox. When building the value fails after the
//! schema was inferred (a top-level array, an integer beyond 64 bits, a
//! field whose values disagree with the merged schema), Debezium stops its
//! task (with the JSON converter, or with an envelope); pgoutbox
//! dead-letters the event instead, and otherwise (the string converter,
//! no envelope) sends the string as Debezium does. Checked byte for byte
//! against Debezium 3.6.1 by tests/debezium_conformance.rs.
//!
//! Doubles print as Java's `Double.toString` does from Java 19 on (the
//! shortest digits that read back as the same double). An integer literal
//! beyond `u64` is read as a double by serde_json where Jackson reads a
//! BigInteger (pgoutbox then expands it, Debezium stops).

use std::fmt::Write as _;

use serde::de::{Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use super::connect::json_string;

/// A JSON document, objects in their order.
#[derive(Clone, Debug, PartialEq)]
enum Json {
    Null,
    Bool(bool),
    Int(i64),
    Big,
    Float(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl<'de> Deserialize<'de> for Json {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Json, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Json;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("JSON")
            }
            fn visit_unit<E>(self) -> Result<Json, E> {
                Ok(Json::Null)
            }
            fn visit_bool<E>(self, b: bool) -> Result<Json, E> {
                Ok(Json::Bool(b))
            }
            fn visit_i64<E>(self, n: i64) -> Result<Json, E> {
                Ok(Json::Int(n))
            }
            fn visit_u64<E>(self, n: u64) -> Result<Json, E> {
                Ok(i64::try_from(n).map_or(Json::Big, Json::Int))
            }
            fn visit_f64<E>(self, n: f64) -> Result<Json, E> {
                Ok(Json::Float(n))
            }
            fn visit_str<E>(self, s: &str) -> Result<Json, E> {
                Ok(Json::Str(s.to_owned()))
            }
            fn visit_string<E>(self, s: String) -> Result<Json, E> {
                Ok(Json::Str(s))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Json, A::Error> {
                let mut out = Vec::new();
                while let Some(v) = seq.next_element()? {
                    out.push(v);
                }
                Ok(Json::Arr(out))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Json, A::Error> {
                let mut out: Vec<(String, Json)> = Vec::new();
                while let Some((k, v)) = map.next_entry::<String, Json>()? {
                    // Jackson's ObjectNode: a repeated name keeps its place,
                    // the last value wins.
                    match out.iter_mut().find(|(name, _)| *name == k) {
                        Some(slot) => slot.1 = v,
                        None => out.push((k, v)),
                    }
                }
                Ok(Json::Obj(out))
            }
        }
        d.deserialize_any(V)
    }
}

/// An inferred Connect schema (every one optional).
#[derive(Clone, Debug, PartialEq)]
enum Schema {
    Str,
    Bool,
    I32,
    I64,
    F64,
    Array(Box<Schema>),
    Struct(Vec<(String, Schema)>),
}

/// The inference failed: Debezium keeps the payload a string.
struct NoSchema;

fn schema_of(node: &Json) -> Result<Option<Schema>, NoSchema> {
    Ok(Some(match node {
        Json::Str(_) => Schema::Str,
        Json::Bool(_) => Schema::Bool,
        Json::Int(n) if i32::try_from(*n).is_ok() => Schema::I32,
        Json::Int(_) => Schema::I64,
        Json::Big | Json::Float(_) => Schema::F64,
        Json::Arr(a) if a.is_empty() => return Ok(None),
        Json::Arr(a) => Schema::Array(Box::new(element_schema(a)?)),
        Json::Obj(fields) => {
            let mut out: Vec<(String, Schema)> = Vec::new();
            for (name, value) in fields {
                if let Some(s) = schema_of(value)? {
                    if out.iter().all(|(n, _)| n != name) {
                        out.push((name.clone(), s));
                    }
                }
            }
            Schema::Struct(out)
        }
        Json::Null => return Ok(None),
    }))
}

fn kind(node: &Json) -> u8 {
    match node {
        Json::Null => 0,
        Json::Bool(_) => 1,
        Json::Int(_) | Json::Big | Json::Float(_) => 2,
        Json::Str(_) => 3,
        Json::Arr(_) => 4,
        Json::Obj(_) => 5,
    }
}

fn element_schema(array: &[Json]) -> Result<Schema, NoSchema> {
    let mut first: Option<&Json> = None;
    for e in array.iter().filter(|e| **e != Json::Null) {
        let reference = *first.get_or_insert(e);
        if kind(e) != kind(reference) {
            return Err(NoSchema);
        }
        if kind(e) == 2 && schema_of(e)? != schema_of(reference)? {
            return Err(NoSchema);
        }
    }
    let Some(sample) = first else {
        return Err(NoSchema);
    };
    if !matches!(sample, Json::Obj(_)) {
        return schema_of(sample)?.ok_or(NoSchema);
    }
    let mut merged: Vec<(String, Schema)> = Vec::new();
    for e in array {
        if let Some(Schema::Struct(fields)) = schema_of(e)? {
            for (name, s) in fields {
                if merged.iter().all(|(n, _)| *n != name) {
                    merged.push((name, s));
                }
            }
        }
    }
    Ok(Schema::Struct(merged))
}

/// A Connect value built against its schema.
#[derive(Clone, Debug, PartialEq)]
enum Value {
    Null,
    Bool(bool),
    Int(i64),
    Float(f64),
    Str(String),
    List(Vec<Value>),
    Struct(Vec<(String, Value)>),
}

/// Building the value failed (Debezium's `DataException`).
struct Invalid;

fn value_of(node: &Json, schema: &Schema) -> Result<Value, Invalid> {
    let v = match (node, schema) {
        (Json::Null, _) => Value::Null,
        (Json::Str(s), Schema::Str) => Value::Str(s.clone()),
        (Json::Bool(b), Schema::Bool) => Value::Bool(*b),
        (Json::Int(n), Schema::I32) if i32::try_from(*n).is_ok() => Value::Int(*n),
        (Json::Int(n), Schema::I64) if i32::try_from(*n).is_err() => Value::Int(*n),
        (Json::Float(f), Schema::F64) => Value::Float(*f),
        (Json::Arr(a), Schema::Array(element)) => Value::List(
            a.iter()
                .map(|e| value_of(e, element))
                .collect::<Result<_, _>>()?,
        ),
        (Json::Obj(fields), Schema::Struct(schema)) => Value::Struct(
            schema
                .iter()
                .map(|(name, s)| {
                    let v = match fields.iter().find(|(n, _)| n == name) {
                        Some((_, node)) => value_of(node, s)?,
                        None => Value::Null,
                    };
                    Ok((name.clone(), v))
                })
                .collect::<Result<_, _>>()?,
        ),
        _ => return Err(Invalid),
    };
    Ok(v)
}

/// What expanding a payload gives.
pub(super) enum Expanded {
    /// The value as the converter prints it.
    Value(Vec<u8>),
    /// Debezium keeps the payload a string (not JSON starting with `{` or
    /// `[`, or no schema could be inferred).
    Unchanged,
    /// Debezium's JSON converter would stop its task on this payload.
    Refused(String),
}

/// Expands `payload` and prints it for the JSON converter (`json`) or the
/// string converter. `strict`: the value cannot stay a string once a schema
/// was inferred — Debezium stops its task there with the JSON converter,
/// and with either converter when the value is an envelope.
pub(super) fn expand(payload: &[u8], json: bool, strict: bool) -> Expanded {
    if !payload.starts_with(b"{") && !payload.starts_with(b"[") {
        return Expanded::Unchanged;
    }
    let Ok(document) = serde_json::from_slice::<Json>(payload) else {
        return Expanded::Unchanged;
    };
    let schema = match schema_of(&document) {
        Ok(Some(s)) => s,
        Ok(None) | Err(NoSchema) => return Expanded::Unchanged,
    };
    let built = match (&document, &schema) {
        (Json::Obj(_), Schema::Struct(_)) => value_of(&document, &schema).ok(),
        _ => None,
    };
    match built {
        Some(value) => {
            let mut out = String::new();
            if json {
                write_json(&mut out, &value);
            } else {
                write_java(&mut out, &value);
            }
            Expanded::Value(out.into_bytes())
        }
        None if json || strict => Expanded::Refused(
            "table.expand.json.payload: the payload's values disagree with the schema Debezium infers from it (a top-level array, an integer beyond 64 bits, or an array whose objects give one field different types); Debezium stops its task on such a payload".into(),
        ),
        None => Expanded::Unchanged,
    }
}

/// The value as `JsonConverter` (no schemas) writes it.
fn write_json(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(f) => out.push_str(&java_double(*f)),
        Value::Str(s) => out.push_str(&String::from_utf8_lossy(&json_string(s.as_bytes()))),
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_json(out, item);
            }
            out.push(']');
        }
        Value::Struct(fields) => {
            out.push('{');
            for (i, (name, item)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&String::from_utf8_lossy(&json_string(name.as_bytes())));
                out.push(':');
                write_json(out, item);
            }
            out.push('}');
        }
    }
}

/// The value as Java's `toString` prints it (`StringConverter`): `Struct{a=1}`
/// without NULL fields, lists as `[a, b]`.
fn write_java(out: &mut String, v: &Value) {
    match v {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Int(n) => {
            let _ = write!(out, "{n}");
        }
        Value::Float(f) => out.push_str(&java_double(*f)),
        Value::Str(s) => out.push_str(s),
        Value::List(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push_str(", ");
                }
                write_java(out, item);
            }
            out.push(']');
        }
        Value::Struct(fields) => {
            out.push_str("Struct{");
            let present = fields.iter().filter(|(_, v)| *v != Value::Null);
            for (i, (name, item)) in present.enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(name);
                out.push('=');
                write_java(out, item);
            }
            out.push('}');
        }
    }
}

/// Java's `Double.toString` (Java 19+): the shortest digits that read back
/// as `d`, plain for 10^-3 <= |d| < 10^7, else `d.dddE±n`; always a digit
/// after the point.
fn java_double(d: f64) -> String {
    if d == 0.0 {
        return if d.is_sign_negative() { "-0.0" } else { "0.0" }.into();
    }
    let sci = format!("{:e}", d.abs());
    let (mantissa, exp) = sci.split_once('e').unwrap_or((&sci, "0"));
    let exp: i32 = exp.parse().unwrap_or(0);
    let digits: String = mantissa.chars().filter(char::is_ascii_digit).collect();
    let sign = if d < 0.0 { "-" } else { "" };
    if (-3..7).contains(&exp) {
        let point = exp + 1;
        let (int, frac) = if point <= 0 {
            (
                "0".to_string(),
                format!("{}{digits}", "0".repeat((-point) as usize)),
            )
        } else if point as usize >= digits.len() {
            (
                format!("{digits}{}", "0".repeat(point as usize - digits.len())),
                String::new(),
            )
        } else {
            (
                digits[..point as usize].to_string(),
                digits[point as usize..].to_string(),
            )
        };
        let frac = if frac.is_empty() {
            "0".to_string()
        } else {
            frac
        };
        format!("{sign}{int}.{frac}")
    } else {
        let rest = if digits.len() > 1 { &digits[1..] } else { "0" };
        format!("{sign}{}.{rest}E{exp}", &digits[..1])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn expanded(payload: &str, json: bool) -> String {
        match expand(payload.as_bytes(), json, false) {
            Expanded::Value(v) => String::from_utf8(v).unwrap(),
            Expanded::Unchanged => "<unchanged>".into(),
            Expanded::Refused(_) => "<refused>".into(),
        }
    }

    #[test]
    fn objects_keep_their_order_and_lose_nulls_and_empty_arrays() {
        let p = r#"{"z": 1, "a": "x\n", "n": null, "e": [], "f": 1.5, "big": 3000000000, "o": {"t": true}}"#;
        assert_eq!(
            expanded(p, true),
            r#"{"z":1,"a":"x\n","f":1.5,"big":3000000000,"o":{"t":true}}"#
        );
        assert_eq!(
            expanded(p, false),
            "Struct{z=1,a=x\n,f=1.5,big=3000000000,o=Struct{t=true}}"
        );
    }

    #[test]
    fn arrays_of_objects_merge_their_fields() {
        let p = r#"{"items": [{"a": 1}, {"b": "x"}, null], "tags": ["p", null]}"#;
        assert_eq!(
            expanded(p, true),
            r#"{"items":[{"a":1,"b":null},{"a":null,"b":"x"},null],"tags":["p",null]}"#
        );
        assert_eq!(
            expanded(p, false),
            "Struct{items=[Struct{a=1}, Struct{b=x}, null],tags=[p, null]}"
        );
    }

    #[test]
    fn what_debezium_cannot_expand_stays_a_string_or_is_refused() {
        assert_eq!(expanded(r#"{"m": [1, "a"]}"#, true), "<unchanged>");
        assert_eq!(expanded(r#"{"m": [1, 3000000000]}"#, true), "<unchanged>");
        assert_eq!(
            expanded(r#" {"a": 1}"#, true),
            "<unchanged>",
            "must start with {{ or ["
        );
        assert_eq!(expanded("plain", true), "<unchanged>");
        assert_eq!(expanded("[1, 2]", true), "<refused>");
        assert_eq!(expanded("[1, 2]", false), "<unchanged>");
        assert!(
            matches!(expand(b"[1, 2]", false, true), Expanded::Refused(_)),
            "in an envelope, Debezium's struct refuses the string"
        );
        assert_eq!(
            expanded(r#"{"big": 12345678901234567890}"#, true),
            "<refused>"
        );
        assert_eq!(
            expanded(r#"{"a": [{"x": 1}, {"x": "s"}]}"#, true),
            "<refused>"
        );
    }

    #[test]
    fn doubles_print_as_java_does() {
        for (d, java) in [
            (1.0, "1.0"),
            (100.0, "100.0"),
            (0.001, "0.001"),
            (0.0001, "1.0E-4"),
            (1234567.5, "1234567.5"),
            (1.0e7, "1.0E7"),
            (-2.5e-10, "-2.5E-10"),
            (0.1 + 0.2, "0.30000000000000004"),
            (-0.0, "-0.0"),
        ] {
            assert_eq!(java_double(d), java, "{d}");
        }
    }
}
