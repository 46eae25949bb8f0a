//! The protobuf wire format, written directly: spans and usage log records are encoded once,
//! in the usage worker, straight into their export batch (no intermediate SDK or message
//! structs, no per-attribute allocation). Field numbers are those of the OTLP `.proto` files;
//! the tests decode what is written here with `opentelemetry-proto`'s generated types.

/// Wire types.
const VARINT: u32 = 0;
const FIXED64: u32 = 1;
const LEN: u32 = 2;
const FIXED32: u32 = 5;

/// An attribute value (`AnyValue`).
#[derive(Clone, Copy, Debug)]
pub enum Value<'a> {
    Str(&'a str),
    Int(i64),
    Bool(bool),
    Double(f64),
}

impl From<&'static str> for Value<'static> {
    fn from(v: &'static str) -> Self {
        Value::Str(v)
    }
}

/// A protobuf message being written into a byte buffer.
pub struct Pb<'b>(pub &'b mut Vec<u8>);

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        buf.push((v as u8) | 0x80);
        v >>= 7;
    }
    buf.push(v as u8);
}

impl Value<'_> {
    /// The encoded length of the `AnyValue` message.
    fn len(&self) -> usize {
        match self {
            Value::Str(s) => 1 + varint_len(s.len() as u64) + s.len(),
            Value::Int(i) => 1 + varint_len(*i as u64),
            Value::Bool(_) => 2,
            Value::Double(_) => 9,
        }
    }
}

impl Pb<'_> {
    fn key(&mut self, field: u32, wire: u32) {
        put_varint(self.0, u64::from(field << 3 | wire));
    }

    pub fn varint(&mut self, field: u32, v: u64) {
        self.key(field, VARINT);
        put_varint(self.0, v);
    }

    pub fn fixed64(&mut self, field: u32, v: u64) {
        self.key(field, FIXED64);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn fixed32(&mut self, field: u32, v: u32) {
        self.key(field, FIXED32);
        self.0.extend_from_slice(&v.to_le_bytes());
    }

    pub fn bytes(&mut self, field: u32, v: &[u8]) {
        self.key(field, LEN);
        put_varint(self.0, v.len() as u64);
        self.0.extend_from_slice(v);
    }

    pub fn str(&mut self, field: u32, v: &str) {
        self.bytes(field, v.as_bytes());
    }

    /// A string field written from its parts.
    pub fn strs(&mut self, field: u32, parts: &[&str]) {
        self.key(field, LEN);
        put_varint(self.0, parts.iter().map(|p| p.len()).sum::<usize>() as u64);
        for p in parts {
            self.0.extend_from_slice(p.as_bytes());
        }
    }

    /// A nested message whose length is not known up front: written after its field key, then
    /// its length is inserted before it (one move of the message's bytes).
    pub fn message(&mut self, field: u32, body: impl FnOnce(&mut Pb<'_>)) {
        self.key(field, LEN);
        let start = self.0.len();
        body(&mut Pb(self.0));
        let len = (self.0.len() - start) as u64;
        let mut head = [0u8; 10];
        let mut n = 0;
        let mut v = len;
        while v >= 0x80 {
            head[n] = (v as u8) | 0x80;
            v >>= 7;
            n += 1;
        }
        head[n] = v as u8;
        self.0.splice(start..start, head[..=n].iter().copied());
    }

    /// An `AnyValue` in `field`.
    pub fn value(&mut self, field: u32, v: Value<'_>) {
        self.key(field, LEN);
        put_varint(self.0, v.len() as u64);
        match v {
            Value::Str(s) => self.str(1, s),
            Value::Bool(b) => self.varint(2, u64::from(b)),
            Value::Int(i) => self.varint(3, i as u64),
            Value::Double(d) => self.fixed64(4, d.to_bits()),
        }
    }

    /// A `KeyValue` in `field` (attributes are field 9 of a span, 6 of a log record, 1 of a
    /// resource).
    pub fn attr(&mut self, field: u32, key: &str, v: Value<'_>) {
        self.attr2(field, "", key, v);
    }

    /// A `KeyValue` whose key is `prefix` followed by `key`.
    pub fn attr2(&mut self, field: u32, prefix: &str, key: &str, v: Value<'_>) {
        let klen = prefix.len() + key.len();
        let vlen = v.len();
        let len = 1 + varint_len(klen as u64) + klen + 1 + varint_len(vlen as u64) + vlen;
        self.key(field, LEN);
        put_varint(self.0, len as u64);
        self.key(1, LEN);
        put_varint(self.0, klen as u64);
        self.0.extend_from_slice(prefix.as_bytes());
        self.0.extend_from_slice(key.as_bytes());
        self.value(2, v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
    use prost::Message as _;

    /// Attributes of every value kind, and long ones (multi-byte lengths), decode as written.
    #[test]
    fn attributes_decode() {
        let long = "x".repeat(300);
        for (key, v) in [
            ("s", Value::Str("abc")),
            ("long", Value::Str(&long)),
            ("i", Value::Int(-5)),
            ("big", Value::Int(i64::MAX)),
            ("b", Value::Bool(true)),
            ("d", Value::Double(0.25)),
        ] {
            let mut buf = Vec::new();
            Pb(&mut buf).attr2(1, "p.", key, v);
            // Field 1 of a Resource is its attributes: decode the KeyValue inside.
            let r = opentelemetry_proto::tonic::resource::v1::Resource::decode(&buf[..]).unwrap();
            let KeyValue { key: k, value, .. } = &r.attributes[0];
            assert_eq!(k, &format!("p.{key}"));
            let got = value.as_ref().unwrap().value.as_ref().unwrap();
            match (v, got) {
                (Value::Str(a), any_value::Value::StringValue(b)) => assert_eq!(a, b),
                (Value::Int(a), any_value::Value::IntValue(b)) => assert_eq!(a, *b),
                (Value::Bool(a), any_value::Value::BoolValue(b)) => assert_eq!(a, *b),
                (Value::Double(a), any_value::Value::DoubleValue(b)) => assert_eq!(a, *b),
                other => panic!("{other:?}"),
            }
        }
    }

    /// A nested message longer than 127 bytes gets a two-byte length.
    #[test]
    fn nested_lengths() {
        let mut buf = Vec::new();
        let long = "y".repeat(200);
        Pb(&mut buf).message(2, |m| m.message(1, |s| s.str(1, &long)));
        let s = opentelemetry_proto::tonic::trace::v1::ResourceSpans::decode(&buf[..]).unwrap();
        assert_eq!(s.scope_spans[0].scope.as_ref().unwrap().name, long);
    }
}
