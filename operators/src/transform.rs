//! The pretraining clip transform (spec §1, "Transform").
//!
//! One random-resized-crop box and one flip decision per clip (shared by all frames), bilinear
//! resize with torch `interpolate(mode="bilinear", align_corners=False, antialias=False)`
//! semantics, and per-channel normalisation in 0..255 space. Output layout is channel-major
//! `[3, T, S, S]` f32, ready to be stacked into `[B, 3, T, S, S]`.

use rand::Rng;
use thiserror::Error;

/// ImageNet channel means (applied as `255 * mean`).
pub const MEAN: [f64; 3] = [0.485, 0.456, 0.406];
/// ImageNet channel standard deviations (applied as `255 * std`).
pub const STD: [f64; 3] = [0.229, 0.224, 0.225];

/// Maximum random tries before the centre-crop fallback (as in the reference).
const CROP_TRIES: usize = 10;

/// Errors for frames or parameters that cannot be transformed.
#[derive(Debug, Error, Clone, PartialEq)]
pub enum TransformError {
    /// A frame or output dimension is zero.
    #[error(
        "zero-size input or output: t={t}, height={height}, width={width}, crop_size={crop_size}"
    )]
    ZeroSize {
        /// Frames.
        t: usize,
        /// Frame height.
        height: usize,
        /// Frame width.
        width: usize,
        /// Output side.
        crop_size: usize,
    },
    /// The frame buffer length is not `t * height * width * 3`.
    #[error("frame buffer has {got} bytes, expected {expected} (T×H×W×3)")]
    BadLength {
        /// Actual length.
        got: usize,
        /// `t * height * width * 3`.
        expected: usize,
    },
    /// The crop box does not lie inside the frame or is empty.
    #[error("crop box {crop:?} not inside a {height}x{width} frame")]
    CropOutOfBounds {
        /// Offending box.
        crop: CropBox,
        /// Frame height.
        height: usize,
        /// Frame width.
        width: usize,
    },
    /// Scale or aspect ranges are not finite, positive and ordered.
    #[error("invalid augmentation config: {0}")]
    InvalidConfig(String),
}

/// A crop rectangle in frame pixel coordinates.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct CropBox {
    /// First row.
    pub top: usize,
    /// First column.
    pub left: usize,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// The random decisions for one clip, drawn once and applied to every frame.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct TransformParams {
    /// Crop box (same for all frames).
    pub crop: CropBox,
    /// Whether to mirror the clip horizontally.
    pub flip: bool,
}

impl TransformParams {
    /// The whole `height × width` frame, unflipped.
    pub fn whole(height: usize, width: usize) -> Self {
        TransformParams {
            crop: CropBox {
                top: 0,
                left: 0,
                height,
                width,
            },
            flip: false,
        }
    }
}

/// Random-resized-crop settings (`rr_scale`, `rr_aspect`, `crop_size` in the configs).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AugmentConfig {
    /// Crop area as a fraction of the frame area, `(0.3, 1.0)`.
    pub scale: (f64, f64),
    /// Crop aspect ratio w/h range, sampled log-uniformly, `(0.75, 1.35)`.
    pub aspect_ratio: (f64, f64),
    /// Output side S (224 or 384).
    pub crop_size: usize,
}

impl AugmentConfig {
    /// The pretraining setting at the given crop size.
    pub fn pretrain(crop_size: usize) -> Self {
        AugmentConfig {
            scale: (0.3, 1.0),
            aspect_ratio: (0.75, 1.35),
            crop_size,
        }
    }

    /// Checks the ranges are finite, positive where needed and ordered.
    pub fn validate(&self) -> Result<(), TransformError> {
        let (s0, s1) = self.scale;
        let (a0, a1) = self.aspect_ratio;
        let ok = s0.is_finite()
            && s1.is_finite()
            && 0.0 <= s0
            && s0 <= s1
            && a0.is_finite()
            && a1.is_finite()
            && 0.0 < a0
            && a0 <= a1;
        if !ok {
            return Err(TransformError::InvalidConfig(format!(
                "scale {:?}, aspect_ratio {:?}",
                self.scale, self.aspect_ratio
            )));
        }
        if self.crop_size == 0 {
            return Err(TransformError::InvalidConfig("crop_size is 0".into()));
        }
        Ok(())
    }
}

/// Python's `random.uniform(a, b)`: `a + (b - a) * U[0, 1)`.
pub(crate) fn uniform(rng: &mut impl Rng, a: f64, b: f64) -> f64 {
    a + (b - a) * rng.random::<f64>()
}

/// Python 3 `int(round(x))` (ties to even) for finite non-negative `x`, saturating.
pub(crate) fn py_round(x: f64) -> usize {
    let r = x.round_ties_even();
    if r.is_finite() && r > 0.0 {
        r as usize
    } else {
        0
    }
}

/// The centre-crop fallback of torchvision's `RandomResizedCrop`: the largest centred box whose
/// aspect is the frame's, clamped to the ratio range.
fn fallback_crop(height: usize, width: usize, ratio: (f64, f64)) -> CropBox {
    let in_ratio = width as f64 / height as f64;
    let (mut h, mut w) = (height, width);
    if in_ratio < ratio.0 {
        w = width;
        h = py_round(w as f64 / ratio.0);
    } else if in_ratio > ratio.1 {
        h = height;
        w = py_round(h as f64 * ratio.1);
    }
    // Rounding keeps these in range for sane ratios; clamp anyway so the box is always valid.
    let h = h.clamp(1, height);
    let w = w.clamp(1, width);
    CropBox {
        top: (height - h) / 2,
        left: (width - w) / 2,
        height: h,
        width: w,
    }
}

/// Draws the per-clip transform parameters, in the reference's order: the crop
/// ([`sample_crop`]), then `flip = U(0, 1) < 0.5`.
pub fn sample_params(
    height: usize,
    width: usize,
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
) -> Result<TransformParams, TransformError> {
    let crop = sample_crop(height, width, cfg, rng)?;
    let flip = rng.random::<f64>() < 0.5;
    Ok(TransformParams { crop, flip })
}

/// Draws a random resized crop box as the reference's `_get_param_spatial_crop`: up to 10 tries
/// of `area = U(scale)·H·W`, `ar = exp(U(ln lo, ln hi))`, `w = round(√(area·ar))`,
/// `h = round(√(area/ar))`, accepted if `0 < w ≤ W` and `0 < h ≤ H`, then
/// `top = UniformInt[0, H-h]`, `left = UniformInt[0, W-w]`; otherwise the torchvision centre-crop
/// fallback.
pub fn sample_crop(
    height: usize,
    width: usize,
    cfg: &AugmentConfig,
    rng: &mut impl Rng,
) -> Result<CropBox, TransformError> {
    cfg.validate()?;
    if height == 0 || width == 0 {
        return Err(TransformError::ZeroSize {
            t: 1,
            height,
            width,
            crop_size: cfg.crop_size,
        });
    }
    let area = height as f64 * width as f64;
    let log_ratio = (cfg.aspect_ratio.0.ln(), cfg.aspect_ratio.1.ln());
    for _ in 0..CROP_TRIES {
        let target_area = uniform(rng, cfg.scale.0, cfg.scale.1) * area;
        let ar = uniform(rng, log_ratio.0, log_ratio.1).exp();
        let w = py_round((target_area * ar).sqrt());
        let h = py_round((target_area / ar).sqrt());
        if 0 < w && w <= width && 0 < h && h <= height {
            let top = rng.random_range(0..=height - h);
            let left = rng.random_range(0..=width - w);
            return Ok(CropBox {
                top,
                left,
                height: h,
                width: w,
            });
        }
    }
    Ok(fallback_crop(height, width, cfg.aspect_ratio))
}

/// Per-output-position source taps of a 1-D torch bilinear resize (align_corners=False):
/// `src = max((dst + 0.5)·(in/out) − 0.5, 0)`, `i0 = floor(src)`, `i1 = min(i0 + 1, in − 1)`,
/// weights `(1 − λ, λ)` with `λ = src − i0`, all in f32 like torch's float kernel.
#[derive(Clone, Debug)]
struct Taps {
    i0: Vec<usize>,
    i1: Vec<usize>,
    w0: Vec<f32>,
    w1: Vec<f32>,
}

impl Taps {
    fn new(input: usize, output: usize) -> Taps {
        let scale = input as f32 / output as f32;
        let mut t = Taps {
            i0: Vec::with_capacity(output),
            i1: Vec::with_capacity(output),
            w0: Vec::with_capacity(output),
            w1: Vec::with_capacity(output),
        };
        for dst in 0..output {
            let src = (scale * (dst as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 < input - 1 { i0 + 1 } else { i0 };
            t.i0.push(i0);
            t.i1.push(i1);
            t.w0.push(1.0 - l1);
            t.w1.push(l1);
        }
        t
    }

    /// Mirrors the output axis (a flip after resizing is a reversed tap table).
    fn reversed(mut self) -> Taps {
        self.i0.reverse();
        self.i1.reverse();
        self.w0.reverse();
        self.w1.reverse();
        self
    }
}

/// Applies crop → bilinear resize to S×S → optional horizontal flip → normalisation to a clip.
///
/// `frames` is `T×H×W×3` packed u8 RGB. Returns f32 `[3, T, S, S]` (channel-major) with values
/// `(x − 255·mean) / (255·std)`, where `x` is the resized 0..255 value. The resize is separable
/// and evaluated as `h0·(w0·x00 + w1·x01) + h1·(w0·x10 + w1·x11)`, matching torch's f32 CPU kernel.
pub fn apply(
    frames: &[u8],
    t: usize,
    height: usize,
    width: usize,
    params: &TransformParams,
    crop_size: usize,
) -> Result<Vec<f32>, TransformError> {
    if t == 0 || height == 0 || width == 0 || crop_size == 0 {
        return Err(TransformError::ZeroSize {
            t,
            height,
            width,
            crop_size,
        });
    }
    let expected = t
        .checked_mul(height)
        .and_then(|x| x.checked_mul(width))
        .and_then(|x| x.checked_mul(3))
        .ok_or(TransformError::BadLength {
            got: frames.len(),
            expected: usize::MAX,
        })?;
    if frames.len() != expected {
        return Err(TransformError::BadLength {
            got: frames.len(),
            expected,
        });
    }
    let c = params.crop;
    let inside = c.height > 0
        && c.width > 0
        && c.top.checked_add(c.height).is_some_and(|b| b <= height)
        && c.left.checked_add(c.width).is_some_and(|r| r <= width);
    if !inside {
        return Err(TransformError::CropOutOfBounds {
            crop: c,
            height,
            width,
        });
    }

    let s = crop_size;
    let rows = Taps::new(c.height, s);
    let cols = {
        let taps = Taps::new(c.width, s);
        if params.flip { taps.reversed() } else { taps }
    };
    // Absolute byte offsets of the column taps within a frame row.
    let col0: Vec<usize> = cols.i0.iter().map(|&i| (c.left + i) * 3).collect();
    let col1: Vec<usize> = cols.i1.iter().map(|&i| (c.left + i) * 3).collect();

    let mean: [f32; 3] = MEAN.map(|m| (255.0 * m) as f32);
    let std: [f32; 3] = STD.map(|v| (255.0 * v) as f32);

    let plane = s * s;
    let mut out = vec![0.0f32; 3 * t * plane];
    // Two cached horizontally-resized source rows, planar [3][S]; slot = row parity, since each
    // output row needs rows i0 and i1 ∈ {i0, i0 + 1} and i0 never decreases.
    let mut cache = [vec![0.0f32; 3 * s], vec![0.0f32; 3 * s]];
    let row_bytes = width * 3;
    let frame_bytes = height * row_bytes;

    for (ti, frame) in frames.chunks_exact(frame_bytes).enumerate() {
        let mut tag = [usize::MAX; 2];
        for oy in 0..s {
            let (r0, r1) = (rows.i0[oy], rows.i1[oy]);
            for r in [r0, r1] {
                let slot = r & 1;
                if tag[slot] != r {
                    let base = (c.top + r) * row_bytes;
                    let src = &frame[base..base + row_bytes];
                    let buf = &mut cache[slot];
                    for ox in 0..s {
                        let (a, b) = (col0[ox], col1[ox]);
                        let (w0, w1) = (cols.w0[ox], cols.w1[ox]);
                        for ch in 0..3 {
                            buf[ch * s + ox] =
                                w0 * f32::from(src[a + ch]) + w1 * f32::from(src[b + ch]);
                        }
                    }
                    tag[slot] = r;
                }
            }
            let (h0, h1) = (rows.w0[oy], rows.w1[oy]);
            let (b0, b1) = (&cache[r0 & 1], &cache[r1 & 1]);
            for ch in 0..3 {
                let dst_off = ch * t * plane + ti * plane + oy * s;
                let dst = &mut out[dst_off..dst_off + s];
                let x0 = &b0[ch * s..(ch + 1) * s];
                let x1 = &b1[ch * s..(ch + 1) * s];
                let (m, sd) = (mean[ch], std[ch]);
                for ((d, &p), &q) in dst.iter_mut().zip(x0).zip(x1) {
                    *d = (h0 * p + h1 * q - m) / sd;
                }
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeding::{Stream, rng_for};

    fn norm(x: f32, ch: usize) -> f32 {
        (x - (255.0 * MEAN[ch]) as f32) / (255.0 * STD[ch]) as f32
    }

    fn full(h: usize, w: usize) -> TransformParams {
        TransformParams {
            crop: CropBox {
                top: 0,
                left: 0,
                height: h,
                width: w,
            },
            flip: false,
        }
    }

    /// A single-channel frame replicated into RGB with per-channel offsets.
    fn rgb(vals: &[u8]) -> Vec<u8> {
        vals.iter()
            .flat_map(|&v| [v, v.wrapping_add(1), v.wrapping_add(2)])
            .collect()
    }

    #[test]
    fn identity_size_is_exact_normalisation() {
        let (t, h, w) = (2, 5, 5);
        let frames: Vec<u8> = (0..t * h * w * 3).map(|i| (i * 37 % 256) as u8).collect();
        let out = apply(&frames, t, h, w, &full(h, w), 5).unwrap();
        for ti in 0..t {
            for y in 0..h {
                for x in 0..w {
                    for ch in 0..3 {
                        let v = f32::from(frames[((ti * h + y) * w + x) * 3 + ch]);
                        assert_eq!(out[((ch * t + ti) * h + y) * w + x], norm(v, ch));
                    }
                }
            }
        }
    }

    #[test]
    fn upsample_2x2_to_4x4_matches_torch() {
        // torch.nn.functional.interpolate([[0,100],[200,40]], size=4, mode="bilinear",
        // align_corners=False): taps per axis (scale 0.5) are
        // dst0: src 0 → (0,0) w (1,0); dst1: src 0.25 → (0,1) w (.75,.25);
        // dst2: src 0.75 → (0,1) w (.25,.75); dst3: src 1.25 → (1,1) w (.75,.25).
        let img = [0u8, 100, 200, 40];
        let frames = rgb(&img);
        let out = apply(&frames, 1, 2, 2, &full(2, 2), 4).unwrap();
        let lerp = |a: f32, b: f32, l: f32| (1.0 - l) * a + l * b;
        let taps = [
            (0usize, 0usize, 0.0f32),
            (0, 1, 0.25),
            (0, 1, 0.75),
            (1, 1, 0.25),
        ];
        let want_rows = [
            [0.0, 25.0, 75.0, 100.0],
            [50.0, 58.75, 76.25, 85.0],
            [150.0, 126.25, 78.75, 55.0],
            [200.0, 160.0, 80.0, 40.0],
        ];
        for (oy, &(r0, r1, ly)) in taps.iter().enumerate() {
            for (ox, &(c0, c1, lx)) in taps.iter().enumerate() {
                let g = |r: usize, c: usize| f32::from(img[r * 2 + c]);
                let v = lerp(
                    lerp(g(r0, c0), g(r0, c1), lx),
                    lerp(g(r1, c0), g(r1, c1), lx),
                    ly,
                );
                assert!((v - want_rows[oy][ox]).abs() < 1e-4);
                for ch in 0..3 {
                    let got = out[(ch * 4 + oy) * 4 + ox];
                    let want = norm(want_rows[oy][ox] + ch as f32, ch);
                    assert!((got - want).abs() < 1e-5, "{oy},{ox},{ch}: {got} vs {want}");
                }
            }
        }
    }

    #[test]
    fn downsample_matches_hand_computation() {
        // Crop rows 1..3, cols 2..7 of a 4x8 frame, resize 2x5 → 2x2.
        // Rows: in 2 → out 2, identity taps. Cols: in 5 → out 2, scale 2.5:
        // dst0: src 0.75 → cols (0,1) w (.25,.75); dst1: src 3.25 → (3,4) w (.75,.25).
        let (h, w) = (4, 8);
        let gray: Vec<u8> = (0..h * w).map(|i| (i * 7 % 251) as u8).collect();
        let frames = rgb(&gray);
        let crop = CropBox {
            top: 1,
            left: 2,
            height: 2,
            width: 5,
        };
        let p = TransformParams { crop, flip: false };
        let out = apply(&frames, 1, h, w, &p, 2).unwrap();
        let g = |r: usize, c: usize| f32::from(gray[(1 + r) * w + 2 + c]);
        for oy in 0..2 {
            let want0 = 0.25 * g(oy, 0) + 0.75 * g(oy, 1);
            let want1 = 0.75 * g(oy, 3) + 0.25 * g(oy, 4);
            for ch in 0..3 {
                let o = &out[(ch * 2 + oy) * 2..(ch * 2 + oy) * 2 + 2];
                assert!((o[0] - norm(want0 + ch as f32, ch)).abs() < 1e-5);
                assert!((o[1] - norm(want1 + ch as f32, ch)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn downsample_vertical_fractional() {
        // 5 rows → 2 rows (scale 2.5), 1 column: dst0 = .25·r0 + .75·r1, dst1 = .75·r3 + .25·r4.
        let col = [10u8, 20, 40, 80, 160];
        let frames = rgb(&col);
        let out = apply(&frames, 1, 5, 1, &full(5, 1), 2).unwrap();
        // Width 1 → 2: both output columns read column 0.
        let want = [0.25 * 10.0 + 0.75 * 20.0, 0.75 * 80.0 + 0.25 * 160.0];
        for (oy, &wv) in want.iter().enumerate() {
            for ox in 0..2 {
                assert!((out[oy * 2 + ox] - norm(wv, 0)).abs() < 1e-5);
            }
        }
    }

    #[test]
    fn flip_mirrors() {
        let (t, h, w) = (3, 6, 9);
        let frames: Vec<u8> = (0..t * h * w * 3).map(|i| (i * 13 % 256) as u8).collect();
        let crop = CropBox {
            top: 1,
            left: 2,
            height: 4,
            width: 7,
        };
        let s = 5;
        let a = apply(&frames, t, h, w, &TransformParams { crop, flip: false }, s).unwrap();
        let b = apply(&frames, t, h, w, &TransformParams { crop, flip: true }, s).unwrap();
        for row in 0..3 * t * s {
            for x in 0..s {
                assert_eq!(a[row * s + x], b[row * s + s - 1 - x]);
            }
        }
    }

    #[test]
    fn crop_boxes_in_bounds() {
        let cfg = AugmentConfig::pretrain(224);
        let sizes = [
            (7, 1000),
            (1000, 7),
            (1, 1),
            (1, 2),
            (3, 5),
            (255, 341),
            (720, 1280),
        ];
        for (k, &(h, w)) in sizes.iter().enumerate() {
            let mut rng = rng_for(3, Stream::Clip, k as u64);
            let mut flips = 0;
            for _ in 0..2000 {
                let p = sample_params(h, w, &cfg, &mut rng).unwrap();
                let c = p.crop;
                assert!(c.height >= 1 && c.width >= 1, "{c:?}");
                assert!(
                    c.top + c.height <= h && c.left + c.width <= w,
                    "{h}x{w}: {c:?}"
                );
                flips += usize::from(p.flip);
            }
            assert!((800..1200).contains(&flips), "{flips}");
        }
    }

    #[test]
    fn fallback_path() {
        let cfg = AugmentConfig::pretrain(224);
        // 7 rows x 1000 cols: no random box fits, fallback clamps aspect to 1.35.
        let p = sample_params(7, 1000, &cfg, &mut rng_for(0, Stream::Clip, 0)).unwrap();
        assert_eq!(
            p.crop,
            CropBox {
                top: 0,
                left: (1000 - 9) / 2,
                height: 7,
                width: 9
            }
        );
        // 1000 rows x 7 cols: aspect clamped to 0.75 ⇒ h = round(7 / 0.75) = 9.
        let p = sample_params(1000, 7, &cfg, &mut rng_for(0, Stream::Clip, 1)).unwrap();
        assert_eq!(
            p.crop,
            CropBox {
                top: (1000 - 9) / 2,
                left: 0,
                height: 9,
                width: 7
            }
        );
    }

    #[test]
    fn accepted_boxes_aspect_and_area() {
        let cfg = AugmentConfig::pretrain(224);
        let (h, w) = (720usize, 1280usize);
        let mut rng = rng_for(11, Stream::Clip, 0);
        for _ in 0..5000 {
            let c = sample_params(h, w, &cfg, &mut rng).unwrap().crop;
            let ar = c.width as f64 / c.height as f64;
            // Rounding of w and h perturbs the ratio slightly.
            assert!((0.75 - 0.01..=1.35 + 0.01).contains(&ar), "{ar}");
            let frac = (c.width * c.height) as f64 / (h * w) as f64;
            assert!((0.3 - 0.01..=1.0).contains(&frac), "{frac}");
        }
    }

    #[test]
    fn invalid_inputs() {
        let cfg = AugmentConfig::pretrain(4);
        let mut rng = rng_for(0, Stream::Clip, 0);
        assert!(matches!(
            sample_params(0, 5, &cfg, &mut rng),
            Err(TransformError::ZeroSize { .. })
        ));
        let p = full(2, 2);
        assert!(matches!(
            apply(&[0; 11], 1, 2, 2, &p, 4),
            Err(TransformError::BadLength { .. })
        ));
        assert!(matches!(
            apply(&[0; 12], 1, 2, 2, &full(3, 2), 4),
            Err(TransformError::CropOutOfBounds { .. })
        ));
        assert!(matches!(
            apply(&[], 0, 2, 2, &p, 4),
            Err(TransformError::ZeroSize { .. })
        ));
    }
}
