//! Strict entity-level precision, recall and F1, as the CoNLL scorer (`conlleval`) defines
//! them: a predicted entity counts only if its type and both boundaries match a gold one.

use super::conll::Span;
use serde::Serialize;
use std::collections::{BTreeMap, HashSet};

/// True positives, false positives and false negatives of one entity type.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    /// Predicted and gold.
    pub tp: usize,
    /// Predicted, not gold.
    pub fp: usize,
    /// Gold, not predicted.
    pub fn_: usize,
}

impl Counts {
    /// Precision (0 when nothing was predicted).
    pub fn precision(&self) -> f64 {
        ratio(self.tp, self.tp + self.fp)
    }
    /// Recall (0 when there is no gold entity).
    pub fn recall(&self) -> f64 {
        ratio(self.tp, self.tp + self.fn_)
    }
    /// Harmonic mean of precision and recall.
    pub fn f1(&self) -> f64 {
        let (p, r) = (self.precision(), self.recall());
        if p + r == 0.0 {
            0.0
        } else {
            2.0 * p * r / (p + r)
        }
    }
}

fn ratio(a: usize, b: usize) -> f64 {
    if b == 0 {
        0.0
    } else {
        a as f64 / b as f64
    }
}

/// Accumulates counts over many texts.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Scorer {
    /// Counts per entity type.
    pub per_type: BTreeMap<String, Counts>,
}

impl Scorer {
    /// Adds one text's gold and predicted spans.
    pub fn add(&mut self, gold: &[Span], pred: &[Span]) {
        let gold_set: HashSet<&Span> = gold.iter().collect();
        let pred_set: HashSet<&Span> = pred.iter().collect();
        for p in &pred_set {
            let c = self.per_type.entry(p.2.clone()).or_default();
            if gold_set.contains(p) {
                c.tp += 1;
            } else {
                c.fp += 1;
            }
        }
        for g in &gold_set {
            if !pred_set.contains(g) {
                self.per_type.entry(g.2.clone()).or_default().fn_ += 1;
            }
        }
    }

    /// Micro-averaged counts over all types.
    pub fn overall(&self) -> Counts {
        self.per_type
            .values()
            .fold(Counts::default(), |a, c| Counts {
                tp: a.tp + c.tp,
                fp: a.fp + c.fp,
                fn_: a.fn_ + c.fn_,
            })
    }

    /// A table: one line per type and one overall, precision/recall/F1 in percent.
    pub fn table(&self) -> String {
        let mut s = format!(
            "{:<8} {:>8} {:>8} {:>8} {:>7}\n",
            "type", "prec", "recall", "F1", "gold"
        );
        let line = |name: &str, c: &Counts| {
            format!(
                "{:<8} {:>8.2} {:>8.2} {:>8.2} {:>7}\n",
                name,
                100.0 * c.precision(),
                100.0 * c.recall(),
                100.0 * c.f1(),
                c.tp + c.fn_
            )
        };
        for (t, c) in &self.per_type {
            s.push_str(&line(t, c));
        }
        s.push_str(&line("overall", &self.overall()));
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sp(a: usize, b: usize, t: &str) -> Span {
        (a, b, t.to_string())
    }

    #[test]
    fn strict_matching() {
        let mut s = Scorer::default();
        let gold = [sp(0, 5, "PER"), sp(10, 15, "LOC"), sp(20, 25, "ORG")];
        // Exact PER: tp. LOC with the wrong end: fp + fn. ORG labelled MISC: fp + fn.
        let pred = [sp(0, 5, "PER"), sp(10, 14, "LOC"), sp(20, 25, "MISC")];
        s.add(&gold, &pred);
        let o = s.overall();
        assert_eq!((o.tp, o.fp, o.fn_), (1, 2, 2));
        assert!((o.precision() - 1.0 / 3.0).abs() < 1e-9);
        assert!((o.recall() - 1.0 / 3.0).abs() < 1e-9);
        assert_eq!(s.per_type["ORG"].fn_, 1);
        assert_eq!(s.per_type["MISC"].fp, 1);
        assert!(s.table().contains("overall"));
    }

    #[test]
    fn empty_is_zero_not_nan() {
        let s = Scorer::default();
        assert_eq!(s.overall().f1(), 0.0);
    }
}
