//! Safe semantic hits: a near prompt is refused when it differs from the stored one in any
//! number or in a negation. Embeddings place "What is 15% of 200?" and "What is 15% of 300?"
//! side by side, and "Can I cancel?" next to "Can I not cancel?"; their answers differ. The
//! rule compares the multiset of numbers (digit runs, with a decimal part) and the multiset of
//! negation words (`not`, `never`, `no`, `without`, `nor`, `none`, `nothing`, `nobody`,
//! `neither`, `cannot` and every `…n't`) of the two texts.
//!
//! Its limits: numbers written as words ("fifteen") and negations by other means ("fail to",
//! "un-", antonyms) are not seen; a paraphrase that merely moves a number ("200 × 15%") still
//! hits, as it should. Set a lower `score_threshold` where those matter.

/// Whether a candidate with prompt `stored` may answer `asked`.
pub fn compatible(asked: &str, stored: &str) -> bool {
    signature(asked) == signature(stored)
}

/// The numbers and negations of a text, sorted.
fn signature(text: &str) -> (Vec<String>, Vec<&'static str>) {
    let mut numbers = Vec::new();
    let mut negations = Vec::new();
    let lower = text.to_lowercase();
    let bytes = lower.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i].is_ascii_digit() {
            let start = i;
            while i < bytes.len()
                && (bytes[i].is_ascii_digit()
                    || ((bytes[i] == b'.' || bytes[i] == b',')
                        && bytes.get(i + 1).is_some_and(u8::is_ascii_digit)))
            {
                i += 1;
            }
            numbers.push(canonical_number(&lower[start..i]));
        } else {
            i += 1;
        }
    }
    for word in lower.split(|c: char| !(c.is_alphanumeric() || c == '\'' || c == '’')) {
        let w = word.trim_matches(|c| c == '\'' || c == '’');
        let neg = match w {
            "not" | "never" | "no" | "without" | "nor" | "none" | "nothing" | "nobody"
            | "neither" | "cannot" => Some("not"),
            _ if w.ends_with("n't") || w.ends_with("n’t") => Some("not"),
            _ => None,
        };
        if let Some(n) = neg {
            negations.push(n);
        }
    }
    numbers.sort();
    negations.sort();
    (numbers, negations)
}

/// "1,000" and "1000" are one number; "2.50" and "2.5" too.
fn canonical_number(s: &str) -> String {
    let s = s.replace(',', "");
    match s.split_once('.') {
        Some((int, frac)) => {
            let frac = frac.trim_end_matches('0');
            let int = int.trim_start_matches('0');
            let int = if int.is_empty() { "0" } else { int };
            if frac.is_empty() {
                int.to_string()
            } else {
                format!("{int}.{frac}")
            }
        }
        None => {
            let t = s.trim_start_matches('0');
            if t.is_empty() {
                "0".into()
            } else {
                t.to_string()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A different number or negation refuses the hit; paraphrases and reformatted numbers pass.
    #[test]
    fn numbers_and_negations_must_match() {
        assert!(!compatible("What is 15% of 200?", "What is 15% of 300?"));
        assert!(!compatible(
            "Can I cancel my order?",
            "Can I not cancel my order?"
        ));
        assert!(!compatible(
            "Can I cancel my order?",
            "I can't cancel my order?"
        ));
        assert!(!compatible("Pizza with cheese", "Pizza without cheese"));
        assert!(!compatible("Is it ever allowed?", "Is it never allowed?"));
        assert!(compatible(
            "How do I reset my password?",
            "how can I reset the password"
        ));
        assert!(compatible("What is 15% of 200?", "what's 15 % of 200"));
        assert!(compatible("Costs 1,000 dollars", "costs 1000 dollars"));
        assert!(compatible("2.50 per month", "2.5 per month"));
        assert!(!compatible("Call me at 10", "Call me at 10 or 11"));
    }
}
