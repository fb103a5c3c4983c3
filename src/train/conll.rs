//! Reader for CoNLL-2003-style files: one token a line (`token POS chunk NER` or just
//! `token NER`; the tag is the last column), blank lines between sentences, `-DOCSTART-`
//! lines between documents.

use std::path::Path;

/// One sentence: words and their tags (IOB1 or IOB2).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Sentence {
    /// The tokens.
    pub words: Vec<String>,
    /// One tag per token.
    pub tags: Vec<String>,
}

/// A document: the sentences between two `-DOCSTART-` lines.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Document {
    /// Its sentences, in order.
    pub sentences: Vec<Sentence>,
}

/// A gold or predicted entity as a byte range of a text and a type.
pub type Span = (usize, usize, String);

/// Why a CoNLL file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ConllError {
    /// The file could not be read.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: String,
        /// The I/O error.
        source: std::io::Error,
    },
    /// A line has no tag column.
    #[error("{path}:{line}: expected `token ... TAG`, got {text:?}")]
    Format {
        /// The file.
        path: String,
        /// 1-based line number.
        line: usize,
        /// The line.
        text: String,
    },
}

/// Reads a CoNLL file into documents. A file without `-DOCSTART-` lines is one document.
pub fn read(path: &Path) -> Result<Vec<Document>, ConllError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConllError::Io {
        path: path.display().to_string(),
        source,
    })?;
    parse(&text).map_err(|(line, text)| ConllError::Format {
        path: path.display().to_string(),
        line,
        text,
    })
}

/// Parses CoNLL text; on error returns the 1-based line number and the line.
pub fn parse(text: &str) -> Result<Vec<Document>, (usize, String)> {
    let mut docs = vec![Document::default()];
    let mut sent = Sentence::default();
    let flush = |docs: &mut Vec<Document>, sent: &mut Sentence| {
        if !sent.words.is_empty() {
            docs.last_mut()
                .expect("docs is never empty")
                .sentences
                .push(std::mem::take(sent));
        }
    };
    for (i, line) in text.lines().enumerate() {
        let line = line.trim_end();
        if line.is_empty() {
            flush(&mut docs, &mut sent);
            continue;
        }
        if line.starts_with("-DOCSTART-") {
            flush(&mut docs, &mut sent);
            if !docs
                .last()
                .expect("docs is never empty")
                .sentences
                .is_empty()
            {
                docs.push(Document::default());
            }
            continue;
        }
        let cols: Vec<&str> = line.split_whitespace().collect();
        if cols.len() < 2 {
            return Err((i + 1, line.to_string()));
        }
        sent.words.push(cols[0].to_string());
        sent.tags.push(cols[cols.len() - 1].to_string());
    }
    flush(&mut docs, &mut sent);
    docs.retain(|d| !d.sentences.is_empty());
    Ok(docs)
}

impl Document {
    /// The document as text (words joined by spaces, sentences by newlines), the byte range of
    /// every word in order, and the gold entities as byte spans.
    pub fn text(&self) -> (String, Vec<(usize, usize)>, Vec<Span>) {
        let mut text = String::new();
        let mut words = Vec::new();
        let mut gold = Vec::new();
        for (si, s) in self.sentences.iter().enumerate() {
            if si > 0 {
                text.push('\n');
            }
            let first = words.len();
            for (wi, w) in s.words.iter().enumerate() {
                if wi > 0 {
                    text.push(' ');
                }
                words.push((text.len(), text.len() + w.len()));
                text.push_str(w);
            }
            for (a, b, ty) in tag_spans(&s.tags) {
                gold.push((words[first + a].0, words[first + b - 1].1, ty));
            }
        }
        (text, words, gold)
    }

    /// All tags, in word order.
    pub fn tags(&self) -> impl Iterator<Item = &String> {
        self.sentences.iter().flat_map(|s| s.tags.iter())
    }
}

/// Entity spans `(first_word, last_word_exclusive, type)` of a tag sequence, read as the
/// CoNLL scorer does: `B-X` always starts an entity, and so does `I-X` after `O` or after
/// another type (IOB1).
pub fn tag_spans(tags: &[String]) -> Vec<(usize, usize, String)> {
    let mut out = Vec::new();
    let mut open: Option<(usize, String)> = None;
    for (i, t) in tags.iter().enumerate() {
        let (prefix, ty) = match t.split_once('-') {
            Some((p, ty)) => (p, ty),
            None => ("O", ""),
        };
        let continues = prefix == "I" && open.as_ref().is_some_and(|(_, cur)| cur == ty);
        if continues {
            continue;
        }
        if let Some((s, cur)) = open.take() {
            out.push((s, i, cur));
        }
        if prefix == "B" || prefix == "I" {
            open = Some((i, ty.to_string()));
        }
    }
    if let Some((s, cur)) = open {
        out.push((s, tags.len(), cur));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "-DOCSTART- -X- -X- O\n\nEU NNP B-NP B-ORG\nrejects VBZ B-VP O\nGerman JJ B-NP B-MISC\ncall NN I-NP O\n\nPeter NNP B-NP B-PER\nBlackburn NNP I-NP I-PER\n\n-DOCSTART- -X- -X- O\n\nBRUSSELS NNP B-NP B-LOC\n";

    #[test]
    fn reads_documents_and_sentences() {
        let docs = parse(SAMPLE).unwrap();
        assert_eq!(docs.len(), 2);
        assert_eq!(docs[0].sentences.len(), 2);
        assert_eq!(docs[0].sentences[1].words, vec!["Peter", "Blackburn"]);
        let (text, words, gold) = docs[0].text();
        assert_eq!(text, "EU rejects German call\nPeter Blackburn");
        assert_eq!(words.len(), 6);
        let got: Vec<(&str, &str)> = gold
            .iter()
            .map(|(a, b, t)| (&text[*a..*b], t.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                ("EU", "ORG"),
                ("German", "MISC"),
                ("Peter Blackburn", "PER")
            ]
        );
    }

    #[test]
    fn iob_edge_cases() {
        let t = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        // I- after O starts an entity; I- of another type starts a new one; B- after I- of
        // the same type starts a new one.
        assert_eq!(
            tag_spans(&t(&["O", "I-PER", "I-PER", "I-LOC", "B-LOC", "O", "B-ORG"])),
            vec![
                (1, 3, "PER".to_string()),
                (3, 4, "LOC".to_string()),
                (4, 5, "LOC".to_string()),
                (6, 7, "ORG".to_string())
            ]
        );
        assert!(tag_spans(&t(&["O", "O"])).is_empty());
    }

    #[test]
    fn bad_line_is_reported() {
        assert_eq!(parse("EU B-ORG\nlonely\n").unwrap_err().0, 2);
    }
}
