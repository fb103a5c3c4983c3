//! From per-piece tag probabilities to entity mentions: constrained BIO decoding, snapping to
//! word boundaries, character offsets, and grouping of repeated mentions.

use super::tokens::Tokens;
use std::collections::HashMap;

/// How a tag name reads in a BIO scheme.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Tag {
    /// Outside any entity.
    Outside,
    /// First piece of an entity of this type.
    Begin(String),
    /// A later piece of an entity of this type.
    Inside(String),
}

impl Tag {
    /// Parses `O`, `B-PER`, `I-PER` (also `B_PER`; BIOES `S-`/`U-` read as begin and
    /// `E-`/`L-` as inside; a bare type such as `PER` as inside).
    pub fn parse(name: &str) -> Tag {
        if name == "O" || name.is_empty() {
            return Tag::Outside;
        }
        let (prefix, ty) = match name.split_once(['-', '_']) {
            Some((p, t)) if p.len() == 1 => (p, t),
            _ => ("I", name),
        };
        match prefix {
            "B" | "S" | "U" => Tag::Begin(ty.to_string()),
            _ => Tag::Inside(ty.to_string()),
        }
    }

    /// The entity type, if any.
    pub fn entity_type(&self) -> Option<&str> {
        match self {
            Tag::Outside => None,
            Tag::Begin(t) | Tag::Inside(t) => Some(t),
        }
    }
}

/// A tag set with the transitions a BIO sequence allows.
#[derive(Debug, Clone)]
pub struct TagSet {
    tags: Vec<Tag>,
    /// `allowed[prev * n + cur]`.
    allowed: Vec<bool>,
    /// Whether a sequence may start with each tag.
    start: Vec<bool>,
}

impl TagSet {
    /// Builds the tag set of a model's labels.
    pub fn new(labels: &[String]) -> Self {
        let tags: Vec<Tag> = labels.iter().map(|l| Tag::parse(l)).collect();
        let n = tags.len();
        let mut allowed = vec![true; n * n];
        let mut start = vec![true; n];
        for (c, cur) in tags.iter().enumerate() {
            if let Tag::Inside(ty) = cur {
                start[c] = false;
                for (p, prev) in tags.iter().enumerate() {
                    allowed[p * n + c] = prev.entity_type() == Some(ty.as_str());
                }
            }
        }
        // A tag set with only inside tags (IO scheme) has no legal start; allow everything.
        if !start.iter().any(|&s| s) {
            start.fill(true);
            allowed.fill(true);
        }
        Self {
            tags,
            allowed,
            start,
        }
    }

    /// The tags, by label index.
    pub fn tags(&self) -> &[Tag] {
        &self.tags
    }

    /// Entity types the tag set can produce, sorted.
    pub fn entity_types(&self) -> Vec<String> {
        let mut t: Vec<String> = self
            .tags
            .iter()
            .filter_map(|t| t.entity_type().map(str::to_string))
            .collect();
        t.sort();
        t.dedup();
        t
    }

    /// The most probable tag sequence that is a valid BIO sequence (Viterbi over
    /// log-probabilities). `probs` is `[len, n]` row-major, rows summing to 1.
    pub fn decode(&self, probs: &[f32]) -> Vec<usize> {
        let n = self.tags.len();
        if n == 0 {
            return Vec::new();
        }
        let len = probs.len() / n;
        if len == 0 {
            return Vec::new();
        }
        let lp = |t: usize, k: usize| (probs[t * n + k].max(1e-12)).ln();
        let mut score: Vec<f32> = (0..n)
            .map(|k| {
                if self.start[k] {
                    lp(0, k)
                } else {
                    f32::NEG_INFINITY
                }
            })
            .collect();
        let mut back = vec![0usize; len * n];
        for t in 1..len {
            let mut next = vec![f32::NEG_INFINITY; n];
            for c in 0..n {
                let mut best = (f32::NEG_INFINITY, 0usize);
                for (p, &s) in score.iter().enumerate() {
                    if self.allowed[p * n + c] && s > best.0 {
                        best = (s, p);
                    }
                }
                next[c] = best.0 + lp(t, c);
                back[t * n + c] = best.1;
            }
            score = next;
        }
        let mut k = (0..n)
            .max_by(|&a, &b| score[a].total_cmp(&score[b]))
            .unwrap_or(0);
        let mut path = vec![0usize; len];
        for t in (0..len).rev() {
            path[t] = k;
            k = back[t * n + k];
        }
        path
    }

    /// Turns a tag path into `(first_piece, last_piece_exclusive, type)` spans.
    pub fn spans(&self, path: &[usize]) -> Vec<(usize, usize, String)> {
        let mut out: Vec<(usize, usize, String)> = Vec::new();
        let mut open: Option<(usize, String)> = None;
        for (t, &k) in path.iter().enumerate() {
            match &self.tags[k] {
                Tag::Outside => {
                    if let Some((s, ty)) = open.take() {
                        out.push((s, t, ty));
                    }
                }
                Tag::Begin(ty) => {
                    if let Some((s, prev)) = open.take() {
                        out.push((s, t, prev));
                    }
                    open = Some((t, ty.clone()));
                }
                Tag::Inside(ty) => match &open {
                    Some((_, cur)) if cur == ty => {}
                    _ => {
                        if let Some((s, prev)) = open.take() {
                            out.push((s, t, prev));
                        }
                        open = Some((t, ty.clone()));
                    }
                },
            }
        }
        if let Some((s, ty)) = open {
            out.push((s, path.len(), ty));
        }
        out
    }
}

/// One entity mention found in a text.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Mention {
    /// `text[start..end]` in chars.
    pub text: String,
    /// Entity type.
    pub label: String,
    /// Mean probability of the mention's tags.
    pub score: f32,
    /// Start in Unicode scalar values.
    pub start: u32,
    /// End (exclusive) in Unicode scalar values.
    pub end: u32,
    /// Start in UTF-8 bytes.
    pub byte_start: u32,
    /// End (exclusive) in UTF-8 bytes.
    pub byte_end: u32,
}

/// All mentions of one entity.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Group {
    /// Text of the first mention.
    pub text: String,
    /// Entity type.
    pub label: String,
    /// Number of mentions.
    pub mentions: u32,
    /// Best mention score.
    pub score: f32,
}

/// Decodes the entities of a whole text from per-piece probabilities `[pieces, labels]`.
///
/// Spans are widened to whole pre-tokenizer words (a mention never ends inside a word) and
/// carry both char and byte offsets.
pub fn decode(text: &str, tokens: &Tokens, probs: &[f32], tags: &TagSet) -> Vec<Mention> {
    let n = tags.tags().len();
    let path = tags.decode(probs);
    let mut mentions = Vec::new();
    let mut chars = CharCounter::new(text);
    let mut last_end = 0usize;
    for (first, last, label) in tags.spans(&path) {
        // Widen to whole words.
        let mut a = first;
        while a > 0 && tokens.words[a - 1] == tokens.words[first] {
            a -= 1;
        }
        let mut b = last;
        while b < tokens.len() && tokens.words[b] == tokens.words[last - 1] {
            b += 1;
        }
        let byte_start = tokens.offsets[a].0;
        let byte_end = tokens.offsets[b - 1].1;
        if byte_end <= byte_start || byte_start < last_end {
            continue;
        }
        last_end = byte_end;
        let score =
            (first..last).map(|t| probs[t * n + path[t]]).sum::<f32>() / (last - first) as f32;
        let start = chars.at(byte_start);
        let end = chars.at(byte_end);
        mentions.push(Mention {
            text: text[byte_start..byte_end].to_string(),
            label,
            score,
            start: start as u32,
            end: end as u32,
            byte_start: byte_start as u32,
            byte_end: byte_end as u32,
        });
    }
    mentions
}

/// Converts increasing byte offsets to char offsets in one pass over the text.
struct CharCounter<'a> {
    text: &'a str,
    byte: usize,
    chars: usize,
}

impl<'a> CharCounter<'a> {
    fn new(text: &'a str) -> Self {
        Self {
            text,
            byte: 0,
            chars: 0,
        }
    }

    /// Char index of `byte` (a char boundary); `byte` must not decrease between calls by more
    /// than the counter can recount, so it restarts when asked to go back.
    fn at(&mut self, byte: usize) -> usize {
        if byte < self.byte {
            self.byte = 0;
            self.chars = 0;
        }
        self.chars += self.text[self.byte..byte].chars().count();
        self.byte = byte;
        self.chars
    }
}

/// Groups mentions of the same entity, in order of first mention.
///
/// Mentions with the same text (up to case and spacing) and the same type form one group,
/// named by its first mention: "Jordan" the person and "Jordan" the country are two groups,
/// as they are two entities in the mention list. A person mentioned by part of a name
/// ("Putin") joins the one person group whose full name contains those words ("Vladimir
/// Putin"), which keeps its own (fuller) text; when several would fit, it stays on its own.
pub fn group(mentions: &[Mention]) -> Vec<Group> {
    struct Acc {
        text: String,
        words: Vec<String>,
        label: String,
        mentions: u32,
        score: f32,
    }
    let norm = |t: &str| {
        t.split_whitespace()
            .collect::<Vec<_>>()
            .join(" ")
            .to_lowercase()
    };
    let mut index: HashMap<String, usize> = HashMap::new();
    let mut groups: Vec<Acc> = Vec::new();
    for m in mentions {
        let words = norm(&m.text);
        let key = format!("{}\u{0}{words}", m.label);
        let g = *index.entry(key).or_insert_with(|| {
            groups.push(Acc {
                text: m.text.clone(),
                words: words.split(' ').map(str::to_string).collect(),
                label: m.label.clone(),
                mentions: 0,
                score: 0.0,
            });
            groups.len() - 1
        });
        let acc = &mut groups[g];
        acc.mentions += 1;
        acc.score = acc.score.max(m.score);
    }
    // Partial person names join the one longer person name that contains them.
    let mut target: Vec<Option<usize>> = vec![None; groups.len()];
    for (i, g) in groups.iter().enumerate() {
        if g.label != "PER" {
            continue;
        }
        let fits: Vec<usize> = (0..groups.len())
            .filter(|&j| {
                j != i
                    && groups[j].label == "PER"
                    && groups[j].words.len() > g.words.len()
                    && g.words.iter().all(|w| groups[j].words.contains(w))
            })
            .collect();
        if let [j] = fits[..] {
            target[i] = Some(j);
        }
    }
    let mut out: Vec<Option<Group>> = groups
        .iter()
        .map(|a| {
            Some(Group {
                text: a.text.clone(),
                label: a.label.clone(),
                mentions: a.mentions,
                score: a.score,
            })
        })
        .collect();
    for (i, t) in target.iter().enumerate() {
        let Some(j) = *t else { continue };
        if let Some(part) = out[i].take() {
            if let Some(full) = out[j].as_mut() {
                full.mentions += part.mentions;
                full.score = full.score.max(part.score);
            }
        }
    }
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels() -> Vec<String> {
        ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
            .iter()
            .map(|s| s.to_string())
            .collect()
    }

    fn one_hot(tags: &[usize], n: usize, p: f32) -> Vec<f32> {
        let mut v = Vec::new();
        for &t in tags {
            for k in 0..n {
                v.push(if k == t {
                    p
                } else {
                    (1.0 - p) / (n - 1) as f32
                });
            }
        }
        v
    }

    #[test]
    fn parses_tag_names() {
        assert_eq!(Tag::parse("O"), Tag::Outside);
        assert_eq!(Tag::parse("B-PER"), Tag::Begin("PER".into()));
        assert_eq!(Tag::parse("I_LOC"), Tag::Inside("LOC".into()));
        assert_eq!(Tag::parse("S-ORG"), Tag::Begin("ORG".into()));
        assert_eq!(Tag::parse("MISC"), Tag::Inside("MISC".into()));
    }

    #[test]
    fn viterbi_forbids_inside_after_outside() {
        let ts = TagSet::new(&labels());
        // Argmax would give O, I-PER, I-PER: an I- after O. The decoder must start the
        // entity with B-PER or drop it; B-PER is the likelier repair here.
        let mut probs = one_hot(&[0, 2, 2], 5, 0.6);
        probs[5 + 1] = 0.35; // B-PER is close behind at piece 1
        let path = ts.decode(&probs);
        assert_eq!(path, vec![0, 1, 2]);
        assert_eq!(ts.spans(&path), vec![(1, 3, "PER".to_string())]);
    }

    #[test]
    fn spans_split_on_type_change_and_begin() {
        let ts = TagSet::new(&labels());
        assert_eq!(
            ts.spans(&[1, 2, 3, 4, 1, 1, 0]),
            vec![
                (0, 2, "PER".to_string()),
                (2, 4, "LOC".to_string()),
                (4, 5, "PER".to_string()),
                (5, 6, "PER".to_string())
            ]
        );
        // A raw I- after another type opens a new entity when spans are read leniently.
        assert_eq!(
            ts.spans(&[2, 4]),
            vec![(0, 1, "PER".into()), (1, 2, "LOC".into())]
        );
        assert!(ts.spans(&[]).is_empty());
    }

    #[test]
    fn mentions_snap_to_words_and_carry_offsets() {
        // "Élan met Zoë😀 in Köln": pieces with hand-made offsets and words.
        let text = "Élan met Zoë😀 in Köln";
        let pieces: &[(&str, u32)] = &[
            ("Él", 0),
            ("an", 0),
            ("met", 1),
            ("Zoë", 2),
            ("😀", 3),
            ("in", 4),
            ("Kö", 5),
            ("ln", 5),
        ];
        let mut tokens = Tokens::default();
        let mut pos = 0;
        for (p, w) in pieces {
            let s = text[pos..].find(p).unwrap() + pos;
            tokens.ids.push(0);
            tokens.offsets.push((s, s + p.len()));
            tokens.casing.push(0);
            tokens.words.push(*w);
            pos = s + p.len();
        }
        let ts = TagSet::new(&labels());
        // B-PER on "an" only (inside a word) must widen to "Élan"; "Kö" B-LOC, "ln" O must
        // widen to "Köln".
        let probs = one_hot(&[0, 1, 0, 1, 0, 0, 3, 0], 5, 0.9);
        let ms = decode(text, &tokens, &probs, &ts);
        let got: Vec<(&str, &str)> = ms
            .iter()
            .map(|m| (m.text.as_str(), m.label.as_str()))
            .collect();
        assert_eq!(got, vec![("Élan", "PER"), ("Zoë", "PER"), ("Köln", "LOC")]);
        let chars: Vec<char> = text.chars().collect();
        for m in &ms {
            let by_chars: String = chars[m.start as usize..m.end as usize].iter().collect();
            assert_eq!(by_chars, m.text);
            assert_eq!(&text[m.byte_start as usize..m.byte_end as usize], m.text);
        }
        assert!((ms[0].score - 0.9).abs() < 1e-6);
    }

    #[test]
    fn groups_count_mentions() {
        let m = |t: &str, l: &str, s: f32| Mention {
            text: t.into(),
            label: l.into(),
            score: s,
            start: 0,
            end: 0,
            byte_start: 0,
            byte_end: 0,
        };
        let g = group(&[
            m("Kim Jong Un", "PER", 0.9),
            m("Russia", "LOC", 0.8),
            m("Kim  Jong Un", "PER", 0.95),
            m("Russia", "ORG", 0.5),
            m("Kim Jong Un", "ORG", 0.6),
            m("Kim", "PER", 0.7),
            m("Putin", "PER", 0.9),
            m("Vladimir Putin", "PER", 0.8),
            m("Vladimir Putin", "PER", 0.8),
            m("Lee", "PER", 0.9),
            m("Lee Ann", "PER", 0.9),
            m("Lee Bo", "PER", 0.9),
        ]);
        let got: Vec<(&str, &str, u32)> = g
            .iter()
            .map(|g| (g.text.as_str(), g.label.as_str(), g.mentions))
            .collect();
        assert_eq!(
            got,
            vec![
                ("Kim Jong Un", "PER", 3),
                ("Russia", "LOC", 1),
                ("Russia", "ORG", 1),
                ("Kim Jong Un", "ORG", 1),
                ("Vladimir Putin", "PER", 3),
                ("Lee", "PER", 1),
                ("Lee Ann", "PER", 1),
                ("Lee Bo", "PER", 1),
            ]
        );
        assert_eq!(g[0].score, 0.95);
    }

    /// Issue #30: one text with two types is two entities (it used to be one group with the
    /// majority type), and a group is named by its first mention's spelling.
    #[test]
    fn same_text_of_two_types_is_two_groups() {
        let m = |t: &str, l: &str| Mention {
            text: t.into(),
            label: l.into(),
            score: 0.9,
            start: 0,
            end: 0,
            byte_start: 0,
            byte_end: 0,
        };
        let g = group(&[
            m("Jordan", "PER"),
            m("JORDAN", "LOC"),
            m("jordan", "LOC"),
            m("Jordan", "PER"),
        ]);
        let got: Vec<(&str, &str, u32)> = g
            .iter()
            .map(|g| (g.text.as_str(), g.label.as_str(), g.mentions))
            .collect();
        assert_eq!(got, vec![("Jordan", "PER", 2), ("JORDAN", "LOC", 2)]);
    }
}
