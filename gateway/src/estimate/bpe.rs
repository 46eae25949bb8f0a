//! o200k_base token counting, the same counts as tiktoken's `count_ordinary`, from a compact
//! table compiled into the binary (`build.rs`: ~4 MB read-only, shared, nothing built at
//! start-up) instead of tiktoken's ~26 MB of hash maps.
//!
//! Two steps, as tiktoken:
//! - **Pre-tokenization** with o200k's pattern. Its one look-ahead, `\s+(?!\S)`, is emulated
//!   the way GitHub's `bpe-openai` does: the alternatives are separate patterns of one
//!   leftmost-first regex, `\s+\s` stands for the look-ahead and gives its last character
//!   back, so the whole pattern runs on `regex-automata`'s DFAs instead of a backtracking engine.
//! - **Byte-pair merging** of each piece: tiktoken's algorithm (merge the lowest-ranked adjacent
//!   pair, leftmost first, until none is in the vocabulary), counting the parts left.

use regex_automata::meta::{Cache, Regex};
use regex_automata::{Anchored, Input};
use std::cell::RefCell;
use std::sync::LazyLock;

static TABLE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k.bin"));

/// o200k's pre-tokenizer pattern (tiktoken's `O200K_BASE_PAT_STR`), with `\s+(?!\S)` split out.
const PATTERNS: [&str; 3] = [
    concat!(
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
        r"|\p{N}{1,3}",
        r"| ?[^\s\p{L}\p{N}]+[\r\n/]*",
        r"|\s*[\r\n]+",
        r"|\s+$",
    ),
    // `\s+(?!\S)`: whitespace followed by more whitespace; the last character is given back.
    r"\s+\s",
    r"\s+",
];

/// The vocabulary as `build.rs` laid it out: counts, offsets into the arena, the hash table.
pub struct Vocabulary {
    n: usize,
    mask: usize,
    offsets: usize,
    table: usize,
    arena: usize,
}

/// The same hash as `build.rs`.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29)
}

fn word(i: usize) -> usize {
    u32::from_le_bytes([TABLE[i], TABLE[i + 1], TABLE[i + 2], TABLE[i + 3]]) as usize
}

impl Vocabulary {
    fn new() -> Vocabulary {
        let (n, bits) = (word(0), word(4));
        let offsets = 8;
        let table = offsets + 4 * (n + 1);
        let arena = table + 4 * (1 << bits);
        Vocabulary {
            n,
            mask: (1 << bits) - 1,
            offsets,
            table,
            arena,
        }
    }

    /// Ordinary tokens in the vocabulary.
    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.n
    }

    /// The bytes of token `rank`.
    pub fn token(&self, rank: usize) -> &'static [u8] {
        debug_assert!(rank < self.n, "rank {rank} beyond the vocabulary");
        let at = self.offsets + 4 * rank;
        &TABLE[self.arena + word(at)..self.arena + word(at + 4)]
    }

    /// The rank of `bytes`, if they are a token.
    pub fn rank(&self, bytes: &[u8]) -> Option<u32> {
        let mut i = hash(bytes) as usize & self.mask;
        loop {
            let slot = word(self.table + 4 * i);
            if slot == 0 {
                return None;
            }
            if self.token(slot - 1) == bytes {
                return Some(slot as u32 - 1);
            }
            i = (i + 1) & self.mask;
        }
    }

    /// Tokens in one pre-tokenized piece: tiktoken's byte-pair merge.
    fn count_piece(&self, piece: &[u8]) -> usize {
        if piece.len() <= 1 || self.rank(piece).is_some() {
            return 1.min(piece.len());
        }
        // (start of a part, rank of it merged with the next part)
        let rank_of = |parts: &[(usize, u32)], i: usize| -> u32 {
            if i + 2 < parts.len() {
                self.rank(&piece[parts[i].0..parts[i + 2].0])
                    .unwrap_or(u32::MAX)
            } else {
                u32::MAX
            }
        };
        let mut parts: Vec<(usize, u32)> = (0..=piece.len()).map(|i| (i, u32::MAX)).collect();
        for i in 0..parts.len() - 2 {
            parts[i].1 = rank_of(&parts, i);
        }
        // Merge the lowest-ranked pair (leftmost on ties) until no pair is a token.
        while let Some((i, _)) = parts[..parts.len() - 1]
            .iter()
            .enumerate()
            .filter(|(_, p)| p.1 != u32::MAX)
            .min_by_key(|(i, p)| (p.1, *i))
        {
            parts.remove(i + 1);
            parts[i].1 = rank_of(&parts, i);
            if i > 0 {
                parts[i - 1].1 = rank_of(&parts, i - 1);
            }
        }
        parts.len() - 1
    }
}

/// The vocabulary and the pre-tokenizer, built once per process.
pub struct O200k {
    pub vocab: Vocabulary,
    pre: Regex,
}

static O200K: LazyLock<O200k> = LazyLock::new(|| O200k {
    vocab: Vocabulary::new(),
    pre: Regex::new_many(&PATTERNS).expect("o200k's pre-tokenizer compiles"),
});

impl O200k {
    pub fn get() -> &'static O200k {
        &O200K
    }

    /// Tokens in `text`, as tiktoken's o200k_base `count_ordinary` counts them.
    pub fn count(&self, text: &str) -> usize {
        // The pre-tokenizer's search state, one per thread and kept warm: `Regex::find` would
        // borrow one from the regex's pool for every piece, through a mutex on any thread but
        // the first that used it (a fifth of a large prompt's count).
        thread_local! {
            static CACHE: RefCell<Option<Cache>> = const { RefCell::new(None) };
        }
        CACHE.with_borrow_mut(|cache| {
            let cache = cache.get_or_insert_with(|| self.pre.create_cache());
            self.count_with(cache, text)
        })
    }

    /// [`O200k::count`] with the pre-tokenizer's search state given. There is one `O200k` per
    /// process (`O200K`), so a thread's cache is always this regex's.
    fn count_with(&self, cache: &mut Cache, text: &str) -> usize {
        let mut at = 0;
        let mut total = 0;
        while at < text.len() {
            let input = Input::new(&text[at..]).anchored(Anchored::Yes);
            let Some(m) = self.pre.search_with(cache, &input) else {
                // Every character matches some alternative; count the rest bytewise if not.
                return total + self.vocab.count_piece(&text.as_bytes()[at..]);
            };
            let mut end = at + m.end();
            if m.pattern().as_usize() == 1 {
                // The look-ahead character is not part of the piece.
                let last = text[at..end].chars().next_back().map_or(0, char::len_utf8);
                end -= last;
            }
            total += self.vocab.count_piece(&text.as_bytes()[at..end]);
            at = end;
        }
        total
    }
}

#[cfg(test)]
#[path = "bpe_tests.rs"]
mod tests;
