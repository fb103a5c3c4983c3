//! Zero-shot topics: an article embedding compared with label embeddings, turned into
//! calibrated probabilities with a temperature-scaled softmax.

use serde::{Deserialize, Serialize};

/// Softmax temperature applied to cosine similarities. Cosines of MiniLM embeddings live in a
/// narrow band (about 0..0.6), so they are multiplied by this before the softmax; the value
/// was fitted by minimising the negative log-likelihood of the AG News dev labels (see
/// `models/topics/REPORT.md`), which is what makes the scores calibrated probabilities.
pub const DEFAULT_SCALE: f32 = 20.0;

/// A topic label: a name and the texts that describe it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Name returned to the caller.
    pub name: String,
    /// A sentence describing the label.
    #[serde(default)]
    pub description: String,
    /// Example headlines or sentences.
    #[serde(default)]
    pub examples: Vec<String>,
}

impl Label {
    /// The texts whose embeddings are averaged into the label's prototype: a sentence naming
    /// the label, the description, and each example.
    pub fn prototype_texts(&self) -> Vec<String> {
        let mut out = vec![format!("This news article is about {}.", self.name)];
        if !self.description.trim().is_empty() {
            out.push(self.description.clone());
        }
        out.extend(
            self.examples
                .iter()
                .filter(|e| !e.trim().is_empty())
                .cloned(),
        );
        out
    }
}

/// A taxonomy file: `{"labels": [{"name", "description", "examples"}...]}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Taxonomy {
    /// The labels, in display order.
    pub labels: Vec<Label>,
}

/// Mean of unit vectors, renormalised to unit length. Empty input gives an empty vector.
pub fn mean_unit(vectors: &[&[f32]], weights: &[f32]) -> Vec<f32> {
    let Some(first) = vectors.first() else {
        return Vec::new();
    };
    let mut acc = vec![0f32; first.len()];
    for (v, &w) in vectors.iter().zip(weights) {
        for (a, x) in acc.iter_mut().zip(v.iter()) {
            *a += w * x;
        }
    }
    let norm = acc.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
    acc.iter_mut().for_each(|x| *x /= norm);
    acc
}

/// Probabilities of each label for an article: `softmax(scale * (label . article) + bias)`;
/// with unit vectors and no bias, a softmax of scaled cosines.
pub fn score(article: &[f32], labels: &[&[f32]], bias: &[f32], scale: f32) -> Vec<f32> {
    let logits: Vec<f32> = labels
        .iter()
        .enumerate()
        .map(|(i, l)| {
            scale * l.iter().zip(article).map(|(a, b)| a * b).sum::<f32>()
                + bias.get(i).copied().unwrap_or(0.0)
        })
        .collect();
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exps: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exps.iter().sum();
    exps.iter().map(|e| e / sum).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn scores_are_probabilities_ordered_by_similarity() {
        let a = [1.0, 0.0];
        let l1 = [0.9, 0.436];
        let l2 = [0.0, 1.0];
        let s = score(&a, &[&l1, &l2], &[], DEFAULT_SCALE);
        assert!((s.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(s[0] > s[1]);
    }

    #[test]
    fn bias_shifts_scores() {
        let a = [1.0, 0.0];
        let s = score(&a, &[&[1.0, 0.0], &[0.0, 1.0]], &[0.0, 5.0], 1.0);
        assert!(s[1] > s[0]);
    }

    #[test]
    fn mean_unit_is_unit() {
        let m = mean_unit(&[&[1.0, 0.0], &[0.0, 1.0]], &[1.0, 1.0]);
        assert!((m[0] - m[1]).abs() < 1e-6);
        assert!((m.iter().map(|x| x * x).sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(mean_unit(&[], &[]).is_empty());
    }

    #[test]
    fn prototype_texts_skip_blanks() {
        let l = Label {
            name: "sports".into(),
            description: " ".into(),
            examples: vec!["Final score".into(), "".into()],
        };
        assert_eq!(l.prototype_texts().len(), 2);
    }
}
