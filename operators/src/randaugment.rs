//! RandAugment as the official frozen evaluation applies it to a training clip (spec §9:
//! `rand-m7-n4-mstd0.5-inc1`, bicubic): four operations drawn with replacement from the
//! "increasing" set, each applied with probability ½ at a magnitude drawn around 7, with the
//! same arguments for every frame of the clip.
//!
//! The operations are written from the definitions of the Pillow functions the official code
//! calls (`ImageOps`, `ImageEnhance`, `Image.transform` with bicubic resampling and a grey
//! fill) on packed RGB `u8` frames: Pillow's cubic (a = −1), edge handling, blend arithmetic
//! and rounding, so each operation's output equals Pillow's to the bit
//! (`tests/randaugment_pil.rs`). Python's random stream itself is not reproduced (the draws
//! come from the caller's seeded generator): a clip's augmentation is the same kind of draw
//! as the official one, not the same draw.

use rand::Rng;

/// The magnitude scale's top (timm's `_MAX_LEVEL`).
const MAX_LEVEL: f64 = 10.0;

/// The grey the geometric operations fill uncovered pixels with (timm's `_FILL`; the
/// official `create_random_augment` passes no image mean).
const FILL: u8 = 128;

/// One operation of the increasing set, before its arguments are drawn.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum OpKind {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
}

/// timm's `_RAND_INCREASING_TRANSFORMS`, in its order (the order the choice draws from).
pub const INCREASING: [OpKind; 15] = [
    OpKind::AutoContrast,
    OpKind::Equalize,
    OpKind::Invert,
    OpKind::Rotate,
    OpKind::Posterize,
    OpKind::Solarize,
    OpKind::SolarizeAdd,
    OpKind::Color,
    OpKind::Contrast,
    OpKind::Brightness,
    OpKind::Sharpness,
    OpKind::ShearX,
    OpKind::ShearY,
    OpKind::TranslateX,
    OpKind::TranslateY,
];

/// An operation with its arguments: applied alike to every frame of a clip.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Op {
    /// Per channel, stretch `[min, max]` to `[0, 255]` (`ImageOps.autocontrast`).
    AutoContrast,
    /// Per channel histogram equalisation (`ImageOps.equalize`).
    Equalize,
    /// `255 − v`.
    Invert,
    /// Counter-clockwise rotation about the centre, in degrees.
    Rotate(f64),
    /// Keep this many high bits (0 gives black).
    Posterize(u32),
    /// Invert values at or above the threshold (256: nothing).
    Solarize(u32),
    /// Add to values below 128, saturating.
    SolarizeAdd(u32),
    /// Blend with the grey image by this factor (1: unchanged).
    Color(f64),
    /// Blend with the mean grey by this factor.
    Contrast(f64),
    /// Blend with black by this factor.
    Brightness(f64),
    /// Blend with the 3×3 smoothed image by this factor.
    Sharpness(f64),
    /// Output `(x, y)` reads input `(x + f·y, y)`.
    ShearX(f64),
    /// Output `(x, y)` reads input `(x, f·x + y)`.
    ShearY(f64),
    /// Output reads input shifted by this fraction of the width.
    TranslateX(f64),
    /// Output reads input shifted by this fraction of the height.
    TranslateY(f64),
}

/// The RandAugment policy: which operations, how many, how strong.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandAugment {
    /// Operations drawn per clip, with replacement (`n`).
    pub num_ops: usize,
    /// Mean magnitude on the 0–10 scale (`m`).
    pub magnitude: f64,
    /// Standard deviation of the per-operation magnitude (`mstd`).
    pub magnitude_std: f64,
    /// Probability each drawn operation is applied (timm: 0.5).
    pub prob: f64,
}

impl RandAugment {
    /// The official evaluation's `rand-m7-n4-mstd0.5-inc1`.
    pub fn official() -> Self {
        RandAugment {
            num_ops: 4,
            magnitude: 7.0,
            magnitude_std: 0.5,
            prob: 0.5,
        }
    }

    /// Draws one clip's operations, in timm's order: the `num_ops` kinds, then per kind the
    /// coin for applying it, its magnitude (Gaussian around `magnitude`, clipped to 0–10) and
    /// the sign of signed arguments. Skipped operations are left out.
    pub fn draw(&self, rng: &mut impl Rng) -> Vec<Op> {
        let kinds: Vec<OpKind> = (0..self.num_ops)
            .map(|_| INCREASING[rng.random_range(0..INCREASING.len())])
            .collect();
        let mut ops = Vec::with_capacity(kinds.len());
        for kind in kinds {
            if self.prob < 1.0 && rng.random::<f64>() > self.prob {
                continue;
            }
            let mut m = self.magnitude;
            if self.magnitude_std > 0.0 {
                m = gauss(rng, m, self.magnitude_std);
            }
            let m = m.clamp(0.0, MAX_LEVEL);
            ops.push(op_at(kind, m, rng));
        }
        ops
    }

    /// Draws one clip's operations and applies them to its `t` packed RGB frames.
    pub fn apply(
        &self,
        frames: &mut [u8],
        t: usize,
        height: usize,
        width: usize,
        rng: &mut impl Rng,
    ) {
        let ops = self.draw(rng);
        apply_ops(&ops, frames, t, height, width);
    }
}

/// Applies `ops` in order to each of `t` packed RGB frames of `height × width` (frame by
/// frame: histogram-based operations read each frame's own statistics, as PIL does).
pub fn apply_ops(ops: &[Op], frames: &mut [u8], t: usize, height: usize, width: usize) {
    let len = height * width * 3;
    if ops.is_empty() || len == 0 {
        return;
    }
    let mut scratch = vec![0u8; len];
    for op in ops {
        match op.matrix(height, width) {
            // The same taps in every frame: worked out once for the clip.
            Some(m) => affine(frames, t, height, width, m),
            None => {
                for frame in frames.chunks_exact_mut(len).take(t) {
                    op.apply(frame, &mut scratch, height, width);
                }
            }
        }
    }
}

/// `random.gauss(mu, sigma)` in distribution (Box–Muller on the caller's generator).
fn gauss(rng: &mut impl Rng, mu: f64, sigma: f64) -> f64 {
    mu + sigma * crate::erasing::Normals::default().next(rng)
}

/// timm's `_randomly_negate`: `−v` when `random() > 0.5`.
fn negate(rng: &mut impl Rng, v: f64) -> f64 {
    if rng.random::<f64>() > 0.5 { -v } else { v }
}

/// The level-to-argument functions of the increasing set at magnitude `m`.
fn op_at(kind: OpKind, m: f64, rng: &mut impl Rng) -> Op {
    let level = m / MAX_LEVEL;
    let enhance = |rng: &mut _| 1.0 + negate(rng, level * 0.9);
    match kind {
        OpKind::AutoContrast => Op::AutoContrast,
        OpKind::Equalize => Op::Equalize,
        OpKind::Invert => Op::Invert,
        OpKind::Rotate => Op::Rotate(negate(rng, level * 30.0)),
        OpKind::Posterize => Op::Posterize(4 - (level * 4.0) as u32),
        OpKind::Solarize => Op::Solarize(256 - (level * 256.0) as u32),
        OpKind::SolarizeAdd => Op::SolarizeAdd((level * 110.0) as u32),
        OpKind::Color => Op::Color(enhance(rng)),
        OpKind::Contrast => Op::Contrast(enhance(rng)),
        OpKind::Brightness => Op::Brightness(enhance(rng)),
        OpKind::Sharpness => Op::Sharpness(enhance(rng)),
        OpKind::ShearX => Op::ShearX(negate(rng, level * 0.3)),
        OpKind::ShearY => Op::ShearY(negate(rng, level * 0.3)),
        OpKind::TranslateX => Op::TranslateX(negate(rng, level * 0.45)),
        OpKind::TranslateY => Op::TranslateY(negate(rng, level * 0.45)),
    }
}

impl Op {
    /// Applies the operation to one packed RGB frame in place (`scratch`: a frame-sized
    /// buffer the filtering operation writes through; a clip goes through [`apply_ops`]).
    pub fn apply(&self, frame: &mut [u8], scratch: &mut [u8], height: usize, width: usize) {
        match *self {
            Op::AutoContrast => per_channel_lut(frame, autocontrast_lut),
            Op::Equalize => per_channel_lut(frame, equalize_lut),
            Op::Invert => frame.iter_mut().for_each(|v| *v = 255 - *v),
            Op::Posterize(bits) => {
                if bits < 8 {
                    let mask = !((1u32 << (8 - bits)) - 1) as u8;
                    frame.iter_mut().for_each(|v| *v &= mask);
                }
            }
            Op::Solarize(threshold) => frame.iter_mut().for_each(|v| {
                if u32::from(*v) >= threshold {
                    *v = 255 - *v;
                }
            }),
            Op::SolarizeAdd(add) => frame.iter_mut().for_each(|v| {
                if *v < 128 {
                    *v = (u32::from(*v) + add).min(255) as u8;
                }
            }),
            Op::Color(f) => {
                for px in frame.chunks_exact_mut(3) {
                    let l = luma(px);
                    for v in px.iter_mut() {
                        *v = blend(l, *v, f);
                    }
                }
            }
            Op::Contrast(f) => {
                let mean = mean_luma(frame);
                frame.iter_mut().for_each(|v| *v = blend(mean, *v, f));
            }
            Op::Brightness(f) => frame.iter_mut().for_each(|v| *v = blend(0, *v, f)),
            Op::Sharpness(f) => {
                smooth(frame, scratch, height, width);
                for (v, &d) in frame.iter_mut().zip(scratch.iter()) {
                    *v = blend(d, *v, f);
                }
            }
            Op::Rotate(_)
            | Op::ShearX(_)
            | Op::ShearY(_)
            | Op::TranslateX(_)
            | Op::TranslateY(_) => {
                if let Some(m) = self.matrix(height, width) {
                    affine(frame, 1, height, width, m);
                }
            }
        }
    }

    /// The affine data PIL's `Image.transform` gets for a geometric operation (output pixel
    /// centre → input position); `None` for the others. Rotation is PIL's `Image.rotate` about
    /// the centre, its sine and cosine rounded to 15 decimals as PIL does.
    pub fn matrix(&self, height: usize, width: usize) -> Option<[f64; 6]> {
        Some(match *self {
            Op::Rotate(degrees) => {
                // PIL: `angle % 360` (Python's modulo), then radians; `round(x, 15)` is
                // Python's correctly rounded decimal rounding (Rust's formatting rounds the
                // exact value the same way).
                let angle = -degrees.rem_euclid(360.0).to_radians();
                let round15 = |x: f64| format!("{x:.15}").parse::<f64>().unwrap_or(x);
                let (c, s) = (round15(angle.cos()), round15(angle.sin()));
                let (cx, cy) = (width as f64 / 2.0, height as f64 / 2.0);
                let mut m = [c, s, 0.0, -s, c, 0.0];
                m[2] = m[0] * -cx + m[1] * -cy + cx;
                m[5] = m[3] * -cx + m[4] * -cy + cy;
                m
            }
            Op::ShearX(f) => [1.0, f, 0.0, 0.0, 1.0, 0.0],
            Op::ShearY(f) => [1.0, 0.0, 0.0, f, 1.0, 0.0],
            Op::TranslateX(p) => [1.0, 0.0, p * width as f64, 0.0, 1.0, 0.0],
            Op::TranslateY(p) => [1.0, 0.0, 0.0, 0.0, 1.0, p * height as f64],
            _ => return None,
        })
    }
}

/// PIL's RGB → L: `(19595 R + 38470 G + 7471 B + 0x8000) >> 16`.
fn luma(px: &[u8]) -> u8 {
    let v = 19595 * u32::from(px[0]) + 38470 * u32::from(px[1]) + 7471 * u32::from(px[2]);
    ((v + 0x8000) >> 16) as u8
}

/// `ImageEnhance.Contrast`'s grey: the mean of the L image, rounded (`int(mean + 0.5)`).
fn mean_luma(frame: &[u8]) -> u8 {
    let n = frame.len() / 3;
    if n == 0 {
        return 0;
    }
    let sum: u64 = frame.chunks_exact(3).map(|px| u64::from(luma(px))).sum();
    (sum as f64 / n as f64 + 0.5) as u8
}

/// `Image.blend(degenerate, image, f)` for one value: `d + f·(v − d)` in f32, clipped to
/// 0–255 and truncated.
fn blend(d: u8, v: u8, f: f64) -> u8 {
    let f = f as f32;
    let x = f32::from(d) + f * (f32::from(v) - f32::from(d));
    if x <= 0.0 {
        0
    } else if x >= 255.0 {
        255
    } else {
        x as u8
    }
}

/// Rewrites each channel through a lookup table built from that channel's histogram.
fn per_channel_lut(frame: &mut [u8], lut_of: fn(&[u64; 256]) -> [u8; 256]) {
    for c in 0..3 {
        let mut hist = [0u64; 256];
        for px in frame.chunks_exact(3) {
            hist[usize::from(px[c])] += 1;
        }
        let lut = lut_of(&hist);
        for px in frame.chunks_exact_mut(3) {
            px[c] = lut[usize::from(px[c])];
        }
    }
}

fn identity_lut() -> [u8; 256] {
    std::array::from_fn(|i| i as u8)
}

/// `ImageOps.autocontrast` (cutoff 0): `[lo, hi]` of the used values stretched to `[0, 255]`,
/// `int(i · 255/(hi − lo) − lo · 255/(hi − lo))` clipped.
fn autocontrast_lut(hist: &[u64; 256]) -> [u8; 256] {
    let lo = hist.iter().position(|&n| n > 0);
    let hi = hist.iter().rposition(|&n| n > 0);
    match (lo, hi) {
        (Some(lo), Some(hi)) if hi > lo => {
            let scale = 255.0 / (hi - lo) as f64;
            let offset = -(lo as f64) * scale;
            std::array::from_fn(|i| ((i as f64 * scale + offset) as i64).clamp(0, 255) as u8)
        }
        _ => identity_lut(),
    }
}

/// `ImageOps.equalize`: `step = (Σ used − last used count) // 255`, then `lut[i] =
/// (step // 2 + Σ_{j<i} h[j]) // step`; identity for one used value or a zero step.
fn equalize_lut(hist: &[u64; 256]) -> [u8; 256] {
    let used: Vec<u64> = hist.iter().copied().filter(|&n| n > 0).collect();
    if used.len() <= 1 {
        return identity_lut();
    }
    let step = (used.iter().sum::<u64>() - used[used.len() - 1]) / 255;
    if step == 0 {
        return identity_lut();
    }
    let mut n = step / 2;
    std::array::from_fn(|i| {
        let v = (n / step).min(255) as u8;
        n += hist[i];
        v
    })
}

/// `ImageFilter.SMOOTH` (3×3 kernel 1 1 1 / 1 5 1 / 1 1 1, ÷13) into `out`, border pixels
/// copied, sums rounded to `u8` (as Pillow's filter does; its resampling truncates).
fn smooth(frame: &[u8], out: &mut [u8], height: usize, width: usize) {
    out.copy_from_slice(frame);
    if height < 3 || width < 3 {
        return;
    }
    let stride = width * 3;
    const K: [f32; 9] = [1.0, 1.0, 1.0, 1.0, 5.0, 1.0, 1.0, 1.0, 1.0];
    for y in 1..height - 1 {
        for x in 1..width - 1 {
            for c in 0..3 {
                let mut s = 0.0f32;
                for (k, w) in K.iter().enumerate() {
                    let (dy, dx) = (k / 3, k % 3);
                    let v = frame[(y + dy - 1) * stride + (x + dx - 1) * 3 + c];
                    s += f32::from(v) * (w / 13.0);
                }
                out[y * stride + x * 3 + c] = (s + 0.5).clamp(0.0, 255.0) as u8;
            }
        }
    }
}

/// PIL's cubic convolution (a = −1) through four samples at fraction `d`.
fn cubic(v1: f64, v2: f64, v3: f64, v4: f64, d: f64) -> f64 {
    let p2 = -v1 + v3;
    let p3 = 2.0 * (v1 - v2) + v3 - v4;
    let p4 = -v1 + v2 - v3 + v4;
    v2 + d * (p2 + d * (p3 + d * p4))
}

/// One output pixel's bicubic taps: byte offsets of the four columns and the four rows it
/// reads, and its fractions; `None` outside the input (the fill).
type Tap = Option<([usize; 4], [usize; 4], f64, f64)>;

/// Rows of output pixels whose taps are worked out at once (and used for every frame).
const BAND: usize = 32;

/// `Image.transform(size, AFFINE, m, BICUBIC, fillcolor=128)` of each of `t` packed RGB frames,
/// in place: output pixel `(x, y)` reads the input at `(m0·(x+½) + m1·(y+½) + m2, m3·(x+½) +
/// m4·(y+½) + m5)`; outside the input it is the fill. Columns are clamped to the frame, the
/// first row too, and each further row outside the frame repeats the one before (PIL's
/// `bicubic_filter32RGB`, in its f64 arithmetic). The taps are the same in every frame, so they
/// are worked out once per band of rows for the whole clip; memory is one more copy of the
/// frames.
fn affine(frames: &mut [u8], t: usize, height: usize, width: usize, m: [f64; 6]) {
    let stride = width * 3;
    let len = height * stride;
    if len == 0 || t == 0 {
        return;
    }
    let mut out = vec![0u8; t * len];
    let (w, h) = (width as f64, height as f64);
    let (last_x, last_y) = (width as i64 - 1, height as i64 - 1);
    let mut taps: Vec<Tap> = Vec::with_capacity(BAND * width);
    for band in (0..height).step_by(BAND) {
        let rows_in_band = BAND.min(height - band);
        taps.clear();
        for y in band..band + rows_in_band {
            let yc = y as f64 + 0.5;
            for x in 0..width {
                let xc = x as f64 + 0.5;
                let xin = m[0] * xc + m[1] * yc + m[2];
                let yin = m[3] * xc + m[4] * yc + m[5];
                if !(0.0..w).contains(&xin) || !(0.0..h).contains(&yin) {
                    taps.push(None);
                    continue;
                }
                let (xs, ys) = (xin - 0.5, yin - 0.5);
                let (fx, fy) = (xs.floor(), ys.floor());
                let (x0, y0) = (fx as i64 - 1, fy as i64 - 1);
                let mut cols = [0usize; 4];
                for (k, c) in cols.iter_mut().enumerate() {
                    *c = (x0 + k as i64).clamp(0, last_x) as usize * 3;
                }
                let mut rows = [y0.clamp(0, last_y) as usize * stride; 4];
                for k in 1..4 {
                    let r = y0 + k as i64;
                    rows[k] = if (0..=last_y).contains(&r) {
                        r as usize * stride
                    } else {
                        rows[k - 1]
                    };
                }
                taps.push(Some((cols, rows, xs - fx, ys - fy)));
            }
        }
        let span = band * stride..(band + rows_in_band) * stride;
        for (frame, out) in frames
            .chunks_exact(len)
            .zip(out.chunks_exact_mut(len))
            .take(t)
        {
            resample(frame, &mut out[span.clone()], &taps);
        }
    }
    frames[..t * len].copy_from_slice(&out);
}

/// Writes `out` (packed RGB, one pixel per tap) from `frame` through `taps`.
fn resample(frame: &[u8], out: &mut [u8], taps: &[Tap]) {
    for (px, tap) in out.chunks_exact_mut(3).zip(taps) {
        let Some((cols, rows, dx, dy)) = tap else {
            px.fill(FILL);
            continue;
        };
        // Each row's four pixels, all three channels at once (plain loops: `[T; N]::map` does
        // not inline here and cost twice the arithmetic).
        let mut v = [[0.0f64; 3]; 4];
        for (vk, &r) in v.iter_mut().zip(rows) {
            let mut s = [[0.0f64; 3]; 4];
            for (si, &col) in s.iter_mut().zip(cols) {
                let q = &frame[r + col..r + col + 3];
                *si = [f64::from(q[0]), f64::from(q[1]), f64::from(q[2])];
            }
            for (c, vc) in vk.iter_mut().enumerate() {
                *vc = cubic(s[0][c], s[1][c], s[2][c], s[3][c], *dx);
            }
        }
        for (c, o) in px.iter_mut().enumerate() {
            let p = cubic(v[0][c], v[1][c], v[2][c], v[3][c], *dy);
            *o = if p <= 0.0 {
                0
            } else if p >= 255.0 {
                255
            } else {
                p as u8
            };
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A 6×5 frame whose channels differ: R ramps along x, G along y, B constant 77.
    fn ramp(h: usize, w: usize) -> Vec<u8> {
        let mut f = Vec::with_capacity(h * w * 3);
        for y in 0..h {
            for x in 0..w {
                f.extend_from_slice(&[(20 + 30 * x) as u8, (10 + 40 * y) as u8, 77]);
            }
        }
        f
    }

    fn run(op: Op, frame: &[u8], h: usize, w: usize) -> Vec<u8> {
        let mut f = frame.to_vec();
        let mut scratch = vec![0; f.len()];
        op.apply(&mut f, &mut scratch, h, w);
        f
    }

    #[test]
    fn lut_operations_follow_pil() {
        let f = ramp(5, 6);
        // Autocontrast: R spans 20..170 → 0..255; B (one value) is unchanged.
        let a = run(Op::AutoContrast, &f, 5, 6);
        assert_eq!((a[0], a[3], a[15]), (0, 51, 255)); // int(30·255/150) = 51
        assert!(a.chunks(3).all(|p| p[2] == 77));
        // Equalize: R has six values, five each; step = (30 − 5) // 255 = 0 → identity.
        assert_eq!(run(Op::Equalize, &f, 5, 6), f);
        assert_eq!(run(Op::Invert, &f, 5, 6)[0], 235);
        assert_eq!(run(Op::Posterize(2), &f, 5, 6)[3], 0); // 50 & 0b1100_0000
        assert_eq!(run(Op::Posterize(0), &f, 5, 6).iter().max(), Some(&0));
        let s = run(Op::Solarize(100), &f, 5, 6);
        assert_eq!((s[3], s[9]), (50, 255 - 110));
        assert_eq!(run(Op::Solarize(256), &f, 5, 6), f);
        let s = run(Op::SolarizeAdd(100), &f, 5, 6);
        assert_eq!((s[0], s[9], s[12]), (120, 210, 140)); // 20+100, 110+100; 140 ≥ 128 kept
    }

    #[test]
    fn equalize_spreads_a_skewed_histogram() {
        // 300 pixels: value 10 ×200, 20 ×50, 200 ×50 (grey).
        let mut f = Vec::new();
        for i in 0..300 {
            let v = if i < 200 {
                10
            } else if i < 250 {
                20
            } else {
                200
            };
            f.extend_from_slice(&[v, v, v]);
        }
        let e = run(Op::Equalize, &f, 1, 300);
        // step = (300 − 50) // 255 = 0 → identity; scale the counts up to get a real step.
        assert_eq!(e, f);
        let mut big = Vec::new();
        for _ in 0..10 {
            big.extend_from_slice(&f);
        }
        let e = run(Op::Equalize, &big, 1, 3000);
        // step = (3000 − 500) // 255 = 9: lut[10] = 4 // 9 = 0, lut[20] = (4 + 2000) // 9 = 222,
        // lut[200] = (4 + 2500) // 9 = 278 → clipped to 255.
        assert_eq!((e[0], e[3 * 200], e[3 * 250]), (0, 222, 255));
    }

    #[test]
    fn enhancements_blend_with_their_degenerate_image() {
        let f = ramp(5, 6);
        // Factor 1 is the identity for each of them.
        for op in [
            Op::Color(1.0),
            Op::Contrast(1.0),
            Op::Brightness(1.0),
            Op::Sharpness(1.0),
        ] {
            assert_eq!(run(op, &f, 5, 6), f, "{op:?}");
        }
        // Brightness 0.5: truncated halves; 1.9: clipped at 255.
        let b = run(Op::Brightness(0.5), &f, 5, 6);
        assert_eq!((b[0], b[1], b[2]), (10, 5, 38));
        assert_eq!(run(Op::Brightness(1.9), &f, 5, 6)[15], 255);
        // Colour 0: every channel becomes the pixel's luma.
        let g = run(Op::Color(0.0), &f, 5, 6);
        let l = luma(&f[0..3]);
        assert_eq!(&g[0..3], &[l, l, l]);
        // Contrast 0: every value becomes the mean luma.
        let c = run(Op::Contrast(0.0), &f, 5, 6);
        assert!(c.iter().all(|&v| v == c[0]));
        // Sharpness 0 is the SMOOTH filter: borders kept, an inner pixel of the linear R
        // ramp keeps its value (the kernel is symmetric), B stays 77.
        let s = run(Op::Sharpness(0.0), &f, 5, 6);
        assert_eq!(&s[0..3], &f[0..3]);
        let inner = (2 * 6 + 2) * 3;
        assert!((i32::from(s[inner]) - i32::from(f[inner])).abs() <= 1);
        assert!(s.chunks(3).all(|p| p[2] == 77 || p[2] == 76));
    }

    #[test]
    fn geometry_maps_pixels_like_pil() {
        let (h, w) = (8, 10);
        let f = ramp(h, w);
        // Zero shear/translation/rotation is the identity (cubic taps at whole pixels).
        for op in [Op::ShearX(0.0), Op::TranslateY(0.0), Op::Rotate(0.0)] {
            assert_eq!(run(op, &f, h, w), f, "{op:?}");
        }
        // Translate by +0.2 of the width (2 pixels): output x reads input x + 2; the last two
        // columns fall outside and take the fill.
        let t = run(Op::TranslateX(0.2), &f, h, w);
        assert_eq!(&t[0..3], &f[6..9]);
        let last = (w - 1) * 3;
        assert_eq!(&t[last..last + 3], &[FILL; 3]);
        // Rotating by 180° about the centre reverses the frame exactly.
        let r = run(Op::Rotate(180.0), &f, h, w);
        let n = h * w;
        for i in 0..n {
            assert_eq!(
                &r[i * 3..i * 3 + 3],
                &f[(n - 1 - i) * 3..(n - i) * 3],
                "pixel {i}"
            );
        }
        // A half-pixel shift interpolates: inside a linear ramp the cubic is exact (R 80 and
        // 110 → 95); at the edge the clamped taps bend it (20, 20, 50, 80 → 31.25 → 31).
        let half = run(Op::TranslateX(0.05), &ramp(4, 10), 4, 10);
        assert_eq!((half[6], half[0]), (95, 31));
    }

    #[test]
    fn draws_follow_the_official_policy() {
        let ra = RandAugment::official();
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let (mut applied, mut drawn_clips) = (0usize, 0usize);
        let mut kinds = std::collections::BTreeSet::new();
        for _ in 0..2000 {
            let ops = ra.draw(&mut rng);
            assert!(ops.len() <= 4);
            applied += ops.len();
            drawn_clips += 1;
            for op in ops {
                kinds.insert(format!("{op:?}").split('(').next().unwrap().to_string());
                match op {
                    Op::Rotate(d) => assert!((9.0..=30.0).contains(&d.abs())),
                    Op::Posterize(b) => assert!(b <= 3),
                    Op::Solarize(t) => assert!((0..=256).contains(&t)),
                    Op::SolarizeAdd(a) => assert!(a <= 110),
                    Op::Color(f) | Op::Contrast(f) | Op::Brightness(f) | Op::Sharpness(f) => {
                        assert!((0.1..=1.9).contains(&f));
                        assert!((f - 1.0).abs() >= 0.27, "m ≈ 7 moves it about 0.63");
                    }
                    Op::ShearX(s) | Op::ShearY(s) => assert!(s.abs() <= 0.3),
                    Op::TranslateX(p) | Op::TranslateY(p) => assert!(p.abs() <= 0.45),
                    _ => {}
                }
            }
        }
        // Half of the four drawn operations are applied on average; every kind shows up.
        let mean = applied as f64 / drawn_clips as f64;
        assert!((1.8..2.2).contains(&mean), "{mean}");
        assert_eq!(kinds.len(), INCREASING.len());
    }

    #[test]
    fn every_frame_of_a_clip_gets_the_same_operations() {
        let (h, w) = (6, 8);
        let one = ramp(h, w);
        let mut clip = [one.clone(), one.clone(), one].concat();
        let ops = [Op::Rotate(20.0), Op::Solarize(100), Op::Color(1.5)];
        apply_ops(&ops, &mut clip, 3, h, w);
        let n = h * w * 3;
        assert_eq!(clip[..n], clip[n..2 * n]);
        assert_eq!(clip[..n], clip[2 * n..]);
        assert_ne!(clip[..n], ramp(h, w)[..]);
    }
}
