//! Layer norm, softmax and GELU for training, each one pass forward and one pass backward
//! (candle custom ops with their gradients), on f32 CPU tensors. (GELU also serves the
//! unfused inference path on the CPU: same values.)
//!
//! candle-nn's fast `layer_norm` and `softmax_last_dim` record no backward pass, so training
//! composed them from element-wise ops: a layer norm was about ten tensor passes forward and
//! twice that backward, each a fresh allocation. These run a row at a time (rows split over
//! rayon's threads) and compute the same values. Other devices and dtypes keep the composed
//! forms.

use super::kernels;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor,
};
use rayon::prelude::*;

/// Whether `x` can take the fused ops: f32 on the CPU.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32
}

/// The f32 data of a contiguous storage, or an error naming `op`.
fn slice<'a>(op: &str, s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(&data[a..b]),
        None => candle_core::bail!("{op}: input must be contiguous"),
    }
}

/// Rows of `n` over `threads`: long enough to amortise rayon's hand-off.
fn min_rows(n: usize) -> usize {
    (16_384 / n.max(1)).max(1)
}

/// `f(out, row)` for each row of `n` values of `x`, rows split over rayon's threads: the
/// outputs, one row each.
fn map_rows(x: &[f32], n: usize, f: impl Fn(&mut [f32], &[f32]) + Sync + Send) -> Vec<f32> {
    let mut out = vec![0f32; x.len()];
    out.par_chunks_mut(n)
        .zip(x.par_chunks(n))
        .with_min_len(min_rows(n))
        .for_each(|(o, x)| f(o, x));
    out
}

/// [`map_rows`] over two inputs of the same shape, row by row: `f(out, a_row, b_row)`.
fn map_rows2(
    a: &[f32],
    b: &[f32],
    n: usize,
    f: impl Fn(&mut [f32], &[f32], &[f32]) + Sync + Send,
) -> Vec<f32> {
    let mut out = vec![0f32; a.len()];
    out.par_chunks_mut(n)
        .zip(a.par_chunks(n).zip(b.par_chunks(n)))
        .with_min_len(min_rows(n))
        .for_each(|(o, (a, b))| f(o, a, b));
    out
}

/// Elements per task of the element-wise ops (GELU), which have no rows of their own.
const ELEMENTWISE_CHUNK: usize = 4096;

/// Softmax over the last dimension.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Softmax)
}

struct Softmax;

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "tidings-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), s, l)?;
        let n = l.dims().last().copied().unwrap_or(1).max(1);
        let y = map_rows(x, n, |y, x| {
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            let mut sum = 0f32;
            for (y, &x) in y.iter_mut().zip(x) {
                *y = (x - max).exp();
                sum += *y;
            }
            let inv = 1.0 / sum;
            y.iter_mut().for_each(|y| *y *= inv);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, _arg: &Tensor, res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(
            res.apply_op2_no_bwd(&grad.contiguous()?, &SoftmaxGrad)?,
        ))
    }
}

/// `dx = y * (g - sum(g * y))` per row, from the softmax's output `y` and gradient `g`.
struct SoftmaxGrad;

impl CustomOp2 for SoftmaxGrad {
    fn name(&self) -> &'static str {
        "tidings-softmax-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let y = slice(self.name(), s1, l1)?;
        let g = slice(self.name(), s2, l2)?;
        let n = l1.dims().last().copied().unwrap_or(1).max(1);
        let dx = map_rows2(y, g, n, |dx, y, g| {
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, &y), &g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// Layer norm over the last dimension with weight `gamma` and bias `beta`.
pub fn layer_norm(x: &Tensor, gamma: &Tensor, beta: &Tensor, eps: f64) -> Result<Tensor> {
    x.contiguous()?.apply_op3(
        &gamma.contiguous()?,
        &beta.contiguous()?,
        LayerNorm { eps: eps as f32 },
    )
}

struct LayerNorm {
    eps: f32,
}

/// Mean and reciprocal standard deviation of a row.
fn moments(x: &[f32], eps: f32) -> (f32, f32) {
    let n = x.len() as f32;
    let mean = x.iter().sum::<f32>() / n;
    let var = x.iter().map(|v| (v - mean) * (v - mean)).sum::<f32>() / n;
    (mean, 1.0 / (var + eps).sqrt())
}

impl CustomOp3 for LayerNorm {
    fn name(&self) -> &'static str {
        "tidings-layer-norm"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), s1, l1)?;
        let gamma = slice(self.name(), s2, l2)?;
        let beta = slice(self.name(), s3, l3)?;
        let n = gamma.len();
        if n == 0 || l1.dims().last() != Some(&n) || beta.len() != n {
            candle_core::bail!(
                "{}: weight and bias must match the last dimension",
                self.name()
            );
        }
        let y = map_rows(x, n, |y, x| {
            let (mean, rstd) = moments(x, self.eps);
            for i in 0..n {
                y[i] = (x[i] - mean) * rstd * gamma[i] + beta[i];
            }
        });
        Ok((CpuStorage::F32(y), l1.shape().clone()))
    }

    fn bwd(
        &self,
        x: &Tensor,
        gamma: &Tensor,
        _beta: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let n = gamma.elem_count();
        let rows = x.elem_count() / n.max(1);
        let packed =
            x.apply_op3_no_bwd(gamma, &grad.contiguous()?, &LayerNormGrad { eps: self.eps })?;
        let dx = packed.narrow(0, 0, rows)?.reshape(x.shape())?;
        let dgamma = packed.get(rows)?.reshape(gamma.shape())?;
        let dbeta = packed.get(rows + 1)?.reshape(gamma.shape())?;
        Ok((Some(dx), Some(dgamma), Some(dbeta)))
    }
}

/// The layer norm's gradients from `x`, `gamma` and the output gradient `g`, packed as one
/// `[rows + 2, n]` tensor: `dx` row by row, then `dgamma`, then `dbeta`.
struct LayerNormGrad {
    eps: f32,
}

impl CustomOp3 for LayerNormGrad {
    fn name(&self) -> &'static str {
        "tidings-layer-norm-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), s1, l1)?;
        let gamma = slice(self.name(), s2, l2)?;
        let g = slice(self.name(), s3, l3)?;
        let n = gamma.len().max(1);
        let rows = x.len() / n;
        let mut out = vec![0f32; (rows + 2) * n];
        let (dx, params) = out.split_at_mut(rows * n);
        // dx per row; each chunk of rows also sums its share of dgamma and dbeta.
        let partial = dx
            .par_chunks_mut(n)
            .zip(x.par_chunks(n).zip(g.par_chunks(n)))
            .with_min_len(min_rows(n))
            .fold(
                || vec![0f32; 2 * n],
                |mut acc, (dx, (x, g))| {
                    let (mean, rstd) = moments(x, self.eps);
                    let (mut sum_d, mut sum_dh) = (0f32, 0f32);
                    for i in 0..n {
                        let xhat = (x[i] - mean) * rstd;
                        let d = g[i] * gamma[i];
                        sum_d += d;
                        sum_dh += d * xhat;
                        acc[i] += g[i] * xhat;
                        acc[n + i] += g[i];
                    }
                    let (mean_d, mean_dh) = (sum_d / n as f32, sum_dh / n as f32);
                    for i in 0..n {
                        let xhat = (x[i] - mean) * rstd;
                        dx[i] = rstd * (g[i] * gamma[i] - mean_d - xhat * mean_dh);
                    }
                    acc
                },
            )
            .reduce(
                || vec![0f32; 2 * n],
                |mut a, b| {
                    a.iter_mut().zip(&b).for_each(|(a, b)| *a += b);
                    a
                },
            );
        params.copy_from_slice(&partial);
        Ok((CpuStorage::F32(out), Shape::from((rows + 2, n))))
    }
}

/// GELU, the exact (erf) form: `x * (1 + erf(x / sqrt 2)) / 2`.
pub fn gelu_erf(x: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(Gelu)
}

struct Gelu;

impl CustomOp1 for Gelu {
    fn name(&self) -> &'static str {
        "tidings-gelu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), s, l)?;
        let y = map_rows(x, ELEMENTWISE_CHUNK, |y, x| {
            y.copy_from_slice(x);
            kernels::gelu_erf(y);
        });
        Ok((CpuStorage::F32(y), l.shape().clone()))
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(arg.apply_op2_no_bwd(&grad.contiguous()?, &GeluGrad)?))
    }
}

/// `dx = g * (0.5 (1 + erf(x / sqrt 2)) + x exp(-x^2 / 2) / sqrt(2 pi))`.
struct GeluGrad;

impl CustomOp2 for GeluGrad {
    fn name(&self) -> &'static str {
        "tidings-gelu-grad"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), s1, l1)?;
        let g = slice(self.name(), s2, l2)?;
        let dx = map_rows2(x, g, ELEMENTWISE_CHUNK, |dx, x, g| {
            kernels::gelu_erf_grad(x, g, dx)
        });
        Ok((CpuStorage::F32(dx), l1.shape().clone()))
    }
}

/// `x W^T` for a frozen `W` (`[out, in]`; `wt` its contiguous transpose): the same product as
/// `x.matmul(wt)`, but its backward pass computes only the input's gradient, `g W`. candle's
/// own matmul also computes the weight's gradient, which a frozen weight (an adapter run's
/// base) throws away: a third of a dense layer's training work.
pub fn frozen_product(x: &Tensor, w: &Tensor, wt: &Tensor) -> Result<Tensor> {
    x.contiguous()?.apply_op1(FrozenProduct {
        w: w.clone(),
        wt: wt.clone(),
    })
}

/// See [`frozen_product`].
struct FrozenProduct {
    w: Tensor,
    wt: Tensor,
}

impl CustomOp1 for FrozenProduct {
    fn name(&self) -> &'static str {
        "tidings-frozen-product"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = slice(self.name(), s, l)?;
        let (m, k) = l.shape().dims2()?;
        let y = Tensor::from_slice(x, (m, k), &candle_core::Device::Cpu)?.matmul(&self.wt)?;
        let shape = y.shape().clone();
        Ok((CpuStorage::F32(y.flatten_all()?.to_vec1::<f32>()?), shape))
    }

    fn bwd(&self, _arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(grad.matmul(&self.w)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var, D};

    fn random(shape: &[usize], seed: u64) -> Tensor {
        let n: usize = shape.iter().product();
        let mut state = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        let v: Vec<f32> = (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 6.0
            })
            .collect();
        Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
    }

    fn assert_close(a: &Tensor, b: &Tensor, tol: f32, what: &str) {
        let a = a.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let b = b.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(a.len(), b.len(), "{what}: lengths");
        let worst = a
            .iter()
            .zip(&b)
            .map(|(x, y)| (x - y).abs())
            .fold(0f32, f32::max);
        assert!(worst <= tol, "{what}: largest difference {worst}");
    }

    /// Values and gradients (through a weighted sum, so every output has its own gradient)
    /// of the fused op and of candle's composed form agree.
    fn check(
        fused: impl Fn(&[Tensor]) -> Result<Tensor>,
        composed: impl Fn(&[Tensor]) -> Result<Tensor>,
        inputs: &[Tensor],
        tol: f32,
    ) {
        let weights = random(inputs[0].dims(), 99);
        let run = |f: &dyn Fn(&[Tensor]) -> Result<Tensor>| {
            let vars: Vec<Var> = inputs
                .iter()
                .map(|t| Var::from_tensor(t).unwrap())
                .collect();
            let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
            let y = f(&ts).unwrap();
            let loss = (&y * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            let gs: Vec<Tensor> = vars.iter().map(|v| grads.get(v).unwrap().clone()).collect();
            (y, gs)
        };
        let (y1, g1) = run(&fused);
        let (y2, g2) = run(&composed);
        assert_close(&y1, &y2, tol, "values");
        for (i, (a, b)) in g1.iter().zip(&g2).enumerate() {
            assert_close(a, b, tol, &format!("gradient of input {i}"));
        }
    }

    #[test]
    fn softmax_matches_candle() {
        check(
            |t| softmax_last_dim(&t[0]),
            |t| candle_nn::ops::softmax(&t[0], D::Minus1),
            &[random(&[3, 5, 37], 1)],
            1e-5,
        );
    }

    #[test]
    fn layer_norm_matches_candle() {
        let gamma = (random(&[48], 2) * 0.3).unwrap();
        let beta = random(&[48], 3);
        check(
            |t| layer_norm(&t[0], &t[1], &t[2], 1e-12),
            |t| candle_nn::ops::layer_norm_slow(&t[0], &t[1], &t[2], 1e-12),
            &[random(&[2, 7, 48], 4), gamma, beta],
            2e-4,
        );
    }

    #[test]
    fn gelu_matches_candle() {
        check(
            |t| gelu_erf(&t[0]),
            |t| t[0].gelu_erf(),
            &[random(&[5, 333], 5)],
            1e-5,
        );
    }

    #[test]
    fn a_frozen_product_matches_matmul_and_keeps_no_weight_gradient() {
        let w = random(&[24, 40], 6);
        let wt = w.t().unwrap().contiguous().unwrap();
        let x = Var::from_tensor(&random(&[9, 40], 7)).unwrap();
        let weights = random(&[9, 24], 8);
        let grad_of = |y: Tensor| {
            let loss = (&y * &weights).unwrap().sum_all().unwrap();
            let grads = loss.backward().unwrap();
            (y, grads.get(&x).unwrap().clone())
        };
        let (y1, g1) = grad_of(frozen_product(x.as_tensor(), &w, &wt).unwrap());
        let (y2, g2) = grad_of(x.as_tensor().matmul(&wt).unwrap());
        assert_close(&y1, &y2, 1e-4, "values");
        assert_close(&g1, &g2, 1e-4, "input gradient");
    }
}
