//! Text to word pieces, with UTF-8 byte offsets back into the text and each piece's shape.

use super::casing;
use tokenizers::Tokenizer;

/// Why a text could not be tokenized.
#[derive(Debug, thiserror::Error)]
#[error("tokenizer failed: {0}")]
pub struct TokenizeError(pub String);

/// A text as word pieces, without special tokens.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Tokens {
    /// Vocabulary ids.
    pub ids: Vec<u32>,
    /// UTF-8 byte range of each piece in the text.
    pub offsets: Vec<(usize, usize)>,
    /// Word shape of each piece (see [`casing`]).
    pub casing: Vec<u32>,
    /// Index of the pre-tokenizer word each piece belongs to.
    pub words: Vec<u32>,
}

impl Tokens {
    /// Number of pieces.
    pub fn len(&self) -> usize {
        self.ids.len()
    }

    /// True when the text gave no pieces.
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }

    /// Keeps the first `n` pieces (all of them when there are fewer).
    pub fn truncate(&mut self, n: usize) {
        self.ids.truncate(n);
        self.offsets.truncate(n);
        self.casing.truncate(n);
        self.words.truncate(n);
    }
}

/// Tokenizes `text` once, for every model that shares `tokenizer`.
pub fn tokenize(tokenizer: &Tokenizer, text: &str) -> Result<Tokens, TokenizeError> {
    let enc = tokenizer
        .encode(text, false)
        .map_err(|e| TokenizeError(e.to_string()))?;
    let mut out = Tokens {
        ids: enc.get_ids().to_vec(),
        offsets: Vec::with_capacity(enc.len()),
        casing: Vec::with_capacity(enc.len()),
        words: Vec::with_capacity(enc.len()),
    };
    let mut last_word = 0u32;
    for (i, &(s, e)) in enc.get_offsets().iter().enumerate() {
        // Offsets from the tokenizers crate are byte offsets into the original text; clamp and
        // snap them to char boundaries so that slicing can never panic.
        let (s, e) = snap(text, s, e);
        out.offsets.push((s, e));
        out.casing.push(casing::shape(&text[s..e]));
        let w = enc.get_word_ids()[i].unwrap_or(last_word);
        last_word = w;
        out.words.push(w);
    }
    Ok(out)
}

/// Clamps a byte range to `text` and widens it to the nearest char boundaries.
pub fn snap(text: &str, start: usize, end: usize) -> (usize, usize) {
    let mut s = start.min(text.len());
    let mut e = end.min(text.len()).max(s);
    while !text.is_char_boundary(s) {
        s -= 1;
    }
    while !text.is_char_boundary(e) {
        e += 1;
    }
    (s, e)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn snap_keeps_char_boundaries() {
        let t = "a😀b";
        assert_eq!(snap(t, 2, 3), (1, 5));
        assert_eq!(snap(t, 0, 99), (0, t.len()));
        assert_eq!(snap(t, 99, 100), (t.len(), t.len()));
    }
}
