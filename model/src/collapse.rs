//! Collapse signals over the (layer-normed) target features of a step, cheap enough for every
//! step. Two kinds of collapse need two signals: every clip mapping to the same features
//! ([`batch_std`] near 0), and *dimensional* collapse, where the features still differ across
//! clips but only along a few directions ([`effective_rank`] near 1). Small V-JEPA runs show the
//! second while the first stays healthy (README "Proof that it learns").

use candle_core::{DType, Tensor};

use crate::ModelError;
use crate::kernels;

/// Token rows [`effective_rank`] uses at most (evenly strided), so the `D×D` covariance costs
/// `4096·D²` multiply-adds whatever the batch.
pub const RANK_MAX_ROWS: usize = 4096;

/// Both collapse signals of one step's target features, as the step reports them.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Signals {
    /// [`batch_std`].
    pub std: f64,
    /// [`effective_rank`].
    pub rank: f64,
}

/// [`batch_std`] and [`effective_rank`] of `[B, N, D]` features with one device-to-host copy
/// (this runs every training step).
pub fn signals(h: &Tensor) -> Result<Signals, ModelError> {
    let v = terms(h)?.to_dtype(DType::F64)?.to_vec1::<f64>()?;
    Ok(Signals::from_terms(&v))
}

/// The device-side terms of [`signals`] as one `[3]` f32 tensor, for a caller that reads them
/// back together with other values of the step (one host sync instead of several).
pub fn terms(h: &Tensor) -> Result<Tensor, ModelError> {
    let std = std_tensor(h)?;
    let (trace, frob2) = rank_terms(h)?;
    Ok(Tensor::stack(&[std, trace, frob2], 0)?)
}

impl Signals {
    /// The signals from the three values of [`terms`].
    pub fn from_terms(v: &[f64]) -> Self {
        match v {
            [std, trace, frob2, ..] => Signals {
                std: *std,
                rank: participation_ratio(*trace, *frob2),
            },
            _ => Signals {
                std: f64::NAN,
                rank: 0.0,
            },
        }
    }
}

/// Population std over the batch axis of `[B, N, D]` features, then the mean over N and D
/// (0 for a batch of one clip).
pub fn batch_std(h: &Tensor) -> Result<f64, ModelError> {
    Ok(std_tensor(h)?.to_dtype(DType::F64)?.to_scalar::<f64>()?)
}

/// Participation ratio `(Σλ)² / Σλ²` of the eigenvalues λ of the covariance of the token
/// features `[B, N, D]` (all tokens of all clips as rows): about `k` when the variance is spread
/// evenly over `k` directions, between 1 and D. Computed as `tr(C)² / ‖C‖²_F`, so no
/// eigendecomposition; 0 when the features do not vary at all.
pub fn effective_rank(h: &Tensor) -> Result<f64, ModelError> {
    let (trace, frob2) = rank_terms(h)?;
    let v = Tensor::stack(&[trace, frob2], 0)?
        .to_dtype(DType::F64)?
        .to_vec1::<f64>()?;
    Ok(participation_ratio(v[0], v[1]))
}

fn std_tensor(h: &Tensor) -> Result<Tensor, ModelError> {
    let (b, n, d) = h.dims3()?;
    let x = h.to_dtype(DType::F32)?.reshape((b, n * d))?;
    // Means over the batch as a [1, B] · [B, N·D] product: candle's reduction over a leading
    // axis launches one small block per output (1.6 M of them at ViT-L), a GEMV streams it.
    let avg = Tensor::full(1.0 / b as f32, (1, b), h.device())?;
    let centred = x.broadcast_sub(&avg.matmul(&x)?)?;
    let std = avg.matmul(&centred.sqr()?)?.sqrt()?.reshape((n, d))?;
    // The mean over positions as column sums, then a sum of D values: candle's whole-tensor
    // sum is one block on a GPU (about 10 GB/s; ms per step at ViT-L batch 24).
    let total = kernels::column_sum(&std)?.sum_all()?;
    Ok((total / (n * d) as f64)?)
}

/// (tr C, ‖C‖²_F) of the covariance C of at most [`RANK_MAX_ROWS`] strided token rows, unscaled
/// (the ratio does not depend on the scale).
fn rank_terms(h: &Tensor) -> Result<(Tensor, Tensor), ModelError> {
    let (b, n, d) = h.dims3()?;
    let rows = b * n;
    let x = h.to_dtype(DType::F32)?.reshape((rows, d))?;
    let x = if rows > RANK_MAX_ROWS {
        let step = rows.div_ceil(RANK_MAX_ROWS);
        let idx = Tensor::arange_step(0u32, rows as u32, step as u32, h.device())?;
        x.index_select(&idx, 0)?
    } else {
        x
    };
    let mean = (kernels::column_sum(&x)? / x.dim(0)? as f64)?;
    let xc = x.broadcast_sub(&mean)?;
    let cov = xc.t()?.matmul(&xc)?;
    // Our sums of squares (two-stage on a GPU, threaded on the CPU), not candle's one-block
    // whole-tensor sums.
    Ok((kernels::sum_sq(&xc)?, kernels::sum_sq(&cov)?))
}

fn participation_ratio(trace: f64, frob2: f64) -> f64 {
    if frob2 > 0.0 && trace.is_finite() {
        trace * trace / frob2
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn features(rows: &[[f32; 4]]) -> Tensor {
        let flat: Vec<f32> = rows.iter().flatten().copied().collect();
        Tensor::from_vec(flat, (rows.len(), 4), &Device::Cpu)
            .unwrap()
            .reshape((1, rows.len(), 4))
            .unwrap()
    }

    #[test]
    fn rank_counts_directions_with_variance() {
        // Variance along one axis only: rank 1.
        let one = features(&[[1., 0., 0., 0.], [-1., 0., 0., 0.], [3., 0., 0., 0.]]);
        assert!((effective_rank(&one).unwrap() - 1.0).abs() < 1e-6);
        // Equal variance along two orthogonal axes: rank 2.
        let two = features(&[
            [1., 0., 0., 0.],
            [-1., 0., 0., 0.],
            [0., 1., 0., 0.],
            [0., -1., 0., 0.],
        ]);
        assert!((effective_rank(&two).unwrap() - 2.0).abs() < 1e-6);
        // Unequal variances λ = (4, 1)·c: (5²)/(16+1) ≈ 1.47.
        let skew = features(&[
            [2., 0., 0., 0.],
            [-2., 0., 0., 0.],
            [0., 1., 0., 0.],
            [0., -1., 0., 0.],
        ]);
        assert!((effective_rank(&skew).unwrap() - 25.0 / 17.0).abs() < 1e-5);
        // No variance at all.
        let flat = features(&[[1., 2., 3., 4.], [1., 2., 3., 4.]]);
        assert_eq!(effective_rank(&flat).unwrap(), 0.0);
    }

    #[test]
    fn rank_of_isotropic_noise_is_near_the_dimension() {
        let x = Tensor::randn(0f32, 1.0, (3, 3000, 16), &Device::Cpu).unwrap();
        let r = effective_rank(&x).unwrap(); // 9000 rows: strided down to RANK_MAX_ROWS
        assert!(r > 15.0 && r <= 16.0, "{r}");
    }

    #[test]
    fn signals_are_both_statistics() {
        let x = Tensor::randn(0f32, 1.0, (4, 50, 8), &Device::Cpu).unwrap();
        let s = signals(&x).unwrap();
        assert!((s.std - batch_std(&x).unwrap()).abs() < 1e-9, "{s:?}");
        assert!((s.rank - effective_rank(&x).unwrap()).abs() < 1e-9, "{s:?}");
        assert!(s.std > 0.5 && s.rank > 6.0, "{s:?}");
    }

    #[test]
    fn batch_std_is_zero_for_identical_clips() {
        let a = features(&[[1., 2., 3., 4.], [0., 1., 0., 1.]]);
        let same = Tensor::cat(&[&a, &a], 0).unwrap();
        assert_eq!(batch_std(&same).unwrap(), 0.0);
        let b = features(&[[3., 2., 3., 4.], [0., 1., 0., 1.]]);
        let s = batch_std(&Tensor::cat(&[&a, &b], 0).unwrap()).unwrap();
        assert!((s - 1.0 / 8.0).abs() < 1e-6); // one of 8 entries differs by 2
    }
}
