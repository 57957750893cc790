//! Fixed 3-D sin-cos positional tables (spec §2).
//!
//! Per axis a 1-D table of width d: all sines first, then all cosines, with
//! ω_k = 10000^(-k/(d/2)); axes are concatenated as [time, height, width] and the result is cut
//! to the model width (which drops the tail of the width-cosine block for D = 1024 / 1280).

use candle_core::{Device, Tensor};

use crate::ModelError;

/// Per-axis widths (d_t, d_h, d_w) for a table of width `embed_dim`.
///
/// uniform_power: 2·ceil(D/6) for every axis; otherwise D/2 for time and D/4 for height/width.
/// Each width must be even (sin and cos halves), which is why odd splits are refused.
pub fn axis_dims(
    embed_dim: usize,
    uniform_power: bool,
) -> Result<(usize, usize, usize), ModelError> {
    if embed_dim == 0 {
        return Err(ModelError::Config(
            "pos embed: embed_dim must be > 0".into(),
        ));
    }
    if uniform_power {
        let d = 2 * embed_dim.div_ceil(6);
        Ok((d, d, d))
    } else {
        if !embed_dim.is_multiple_of(8) {
            return Err(ModelError::Config(format!(
                "pos embed: embed_dim {embed_dim} must be a multiple of 8 without uniform_power"
            )));
        }
        Ok((embed_dim / 2, embed_dim / 4, embed_dim / 4))
    }
}

/// Appends the 1-D table row of width `d` (even) for integer position `pos`.
fn push_1d(out: &mut Vec<f64>, d: usize, pos: usize) {
    let half = d / 2;
    let pos = pos as f64;
    let omega = |k: usize| 1.0 / 10000f64.powf(k as f64 / half as f64);
    out.extend((0..half).map(|k| (pos * omega(k)).sin()));
    out.extend((0..half).map(|k| (pos * omega(k)).cos()));
}

/// Row-major `[N, D]` table for `grid` = (Gt, Gh, Gw); token n = ti·Gh·Gw + hi·Gw + wi.
/// Computed in f64 (as numpy does) and rounded to f32 once.
pub fn sincos_3d(
    embed_dim: usize,
    grid: (usize, usize, usize),
    uniform_power: bool,
) -> Result<Vec<f32>, ModelError> {
    let (dt, dh, dw) = axis_dims(embed_dim, uniform_power)?;
    let (gt, gh, gw) = grid;
    let mut table = Vec::with_capacity(gt * gh * gw * embed_dim);
    let mut row = Vec::with_capacity(dt + dh + dw);
    for ti in 0..gt {
        for hi in 0..gh {
            for wi in 0..gw {
                row.clear();
                push_1d(&mut row, dt, ti);
                push_1d(&mut row, dh, hi);
                push_1d(&mut row, dw, wi);
                table.extend(row[..embed_dim].iter().map(|&v| v as f32));
            }
        }
    }
    Ok(table)
}

/// The table as an f32 tensor `[1, N, D]` (the checkpoint's shape).
pub fn sincos_3d_tensor(
    embed_dim: usize,
    grid: (usize, usize, usize),
    uniform_power: bool,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let n = grid.0 * grid.1 * grid.2;
    let data = sincos_3d(embed_dim, grid, uniform_power)?;
    Ok(Tensor::from_vec(data, (1, n, embed_dim), device)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn widths_match_spec() {
        assert_eq!(axis_dims(1024, true).unwrap(), (342, 342, 342));
        assert_eq!(axis_dims(1280, true).unwrap(), (428, 428, 428));
        assert_eq!(axis_dims(384, true).unwrap(), (128, 128, 128));
        assert_eq!(axis_dims(768, true).unwrap(), (256, 256, 256));
        assert_eq!(axis_dims(1408, true).unwrap(), (470, 470, 470));
        assert_eq!(axis_dims(1024, false).unwrap(), (512, 256, 256));
        assert!(axis_dims(36, false).is_err());
    }

    #[test]
    fn values_and_truncation_d1024() {
        let d = 1024;
        let grid = (2, 2, 3);
        let t = sincos_3d(d, grid, true).unwrap();
        assert_eq!(t.len(), 12 * d);
        // token 0: every sine 0, every cosine 1 (within the kept columns).
        let row0 = &t[..d];
        assert!(row0[..171].iter().all(|&v| v == 0.0));
        assert!(row0[171..342].iter().all(|&v| v == 1.0));
        assert!(row0[855..1024].iter().all(|&v| v == 1.0));
        // token (ti=1, hi=0, wi=1) = n = 1*6 + 0 + 1 = 7.
        let row = &t[7 * d..8 * d];
        assert!((row[0] - 1f64.sin() as f32).abs() < 1e-7);
        assert!((row[171] - 1f64.cos() as f32).abs() < 1e-7);
        assert_eq!(row[342], 0.0); // height sin at hi = 0
        assert!((row[684] - 1f64.sin() as f32).abs() < 1e-7); // width sin k=0
        // last kept column = width cos with k = 168 of 171 (2 columns cut).
        let w = 1.0 / 10000f64.powf(168.0 / 171.0);
        assert!((row[1023] - w.cos() as f32).abs() < 1e-7);
    }

    #[test]
    fn tensor_shape() {
        let t = sincos_3d_tensor(384, (8, 14, 14), true, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[1, 1568, 384]);
    }
}
