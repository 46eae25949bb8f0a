//! Builds the o200k_base vocabulary into a compact table that the tokenizer
//! (`src/estimate/bpe.rs`) reads from the binary: each ordinary token's bytes in rank order
//! (one arena and its offsets) and an open-addressing hash table from bytes to rank. About 4 MB,
//! read-only and shared, instead of tiktoken's ~26 MB of hash maps built at start-up.
//!
//! The vocabulary comes from tiktoken-rs (a build dependency only), so the counts are
//! tiktoken's; `estimate::bpe` tests compare the two on a corpus.
//!
//! Layout (little endian u32 words, then bytes):
//! `[n_tokens][table_bits][offsets: n_tokens + 1][table: 1 << table_bits][arena bytes]`,
//! a table slot holding `rank + 1` (0 = empty), probed linearly from `hash(bytes)`.

use std::io::Write as _;

/// The hash the table is built with; `src/estimate/bpe.rs` has the same function.
fn hash(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h = (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ (h >> 29)
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    let bpe = tiktoken_rs::o200k_base().expect("tiktoken's o200k_base");
    // Ordinary tokens have ranks 0..n with no gap; the special tokens come after a gap.
    let mut tokens: Vec<Vec<u8>> = Vec::new();
    while let Ok(bytes) = bpe.decode_bytes(&[tokens.len() as u32]) {
        tokens.push(bytes);
    }
    assert!(
        tokens.len() > 199_000,
        "o200k_base has 199,998 ordinary tokens, got {}",
        tokens.len()
    );
    let bits = 19u32;
    assert!(
        tokens.len() * 2 < 1 << bits,
        "the table must stay under half full"
    );
    let mask = (1u64 << bits) - 1;
    let mut table = vec![0u32; 1 << bits];
    let mut offsets = Vec::with_capacity(tokens.len() + 1);
    let mut arena = Vec::new();
    for (rank, t) in tokens.iter().enumerate() {
        offsets.push(arena.len() as u32);
        arena.extend_from_slice(t);
        let mut i = hash(t) & mask;
        while table[i as usize] != 0 {
            i = (i + 1) & mask;
        }
        table[i as usize] = rank as u32 + 1;
    }
    offsets.push(arena.len() as u32);
    let out = std::path::Path::new(&std::env::var("OUT_DIR").expect("OUT_DIR")).join("o200k.bin");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&out).expect("create o200k.bin"));
    let mut word = |v: u32| f.write_all(&v.to_le_bytes()).expect("write o200k.bin");
    word(tokens.len() as u32);
    word(bits);
    offsets.iter().chain(&table).for_each(|&v| word(v));
    f.write_all(&arena).expect("write o200k.bin");
}
