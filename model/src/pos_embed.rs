//! Fixed sin-cos positional tables (spec §2): 3-D for video, 2-D for images (`num_frames = 1`),
//! and the reference's resizing of a table to another token grid.
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

/// Width of each axis block of the 2-D image table (num_frames = 1): D/2 for rows, D/2 for
/// columns (the reference ignores `uniform_power` there). Each block needs an even width, so D
/// must be a multiple of 4.
pub fn image_axis_dim(embed_dim: usize) -> Result<usize, ModelError> {
    if embed_dim == 0 || !embed_dim.is_multiple_of(4) {
        return Err(ModelError::Config(format!(
            "pos embed: the 2-D image table needs embed_dim divisible by 4, got {embed_dim}"
        )));
    }
    Ok(embed_dim / 2)
}

/// Row-major `[Gh·Gw, D]` image table: per token [row block (D/2), column block (D/2)], token
/// n = hi·Gw + wi. Computed in f64 and rounded to f32 once.
pub fn sincos_2d(embed_dim: usize, grid: (usize, usize)) -> Result<Vec<f32>, ModelError> {
    let d = image_axis_dim(embed_dim)?;
    let (gh, gw) = grid;
    let mut table = Vec::with_capacity(gh * gw * embed_dim);
    let mut row = Vec::with_capacity(embed_dim);
    for hi in 0..gh {
        for wi in 0..gw {
            row.clear();
            push_1d(&mut row, d, hi);
            push_1d(&mut row, d, wi);
            table.extend(row.iter().map(|&v| v as f32));
        }
    }
    Ok(table)
}

/// Which fixed table a model uses: 3-D for video, 2-D for images (`num_frames = 1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TableLayout {
    /// [time, height, width] blocks (spec §2), cut to D.
    Video {
        /// Equal block widths 2·ceil(D/6) (true in every official config).
        uniform_power: bool,
    },
    /// [height, width] blocks of D/2 each; the grid's time extent must be 1.
    Image,
}

impl TableLayout {
    /// Checks that a table of width `embed_dim` can be built in this layout.
    pub fn validate(self, embed_dim: usize) -> Result<(), ModelError> {
        match self {
            TableLayout::Video { uniform_power } => axis_dims(embed_dim, uniform_power).map(drop),
            TableLayout::Image => image_axis_dim(embed_dim).map(drop),
        }
    }
}

/// Row-major `[N, D]` table for `grid` = (Gt, Gh, Gw) in `layout`.
pub fn sincos_table(
    embed_dim: usize,
    grid: (usize, usize, usize),
    layout: TableLayout,
) -> Result<Vec<f32>, ModelError> {
    match layout {
        TableLayout::Video { uniform_power } => sincos_3d(embed_dim, grid, uniform_power),
        TableLayout::Image if grid.0 == 1 => sincos_2d(embed_dim, (grid.1, grid.2)),
        TableLayout::Image => Err(ModelError::Config(format!(
            "pos embed: an image table has one time step, got grid {grid:?}"
        ))),
    }
}

/// The table as an f32 tensor `[1, N, D]` (the checkpoint's shape).
pub fn sincos_table_tensor(
    embed_dim: usize,
    grid: (usize, usize, usize),
    layout: TableLayout,
    device: &Device,
) -> Result<Tensor, ModelError> {
    let n = grid.0 * grid.1 * grid.2;
    let data = sincos_table(embed_dim, grid, layout)?;
    Ok(Tensor::from_vec(data, (1, n, embed_dim), device)?)
}

/// The 3-D table as an f32 tensor `[1, N, D]`.
pub fn sincos_3d_tensor(
    embed_dim: usize,
    grid: (usize, usize, usize),
    uniform_power: bool,
    device: &Device,
) -> Result<Tensor, ModelError> {
    sincos_table_tensor(
        embed_dim,
        grid,
        TableLayout::Video { uniform_power },
        device,
    )
}

/// Output side torch gives for `scale_factor = to / from` (it truncates `from · factor` in f64,
/// which for some pairs, e.g. 11 → 15, lands one short).
fn torch_scaled_side(from: usize, factor: f64) -> usize {
    (from as f64 * factor) as usize
}

/// Refuses a resize whose torch output side differs from the wanted one (there the reference's
/// `tokens + pos_embed` fails on the shape).
fn check_side(axis: &str, from: usize, to: usize, got: usize) -> Result<(), ModelError> {
    if got == to {
        return Ok(());
    }
    Err(ModelError::Unsupported(format!(
        "pos embed: resizing the {axis} axis from {from} to {to} tokens gives {got} with the \
         reference's scale-factor interpolation (trunc({from} · {to}/{from})), so the reference \
         fails on this grid too; use another clip size"
    )))
}

/// Linear taps of one axis as torch's CPU kernel computes them (align_corners = false, scale
/// factor given): source x = max((o + 0.5)/factor - 0.5, 0) in f32, i0 = floor(x) (capped at the
/// last index), i1 = i0 + 1 unless at the edge, weights (1 - λ, λ). Equal sizes copy exactly.
fn linear_taps(from: usize, to: usize, factor: f64) -> Vec<(usize, usize, f32, f32)> {
    if from == to {
        return (0..to).map(|i| (i, i, 1.0, 0.0)).collect();
    }
    let ratio = (1.0 / factor) as f32;
    (0..to)
        .map(|o| {
            let x = (ratio * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (x.floor() as usize).min(from - 1);
            let l1 = (x - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 + 1 < from { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Cubic taps of one axis as torch's bicubic kernel computes them (A = -0.75, align_corners =
/// false, no clamp of the source coordinate, indices clamped to the edge).
fn cubic_taps(from: usize, to: usize, factor: f64) -> Vec<([usize; 4], [f32; 4])> {
    const A: f32 = -0.75;
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let ratio = (1.0 / factor) as f32;
    let last = from as i64 - 1;
    (0..to)
        .map(|o| {
            let x = ratio * (o as f32 + 0.5) - 0.5;
            let i = (x.floor() as i64).min(last);
            let t = (x - i as f32).clamp(0.0, 1.0);
            let w = [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)];
            let idx = [0, 1, 2, 3].map(|j| (i - 1 + j).clamp(0, last) as usize);
            (idx, w)
        })
        .collect()
}

/// Resizes a row-major `[Gt·Gh·Gw, D]` video table to grid `to` the way the reference does
/// (`F.interpolate(mode='trilinear', scale_factor=(T'/T, H'/H, W'/W))` on the table viewed as
/// `[1, D, T, H, W]`): f32 taps per axis, each output the sum of 8 corners weighted by
/// λt·λh·λw.
pub fn interpolate_trilinear(
    table: &[f32],
    embed_dim: usize,
    from: (usize, usize, usize),
    to: (usize, usize, usize),
) -> Result<Vec<f32>, ModelError> {
    let (ft, fh, fw) = from;
    let (tt, th, tw) = to;
    if [ft, fh, fw, tt, th, tw, embed_dim].contains(&0) || table.len() != ft * fh * fw * embed_dim {
        return Err(ModelError::Input(format!(
            "pos embed: cannot resize a table of {} values as {from:?} x {embed_dim} to {to:?}",
            table.len()
        )));
    }
    let factors = [tt, th, tw]
        .iter()
        .zip([ft, fh, fw])
        .map(|(&o, i)| o as f64 / i as f64)
        .collect::<Vec<_>>();
    for (axis, (f, (i, o))) in
        ["time", "height", "width"]
            .iter()
            .zip(factors.iter().zip([(ft, tt), (fh, th), (fw, tw)]))
    {
        check_side(axis, i, o, torch_scaled_side(i, *f))?;
    }
    let taps_t = linear_taps(ft, tt, factors[0]);
    let taps_h = linear_taps(fh, th, factors[1]);
    let taps_w = linear_taps(fw, tw, factors[2]);
    let d = embed_dim;
    let row = |t: usize, h: usize, w: usize| &table[((t * fh + h) * fw + w) * d..][..d];
    let mut out = Vec::with_capacity(tt * th * tw * d);
    for &(t0, t1, lt0, lt1) in &taps_t {
        for &(h0, h1, lh0, lh1) in &taps_h {
            for &(w0, w1, lw0, lw1) in &taps_w {
                let corners = [
                    (row(t0, h0, w0), lt0 * lh0 * lw0),
                    (row(t0, h0, w1), lt0 * lh0 * lw1),
                    (row(t0, h1, w0), lt0 * lh1 * lw0),
                    (row(t0, h1, w1), lt0 * lh1 * lw1),
                    (row(t1, h0, w0), lt1 * lh0 * lw0),
                    (row(t1, h0, w1), lt1 * lh0 * lw1),
                    (row(t1, h1, w0), lt1 * lh1 * lw0),
                    (row(t1, h1, w1), lt1 * lh1 * lw1),
                ];
                out.extend((0..d).map(|c| {
                    corners
                        .iter()
                        .rev()
                        .fold(0f32, |acc, (r, w)| r[c] * w + acc)
                }));
            }
        }
    }
    Ok(out)
}

/// Resizes a square row-major `[n·n, D]` image table to `to` = (H', W') tokens the way the
/// reference does for images: `F.interpolate(mode='bicubic', scale_factor=sqrt(H'·W' / n²))`,
/// which only reaches non-square or some square grids wrongly; those are refused.
pub fn interpolate_bicubic(
    table: &[f32],
    embed_dim: usize,
    side: usize,
    to: (usize, usize),
) -> Result<Vec<f32>, ModelError> {
    let (th, tw) = to;
    if [side, th, tw, embed_dim].contains(&0) || table.len() != side * side * embed_dim {
        return Err(ModelError::Input(format!(
            "pos embed: cannot resize a table of {} values as {side}x{side} x {embed_dim} to {to:?}",
            table.len()
        )));
    }
    let factor = ((th * tw) as f64 / (side * side) as f64).sqrt();
    let got = torch_scaled_side(side, factor);
    check_side("height", side, th, got)?;
    check_side("width", side, tw, got)?;
    let taps = cubic_taps(side, th, factor);
    let d = embed_dim;
    let row = |h: usize, w: usize| &table[(h * side + w) * d..][..d];
    let mut out = Vec::with_capacity(th * tw * d);
    for (hi, hw) in &taps {
        for (wi, ww) in &taps {
            out.extend((0..d).map(|c| {
                let line = |h: usize| {
                    row(h, wi[0])[c] * ww[0]
                        + row(h, wi[1])[c] * ww[1]
                        + row(h, wi[2])[c] * ww[2]
                        + row(h, wi[3])[c] * ww[3]
                };
                line(hi[0]) * hw[0]
                    + line(hi[1]) * hw[1]
                    + line(hi[2]) * hw[2]
                    + line(hi[3]) * hw[3]
            }));
        }
    }
    Ok(out)
}

/// A `[1, N, D]` model table built for grid `from`, resized to the token grid `to` of a clip
/// (spec §2 `interpolate_pos_encoding`): returned as is when the grids agree, else trilinear
/// (video) or bicubic (image) on the CPU and moved back to the table's device.
pub fn resize_table(
    table: &Tensor,
    from: (usize, usize, usize),
    to: (usize, usize, usize),
    layout: TableLayout,
) -> Result<Tensor, ModelError> {
    if from == to {
        return Ok(table.clone());
    }
    let (_, n, d) = table.dims3()?;
    if n != from.0 * from.1 * from.2 {
        return Err(ModelError::Input(format!(
            "pos embed: table has {n} rows, grid {from:?} needs {}",
            from.0 * from.1 * from.2
        )));
    }
    let values = table
        .to_dtype(candle_core::DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let out = match layout {
        TableLayout::Video { .. } => interpolate_trilinear(&values, d, from, to)?,
        TableLayout::Image => {
            if from.0 != 1 || to.0 != 1 || from.1 != from.2 {
                return Err(ModelError::Input(format!(
                    "pos embed: image tables are square with one time step, got {from:?} -> {to:?}"
                )));
            }
            interpolate_bicubic(&values, d, from.1, (to.1, to.2))?
        }
    };
    let rows = to.0 * to.1 * to.2;
    Ok(Tensor::from_vec(out, (1, rows, d), table.device())?.to_dtype(table.dtype())?)
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
