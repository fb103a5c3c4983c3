//! Zero-shot topics: an article embedding compared with label embeddings, turned into
//! calibrated probabilities with a temperature-scaled softmax.

use serde::{Deserialize, Serialize};

/// Softmax temperature applied to cosine similarities. Cosines of MiniLM embeddings live in a
/// narrow band (about 0..0.6), so they are multiplied by this before the softmax; the value
/// was fitted by minimising the negative log-likelihood of the AG News dev labels (see
/// `models/topics/REPORT.md`), which is what makes the scores calibrated probabilities.
pub const DEFAULT_SCALE: f32 = 20.0;

/// A topic label: a name and the texts that describe it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Label {
    /// Name returned to the caller.
    pub name: String,
    /// A sentence describing the label.
    #[serde(default)]
    pub description: String,
    /// Example headlines or sentences.
    #[serde(default)]
    pub examples: Vec<String>,
    /// Stable identifier returned with the score (e.g. an IPTC qcode); may be empty.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id: String,
    /// The `name` or `id` of this label's parent among the same labels; empty for none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub parent: String,
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

/// A taxonomy file: `{"labels": [{"name", "description", "examples", "id", "parent"}...]}`,
/// optionally with where it comes from and the attribution its licence asks for.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Taxonomy {
    /// The labels, in display order.
    pub labels: Vec<Label>,
    /// What the vocabulary is.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub source: String,
    /// Its licence.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub licence: String,
    /// The attribution to keep with it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub attribution: String,
}

impl Taxonomy {
    /// Reads a taxonomy file and checks its labels' parents (known, no cycles).
    pub fn read(path: &std::path::Path) -> anyhow::Result<Self> {
        use anyhow::Context;
        let bytes =
            std::fs::read(path).with_context(|| format!("reading taxonomy {}", path.display()))?;
        let tax: Self = serde_json::from_slice(&bytes)
            .with_context(|| format!("parsing taxonomy {}", path.display()))?;
        parents(&tax.labels).map_err(|e| anyhow::anyhow!("taxonomy {}: {e}", path.display()))?;
        Ok(tax)
    }
}

/// The parent of each label, as an index into `labels`, from each label's `parent` (a name
/// or id of another label). Errors name the label at fault: an unknown parent, or a cycle.
pub fn parents(labels: &[Label]) -> Result<Vec<Option<usize>>, String> {
    let find = |key: &str| {
        labels
            .iter()
            .position(|l| (!l.id.is_empty() && l.id == key) || l.name.eq_ignore_ascii_case(key))
    };
    // Ids must be distinct, and no id may be another label's name, so that a parent names
    // one label only.
    for (i, l) in labels.iter().enumerate().filter(|(_, l)| !l.id.is_empty()) {
        if let Some(j) = labels
            .iter()
            .enumerate()
            .position(|(j, m)| j != i && (m.id == l.id || m.name.eq_ignore_ascii_case(&l.id)))
        {
            return Err(format!(
                "labels[{i}].id: {:?} is also the id or name of labels[{j}]",
                l.id
            ));
        }
    }
    let mut out = Vec::with_capacity(labels.len());
    for (i, l) in labels.iter().enumerate() {
        let p = l.parent.trim();
        if p.is_empty() {
            out.push(None);
            continue;
        }
        match find(p) {
            Some(j) if j != i => out.push(Some(j)),
            _ => {
                return Err(format!(
                    "labels[{i}].parent: {p:?} is not another label's name or id"
                ))
            }
        }
    }
    // A chain longer than the label count has a cycle.
    for start in 0..labels.len() {
        let (mut at, mut steps) = (start, 0);
        while let Some(p) = out[at] {
            at = p;
            steps += 1;
            if steps > labels.len() {
                return Err(format!("labels[{start}].parent: the parents form a cycle"));
            }
        }
    }
    Ok(out)
}

/// Multi-label calibration of zero-shot scores: `P(about label) = sigmoid(slope * cosine +
/// offset)`, Platt scaling fitted one-vs-rest on the even rows of AG News dev, pooled over
/// two wordings of its labels (bare names, and names with descriptions and examples), and
/// checked on the odd rows (see `models/topics/REPORT.md`, `tidings eval topics
/// --fit-multi-label`).
pub const MULTI_LABEL_SLOPE: f32 = 15.9;
/// See [`MULTI_LABEL_SLOPE`].
pub const MULTI_LABEL_OFFSET: f32 = -3.03;

/// The dot product of two vectors (the cosine, for unit vectors).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

/// Rounds of [`refine`].
pub const REFINE_ROUNDS: usize = 5;

/// Pseudo-count of [`refine`]'s anchor: a label whose articles weigh this much in total moves
/// halfway towards them; one with (almost) none keeps its original prototype, so a feed that
/// lacks a topic does not drag that topic's prototype towards other news.
pub const REFINE_ANCHOR: f32 = 32.0;

/// Prototypes refined with unlabelled articles (unit vectors): each round soft-assigns the
/// articles to the labels (`softmax(DEFAULT_SCALE * cosine)`), and each label's prototype
/// becomes its original prototype plus the (unit) weighted mean of its articles, the latter
/// weighted `mass / (mass + REFINE_ANCHOR)` by the total weight of its articles. The original
/// stays as an anchor, so a label keeps its meaning while taking the shape of the news it is
/// applied to.
pub fn refine(prototypes: &[Vec<f32>], articles: &[&[f32]], rounds: usize) -> Vec<Vec<f32>> {
    refine_with_examples(prototypes, articles, &[], rounds)
}

/// [`refine`] with a few labelled articles as well (semi-supervised): each labelled article
/// counts fully for its own label in every round (weight 1, where an unlabelled one spreads
/// its weight 1 over the labels by its soft assignment), so a handful of examples per label
/// steers which unlabelled articles each prototype gathers. Labels out of range are ignored.
pub fn refine_with_examples(
    prototypes: &[Vec<f32>],
    articles: &[&[f32]],
    labelled: &[(&[f32], usize)],
    rounds: usize,
) -> Vec<Vec<f32>> {
    refine_rounds(prototypes, articles, labelled, rounds, &|| false)
        .unwrap_or_else(|| prototypes.to_vec())
}

/// [`refine`], given up (`None`) as soon as `stop` says so, checked before each round: for
/// a server, whose caller may go away while its prototypes are refined.
pub fn refine_unless(
    prototypes: &[Vec<f32>],
    articles: &[&[f32]],
    rounds: usize,
    stop: &dyn Fn() -> bool,
) -> Option<Vec<Vec<f32>>> {
    refine_rounds(prototypes, articles, &[], rounds, stop)
}

/// The rounds of [`refine_with_examples`]; `None` when `stop` said so before a round.
fn refine_rounds(
    prototypes: &[Vec<f32>],
    articles: &[&[f32]],
    labelled: &[(&[f32], usize)],
    rounds: usize,
    stop: &dyn Fn() -> bool,
) -> Option<Vec<Vec<f32>>> {
    let mut current = prototypes.to_vec();
    if (articles.is_empty() && labelled.is_empty()) || prototypes.is_empty() {
        return Some(current);
    }
    let k = prototypes.len();
    let d = prototypes[0].len();
    for _ in 0..rounds {
        if stop() {
            return None;
        }
        let refs: Vec<&[f32]> = current.iter().map(Vec::as_slice).collect();
        let mut sums = vec![vec![0f32; d]; k];
        let mut mass = vec![0f32; k];
        let mut add = |c: usize, wc: f32, a: &[f32]| {
            mass[c] += wc;
            for (s, x) in sums[c].iter_mut().zip(a.iter()) {
                *s += wc * x;
            }
        };
        for a in articles {
            let w = score(a, &refs, &[], DEFAULT_SCALE);
            for (c, &wc) in w.iter().enumerate() {
                add(c, wc, a);
            }
        }
        for &(a, c) in labelled.iter().filter(|(_, c)| *c < k) {
            add(c, 1.0, a);
        }
        current = prototypes
            .iter()
            .zip(&sums)
            .zip(&mass)
            .map(|((p0, sum), &m)| {
                if m <= 0.0 {
                    return p0.clone();
                }
                let centroid = mean_unit(&[sum], &[1.0]);
                mean_unit(&[p0, &centroid], &[1.0, m / (m + REFINE_ANCHOR)])
            })
            .collect();
    }
    Some(current)
}

/// Neighbours that vote in a [`Memory`].
pub const MEMORY_NEIGHBOURS: usize = 10;
const _: () = assert!(MEMORY_NEIGHBOURS > 0);

/// A nearest-neighbour topic classifier over remembered articles: an article's scores are
/// the mean label distribution of its [`MEMORY_NEIGHBOURS`] most similar remembered articles.
///
/// The remembered articles are unlabelled news whose distributions come from refined
/// prototypes ([`Memory::pseudo_labelled`]), plus any labelled examples (one-hot). Article
/// embeddings have more local than linear structure (on AG News dev, 10 nearest labelled
/// neighbours beat a linear head fitted on the same rows by 4 points), so neighbours that
/// carry the prototypes' votes correct much of what the prototypes alone get wrong.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Memory {
    /// Unit-length article embeddings (shared between the label sets of one pool).
    pub vectors: std::sync::Arc<Vec<Vec<f32>>>,
    /// One label distribution per vector (sums to 1).
    pub labels: Vec<Vec<f32>>,
}

impl Memory {
    /// `articles` labelled with `softmax(scale * cosine)` against `prototypes`, plus
    /// `examples` with their known labels (one-hot; out of range ones are skipped).
    pub fn pseudo_labelled(
        prototypes: &[Vec<f32>],
        articles: std::sync::Arc<Vec<Vec<f32>>>,
        examples: &[(&[f32], usize)],
        scale: f32,
    ) -> Self {
        let refs: Vec<&[f32]> = prototypes.iter().map(Vec::as_slice).collect();
        let mut labels: Vec<Vec<f32>> = articles
            .iter()
            .map(|a| score(a, &refs, &[], scale))
            .collect();
        let examples: Vec<&(&[f32], usize)> =
            examples.iter().filter(|(_, c)| *c < refs.len()).collect();
        let vectors = if examples.is_empty() {
            articles
        } else {
            let mut v = articles.as_ref().clone();
            for (x, c) in examples {
                v.push(x.to_vec());
                let mut onehot = vec![0.0; refs.len()];
                onehot[*c] = 1.0;
                labels.push(onehot);
            }
            std::sync::Arc::new(v)
        };
        Self { vectors, labels }
    }

    /// Whether every vector has `dim` finite values and every label row `labels` finite
    /// values summing to 1, one row per vector.
    pub fn fits(&self, dim: usize, labels: usize) -> bool {
        self.vectors.len() == self.labels.len()
            && self
                .vectors
                .iter()
                .all(|v| v.len() == dim && v.iter().all(|x| x.is_finite()))
            && self.labels.iter().all(|l| {
                l.len() == labels
                    && l.iter().all(|x| x.is_finite() && *x >= 0.0)
                    && (l.iter().sum::<f32>() - 1.0).abs() < 1e-3
            })
    }

    /// The mean label distribution of the article's nearest remembered neighbours; `None`
    /// when nothing is remembered or the dimensions do not match. A non-finite similarity
    /// never counts as near.
    pub fn vote(&self, article: &[f32]) -> Option<Vec<f32>> {
        let width = self.labels.first()?.len();
        if self.vectors.len() != self.labels.len() || self.vectors.first()?.len() != article.len() {
            return None;
        }
        let mut sims: Vec<(f32, usize)> = self
            .vectors
            .iter()
            .enumerate()
            .map(|(i, v)| {
                let s = dot(v, article);
                (if s.is_finite() { s } else { f32::NEG_INFINITY }, i)
            })
            .collect();
        let k = MEMORY_NEIGHBOURS.min(sims.len());
        sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
        let mut out = vec![0f32; width];
        for &(_, i) in &sims[..k] {
            for (o, p) in out.iter_mut().zip(&self.labels[i]) {
                *o += p / k as f32;
            }
        }
        Some(out)
    }
}

/// Independent probabilities `sigmoid(slope * (label . article) + offset)`, each label capped
/// by its parent's probability.
pub fn score_independent(
    article: &[f32],
    labels: &[&[f32]],
    parents: &[Option<usize>],
    slope: f32,
    offset: f32,
) -> Vec<f32> {
    let mut p: Vec<f32> = labels
        .iter()
        .map(|l| {
            let cos = dot(l, article);
            1.0 / (1.0 + (-(slope * cos + offset)).exp())
        })
        .collect();
    cap_by_parents(&mut p, parents);
    p
}

/// Lowers each score to at most its parent's (after the parent's own cap), so a child never
/// outscores its ancestors. `parents` is acyclic.
pub fn cap_by_parents(scores: &mut [f32], parents: &[Option<usize>]) {
    for _ in 0..scores.len() {
        let mut changed = false;
        for (i, p) in parents.iter().enumerate() {
            if let Some(&j) = p.as_ref().filter(|&&j| j < scores.len()) {
                if scores[i] > scores[j] {
                    scores[i] = scores[j];
                    changed = true;
                }
            }
        }
        if !changed {
            break;
        }
    }
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
        .map(|(i, l)| scale * dot(l, article) + bias.get(i).copied().unwrap_or(0.0))
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
    fn children_never_outscore_parents() {
        let l = |name: &str, parent: &str| Label {
            name: name.into(),
            parent: parent.into(),
            ..Label::default()
        };
        let labels = [
            l("economy", ""),
            l("markets", "economy"),
            l("stocks", "MARKETS"),
        ];
        let p = parents(&labels).unwrap();
        assert_eq!(p, vec![None, Some(0), Some(1)]);
        let mut s = vec![0.3, 0.9, 0.8];
        cap_by_parents(&mut s, &p);
        assert_eq!(s, vec![0.3, 0.3, 0.3]);
        assert!(parents(&[l("a", "b"), l("b", "a")])
            .unwrap_err()
            .contains("cycle"));
        assert!(parents(&[l("a", "zzz")])
            .unwrap_err()
            .contains("labels[0].parent"));
        assert!(parents(&[l("a", "a")]).is_err());
        let with_id = |name: &str, id: &str| Label {
            name: name.into(),
            id: id.into(),
            ..Label::default()
        };
        assert!(parents(&[with_id("a", "x"), with_id("b", "x")])
            .unwrap_err()
            .contains("labels[0].id"));
        assert!(parents(&[with_id("a", "b"), with_id("b", "")]).is_err());
        // An index out of range (a hand-edited head file) is ignored, not a panic.
        let mut s = vec![0.9, 0.1];
        cap_by_parents(&mut s, &[Some(7), None]);
        assert_eq!(s, vec![0.9, 0.1]);
    }

    #[test]
    fn memory_votes_with_the_nearest_articles() {
        // Prototypes say label 0 for everything near [1, 0]; the remembered articles near
        // [0.8, 0.6] are labelled 1 (examples), so an article there follows its neighbours.
        let unit = |v: [f32; 2]| {
            let n = (v[0] * v[0] + v[1] * v[1]).sqrt();
            vec![v[0] / n, v[1] / n]
        };
        let prototypes = vec![unit([1.0, 0.0]), unit([0.0, 1.0])];
        let near: Vec<Vec<f32>> = (0..MEMORY_NEIGHBOURS)
            .map(|i| unit([0.8, 0.6 + 0.01 * i as f32]))
            .collect();
        let examples: Vec<(&[f32], usize)> = near.iter().map(|v| (v.as_slice(), 1)).collect();
        let pool = std::sync::Arc::new(vec![unit([1.0, 0.05]); 3]);
        let m = Memory::pseudo_labelled(&prototypes, pool, &examples, DEFAULT_SCALE);
        assert!(m.fits(2, 2) && !m.fits(3, 2));
        assert_eq!(m.vectors.len(), 3 + MEMORY_NEIGHBOURS);
        let article = unit([0.8, 0.61]);
        let refs: Vec<&[f32]> = prototypes.iter().map(Vec::as_slice).collect();
        assert!(score(&article, &refs, &[], DEFAULT_SCALE)[0] > 0.5);
        let p = m.vote(&article).unwrap();
        assert!(p[1] > 0.99, "{p:?}");
        assert!((p.iter().sum::<f32>() - 1.0).abs() < 1e-5);
        assert!(m.vote(&[1.0, 0.0, 0.0]).is_none(), "wrong dimension");
        // Fewer remembered articles than neighbours: all of them vote.
        let none = std::sync::Arc::new(Vec::new());
        let small =
            Memory::pseudo_labelled(&prototypes, none.clone(), &examples[..2], DEFAULT_SCALE);
        assert_eq!(small.vote(&article).unwrap(), vec![0.0, 1.0]);
        let empty = Memory::pseudo_labelled(&prototypes, none, &[], DEFAULT_SCALE);
        assert!(empty.vote(&article).is_none());
    }

    #[test]
    fn examples_pull_prototypes_towards_them() {
        let prototypes = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let x = [0.6f32, 0.8];
        let plain = refine_with_examples(&prototypes, &[], &[], REFINE_ROUNDS);
        assert_eq!(plain, prototypes);
        let pulled = refine_with_examples(&prototypes, &[], &[(&x, 0), (&x, 9)], REFINE_ROUNDS);
        assert!(
            pulled[0][1] > 0.0 && pulled[1] == prototypes[1],
            "{pulled:?}"
        );
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
            ..Label::default()
        };
        assert_eq!(l.prototype_texts().len(), 2);
    }

    #[test]
    fn refinement_stops_when_asked() {
        let prototypes = vec![vec![1.0, 0.0], vec![0.0, 1.0]];
        let a = [0.8f32, 0.6];
        let articles: Vec<&[f32]> = vec![&a; 8];
        let full = refine(&prototypes, &articles, REFINE_ROUNDS);
        assert_eq!(
            refine_unless(&prototypes, &articles, REFINE_ROUNDS, &|| false),
            Some(full)
        );
        assert_eq!(
            refine_unless(&prototypes, &articles, REFINE_ROUNDS, &|| true),
            None
        );
    }
}
