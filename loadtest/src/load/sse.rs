//! Counts content tokens in a streamed response as its bytes arrive, without parsing JSON:
//! the load generator shares the machine with the system under test, so it keeps its own
//! per-chunk work small.
//!
//! A `data:` line counts as one token when it carries non-empty `"content"` (chat) or `"text"`
//! (completions), or is a Responses API `response.output_text.delta` event. Frames are
//! expected in compact JSON, as OpenAI, Azure and the mock send them.

/// Incremental line scanner over an SSE body.
#[derive(Default)]
pub(crate) struct SseCounter {
    /// The unfinished last line of the previous chunk.
    partial: Vec<u8>,
}

impl SseCounter {
    /// Feeds the next body chunk; returns how many content tokens it completed.
    pub(crate) fn feed(&mut self, chunk: &[u8]) -> u64 {
        let mut tokens = 0;
        let mut rest = chunk;
        while let Some(end) = rest.iter().position(|&b| b == b'\n') {
            let line = &rest[..end];
            if self.partial.is_empty() {
                tokens += u64::from(is_content(line));
            } else {
                self.partial.extend_from_slice(line);
                tokens += u64::from(is_content(&self.partial));
                self.partial.clear();
            }
            rest = &rest[end + 1..];
        }
        self.partial.extend_from_slice(rest);
        tokens
    }
}

fn is_content(line: &[u8]) -> bool {
    let Some(data) = line.strip_prefix(b"data:") else {
        return false;
    };
    if contains(data, br#""type":"response."#) {
        return contains(data, br#""type":"response.output_text.delta""#);
    }
    non_empty_field(data, br#""content":""#) || non_empty_field(data, br#""text":""#)
}

/// Whether `field` (ending in the opening quote of a string value) occurs with a non-empty value.
fn non_empty_field(data: &[u8], field: &[u8]) -> bool {
    find(data, field).is_some_and(|at| data.get(at + field.len()).is_some_and(|&b| b != b'"'))
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    find(hay, needle).is_some()
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Content chunks are counted across arbitrary chunk boundaries; role, finish and usage
    /// chunks are not.
    #[test]
    fn counts_content_chunks_across_splits() {
        let body = concat!(
            "data: {\"choices\":[{\"delta\":{\"role\":\"assistant\",\"content\":\"\"}}]}\n\n",
            "data: {\"choices\":[{\"delta\":{\"content\":\" hello\"}}]}\n\n",
            "data: {\"choices\":[{\"text\":\" world\"}]}\n\n",
            "event: response.output_text.delta\n",
            "data: {\"type\":\"response.output_text.delta\",\"delta\":\" the\"}\n\n",
            "data: {\"type\":\"response.output_text.done\",\"text\":\" the\"}\n\n",
            "data: {\"choices\":[],\"usage\":{\"prompt_tokens\":3}}\n\n",
            "data: [DONE]\n\n",
        )
        .as_bytes();
        for split in 1..body.len() {
            let mut counter = SseCounter::default();
            let n = counter.feed(&body[..split]) + counter.feed(&body[split..]);
            assert_eq!(n, 3, "split at {split}");
        }
    }
}
