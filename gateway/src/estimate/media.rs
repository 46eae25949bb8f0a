//! What media cost: images by their documented tiles or patches per model family, audio by its
//! duration, files by their pages or text. Sizes are read from the data itself (a `data:` URL's
//! header); nothing is ever fetched.

use base64::Engine as _;

/// How a model bills an image (OpenAI's "Calculating costs" for vision).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ImageRule {
    /// Fit in 2048×2048, shortest side scaled to 768, then `base + tile × 512-px tiles`
    /// (`detail: low` costs `base` alone).
    Tiles { base: u64, tile: u64 },
    /// 32-px patches, at most 1536, times a multiplier (in thousandths).
    Patches { milli: u64 },
}

/// The most 512-px tiles an image can need (2048 × 768 after scaling).
const MAX_TILES: u64 = 8;
const MAX_PATCHES: u64 = 1536;
/// Text on one PDF page, on top of its page image (a dense page is about 800 tokens).
pub(super) const PDF_PAGE_TEXT: u64 = 1_000;

impl ImageRule {
    /// The rule for a model, by its family name; unknown models bill like GPT-4o.
    pub fn for_model(model: &str) -> ImageRule {
        let m = model.to_ascii_lowercase();
        let has = |s: &str| m.contains(s);
        if has("4o-mini") {
            ImageRule::Tiles {
                base: 2833,
                tile: 5667,
            }
        } else if has("4.1-nano") || has("5-nano") {
            ImageRule::Patches { milli: 2460 }
        } else if has("4.1-mini") || has("5-mini") {
            ImageRule::Patches { milli: 1620 }
        } else if has("o4-mini") {
            ImageRule::Patches { milli: 1720 }
        } else if m.starts_with("o1") || m.starts_with("o3") {
            ImageRule::Tiles {
                base: 75,
                tile: 150,
            }
        } else if has("gpt-5") {
            ImageRule::Tiles {
                base: 70,
                tile: 140,
            }
        } else {
            ImageRule::Tiles {
                base: 85,
                tile: 170,
            }
        }
    }

    /// Tokens of one image of `size` (the largest possible when unknown).
    pub fn tokens(self, size: Option<(u64, u64)>, low: bool) -> u64 {
        match self {
            ImageRule::Tiles { base, .. } if low => base,
            ImageRule::Tiles { base, tile } => base + tile * size.map_or(MAX_TILES, tiles),
            ImageRule::Patches { milli } => {
                (size.map_or(MAX_PATCHES, patches) * milli).div_ceil(1000)
            }
        }
    }

    /// The most one image can cost.
    pub fn max(self) -> u64 {
        self.tokens(None, false)
    }
}

pub(super) fn tiles((w, h): (u64, u64)) -> u64 {
    let (mut w, mut h) = (w.max(1) as f64, h.max(1) as f64);
    if w > 2048.0 || h > 2048.0 {
        let s = 2048.0 / w.max(h);
        (w, h) = (w * s, h * s);
    }
    if w.min(h) > 768.0 {
        let s = 768.0 / w.min(h);
        (w, h) = (w * s, h * s);
    }
    ((w / 512.0).ceil() as u64 * (h / 512.0).ceil() as u64).clamp(1, MAX_TILES)
}

pub(super) fn patches((w, h): (u64, u64)) -> u64 {
    let (w, h) = (w.max(1), h.max(1));
    let n = w.div_ceil(32) * h.div_ceil(32);
    if n <= MAX_PATCHES {
        return n;
    }
    // Scaled down to fit the patch budget.
    let s = ((32.0 * 32.0 * MAX_PATCHES as f64) / (w as f64 * h as f64)).sqrt();
    let (w, h) = ((w as f64 * s).floor() as u64, (h as f64 * s).floor() as u64);
    (w.div_ceil(32) * h.div_ceil(32)).clamp(1, MAX_PATCHES)
}

/// The base64 payload of a `data:` URL (or the string itself).
pub(super) fn strip_data_url(s: &str) -> &str {
    match s.strip_prefix("data:") {
        Some(rest) => rest.split_once(',').map_or(rest, |(_, d)| d),
        None => s,
    }
}

/// Decodes the start of a base64 payload (enough for any image or audio header).
pub(super) fn decode_prefix(b64: &str, bytes: usize) -> Vec<u8> {
    let take = (bytes.div_ceil(3) * 4).min(b64.len() / 4 * 4);
    base64::engine::general_purpose::STANDARD
        .decode(&b64.as_bytes()[..take])
        .unwrap_or_default()
}

/// Width and height of an image given inline as a `data:` URL; `None` for a link, which is
/// never fetched.
pub(super) fn image_size(url: &str) -> Option<(u64, u64)> {
    if !url.starts_with("data:") {
        return None;
    }
    let head = decode_prefix(strip_data_url(url), 64 * 1024);
    let s = imagesize::blob_size(&head).ok()?;
    Some((s.width as u64, s.height as u64))
}

/// Audio input: one token per 100 ms. A WAV header gives the duration; other formats are
/// assumed to be at least 32 kbit/s.
pub(super) fn audio_tokens(b64: &str, format: Option<&str>) -> u64 {
    let b64 = strip_data_url(b64);
    let bytes = (b64.len() as u64 / 4) * 3;
    let mut byte_rate = 4_000;
    if format == Some("wav") {
        let head = decode_prefix(b64, 64);
        if head.len() >= 32 && &head[..4] == b"RIFF" && &head[8..12] == b"WAVE" {
            let rate = u32::from_le_bytes([head[28], head[29], head[30], head[31]]) as u64;
            if rate > 0 {
                byte_rate = rate;
            }
        }
    }
    (bytes * 10).div_ceil(byte_rate).max(1)
}

/// What an attached file costs (on the blocking pool: it decodes the whole file).
pub fn file_tokens(b64: &str, per_page: u64, count_text: impl Fn(&str) -> u64) -> u64 {
    let data = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .unwrap_or_default();
    if data.is_empty() {
        // Not base64: its characters as text.
        return count_text(b64);
    }
    if data.starts_with(b"%PDF") {
        let pages = pdf_pages(&data);
        // Page objects inside compressed object streams cannot be counted without inflating
        // them: assume a page per 20 KB.
        let pages = if pages > 0 {
            pages
        } else {
            (data.len() as u64).div_ceil(20_000)
        };
        return pages * per_page;
    }
    count_text(&String::from_utf8_lossy(&data))
}

/// `/Type /Page` objects (not `/Pages`) in a PDF.
pub(super) fn pdf_pages(data: &[u8]) -> u64 {
    let mut n = 0;
    for pat in [&b"/Type /Page"[..], b"/Type/Page"] {
        for i in memchr::memmem::find_iter(data, pat) {
            if data.get(i + pat.len()) != Some(&b's') {
                n += 1;
            }
        }
    }
    n
}
