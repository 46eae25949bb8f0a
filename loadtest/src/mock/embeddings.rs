//! The mock's embeddings: each input text becomes a bag-of-words vector, so vector search over
//! them behaves like a (very plain) semantic model. The text is lowercased and split on
//! non-alphanumeric characters; each word is hashed with 64-bit FNV-1a (stable across
//! processes and machines, unlike std's randomized hasher) into one of `dimensions` buckets
//! (256 unless the request asks for `dimensions`); the counts are L2-normalized. So identical
//! texts give identical vectors (cosine distance 0), texts sharing most words are near, and
//! texts with no word in common are nearly orthogonal (distance ≈ 1, short of hash collisions).
//! A text with no words at all is embedded as the empty word, so every vector has unit length.
//!
//! The request's `encoding_format` may be `"float"` (default) or `"base64"` (the little-endian
//! `f32` bytes, base64-encoded, as OpenAI sends them).

use base64::Engine as _;
use serde_json::Value;

use super::tokens;

/// Vector size when the request names no `dimensions`.
pub const DEFAULT_DIMENSIONS: usize = 256;
/// Largest `dimensions` accepted (text-embedding-3-large's size).
pub const MAX_DIMENSIONS: usize = 3072;

/// What an embeddings request asks for, validated.
#[derive(Debug, Default)]
pub(crate) struct Request {
    /// One text per vector to return.
    pub(crate) texts: Vec<String>,
    pub(crate) dimensions: usize,
    pub(crate) base64: bool,
}

impl Request {
    /// Reads `input`, `dimensions` and `encoding_format` of a request body; `Err` is the 400
    /// message.
    pub(crate) fn parse(body: &Value) -> Result<Request, String> {
        let dimensions = match body.get("dimensions") {
            None | Some(Value::Null) => DEFAULT_DIMENSIONS,
            Some(d) => d
                .as_u64()
                .and_then(|d| usize::try_from(d).ok())
                .filter(|d| (1..=MAX_DIMENSIONS).contains(d))
                .ok_or_else(|| {
                    format!("'dimensions' must be an integer from 1 to {MAX_DIMENSIONS}")
                })?,
        };
        let base64 = match body.get("encoding_format").and_then(Value::as_str) {
            None | Some("float") => false,
            Some("base64") => true,
            Some(other) => {
                return Err(format!(
                    "'encoding_format' must be 'float' or 'base64', not '{other}'"
                ));
            }
        };
        Ok(Request {
            texts: texts(body.get("input")),
            dimensions,
            base64,
        })
    }

    /// The `embedding` value of input `i`: an array of floats, or a base64 string.
    pub(crate) fn embedding(&self, i: usize) -> Value {
        let v = embed(&self.texts[i], self.dimensions);
        if self.base64 {
            let bytes: Vec<u8> = v.iter().flat_map(|x| x.to_le_bytes()).collect();
            Value::from(base64::engine::general_purpose::STANDARD.encode(bytes))
        } else {
            Value::from(v)
        }
    }
}

/// The texts an `input` holds, one per vector: a string; each string of an array; a token-id
/// array decoded (`o200k_base`) to its text; each token-id array of an array. Anything else
/// is embedded as its JSON text.
fn texts(input: Option<&Value>) -> Vec<String> {
    fn one(item: &Value) -> String {
        match item {
            Value::String(s) => s.clone(),
            Value::Array(ids) if ids.iter().all(Value::is_number) => decode(ids),
            other => other.to_string(),
        }
    }
    match input {
        Some(Value::Array(items)) if !items.is_empty() && items.iter().all(Value::is_number) => {
            vec![decode(items)]
        }
        Some(Value::Array(items)) if !items.is_empty() => items.iter().map(one).collect(),
        Some(item) => vec![one(item)],
        None => vec![String::new()],
    }
}

/// The text of a token-id array; ids that are not `o200k_base` tokens stand as words of
/// their own.
fn decode(ids: &[Value]) -> String {
    let ranks: Option<Vec<u32>> = ids
        .iter()
        .map(|v| v.as_u64().and_then(|n| u32::try_from(n).ok()))
        .collect();
    ranks.and_then(|r| tokens::decode(&r)).unwrap_or_else(|| {
        let words: Vec<String> = ids.iter().map(Value::to_string).collect();
        words.join(" ")
    })
}

/// The mock's embedding of `text` in `dimensions` buckets (see the module doc): unit length,
/// the same on every machine.
pub fn embed(text: &str, dimensions: usize) -> Vec<f32> {
    let dimensions = dimensions.max(1);
    let mut counts = vec![0f32; dimensions];
    let lower = text.to_lowercase();
    let mut words = lower
        .split(|c: char| !c.is_alphanumeric())
        .filter(|w| !w.is_empty())
        .peekable();
    if words.peek().is_none() {
        counts[bucket("", dimensions)] = 1.0;
        return counts;
    }
    for word in words {
        counts[bucket(word, dimensions)] += 1.0;
    }
    let norm = counts.iter().map(|x| x * x).sum::<f32>().sqrt();
    for x in &mut counts {
        *x /= norm;
    }
    counts
}

/// Cosine distance (1 − cosine similarity) of two vectors, the metric a vector index such as
/// RediSearch's `DISTANCE_METRIC COSINE` reports; 1 when either is all zeros.
pub fn cosine_distance(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    let na = a.iter().map(|x| x * x).sum::<f32>().sqrt();
    let nb = b.iter().map(|x| x * x).sum::<f32>().sqrt();
    if na == 0.0 || nb == 0.0 {
        return 1.0;
    }
    1.0 - dot / (na * nb)
}

fn bucket(word: &str, dimensions: usize) -> usize {
    (fnv1a(word.as_bytes()) % dimensions as u64) as usize
}

/// 64-bit FNV-1a.
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn d(a: &str, b: &str) -> f32 {
        cosine_distance(&embed(a, DEFAULT_DIMENSIONS), &embed(b, DEFAULT_DIMENSIONS))
    }

    /// The same text is the same vector (distance 0), whatever its case and punctuation.
    #[test]
    fn identical_texts_have_distance_zero() {
        let a = "What is the capital of France?";
        assert_eq!(embed(a, DEFAULT_DIMENSIONS), embed(a, DEFAULT_DIMENSIONS));
        assert!(d(a, a).abs() < 1e-6);
        assert!(d(a, "what IS the capital of france").abs() < 1e-6);
    }

    /// A paraphrase sharing most words is near; an unrelated text is far; the order holds.
    #[test]
    fn paraphrases_are_near_and_unrelated_texts_far() {
        let q = "What is the capital of France?";
        let paraphrase = "Tell me what the capital of France is";
        let unrelated = "Summarize this quarterly sales report in three bullets";
        let near = d(q, paraphrase);
        let far = d(q, unrelated);
        assert!(near < 0.25, "paraphrase distance {near}");
        assert!(far > 0.9, "unrelated distance {far}");
    }

    /// Vectors have unit length and the requested size; an empty text too.
    #[test]
    fn unit_length_and_size() {
        for (text, dims) in [("one two two three", 256), ("", 8), ("  ?! ", 3072)] {
            let v = embed(text, dims);
            assert_eq!(v.len(), dims);
            let norm: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
            assert!((norm - 1.0).abs() < 1e-5, "{text:?}: {norm}");
        }
        // Word counts weigh: "two" twice is the largest component.
        let v = embed("one two two", 256);
        let max = v.iter().cloned().fold(0.0, f32::max);
        assert!((max - 2.0 / 5f32.sqrt()).abs() < 1e-6, "{max}");
    }

    /// FNV-1a gives its published test values, so vectors never change between builds.
    #[test]
    fn fnv1a_is_the_standard_one() {
        assert_eq!(fnv1a(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(fnv1a(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(fnv1a(b"foobar"), 0x8594_4171_f739_67e8);
    }

    /// Inputs: a string, strings, token ids (decoded to the same text) and arrays of them;
    /// `dimensions` and `encoding_format` validated.
    #[test]
    fn parses_requests() {
        let r = Request::parse(&json!({"input": "hello world"})).unwrap();
        assert_eq!(r.texts, ["hello world"]);
        assert_eq!(r.dimensions, DEFAULT_DIMENSIONS);
        assert!(!r.base64);
        let r = Request::parse(&json!({"input": ["a", "b"], "dimensions": 64})).unwrap();
        assert_eq!(r.texts, ["a", "b"]);
        assert_eq!(r.dimensions, 64);
        let ids: Vec<Value> = tokens::encode("hello world")
            .into_iter()
            .map(Value::from)
            .collect();
        let r = Request::parse(&json!({"input": ids})).unwrap();
        assert_eq!(r.texts, ["hello world"]);
        let r = Request::parse(&json!({"input": [ids, [1, 2]]})).unwrap();
        assert_eq!(r.texts.len(), 2);
        assert_eq!(r.texts[0], "hello world");
        let r = Request::parse(&json!({"input": [4_294_967_296u64]})).unwrap();
        assert_eq!(r.texts, ["4294967296"]);
        for bad in [
            json!({"input": "x", "dimensions": 0}),
            json!({"input": "x", "dimensions": MAX_DIMENSIONS + 1}),
            json!({"input": "x", "dimensions": "8"}),
            json!({"input": "x", "encoding_format": "int8"}),
        ] {
            assert!(Request::parse(&bad).is_err(), "{bad}");
        }
    }

    /// base64 carries the same floats, little-endian.
    #[test]
    fn base64_is_the_float_bytes() {
        let r = Request::parse(
            &json!({"input": "a b c", "encoding_format": "base64", "dimensions": 16}),
        )
        .unwrap();
        let text = r.embedding(0);
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text.as_str().unwrap())
            .unwrap();
        let floats: Vec<f32> = bytes
            .chunks(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        assert_eq!(floats, embed("a b c", 16));
    }
}
