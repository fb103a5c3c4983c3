//! Few-shot evaluation of topic heads (`tidings train topics --shots`), and the zero-shot
//! refinement scores it shares with `tidings eval topics --refine`.
//!
//! Rows are split by position: the even rows are the ones a head may learn from (drawn a few
//! per class, the rest read as unlabelled text), the odd rows are scored. Zero-shot
//! prototypes are scored as they are, refined with the unlabelled articles
//! ([`crate::pipeline::topics::refine`]), and as a memory of those articles
//! ([`super::topics::memory_head_refined`]); heads fitted on `n` rows per class are scored
//! over several random draws, next to the semi-supervised route when there is a prior.

use super::topics::{accuracy, fit_from, memory_head_refined, HeadConfig};
use crate::pipeline::analysis::LabelSet;
use crate::pipeline::topics as zs;
use anyhow::Result;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use std::sync::Arc;

/// Accuracy of zero-shot prototypes on held-out rows, as they are and adapted to unlabelled
/// articles.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RefinementScores {
    /// The prototypes as they are.
    pub zero_shot: f64,
    /// The prototypes refined with the unlabelled articles.
    pub refined: f64,
    /// A memory of the unlabelled articles, labelled by the refined prototypes.
    pub memory: f64,
}

/// A label set of the prototypes `weights` named `names`, at the default scale.
pub fn prototypes(names: &[String], weights: &[Vec<f32>]) -> LabelSet {
    LabelSet::prototypes(names.to_vec(), weights.to_vec(), zs::DEFAULT_SCALE)
}

/// The indices of the even rows of `n` rows: 0, 2, 4, ...
pub fn even_rows(n: usize) -> Vec<usize> {
    (0..n).step_by(2).collect()
}

/// The odd rows (1, 3, 5, ...) of embeddings `x` with classes `y`, copied.
pub fn odd_rows<V: AsRef<[f32]>>(x: &[V], y: &[usize]) -> (Vec<Vec<f32>>, Vec<usize>) {
    (1..x.len())
        .step_by(2)
        .map(|i| (x[i].as_ref().to_vec(), y[i]))
        .unzip()
}

/// [`RefinementScores`] of the zero-shot prototypes `prior` (labels `names`) on the rows
/// `odd_x`, `odd_y`, refined with the unlabelled articles `pool` (whose copies `pooled` the
/// memory keeps).
pub fn refinement_scores(
    names: &[String],
    prior: &[Vec<f32>],
    pool: &[&[f32]],
    pooled: Arc<Vec<Vec<f32>>>,
    odd_x: &[Vec<f32>],
    odd_y: &[usize],
) -> RefinementScores {
    let refined = zs::refine(prior, pool, zs::REFINE_ROUNDS);
    RefinementScores {
        zero_shot: accuracy(&prototypes(names, prior), odd_x, odd_y),
        refined: accuracy(&prototypes(names, &refined), odd_x, odd_y),
        memory: accuracy(
            &memory_head_refined(names, refined, pooled, &[]),
            odd_x,
            odd_y,
        ),
    }
}

/// Which rows one draw picks: `n` random rows of each of `classes` classes (all when it has
/// fewer) among the rows `even`, by `y`; the random order is seeded with `1000 n + draw`.
pub fn draw_rows(y: &[usize], even: &[usize], classes: usize, n: usize, draw: usize) -> Vec<bool> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(1000 * n as u64 + draw as u64);
    let mut picked = vec![false; y.len()];
    for c in 0..classes {
        let mut rows: Vec<usize> = even.iter().copied().filter(|&i| y[i] == c).collect();
        rows.shuffle(&mut rng);
        rows.iter().take(n).for_each(|&i| picked[i] = true);
    }
    picked
}

/// Mean and (population) standard deviation of `v`; zeros for none.
pub fn mean_sd(v: &[f64]) -> (f64, f64) {
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let m = mean(v);
    let sd = (v.iter().map(|a| (a - m) * (a - m)).sum::<f64>() / v.len().max(1) as f64).sqrt();
    (m, sd)
}

/// Accuracies on the odd rows of one draw's semi-supervised heads.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SemiScores {
    /// The prior refined with the drawn rows and the rest of the even rows' text.
    pub refined: f64,
    /// A head fitted on the drawn rows, starting from the refined prototypes.
    pub head: f64,
    /// The memory head of the refined prototypes, the unlabelled text and the drawn rows.
    pub memory: f64,
}

/// Accuracies on the odd rows of the heads of one draw.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DrawScores {
    /// A head fitted on the drawn rows (from the prior when there is one).
    pub head: f64,
    /// The semi-supervised heads; with a prior only.
    pub semi: Option<SemiScores>,
}

/// The accuracies of every draw for one count of rows per class, in draw order.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ShotScores {
    /// [`DrawScores::head`].
    pub head: Vec<f64>,
    /// [`SemiScores::refined`] (empty without a prior).
    pub refined: Vec<f64>,
    /// [`SemiScores::head`] (empty without a prior).
    pub semi: Vec<f64>,
    /// [`SemiScores::memory`] (empty without a prior).
    pub memory: Vec<f64>,
}

/// A few-shot evaluation: embeddings and classes, the head settings, the optional zero-shot
/// prior, and the even/odd split of the rows.
pub struct FewShot<'a> {
    x: &'a [Vec<f32>],
    y: &'a [usize],
    names: &'a [String],
    cfg: HeadConfig,
    prior: Option<&'a [Vec<f32>]>,
    even: Vec<usize>,
    odd_x: Vec<Vec<f32>>,
    odd_y: Vec<usize>,
}

impl<'a> FewShot<'a> {
    /// An evaluation of heads fitted with `cfg` (from `prior`, one prototype per class, when
    /// given) on embeddings `x` of classes `y` (indices into `names`).
    pub fn new(
        x: &'a [Vec<f32>],
        y: &'a [usize],
        names: &'a [String],
        cfg: HeadConfig,
        prior: Option<&'a [Vec<f32>]>,
    ) -> Self {
        let (odd_x, odd_y) = odd_rows(x, y);
        Self {
            x,
            y,
            names,
            cfg,
            prior,
            even: even_rows(x.len()),
            odd_x,
            odd_y,
        }
    }

    /// Whether heads start from a zero-shot prior (and the semi-supervised routes are
    /// scored).
    pub fn has_prior(&self) -> bool {
        self.prior.is_some()
    }

    /// How many rows are drawn from (the even rows).
    pub fn even_rows(&self) -> usize {
        self.even.len()
    }

    /// How many rows are scored (the odd rows).
    pub fn odd_rows(&self) -> usize {
        self.odd_x.len()
    }

    /// With a prior, its [`RefinementScores`] with the even rows' text as the unlabelled
    /// articles (0 rows per class).
    pub fn zero_shot(&self) -> Option<RefinementScores> {
        let p = self.prior?;
        let pool: Vec<&[f32]> = self.even.iter().map(|&i| self.x[i].as_slice()).collect();
        let pooled = Arc::new(self.even.iter().map(|&i| self.x[i].clone()).collect());
        Some(refinement_scores(
            self.names,
            p,
            &pool,
            pooled,
            &self.odd_x,
            &self.odd_y,
        ))
    }

    /// The scores of `draws` random draws of `n` rows per class.
    pub fn shots(&self, n: usize, draws: usize) -> Result<ShotScores> {
        let mut out = ShotScores::default();
        for draw in 0..draws {
            let picked = draw_rows(self.y, &self.even, self.names.len(), n, draw);
            let scores = self.score_draw(&picked)?;
            out.head.push(scores.head);
            if let Some(s) = scores.semi {
                out.refined.push(s.refined);
                out.semi.push(s.head);
                out.memory.push(s.memory);
            }
        }
        Ok(out)
    }

    /// The scores of the heads learnt from the rows `picked`.
    pub fn score_draw(&self, picked: &[bool]) -> Result<DrawScores> {
        let (tx, ty): (Vec<Vec<f32>>, Vec<usize>) = (0..self.x.len())
            .filter(|&i| picked[i])
            .map(|i| (self.x[i].clone(), self.y[i]))
            .unzip();
        let head = self.odd(&fit_from(&tx, &ty, self.names, self.cfg, self.prior)?);
        let semi = match self.prior {
            Some(p) => Some(self.semi_supervised(p, picked, &tx, &ty)?),
            None => None,
        };
        Ok(DrawScores { head, semi })
    }

    /// The semi-supervised heads of the prior `p` and the drawn rows `tx`, `ty` (`picked`),
    /// with the other even rows as unlabelled text.
    fn semi_supervised(
        &self,
        p: &[Vec<f32>],
        picked: &[bool],
        tx: &[Vec<f32>],
        ty: &[usize],
    ) -> Result<SemiScores> {
        let pool: Vec<&[f32]> = self
            .even
            .iter()
            .filter(|&&i| !picked[i])
            .map(|&i| self.x[i].as_slice())
            .collect();
        let labelled: Vec<(&[f32], usize)> = tx
            .iter()
            .map(Vec::as_slice)
            .zip(ty.iter().copied())
            .collect();
        let r = zs::refine_with_examples(p, &pool, &labelled, zs::REFINE_ROUNDS);
        let refined = self.odd(&prototypes(self.names, &r));
        let head = self.odd(&fit_from(tx, ty, self.names, self.cfg, Some(&r))?);
        let pooled = Arc::new(pool.iter().map(|v| v.to_vec()).collect::<Vec<_>>());
        let memory = self.odd(&memory_head_refined(self.names, r, pooled, &labelled));
        Ok(SemiScores {
            refined,
            head,
            memory,
        })
    }

    /// Accuracy of `head` on the odd rows.
    fn odd(&self, head: &LabelSet) -> f64 {
        accuracy(head, &self.odd_x, &self.odd_y)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// `n` unit vectors in 3 dimensions of two classes (rows 0, 1 of the first, 2, 3 of the
    /// second, and so on, so that even and odd rows hold both) that lean towards the first
    /// and the second axis, with some noise.
    fn clusters(n: usize) -> (Vec<Vec<f32>>, Vec<usize>) {
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        (0..n)
            .map(|i| {
                let c = i / 2 % 2;
                let mut v: Vec<f32> = (0..3).map(|_| rng.random_range(-0.2f32..0.2)).collect();
                v[c] += 1.0;
                let norm = v.iter().map(|a| a * a).sum::<f32>().sqrt();
                (v.iter().map(|a| a / norm).collect(), c)
            })
            .unzip()
    }

    fn names() -> Vec<String> {
        vec!["first".into(), "second".into()]
    }

    #[test]
    fn even_and_odd_rows() {
        assert_eq!(even_rows(5), [0, 2, 4]);
        assert!(even_rows(0).is_empty());
        let x: Vec<Vec<f32>> = (0..5).map(|i| vec![i as f32]).collect();
        let (ox, oy) = odd_rows(&x, &[10, 11, 12, 13, 14]);
        assert_eq!(ox, [[1.0], [3.0]]);
        assert_eq!(oy, [11, 13]);
    }

    #[test]
    fn mean_and_sd() {
        assert_eq!(mean_sd(&[1.0, 3.0]), (2.0, 1.0));
        assert_eq!(mean_sd(&[0.5]), (0.5, 0.0));
        assert_eq!(mean_sd(&[]), (0.0, 0.0));
    }

    #[test]
    fn a_draw_picks_n_even_rows_per_class_reproducibly() {
        let y: Vec<usize> = (0..40).map(|i| i % 3 % 2).collect();
        let even = even_rows(y.len());
        let picked = draw_rows(&y, &even, 2, 4, 0);
        assert_eq!(
            picked,
            draw_rows(&y, &even, 2, 4, 0),
            "same seed, same rows"
        );
        assert!(picked.iter().enumerate().all(|(i, &p)| !p || i % 2 == 0));
        for c in 0..2 {
            let of_c = (0..y.len()).filter(|&i| picked[i] && y[i] == c).count();
            assert_eq!(of_c, 4, "class {c}");
        }
        let others: Vec<Vec<bool>> = (1..5).map(|d| draw_rows(&y, &even, 2, 4, d)).collect();
        assert!(others.iter().any(|o| o != &picked), "draws differ");
        // A class with fewer even rows than asked gives them all.
        let all = draw_rows(&y, &even, 2, 1000, 0);
        assert_eq!(all, even_rows_mask(y.len()));
    }

    fn even_rows_mask(n: usize) -> Vec<bool> {
        (0..n).map(|i| i % 2 == 0).collect()
    }

    #[test]
    fn without_a_prior_only_heads_are_scored() {
        let (x, y) = clusters(40);
        let names = names();
        let f = FewShot::new(&x, &y, &names, HeadConfig::default(), None);
        assert_eq!((f.even_rows(), f.odd_rows()), (20, 20));
        assert!(!f.has_prior());
        assert_eq!(f.zero_shot(), None);
        let s = f.shots(3, 2).unwrap();
        assert_eq!(s.head, [1.0, 1.0], "separable clusters");
        assert!(s.refined.is_empty() && s.semi.is_empty() && s.memory.is_empty());
    }

    #[test]
    fn with_a_prior_every_route_is_scored() {
        let (x, y) = clusters(40);
        let names = names();
        let prior = vec![vec![1.0f32, 0.0, 0.0], vec![0.0, 1.0, 0.0]];
        let cfg = HeadConfig {
            steps: super::super::topics::PRIOR_STEPS,
            lr: super::super::topics::PRIOR_LR,
            ..HeadConfig::default()
        };
        let f = FewShot::new(&x, &y, &names, cfg, Some(&prior));
        assert!(f.has_prior());
        let z = f.zero_shot().unwrap();
        assert_eq!((z.zero_shot, z.refined, z.memory), (1.0, 1.0, 1.0), "{z:?}");
        let s = f.shots(2, 3).unwrap();
        for v in [&s.head, &s.refined, &s.semi, &s.memory] {
            assert_eq!(v, &[1.0; 3]);
        }
        // A prior pointing the wrong way scores nothing right before any example.
        let swapped = vec![prior[1].clone(), prior[0].clone()];
        let f = FewShot::new(&x, &y, &names, cfg, Some(&swapped));
        assert_eq!(f.zero_shot().unwrap().zero_shot, 0.0);
    }
}
