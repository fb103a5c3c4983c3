//! Overlapping windows over a long token sequence, and the choice of which window speaks for
//! each token, so that long articles are read whole and no token is read without context.

/// A half-open range of piece indices `[start, end)` read as one model input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    /// First piece.
    pub start: usize,
    /// One past the last piece.
    pub end: usize,
}

impl Window {
    /// Pieces in the window.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// True for an empty window.
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }
}

/// Cuts `n` pieces into windows of at most `size` pieces, consecutive windows sharing
/// `overlap` pieces. Every piece lies in at least one window; an empty text gets no window.
///
/// # Panics
/// Never: `overlap` is clamped below `size`, and `size` is at least 1.
pub fn plan(n: usize, size: usize, overlap: usize) -> Vec<Window> {
    let size = size.max(1);
    let overlap = overlap.min(size - 1);
    let step = size - overlap;
    let mut out = Vec::new();
    let mut start = 0;
    while start < n {
        let end = (start + size).min(n);
        out.push(Window { start, end });
        if end == n {
            break;
        }
        start += step;
    }
    out
}

/// For each piece, the index of the window that reads it with the most context on both sides
/// (the largest distance to that window's nearer edge); ties go to the earlier window.
pub fn owners(n: usize, windows: &[Window]) -> Vec<usize> {
    let mut best = vec![(0usize, 0usize); n];
    let mut seen = vec![false; n];
    for (w, win) in windows.iter().enumerate() {
        for (t, slot) in best
            .iter_mut()
            .enumerate()
            .take(win.end.min(n))
            .skip(win.start)
        {
            let margin = (t - win.start).min(win.end - 1 - t);
            if !seen[t] || margin > slot.1 {
                *slot = (w, margin);
                seen[t] = true;
            }
        }
    }
    best.into_iter().map(|(w, _)| w).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_one_window() {
        assert_eq!(plan(5, 10, 3), vec![Window { start: 0, end: 5 }]);
        assert!(plan(0, 10, 3).is_empty());
    }

    #[test]
    fn windows_overlap_and_cover_everything() {
        let w = plan(25, 10, 4);
        assert_eq!(
            w,
            vec![
                Window { start: 0, end: 10 },
                Window { start: 6, end: 16 },
                Window { start: 12, end: 22 },
                Window { start: 18, end: 25 },
            ]
        );
        let own = owners(25, &w);
        assert_eq!(own.len(), 25);
        // Piece 7 is 1 from window 0's edge but 1 from window 1's start: tie -> window 0;
        // piece 9 is at window 0's last position, so window 1 (margin 3) reads it.
        assert_eq!(own[7], 0);
        assert_eq!(own[9], 1);
        assert_eq!(own[24], 3);
        for (t, &o) in own.iter().enumerate() {
            assert!(w[o].start <= t && t < w[o].end);
        }
    }

    #[test]
    fn degenerate_sizes_do_not_loop() {
        assert_eq!(plan(3, 0, 5).len(), 3);
        assert_eq!(plan(3, 1, 1).len(), 3);
    }
}
