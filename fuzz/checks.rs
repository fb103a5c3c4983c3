//! The invariants the fuzz targets check, shared with `tests/fuzz_seeds.rs`, which replays
//! the committed corpus (`fuzz/corpus/*`) through them in every CI run.

use tidings::model::ModelDir;
use tidings::pipeline::entities::{self, Tag, TagSet};
use tidings::pipeline::{merge_windows, tokens, windows};

/// Label names `bio_decode` picks from: valid tags, bare `O`, and junk.
const NAMES: &[&str] = &[
    "O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-", "I-", "",
    "X", "PER", "b-per", "S-PER", "E-LOC", "I-B-X",
];

/// The NER model directory (tokenizer, config) and its tag set.
pub fn ner_model(dir: &std::path::Path) -> (ModelDir, TagSet) {
    let md = ModelDir::open(dir).expect("open the NER model directory (tokenizer, config)");
    let tags = TagSet::new(&md.config.labels());
    (md, tags)
}

/// The text pipeline of entity extraction, everything but the model: the real tokenizer
/// (pieces, byte offsets, words, casing), windowing, merging window outputs back per piece,
/// constrained BIO decoding, snapping spans to words, char/byte offsets and grouping.
///
/// Input: two bytes choose the window (size 1..=64, overlap below it), the rest is the text
/// (invalid UTF-8 replaced, as the gRPC layer never lets it through). Tag probabilities are
/// derived from the input bytes, the same for a piece in every window that holds it.
///
/// Checks: no panic; merging windows gives back each piece's own probabilities; every
/// mention's `text` is exactly `text[byte_start..byte_end]` and the chars `start..end`;
/// mentions are ordered and disjoint; groups account for every mention.
pub fn text_pipeline(md: &ModelDir, tags: &TagSet, data: &[u8]) {
    if data.len() < 2 {
        return;
    }
    let size = 1 + data[0] as usize % 64;
    let overlap = data[1] as usize % size;
    let text = String::from_utf8_lossy(&data[2..]);
    let Ok(toks) = tokens::tokenize(&md.tokenizer, &text) else {
        return;
    };
    let n = toks.len();
    assert_eq!(toks.ids.len(), n);
    assert_eq!(toks.casing.len(), n);
    assert_eq!(toks.words.len(), n);
    for &(a, b) in &toks.offsets {
        assert!(
            a <= b && b <= text.len(),
            "offset {a}..{b} outside the text"
        );
        assert!(text.is_char_boundary(a) && text.is_char_boundary(b));
    }

    // Probabilities of each piece, from the input bytes; rows sum to 1.
    let labels = tags.tags().len();
    let mut probs = vec![0f32; n * labels];
    for (i, p) in probs.iter_mut().enumerate() {
        *p = 1.0 + data[i % data.len()] as f32 * (1 + i % 7) as f32;
    }
    for row in probs.chunks_mut(labels) {
        let s: f32 = row.iter().sum();
        row.iter_mut().for_each(|p| *p /= s);
    }

    let wins = windows::plan(n, size, overlap);
    if n > 0 {
        assert_eq!(wins.first().map(|w| w.start), Some(0));
        assert_eq!(wins.last().map(|w| w.end), Some(n));
    }
    for w in &wins {
        assert!(!w.is_empty() && w.len() <= size && w.end <= n);
    }
    let per_window: Vec<Vec<f32>> = wins
        .iter()
        .map(|w| probs[w.start * labels..w.end * labels].to_vec())
        .collect();
    let merged = merge_windows(n, &wins, &per_window, labels);
    assert_eq!(
        merged, probs,
        "merging windows changed a piece's probabilities"
    );

    let mentions = entities::decode(&text, &toks, &merged, tags);
    let mut last_end = 0;
    for m in &mentions {
        let (bs, be) = (m.byte_start as usize, m.byte_end as usize);
        assert!(bs < be && bs >= last_end, "mentions overlap or are empty");
        last_end = be;
        assert_eq!(
            &text[bs..be],
            m.text,
            "byte offsets do not slice to the mention"
        );
        let by_chars: String = text
            .chars()
            .skip(m.start as usize)
            .take((m.end - m.start) as usize)
            .collect();
        assert_eq!(by_chars, m.text, "char offsets do not slice to the mention");
        assert!(m.score.is_finite() && (0.0..=1.0 + 1e-5).contains(&m.score));
    }
    let groups = entities::group(&mentions);
    let counted: u32 = groups.iter().map(|g| g.mentions).sum();
    assert_eq!(
        counted as usize,
        mentions.len(),
        "groups lost or doubled a mention"
    );
}

/// Constrained BIO decoding over any label set and any scores: arbitrary label names
/// (valid `B-`/`I-` tags, bare `O`, junk), NaN, infinities and rows that do not sum to 1.
///
/// Input: the first byte is the number of labels (1..=12); each label is a short name picked
/// from a fixed list by the next bytes; the rest are the f32 scores, little-endian.
///
/// Checks: no panic; the path has one tag per piece, each a valid index; spans lie inside
/// the sequence, are ordered and disjoint, and each starts on a tag of its own type.
pub fn bio_decode(data: &[u8]) {
    let Some((&k, rest)) = data.split_first() else {
        return;
    };
    let n = 1 + k as usize % 12;
    if rest.len() < n {
        return;
    }
    let labels: Vec<String> = rest[..n]
        .iter()
        .map(|&b| NAMES[b as usize % NAMES.len()].to_string())
        .collect();
    let probs: Vec<f32> = rest[n..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    let tags = TagSet::new(&labels);
    let len = probs.len() / n;
    let path = tags.decode(&probs[..len * n]);
    assert_eq!(path.len(), len);
    assert!(path.iter().all(|&t| t < n));
    let spans = tags.spans(&path);
    let mut last = 0;
    for (a, b, _) in &spans {
        assert!(a < b && *a >= last && *b <= len, "span {a}..{b} of {len}");
        last = *b;
    }
    // Every span starts on a tag of its type.
    for (a, _, ty) in &spans {
        match &tags.tags()[path[*a]] {
            Tag::Begin(t) | Tag::Inside(t) => assert_eq!(t, ty),
            Tag::Outside => panic!("a span starts on O"),
        }
    }
}
