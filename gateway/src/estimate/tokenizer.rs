//! Token counting: estimates for the reservation and the fallback count when a backend reports
//! no usage, with o200k_base (the GPT-4o family's) as tiktoken counts it ([`super::bpe`]: the
//! vocabulary compiled into the binary).
//!
//! Counting is linear in the text whatever the client sends: the pre-tokenizer makes a
//! run without whitespace one piece, and byte-pair merging is quadratic in a piece's length
//! (3.2 MB of letters took 15 s), so runs longer than [`MAX_RUN`] bytes are cut and counted in
//! parts (a cut can only add a token). A prompt above [`BLOCKING_THRESHOLD`] bytes is counted
//! off the runtime ([`crate::heavy`]: a very large one at low priority), so it never stalls
//! the runtime, and the work stops as soon as the request is dropped (the client left).

use super::bpe::O200k;
use super::{Piece, Prompt, file_tokens};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

/// Above this many bytes of text, tokenizing moves off the runtime ([`crate::heavy::offload`]).
pub const BLOCKING_THRESHOLD: usize = 8 * 1024;

/// Longest run of whitespace or of non-whitespace counted as one piece.
pub const MAX_RUN: usize = 256;

/// The loaded encoder.
#[derive(Clone, Copy)]
pub struct Tokenizer {
    bpe: &'static O200k,
}

/// Set when the request that asked for a count is gone.
#[derive(Clone, Default)]
struct Cancel(Arc<AtomicBool>);

impl Cancel {
    fn is_set(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// Sets the flag when dropped: the future counting a prompt was dropped.
struct CancelOnDrop(Cancel);

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        self.0.0.store(true, Ordering::Relaxed);
    }
}

impl Tokenizer {
    /// Loads the encoder (once per process; later calls are free).
    pub fn load() -> Tokenizer {
        Tokenizer { bpe: O200k::get() }
    }

    /// Tokens in `text`, inline (for short text).
    pub fn count(&self, text: &str) -> u64 {
        self.count_until(text, &Cancel::default())
    }

    /// Tokens in `text`, cutting runs longer than [`MAX_RUN`]; 0 once `cancel` is set.
    fn count_until(&self, text: &str, cancel: &Cancel) -> u64 {
        let mut total = 0;
        let (mut start, mut run_start) = (0, 0);
        let mut run_ws = None;
        for (i, c) in text.char_indices() {
            let ws = c.is_whitespace();
            if run_ws != Some(ws) {
                run_ws = Some(ws);
                run_start = i;
            } else if i - run_start >= MAX_RUN {
                if cancel.is_set() {
                    return 0;
                }
                total += self.bpe.count(&text[start..i]) as u64;
                (start, run_start) = (i, i);
            }
        }
        total + self.bpe.count(&text[start..]) as u64
    }

    fn count_piece(&self, p: &Piece, cancel: &Cancel) -> u64 {
        match p {
            Piece::Text(s) => self.count_until(s, cancel),
            Piece::File { base64, per_page } => {
                file_tokens(base64, *per_page, |t| self.count_until(t, cancel))
            }
        }
    }

    /// Tokens of a prompt: off the runtime when it is large, and abandoned when the returned
    /// future is dropped.
    pub async fn count_prompt(&self, prompt: Prompt) -> u64 {
        let size: usize = prompt
            .pieces
            .iter()
            .map(|p| match p {
                Piece::Text(s) => s.len(),
                Piece::File { base64, .. } => base64.len(),
            })
            .sum();
        let me = *self;
        let cancel = Cancel::default();
        let work = {
            let cancel = cancel.clone();
            move || {
                let counted = prompt
                    .pieces
                    .iter()
                    .map(|p| me.count_piece(p, &cancel))
                    .fold(0u64, u64::saturating_add);
                counted.saturating_add(prompt.fixed)
            }
        };
        if size <= BLOCKING_THRESHOLD {
            return work();
        }
        let _guard = CancelOnDrop(cancel);
        crate::heavy::offload(size, work)
            .await
            .unwrap_or(size as u64)
    }

    /// Tokens in a completion text the backend did not count.
    pub async fn count_text(&self, text: String) -> u64 {
        self.count_prompt(Prompt {
            pieces: vec![Piece::Text(text)],
            fixed: 0,
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A large prompt is counted off the runtime, with the same result.
    #[tokio::test]
    async fn large_prompt_same_count() {
        let t = Tokenizer::load();
        let big = "lorem ipsum dolor sit amet ".repeat(2000);
        assert_eq!(t.count_text(big.clone()).await, t.count(&big));
        assert_eq!(t.count(&big), t.bpe.count(&big) as u64);
    }

    /// Long runs without whitespace are counted in linear time, never below tiktoken's count.
    #[test]
    fn long_runs_are_linear_and_not_undercounted() {
        let t = Tokenizer::load();
        for unit in ["a", "xq", "9", "=", " ", "é"] {
            let s = unit.repeat(4_000);
            let exact = t.bpe.count(&s) as u64;
            let ours = t.count(&s);
            assert!(ours >= exact, "{unit:?}: {ours} < {exact}");
            assert!(ours <= exact + (s.len() / MAX_RUN) as u64 + 1, "{unit:?}");
        }
        // 1 MB of one letter: quadratic merging would take minutes; cut, it takes well under a
        // second even in a debug build, and each cut piece is at least one token.
        let big = "a".repeat(1 << 20);
        let n = t.count(&big);
        assert!(n >= (1 << 20) as u64 / MAX_RUN as u64, "{n}");
    }

    /// No o200k token is longer than `MAX_RUN` bytes, so text of `n` bytes is at least
    /// `n / MAX_RUN` tokens (the pipeline's lower bound before tokenizing).
    #[test]
    fn no_token_longer_than_a_run() {
        let t = Tokenizer::load();
        let v = &t.bpe.vocab;
        let longest = (0..v.len()).map(|r| v.token(r).len()).max().unwrap();
        assert!(longest <= MAX_RUN, "{longest}");
    }

    /// A cancelled count stops between pieces of a run, and dropping the count's future sets
    /// the flag the blocking work checks.
    #[test]
    fn dropped_count_stops() {
        let t = Tokenizer::load();
        let cancel = Cancel::default();
        let guard = CancelOnDrop(cancel.clone());
        assert!(!cancel.is_set());
        drop(guard);
        assert!(cancel.is_set());
        assert_eq!(t.count_until(&"b".repeat(1 << 20), &cancel), 0);
    }
}
