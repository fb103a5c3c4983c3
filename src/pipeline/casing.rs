//! Word shape of a token's original text, fed to models with a casing embedding so that an
//! uncased encoder can still tell "Apple" from "apple" and "US" from "us".

/// Padding and special tokens, and tokens with no original text.
pub const NONE: u32 = 0;
/// Letters, all lower case: `news`.
pub const LOWER: u32 = 1;
/// First letter upper case, the rest lower: `Putin`.
pub const TITLE: u32 = 2;
/// Two or more letters, all upper case: `NATO`.
pub const UPPER: u32 = 3;
/// Any other mix of cases: `McDonald`, `iPhone`; also a lone upper-case letter after others.
pub const MIXED: u32 = 4;
/// No letters at all: digits, punctuation, symbols.
pub const NO_LETTERS: u32 = 5;

/// Classifies `piece`, the original text under one token.
pub fn shape(piece: &str) -> u32 {
    let mut letters = 0usize;
    let mut uppers = 0usize;
    let mut first_upper = false;
    for c in piece.chars() {
        if c.is_alphabetic() {
            if c.is_uppercase() {
                uppers += 1;
                if letters == 0 {
                    first_upper = true;
                }
            }
            letters += 1;
        }
    }
    match (letters, uppers) {
        (0, _) => {
            if piece.is_empty() {
                NONE
            } else {
                NO_LETTERS
            }
        }
        (_, 0) => LOWER,
        (1, 1) => TITLE,
        (l, u) if l == u => UPPER,
        (_, 1) if first_upper => TITLE,
        _ => MIXED,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shapes() {
        assert_eq!(shape("news"), LOWER);
        assert_eq!(shape("Putin"), TITLE);
        assert_eq!(shape("K"), TITLE);
        assert_eq!(shape("NATO"), UPPER);
        assert_eq!(shape("McDonald"), MIXED);
        assert_eq!(shape("iPhone"), MIXED);
        assert_eq!(shape("2019"), NO_LETTERS);
        assert_eq!(shape("’"), NO_LETTERS);
        assert_eq!(shape(""), NONE);
        assert_eq!(shape("Éric"), TITLE);
    }
}
