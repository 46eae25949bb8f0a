use super::*;

/// Text of every shape a prompt takes: prose, code, JSON, several scripts and emoji,
/// whitespace of every kind (the look-ahead's cases), digits, contractions, and noise.
fn corpus() -> Vec<String> {
    let mut v = vec![
        "The quick brown fox jumps over the lazy dog. It's a test; we'll see — won't we? "
            .repeat(40),
        include_str!("mod.rs").to_string(),
        r#"{"model":"gpt-4o","messages":[{"role":"user","content":"hi\n\tthere"}],"n":1}"#
            .repeat(30),
        "Grüße aus Köln! 東京は晴れです。Привет, мир! مرحبا بالعالم 🚀🔥 naïve café ½ 12345678 "
            .repeat(30),
        "a  b   c\t\t d \n\n  e\r\n   f    \n \u{a0}x\u{3000}y  \n\n\n   ".repeat(40),
        "THE QUICK BROWN FOX'S DOG'LL SEE; HeLLo WoRLD I'M, YOU'RE, they've ".repeat(20),
        "1234567890 3.14159 1e10 0xFF 007 ".repeat(30),
        "  leading and trailing spaces   ".into(),
        "\n\n\n".into(),
        " ".into(),
        String::new(),
        "x".repeat(300),
        "éàü".repeat(100),
        "/* */ // => -> != <= >= :: ... ??? !!! ".repeat(20),
    ];
    // Deterministic noise over many character classes.
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut s = String::new();
    for _ in 0..20_000 {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let r = (x >> 8) as u32;
        s.push(match x % 11 {
            0 => ' ',
            1 => '\n',
            2 => char::from_u32(0x4e00 + r % 2000).unwrap_or('中'),
            3 => char::from_u32(0x41 + r % 58).unwrap_or('A'),
            4 => char::from_u32(0x30 + r % 10).unwrap_or('0'),
            5 => char::from_u32(0x1f600 + r % 80).unwrap_or('😀'),
            6 => '\'',
            7 => char::from_u32(0x61 + r % 26).unwrap_or('a'),
            8 => char::from_u32(0x21 + r % 15).unwrap_or('!'),
            9 => char::from_u32(0x300 + r % 0x70).unwrap_or('\u{301}'),
            _ => char::from_u32(0x400 + r % 200).unwrap_or('ж'),
        });
    }
    v.push(s);
    v
}

/// The same count as tiktoken's o200k_base on every corpus, whole and line by line.
#[test]
fn counts_as_tiktoken() {
    let ours = O200k::get();
    let tiktoken = tiktoken_rs::o200k_base_singleton();
    for text in corpus() {
        assert_eq!(
            ours.count(&text),
            tiktoken.encode_ordinary(&text).len(),
            "{:?}",
            &text[..text.len().min(80)]
        );
        for line in text.split_inclusive('\n') {
            assert_eq!(
                ours.count(line),
                tiktoken.encode_ordinary(line).len(),
                "{line:?}"
            );
        }
    }
}

/// The compiled table is o200k's ordinary vocabulary: every token maps back to its rank.
#[test]
fn table_holds_the_vocabulary() {
    let v = &O200k::get().vocab;
    assert_eq!(v.len(), 199_998);
    let tiktoken = tiktoken_rs::o200k_base_singleton();
    for rank in (0..v.len()).step_by(97).chain([0, 255, v.len() - 1]) {
        assert_eq!(v.rank(v.token(rank)), Some(rank as u32));
        assert_eq!(
            tiktoken.decode_bytes(&[rank as u32]).unwrap(),
            v.token(rank)
        );
    }
    assert_eq!(v.rank(b"no such token at all, surely"), None);
}
