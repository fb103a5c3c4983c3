//! Calibration of multi-label topic scores (`tidings eval topics --fit-multi-label`): Platt
//! scaling of article-label cosines, one-vs-rest, and the reliability measures it is judged
//! by (expected calibration error, Brier score, precision and recall at 0.5).
//!
//! Serving turns a cosine `x` into the probability that an article is about a label as
//! `sigmoid(slope * x + offset)` ([`crate::pipeline::topics::MULTI_LABEL_SLOPE`] and
//! [`crate::pipeline::topics::MULTI_LABEL_OFFSET`]); [`multi_label_calibration`] fits that
//! pair on some rows and compares it with the shipped one on others.

/// The logistic function.
fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// One-vs-rest pairs `(cosine, about)` of articles against labels: for each article `i` with
/// `keep(i)`, in order, one pair per row of `weights` (unit-length label prototypes), `about`
/// being 1 for the article's gold class `golds[i]` and 0 for the others.
pub fn pairs(
    weights: &[Vec<f32>],
    embeddings: &[&[f32]],
    golds: &[usize],
    keep: impl Fn(usize) -> bool,
) -> Vec<(f64, f64)> {
    let mut out = Vec::new();
    for (i, (e, &g)) in embeddings.iter().zip(golds).enumerate() {
        if !keep(i) {
            continue;
        }
        for (j, w) in weights.iter().enumerate() {
            let cos: f32 = w.iter().zip(e.iter()).map(|(a, b)| a * b).sum();
            out.push((cos as f64, f64::from(u8::from(j == g))));
        }
    }
    out
}

/// Mean log loss of `sigmoid(a * x + b)` on the `(x, y)` pairs `data` (0 for none).
pub fn log_loss(data: &[(f64, f64)], a: f64, b: f64) -> f64 {
    data.iter()
        .map(|&(x, y)| {
            let z = a * x + b;
            // log(1 + e^z) - y z, computed stably
            z.max(0.0) + (-z.abs()).exp().ln_1p() - y * z
        })
        .sum::<f64>()
        / data.len().max(1) as f64
}

/// Platt scaling: the `(slope, offset)` of `sigmoid(slope * x + offset)` minimising the log
/// loss on `data`, by Newton's method with step halving, from the base rate.
pub fn fit_platt(data: &[(f64, f64)]) -> (f64, f64) {
    let rate = data.iter().map(|d| d.1).sum::<f64>() / data.len().max(1) as f64;
    let (mut a, mut b) = (0.0f64, (rate / (1.0 - rate)).ln());
    let mut loss = log_loss(data, a, b);
    for _ in 0..100 {
        let Some((da, db)) = newton_step(data, a, b) else {
            break;
        };
        let mut step = 1.0;
        while step > 1e-4 {
            let l = log_loss(data, a - step * da, b - step * db);
            if l <= loss {
                a -= step * da;
                b -= step * db;
                loss = l;
                break;
            }
            step /= 2.0;
        }
        if (step * da).abs() < 1e-7 && (step * db).abs() < 1e-7 {
            break;
        }
    }
    (a, b)
}

/// The full Newton step `H^-1 g` of the log loss at `(a, b)` (to subtract), or `None` when
/// the Hessian is singular.
fn newton_step(data: &[(f64, f64)], a: f64, b: f64) -> Option<(f64, f64)> {
    let (mut ga, mut gb, mut haa, mut hab, mut hbb) = (0.0, 0.0, 1e-9, 0.0, 1e-9);
    for &(x, y) in data {
        let p = sigmoid(a * x + b);
        let r = p - y;
        let w = p * (1.0 - p);
        ga += r * x;
        gb += r;
        haa += w * x * x;
        hab += w * x;
        hbb += w;
    }
    let det = haa * hbb - hab * hab;
    if det.abs() < 1e-12 {
        return None;
    }
    Some(((hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det))
}

/// How well probabilities match outcomes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Reliability {
    /// Expected calibration error over 10 equal-width bins of the probability: the mean over
    /// pairs of |mean probability - rate of "about"| in the pair's bin.
    pub ece: f64,
    /// Mean squared difference between probability and outcome.
    pub brier: f64,
    /// Of the pairs with probability >= 0.5, the fraction "about" (0 when there are none).
    pub precision: f64,
    /// Of the "about" pairs, the fraction with probability >= 0.5.
    pub recall: f64,
}

/// The [`Reliability`] of `sigmoid(slope * x + offset)` on the `(x, y)` pairs `data`.
pub fn reliability(data: &[(f64, f64)], slope: f64, offset: f64) -> Reliability {
    let mut bins = [(0.0f64, 0.0f64, 0usize); 10];
    let (mut brier, mut tp, mut fp, mut fneg) = (0.0, 0.0, 0.0, 0.0);
    for &(x, y) in data {
        let p = sigmoid(slope * x + offset);
        let b = ((p * 10.0) as usize).min(9);
        bins[b].0 += p;
        bins[b].1 += y;
        bins[b].2 += 1;
        brier += (p - y) * (p - y);
        match (p >= 0.5, y > 0.5) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fneg += 1.0,
            _ => {}
        }
    }
    let n = data.len().max(1) as f64;
    let ece = bins
        .iter()
        .filter(|b| b.2 > 0)
        .map(|b| (b.0 - b.1).abs() / n)
        .sum();
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 0.0 };
    Reliability {
        ece,
        brier: brier / n,
        precision,
        recall: tp / (tp + fneg).max(1.0),
    }
}

/// The reliability of the fitted and the shipped calibration on one label wording's held-out
/// rows.
#[derive(Debug, Clone, PartialEq)]
pub struct WordingReliability {
    /// The wording (its taxonomy file, as given).
    pub name: String,
    /// Held-out articles scored.
    pub rows: usize,
    /// Of the fitted `(slope, offset)`.
    pub fitted: Reliability,
    /// Of the shipped `(slope, offset)`.
    pub shipped: Reliability,
}

/// A multi-label calibration fitted on the even rows and judged on the odd ones.
#[derive(Debug, Clone, PartialEq)]
pub struct MultiLabelCalibration {
    /// Article-label pairs fitted on (even rows, over all wordings).
    pub pairs: usize,
    /// Fitted slope.
    pub slope: f64,
    /// Fitted offset.
    pub offset: f64,
    /// Per wording, in the order given.
    pub wordings: Vec<WordingReliability>,
}

/// Fits the multi-label calibration on the even rows of `embeddings` (gold classes `golds`),
/// pooled over the label wordings `sets` (name, unit-length prototypes), and measures it and
/// the `shipped` `(slope, offset)` on the odd rows of each wording.
pub fn multi_label_calibration(
    sets: &[(String, Vec<Vec<f32>>)],
    embeddings: &[&[f32]],
    golds: &[usize],
    shipped: (f64, f64),
) -> MultiLabelCalibration {
    let fit: Vec<(f64, f64)> = sets
        .iter()
        .flat_map(|(_, w)| pairs(w, embeddings, golds, |i| i % 2 == 0))
        .collect();
    let (slope, offset) = fit_platt(&fit);
    let wordings = sets
        .iter()
        .map(|(name, weights)| {
            let held = pairs(weights, embeddings, golds, |i| i % 2 == 1);
            WordingReliability {
                name: name.clone(),
                rows: held.len() / weights.len().max(1),
                fitted: reliability(&held, slope, offset),
                shipped: reliability(&held, shipped.0, shipped.1),
            }
        })
        .collect();
    MultiLabelCalibration {
        pairs: fit.len(),
        slope,
        offset,
        wordings,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    /// `n` pairs with `x` uniform in [-1, 1) and `y` drawn as `sigmoid(slope x + offset)`.
    fn logistic_sample(n: usize, slope: f64, offset: f64, seed: u64) -> Vec<(f64, f64)> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n)
            .map(|_| {
                let x: f64 = rng.random_range(-1.0..1.0);
                let y = rng.random::<f64>() < sigmoid(slope * x + offset);
                (x, f64::from(u8::from(y)))
            })
            .collect()
    }

    #[test]
    fn log_loss_matches_a_hand_computed_value() {
        // z = 2 * 0.5 - 1 = 0 for the first pair: ln 2 whatever the label; z = 2 * 1 - 1 = 1
        // for the second, labelled 1: ln(1 + e^-1).
        let data = [(0.5, 0.0), (1.0, 1.0)];
        let want = (2f64.ln() + (1.0 + (-1f64).exp()).ln()) / 2.0;
        assert!((log_loss(&data, 2.0, -1.0) - want).abs() < 1e-12);
        // Stable far out: z = 1000 labelled 0 costs 1000, labelled 1 costs ~0.
        assert!((log_loss(&[(1000.0, 0.0)], 1.0, 0.0) - 1000.0).abs() < 1e-9);
        assert!(log_loss(&[(1000.0, 1.0)], 1.0, 0.0).abs() < 1e-9);
        assert_eq!(log_loss(&[], 1.0, 0.0), 0.0);
    }

    #[test]
    fn platt_recovers_the_slope_and_offset_of_a_logistic_model() {
        for (slope, offset) in [(4.0, -1.0), (15.9, -3.03), (-2.0, 0.5)] {
            let data = logistic_sample(40_000, slope, offset, 7);
            let (a, b) = fit_platt(&data);
            assert!(
                (a - slope).abs() < 0.1 * slope.abs(),
                "slope {a} for {slope}"
            );
            assert!(
                (b - offset).abs() < 0.1 + 0.05 * offset.abs(),
                "offset {b} for {offset}"
            );
            // The fit is a minimum: nudging either parameter costs.
            let at = log_loss(&data, a, b);
            for (da, db) in [(0.05, 0.0), (-0.05, 0.0), (0.0, 0.05), (0.0, -0.05)] {
                assert!(log_loss(&data, a + da, b + db) > at);
            }
        }
    }

    #[test]
    fn platt_on_constant_scores_gives_the_base_rate() {
        // Every x the same: no slope to find, the offset is the log-odds of the rate.
        let data: Vec<(f64, f64)> = (0..100)
            .map(|i| (0.3, f64::from(u8::from(i < 25))))
            .collect();
        let (a, b) = fit_platt(&data);
        let p = sigmoid(a * 0.3 + b);
        assert!((p - 0.25).abs() < 1e-3, "{p}");
    }

    #[test]
    fn reliability_tells_calibrated_from_miscalibrated() {
        let data = logistic_sample(40_000, 6.0, -1.0, 11);
        let right = reliability(&data, 6.0, -1.0);
        assert!(right.ece < 0.02, "{right:?}");
        // Too confident (slope tripled) and shifted: off by a lot.
        let wrong = reliability(&data, 18.0, 2.0);
        assert!(
            wrong.ece > 0.1 && wrong.ece > 5.0 * right.ece,
            "{wrong:?} vs {right:?}"
        );
        assert!(wrong.brier > right.brier, "{wrong:?} vs {right:?}");
    }

    #[test]
    fn reliability_counts_by_hand() {
        // Probabilities sigmoid(x): 0.5 (about), ~0.88 (not about), ~0.12 (about).
        let data = [(0.0, 1.0), (2.0, 0.0), (-2.0, 1.0)];
        let r = reliability(&data, 1.0, 0.0);
        let (p0, p1, p2) = (0.5, sigmoid(2.0), sigmoid(-2.0));
        let brier = ((p0 - 1.0f64).powi(2) + p1.powi(2) + (p2 - 1.0f64).powi(2)) / 3.0;
        assert!((r.brier - brier).abs() < 1e-12);
        // Predicted about: pairs 0 (right) and 1 (wrong); about: pairs 0 and 2.
        assert_eq!(r.precision, 0.5);
        assert_eq!(r.recall, 0.5);
        // One pair per bin: the ECE is the mean |p - y|.
        let ece = ((p0 - 1.0f64).abs() + p1 + (1.0 - p2)) / 3.0;
        assert!((r.ece - ece).abs() < 1e-12);
        let none = reliability(&[], 1.0, 0.0);
        assert_eq!(
            (none.ece, none.brier, none.precision, none.recall),
            (0.0, 0.0, 0.0, 0.0)
        );
    }

    #[test]
    fn pairs_are_one_per_kept_article_and_label() {
        let weights = vec![vec![1.0f32, 0.0], vec![0.0, 1.0]];
        let e: [&[f32]; 3] = [&[0.6, 0.8], &[1.0, 0.0], &[0.0, -1.0]];
        let golds = [1, 0, 0];
        let all = pairs(&weights, &e, &golds, |_| true);
        let want = [
            (0.6f32, 0.0),
            (0.8f32, 1.0),
            (1.0, 1.0),
            (0.0, 0.0),
            (0.0, 1.0),
            (-1.0, 0.0),
        ];
        assert_eq!(all.len(), want.len());
        for ((x, y), (wx, wy)) in all.iter().zip(want) {
            assert_eq!((*x, *y), (f64::from(wx), wy));
        }
        let even = pairs(&weights, &e, &golds, |i| i % 2 == 0);
        assert_eq!(even, [all[0], all[1], all[4], all[5]]);
    }

    #[test]
    fn multi_label_calibration_fits_even_rows_and_judges_odd_ones() {
        // Two classes on the unit circle; each article leans towards its class.
        let w = vec![vec![1.0f32, 0.0], vec![0.0, 1.0]];
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let (mut vecs, mut golds) = (Vec::new(), Vec::new());
        for i in 0..400 {
            let g = i % 3 % 2;
            let t: f32 = rng.random_range(0.0f32..1.2) + if g == 0 { 0.0 } else { 0.37 };
            vecs.push(vec![t.cos(), t.sin()]);
            golds.push(g);
        }
        let e: Vec<&[f32]> = vecs.iter().map(Vec::as_slice).collect();
        let sets = vec![("a.json".to_string(), w.clone()), ("b.json".to_string(), w)];
        let shipped = (15.9, -3.03);
        let cal = multi_label_calibration(&sets, &e, &golds, shipped);
        assert_eq!(
            cal.pairs,
            2 * 200 * 2,
            "two wordings, 200 even rows, two labels"
        );
        let even: Vec<(f64, f64)> = pairs(&sets[0].1, &e, &golds, |i| i % 2 == 0);
        let twice: Vec<(f64, f64)> = even.iter().chain(&even).copied().collect();
        assert_eq!((cal.slope, cal.offset), fit_platt(&twice));
        assert_eq!(cal.wordings.len(), 2);
        let odd = pairs(&sets[0].1, &e, &golds, |i| i % 2 == 1);
        let first = &cal.wordings[0];
        assert_eq!((first.name.as_str(), first.rows), ("a.json", 200));
        assert_eq!(first.fitted, reliability(&odd, cal.slope, cal.offset));
        assert_eq!(first.shipped, reliability(&odd, shipped.0, shipped.1));
        assert!(
            first.fitted.brier <= first.shipped.brier + 0.01,
            "{first:?}"
        );
    }
}
