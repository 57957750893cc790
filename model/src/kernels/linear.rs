//! Linear layer y = x·Wᵀ (+ b) with W `[out, in]` (torch layout), bias fused into the GEMM.
//!
//! Backward in one op: dx = dy·W, dW = dyᵀ·x and db = Σ_rows dy. candle's matmul would get there
//! through a transposed view, a strided copy and a separate bias reduction, on a second thread
//! pool (see `par`).

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Shape, Tensor, WithDType};

use super::math::{Elem, Mat, gemm};
use super::reduce::column_sum_slice;
use super::{SyncPtr, check_same, contiguous, par, unsupported};
use crate::ModelError;

/// Rows of x per unit of the row-parallel GEMMs (y and dx): about a quarter of the rows, within
/// [128, 512]. Every unit packs all of W again, so units should be big; a function of the shape
/// only, so results don't depend on the thread count.
fn row_unit(rows: usize) -> usize {
    rows.div_ceil(4).clamp(128, 512)
}
/// Rows of x per unit of the dW reduction, before capping the number of units.
const K_UNIT: usize = 256;
/// Target number of dW tiles, and at most this many k-slices.
const MAX_K_UNITS: usize = 8;
/// Elements of all partial dW buffers together (32 MiB of f32).
const PARTIAL_BUDGET: usize = 8 << 20;
/// Smallest output block of a dW tile (each tile packs its slice of x again).
const MIN_OUT_BLOCK: usize = 64;

/// x `[.., in]` · Wᵀ (+ b) → `[.., out]`, for W `[out, in]` and b `[out]`.
pub fn linear(x: &Tensor, weight: &Tensor, bias: Option<&Tensor>) -> Result<Tensor, ModelError> {
    let mut all = vec![x, weight];
    all.extend(bias);
    if let Some(r) = super::widen_cpu_bf16(&all, |t| linear(&t[0], &t[1], t.get(2))) {
        return r;
    }
    let (out, inp) = weight.dims2().map_err(|_| {
        ModelError::Input(format!(
            "linear: weight must be [out, in], got {:?}",
            weight.dims()
        ))
    })?;
    match x.dims().last() {
        Some(&c) if c == inp && inp > 0 && out > 0 => {}
        _ => {
            return Err(ModelError::Input(format!(
                "linear: input {:?} for weight {:?}",
                x.dims(),
                weight.dims()
            )));
        }
    }
    let (x, w) = (x.contiguous()?, weight.contiguous()?);
    match bias {
        Some(b) => {
            check_same("linear", &[&x, &w, b])?;
            if b.dims() != [out] {
                return Err(ModelError::Input(format!(
                    "linear: bias {:?} for weight {:?}",
                    b.dims(),
                    weight.dims()
                )));
            }
            Ok(x.apply_op3(&w, &b.contiguous()?, Linear)?)
        }
        None => {
            check_same("linear", &[&x, &w])?;
            Ok(x.apply_op2(&w, LinearNoBias)?)
        }
    }
}

/// Forward op with bias: (x, W, b) → y.
#[derive(Clone, Copy, Debug)]
pub struct Linear;

/// Forward op without bias: (x, W) → y.
#[derive(Clone, Copy, Debug)]
pub struct LinearNoBias;

/// Backward op: (x, W, dy) → one flat tensor [dx (rows·in) | dW (out·in) | db (out, when
/// `bias`)].
#[derive(Clone, Copy, Debug)]
pub struct LinearBackward {
    /// Whether the forward had a bias (then db is appended).
    pub bias: bool,
}

/// (rows, in, out) after checking x `[.., in]` against W `[out, in]`.
fn dims(op: &str, lx: &Layout, lw: &Layout) -> candle_core::Result<(usize, usize, usize)> {
    let (out, inp) = lw.shape().dims2()?;
    match lx.dims().last() {
        Some(&c) if c == inp && inp > 0 => Ok((lx.shape().elem_count() / inp, inp, out)),
        _ => candle_core::bail!("{op}: input {:?} for weight {:?}", lx.dims(), lw.dims()),
    }
}

fn out_shape(lx: &Layout, out: usize) -> Shape {
    let mut d = lx.dims().to_vec();
    if let Some(last) = d.last_mut() {
        *last = out;
    }
    Shape::from(d)
}

/// y = x·Wᵀ (+ b), parallel over row blocks.
fn forward<T: Elem>(x: &[T], w: &[T], b: Option<&[T]>, inp: usize, out: usize) -> Vec<T> {
    let rows = x.len() / inp;
    let mut y = vec![T::ZERO; rows * out];
    let unit = row_unit(rows);
    par::chunks_mut(&mut y, unit * out, |i, yc| {
        let r = yc.len() / out;
        if let Some(b) = b {
            for row in yc.chunks_exact_mut(out) {
                row.copy_from_slice(b);
            }
        }
        // SAFETY: x rows i·unit.. +r and all of W are in bounds; yc is this unit's own.
        unsafe {
            gemm(
                r,
                out,
                inp,
                yc.as_mut_ptr(),
                out as isize,
                Mat {
                    ptr: x.as_ptr().add(i * unit * inp),
                    rs: inp as isize,
                    cs: 1,
                },
                Mat {
                    ptr: w.as_ptr(),
                    rs: 1,
                    cs: inp as isize,
                },
                T::ONE,
                b.is_some(),
            )
        }
    });
    y
}

/// Packed [dx | dW | db]. Units: row blocks of dx, and (k-slice, output-block) tiles of dW.
/// Each k-slice of the rows gives a partial dW (the first straight into the output); the
/// partials are added in slice order. Slices need `out·in` memory each, so large layers get
/// fewer slices and more output blocks.
fn backward<T: Elem>(x: &[T], w: &[T], dy: &[T], inp: usize, out: usize, bias: bool) -> Vec<T> {
    let rows = x.len() / inp;
    let db_len = if bias { out } else { 0 };
    let mut packed = vec![T::ZERO; rows * inp + out * inp + db_len];
    let unit = row_unit(rows);
    let dx_units = rows.div_ceil(unit);
    let k_units = rows
        .div_ceil(K_UNIT)
        .clamp(1, MAX_K_UNITS)
        .min((PARTIAL_BUDGET / (out * inp)).max(1));
    let k_span = rows.div_ceil(k_units);
    let out_span = out
        .div_ceil((MAX_K_UNITS / k_units).max(1))
        .max(MIN_OUT_BLOCK.min(out));
    let out_blocks = out.div_ceil(out_span);
    let mut extra: Vec<Vec<T>> = (1..k_units).map(|_| vec![T::ZERO; out * inp]).collect();
    let (dx, rest) = packed.split_at_mut(rows * inp);
    let (dw, db) = rest.split_at_mut(out * inp);
    let dx_ptr = SyncPtr(dx.as_mut_ptr());
    let slices: Vec<SyncPtr<T>> = std::iter::once(SyncPtr(dw.as_mut_ptr()))
        .chain(extra.iter_mut().map(|e| SyncPtr(e.as_mut_ptr())))
        .collect();
    par::for_each_range(dx_units + k_units * out_blocks, |units| {
        for u in units {
            if u < dx_units {
                let r0 = u * unit;
                let r = unit.min(rows - r0);
                // SAFETY: rows r0..r0+r of dx are this unit's alone; dy rows and W in bounds.
                unsafe {
                    gemm(
                        r,
                        inp,
                        out,
                        dx_ptr.get().add(r0 * inp),
                        inp as isize,
                        Mat {
                            ptr: dy.as_ptr().add(r0 * out),
                            rs: out as isize,
                            cs: 1,
                        },
                        Mat {
                            ptr: w.as_ptr(),
                            rs: inp as isize,
                            cs: 1,
                        },
                        T::ONE,
                        false,
                    );
                }
                continue;
            }
            let (ks, ob) = ((u - dx_units) / out_blocks, (u - dx_units) % out_blocks);
            let k0 = (ks * k_span).min(rows);
            let k = k_span.min(rows - k0);
            let o0 = ob * out_span;
            let o = out_span.min(out - o0);
            if k == 0 || o == 0 {
                continue;
            }
            // SAFETY: rows o0..o0+o of k-slice ks's buffer belong to this unit alone; dyᵀ and
            // x are read at rows k0..k0+k, columns in bounds.
            unsafe {
                gemm(
                    o,
                    inp,
                    k,
                    slices[ks].get().add(o0 * inp),
                    inp as isize,
                    Mat {
                        ptr: dy.as_ptr().add(k0 * out + o0),
                        rs: 1,
                        cs: out as isize,
                    },
                    Mat {
                        ptr: x.as_ptr().add(k0 * inp),
                        rs: inp as isize,
                        cs: 1,
                    },
                    T::ONE,
                    false,
                );
            }
        }
    });
    for part in &extra {
        for (t, &p) in dw.iter_mut().zip(part) {
            *t += p;
        }
    }
    if bias {
        db.copy_from_slice(&column_sum_slice(dy, out));
    }
    packed
}

/// Splits the packed backward output into (dx, dW, db).
fn unpack(
    packed: &Tensor,
    x: &Tensor,
    w: &Tensor,
    bias: bool,
) -> candle_core::Result<(Tensor, Tensor, Option<Tensor>)> {
    let (out, inp) = w.dims2()?;
    let n = x.elem_count();
    let dx = packed.narrow(0, 0, n)?.reshape(x.shape())?;
    let dw = packed.narrow(0, n, out * inp)?.reshape((out, inp))?;
    let db = if bias {
        Some(packed.narrow(0, n + out * inp, out)?)
    } else {
        None
    };
    Ok((dx, dw, db))
}

impl CustomOp3 for Linear {
    fn name(&self) -> &'static str {
        "vjepa-linear"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::linear_fwd(s1, l1, s2, l2, Some((s3, l3)))
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, inp, out) = dims(name, l1, l2)?;
        if l3.dims() != [out] {
            candle_core::bail!("{name}: bias {:?} for {out} outputs", l3.dims());
        }
        let y = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(forward::<f32>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                Some(contiguous(name, s3, l3)?),
                inp,
                out,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(forward::<f64>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                Some(contiguous(name, s3, l3)?),
                inp,
                out,
            )),
            _ => return Err(unsupported(name, s1)),
        };
        Ok((y, out_shape(l1, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _b: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBackward { bias: true })?;
        let (dx, dw, db) = unpack(&packed, x, w, true)?;
        Ok((Some(dx), Some(dw), db))
    }
}

impl CustomOp2 for LinearNoBias {
    fn name(&self) -> &'static str {
        "vjepa-linear-no-bias"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::linear_fwd(s1, l1, s2, l2, None)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (_, inp, out) = dims(name, l1, l2)?;
        let y = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(forward::<f32>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                None,
                inp,
                out,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(forward::<f64>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                None,
                inp,
                out,
            )),
            _ => return Err(unsupported(name, s1)),
        };
        Ok((y, out_shape(l1, out)))
    }

    fn bwd(
        &self,
        x: &Tensor,
        w: &Tensor,
        _y: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<(Option<Tensor>, Option<Tensor>)> {
        let packed = x.apply_op3_no_bwd(w, &grad.contiguous()?, &LinearBackward { bias: false })?;
        let (dx, dw, _) = unpack(&packed, x, w, false)?;
        Ok((Some(dx), Some(dw)))
    }
}

impl CustomOp3 for LinearBackward {
    fn name(&self) -> &'static str {
        "vjepa-linear-backward"
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        s1: &candle_core::CudaStorage,
        l1: &Layout,
        s2: &candle_core::CudaStorage,
        l2: &Layout,
        s3: &candle_core::CudaStorage,
        l3: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        super::cuda::linear_bwd(s1, l1, s2, l2, s3, l3, self.bias)
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> candle_core::Result<(CpuStorage, Shape)> {
        let name = self.name();
        let (rows, inp, out) = dims(name, l1, l2)?;
        if l3.shape().elem_count() != rows * out || l3.dims().last() != Some(&out) {
            candle_core::bail!("{name}: grad {:?} for input {:?}", l3.dims(), l1.dims());
        }
        let len = rows * inp + out * inp + if self.bias { out } else { 0 };
        let packed = match s1 {
            CpuStorage::F32(_) => f32::to_cpu_storage_owned(backward::<f32>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                contiguous(name, s3, l3)?,
                inp,
                out,
                self.bias,
            )),
            CpuStorage::F64(_) => f64::to_cpu_storage_owned(backward::<f64>(
                contiguous(name, s1, l1)?,
                contiguous(name, s2, l2)?,
                contiguous(name, s3, l3)?,
                inp,
                out,
                self.bias,
            )),
            _ => return Err(unsupported(name, s1)),
        };
        Ok((packed, Shape::from(len)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::reference::{self, assert_close, randn};
    use candle_core::{DType, Var};

    fn check(lead: &[usize], inp: usize, out: usize, bias: bool, seed: u64) {
        let mut shape = lead.to_vec();
        shape.push(inp);
        let x = Var::from_tensor(&randn(&shape, DType::F32, seed)).unwrap();
        let w = Var::from_tensor(&randn(&[out, inp], DType::F32, seed + 1)).unwrap();
        let b = Var::from_tensor(&randn(&[out], DType::F32, seed + 2)).unwrap();
        let mut gshape = lead.to_vec();
        gshape.push(out);
        let g = randn(&gshape, DType::F32, seed + 3);
        let bias_t = bias.then(|| b.as_tensor());
        let ours = linear(&x, &w, bias_t).unwrap();
        let want = reference::linear(&x, &w, bias_t).unwrap();
        let what = format!("{shape:?}→{out} bias {bias}");
        assert_close(&ours, &want, 1e-5, &format!("{what} fwd"));
        let ga = (ours * &g).unwrap().sum_all().unwrap().backward().unwrap();
        let gb = (want * &g).unwrap().sum_all().unwrap().backward().unwrap();
        assert_close(
            ga.get(&x).unwrap(),
            gb.get(&x).unwrap(),
            1e-5,
            &format!("{what} dx"),
        );
        assert_close(
            ga.get(&w).unwrap(),
            gb.get(&w).unwrap(),
            1e-5,
            &format!("{what} dW"),
        );
        if bias {
            assert_close(
                ga.get(&b).unwrap(),
                gb.get(&b).unwrap(),
                1e-5,
                &format!("{what} db"),
            );
        } else {
            assert!(ga.get(&b).is_none());
        }
    }

    #[test]
    fn matches_composite_reference() {
        check(&[1, 1], 5, 3, true, 1);
        check(&[2, 95], 96, 288, true, 2); // one k-slice × 5 output blocks
        check(&[4, 357], 48, 96, false, 3);
        check(&[3000], 7, 33, true, 4); // many row blocks and the maximum of k-slices
        check(&[2, 3, 5], 17, 1, true, 5);
        check(&[600], 40, 200, true, 6); // 3 k-slices × 2 output blocks of dW
    }

    #[test]
    fn finite_difference() {
        let x = Var::from_tensor(&randn(&[2, 3, 4], DType::F64, 31)).unwrap();
        let w = Var::from_tensor(&randn(&[5, 4], DType::F64, 32)).unwrap();
        let b = Var::from_tensor(&randn(&[5], DType::F64, 33)).unwrap();
        let r = randn(&[2, 3, 5], DType::F64, 34);
        let loss = || {
            let y = (linear(&x, &w, Some(&b)).unwrap()
                + linear(&x, &w, None).unwrap().sqr().unwrap())
            .unwrap();
            (y * &r).unwrap().sum_all().unwrap()
        };
        let f = || -> f64 { loss().to_scalar().unwrap() };
        let grads = loss().backward().unwrap();
        for v in [&x, &w, &b] {
            crate::layers::tests::check_grad(v, grads.get(v).unwrap(), &f, 1e-7);
        }
    }

    #[test]
    fn parallel_equals_serial_bit_for_bit() {
        let x = Var::from_tensor(&randn(&[1500, 40], DType::F32, 41)).unwrap();
        let w = randn(&[24, 40], DType::F32, 42);
        let b = randn(&[24], DType::F32, 43);
        let run = || {
            let y = linear(&x, &w, Some(&b)).unwrap();
            let g = y.sqr().unwrap().sum_all().unwrap().backward().unwrap();
            let bits = |t: &Tensor| -> Vec<u32> {
                t.flatten_all()
                    .unwrap()
                    .to_vec1::<f32>()
                    .unwrap()
                    .iter()
                    .map(|v| v.to_bits())
                    .collect()
            };
            (bits(&y), bits(g.get(&x).unwrap()))
        };
        assert_eq!(run(), par::serial(run));
    }

    #[test]
    fn refuses_mismatches() {
        let x = randn(&[2, 4], DType::F32, 1);
        let w = randn(&[3, 5], DType::F32, 2);
        assert!(matches!(linear(&x, &w, None), Err(ModelError::Input(_))));
        let w = randn(&[3, 4], DType::F32, 2);
        let b = randn(&[4], DType::F32, 3);
        assert!(matches!(
            linear(&x, &w, Some(&b)),
            Err(ModelError::Input(_))
        ));
        assert!(matches!(linear(&x, &b, None), Err(ModelError::Input(_))));
    }
}
