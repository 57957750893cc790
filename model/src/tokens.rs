//! Validated token-index sets (one mask's context or target indices for a batch).

use candle_core::{DType, Device, Tensor};

use crate::ModelError;
use crate::kernels;

/// Token indices `[B, K]` checked against the token count and turned into the flat u32 index
/// vectors a row gather needs (differentiable: a scatter backward when no row repeats an
/// index, candle's `index_add` otherwise; both exact).
#[derive(Clone, Debug)]
pub struct TokenIndex {
    batch: usize,
    len: usize,
    /// N the indices were checked against; tensors gathered from must have exactly N tokens.
    num_tokens: usize,
    /// Row-local indices, `[B·K]` (for gathering from a shared `[N, D]` table).
    local: Tensor,
    /// Batch-offset indices b·N + n, `[B·K]` (for gathering from a flattened `[B·N, D]` tensor).
    flat: Tensor,
    counts: Vec<usize>,
    /// Whether no row repeats an index (a mask's tokens are a set): the gather's backward is
    /// then a scatter ([`kernels::gather_rows`]) instead of candle's `index_add`.
    distinct: bool,
}

impl TokenIndex {
    /// Reads `[B, K]` indices (u32, i64 or u8) and checks every index is < `num_tokens`, that B
    /// equals `batch` and K > 0. Rows keep their given order.
    pub fn new(
        indices: &Tensor,
        batch: usize,
        num_tokens: usize,
        what: &str,
        device: &Device,
    ) -> Result<Self, ModelError> {
        let (b, k) = indices.dims2().map_err(|_| {
            ModelError::Input(format!(
                "{what}: indices must be [B, K], got {:?}",
                indices.dims()
            ))
        })?;
        if b != batch {
            return Err(ModelError::Input(format!(
                "{what}: {b} index rows for a batch of {batch}"
            )));
        }
        if k == 0 {
            return Err(ModelError::Input(format!(
                "{what}: empty index set (K = 0)"
            )));
        }
        let rows: Vec<Vec<i64>> = match indices.dtype() {
            DType::U32 => to_i64(indices.to_vec2::<u32>()?),
            DType::I64 => indices.to_vec2::<i64>()?,
            DType::U8 => to_i64(indices.to_vec2::<u8>()?),
            other => {
                return Err(ModelError::Input(format!(
                    "{what}: index dtype {other:?} (want u32 or i64)"
                )));
            }
        };
        let mut local = Vec::with_capacity(b * k);
        let mut flat = Vec::with_capacity(b * k);
        // Mask rows come sorted ascending: then distinct is one pass, no copy.
        let distinct = rows.iter().all(|row| {
            row.windows(2).all(|w| w[0] < w[1]) || {
                let mut r = row.clone();
                r.sort_unstable();
                r.windows(2).all(|w| w[0] != w[1])
            }
        });
        for (bi, row) in rows.iter().enumerate() {
            for &n in row {
                if n < 0 || n as u64 >= num_tokens as u64 {
                    return Err(ModelError::Input(format!(
                        "{what}: index {n} in row {bi} is outside 0..{num_tokens}"
                    )));
                }
                local.push(n as u32);
                let f = bi * num_tokens + n as usize;
                flat.push(u32::try_from(f).map_err(|_| {
                    ModelError::Input(format!(
                        "{what}: batch × tokens = {} overflows u32",
                        batch * num_tokens
                    ))
                })?);
            }
        }
        Ok(Self {
            batch: b,
            len: k,
            num_tokens,
            local: Tensor::from_vec(local, b * k, device)?,
            flat: Tensor::from_vec(flat, b * k, device)?,
            counts: vec![k; b],
            distinct,
        })
    }

    /// Batch size B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Indices per row K.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (K = 0 is refused); present for clippy's `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// K for every row (all equal after the collator's batch-min truncation).
    pub fn counts(&self) -> &[usize] {
        &self.counts
    }

    /// x `[B, N, D]` → `[B, K, D]` (differentiable).
    pub fn gather(&self, x: &Tensor) -> Result<Tensor, ModelError> {
        let (b, n, d) = x.dims3()?;
        if b != self.batch || n != self.num_tokens {
            return Err(ModelError::Input(format!(
                "gather: tensor [{b}, {n}, ..] vs indices for batch {} over {} tokens",
                self.batch, self.num_tokens
            )));
        }
        let rows = x.reshape((b * n, d))?;
        let picked = if self.distinct {
            kernels::gather_rows(&rows, &self.flat)?
        } else {
            rows.index_select(&self.flat, 0)?
        };
        Ok(picked.reshape((b, self.len, d))?)
    }

    /// Rows of a shared table `[1, N, D]` or `[N, D]` → `[B, K, D]` (pos-embed lookup).
    pub fn gather_table(&self, table: &Tensor) -> Result<Tensor, ModelError> {
        let d = table.dim(candle_core::D::Minus1)?;
        let n = table.elem_count() / d.max(1);
        if n != self.num_tokens {
            return Err(ModelError::Input(format!(
                "gather_table: table of {n} rows vs indices over {} tokens",
                self.num_tokens
            )));
        }
        let t = table.reshape((n, d))?;
        Ok(t.index_select(&self.local, 0)?
            .reshape((self.batch, self.len, d))?)
    }
}

fn to_i64<T: Copy + Into<i64>>(rows: Vec<Vec<T>>) -> Vec<Vec<i64>> {
    rows.into_iter()
        .map(|r| r.into_iter().map(Into::into).collect())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gathers_rows_and_checks_range() {
        let dev = Device::Cpu;
        let x = Tensor::arange(0f32, 24., &dev)
            .unwrap()
            .reshape((2, 4, 3))
            .unwrap();
        let idx = Tensor::new(&[[1u32, 3], [0, 2]], &dev).unwrap();
        let ti = TokenIndex::new(&idx, 2, 4, "ctx", &dev).unwrap();
        let g = ti.gather(&x).unwrap().to_vec3::<f32>().unwrap();
        assert_eq!(g[0][0], vec![3., 4., 5.]);
        assert_eq!(g[0][1], vec![9., 10., 11.]);
        assert_eq!(g[1][0], vec![12., 13., 14.]);
        assert_eq!(g[1][1], vec![18., 19., 20.]);
        let t = ti
            .gather_table(&x.get(0).unwrap())
            .unwrap()
            .to_vec3::<f32>()
            .unwrap();
        assert_eq!(t[1][1], vec![6., 7., 8.]);
        let bad = Tensor::new(&[[1u32, 4], [0, 2]], &dev).unwrap();
        assert!(TokenIndex::new(&bad, 2, 4, "ctx", &dev).is_err());
        let neg = Tensor::new(&[[1i64, -1], [0, 2]], &dev).unwrap();
        assert!(TokenIndex::new(&neg, 2, 4, "ctx", &dev).is_err());
        assert!(TokenIndex::new(&idx, 3, 4, "ctx", &dev).is_err());
        // indices checked for N = 4 must not silently gather from another token count
        let ti6 = TokenIndex::new(&idx, 2, 6, "ctx", &dev).unwrap();
        assert!(ti6.gather(&x).is_err());
        assert!(ti6.gather_table(&x.get(0).unwrap()).is_err());
    }

    /// Distinct rows gather with the scatter backward, repeated ones with `index_add`: both give
    /// every source token the sum of its gathered rows' gradients.
    #[test]
    fn gather_gradients_with_and_without_repeats() {
        let dev = Device::Cpu;
        let x = candle_core::Var::from_tensor(
            &Tensor::arange(0f32, 24., &dev)
                .unwrap()
                .reshape((2, 4, 3))
                .unwrap(),
        )
        .unwrap();
        let w = Tensor::arange(1f32, 13., &dev)
            .unwrap()
            .reshape((2, 2, 3))
            .unwrap();
        let grad = |rows: &[[u32; 2]; 2]| {
            let ti = TokenIndex::new(&Tensor::new(rows, &dev).unwrap(), 2, 4, "ctx", &dev).unwrap();
            let g = (ti.gather(&x).unwrap() * &w)
                .unwrap()
                .sum_all()
                .unwrap()
                .backward()
                .unwrap();
            (ti.distinct, g.get(&x).unwrap().to_vec3::<f32>().unwrap())
        };
        let (distinct, g) = grad(&[[3, 1], [0, 2]]);
        assert!(distinct);
        assert_eq!(g[0], [[0.; 3], [4., 5., 6.], [0.; 3], [1., 2., 3.]]);
        assert_eq!(g[1], [[7., 8., 9.], [0.; 3], [10., 11., 12.], [0.; 3]]);
        let (distinct, g) = grad(&[[1, 1], [0, 2]]);
        assert!(!distinct);
        assert_eq!(g[0][1], [5., 7., 9.]);
        assert_eq!(g[0][0], [0.; 3]);
    }
}
