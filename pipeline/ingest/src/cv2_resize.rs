//! Bit-exact re-implementation of OpenCV's
//! `cv2.resize(img, (dst_w, dst_h), interpolation=cv2.INTER_LINEAR)` for
//! 8-bit, 3-channel (packed RGB/BGR, H×W×3) images, as done by OpenCV 5.0.0
//! (opencv-python-headless 5.0.0.93 on x86-64).
//!
//! OpenCV's 8-bit linear resize is a separable fixed-point filter:
//!
//! 1. **Taps.** For every destination column (and row) `d`, the source
//!    coordinate is `f = (float)((d + 0.5) * scale - 0.5)` where
//!    `scale = 1.0 / (dst / src)` in `f64` (OpenCV stores the *inverse* scale
//!    and inverts it again, so `scale` is not always exactly `src / dst`).
//!    The integer part is `s = floor(f)` and the fraction `f - s` (both in
//!    `f32`). The two weights `1 - f` and `f` are each converted to 11-bit
//!    fixed point *separately* with round-half-to-even
//!    (`saturate_cast<short>(w * 2048)`), so they may sum to 2047 or 2049.
//! 2. **Horizontal pass** (exact integer arithmetic, so SIMD and scalar agree):
//!    `H = src[s] * w0 + src[s + 1] * w1` per channel. Columns that fall
//!    outside the source (`s < 0` or `s >= src_w - 1`) are clamped to the edge
//!    pixel with weight 2048.
//! 3. **Vertical pass**: rows are *not* clamped like columns. The row weights
//!    are kept as computed and only the row *indices* `s` and `s + 1` are
//!    clipped into `[0, src_h - 1]` when fetched (so near the top/bottom edge of
//!    an upscale, the same row is fetched twice with weights summing to
//!    2047..2049). The two horizontal sums are combined as
//!    `((((H0 >> 4) * b0) >> 16) + (((H1 >> 4) * b1) >> 16) + 2) >> 2`.
//!    This is the formula of OpenCV's 16-bit SIMD kernel (pre-shift by 4,
//!    multiply-high, rounding shift by 2); in this OpenCV version the scalar
//!    tail uses the same formula, so it applies to *every* output element
//!    regardless of its index in the row or of the CPU dispatch level. (The
//!    "textbook" `(H0*b0 + H1*b1 + (1 << 21)) >> 22` differs in ~13 % of
//!    pixels by ±1 and is *not* what OpenCV produces.)
//!
//! Special paths in `cv::resize` that need no code here because they produce
//! identical bytes: same size in and out (OpenCV copies; the formula above is
//! the identity then) and exact 2× downscale in both axes (OpenCV switches to
//! the INTER_AREA fast path, `(a + b + c + d + 2) >> 2`, which equals the
//! formula above when all weights are 1024). IPP is not used for inexact
//! linear resizes (`cv2.ipp.useIPP_NotExact()` is false by default).

/// Fixed-point scale of the interpolation weights (`INTER_RESIZE_COEF_SCALE`, 2^11).
const COEF_SCALE: f32 = 2048.0;
/// Channels per pixel.
const CN: usize = 3;

/// One interpolation tap along an axis: output = in[i0]*w0 + in[i1]*w1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Tap {
    i0: usize,
    i1: usize,
    w0: i32,
    w1: i32,
}

/// Computes the taps of one axis (`src` → `dst` samples).
///
/// `clamp_coords` selects the column behaviour (coordinates outside the
/// source are snapped to the edge with weight 2048/0); without it (rows) the
/// weights are kept and only the indices are clipped, as OpenCV does.
fn axis_taps(src: usize, dst: usize, clamp_coords: bool) -> Vec<Tap> {
    // OpenCV keeps inv_scale = dst/src and uses its reciprocal.
    let inv_scale = dst as f64 / src as f64;
    let scale = 1.0 / inv_scale;
    let last = src as i64 - 1;
    (0..dst)
        .map(|d| {
            // The coordinate is computed in f64 and rounded to f32; floor and
            // fraction are then taken in f32, as OpenCV does.
            let mut f = ((d as f64 + 0.5) * scale - 0.5) as f32;
            let mut s = f.floor() as i64;
            f -= s as f32;
            if clamp_coords {
                if s < 0 {
                    s = 0;
                    f = 0.0;
                }
                if s >= last {
                    s = last;
                    f = 0.0;
                }
            }
            // Each weight is rounded on its own (cvRound = ties-to-even);
            // their sum is therefore not always exactly 2048.
            let w0 = ((1.0f32 - f) * COEF_SCALE).round_ties_even() as i32;
            let w1 = (f * COEF_SCALE).round_ties_even() as i32;
            let clip = |i: i64| i.clamp(0, last) as usize;
            let (mut i0, mut i1) = (clip(s), clip(s + 1));
            // A zero-weight tap contributes exactly 0 in both passes, so point
            // it at the other tap: this keeps `source_window` tight without
            // changing any output value.
            if w1 == 0 {
                i1 = i0;
            } else if w0 == 0 {
                i0 = i1;
            }
            Tap { i0, i1, w0, w1 }
        })
        .collect()
}

/// Vertical combination of two horizontal sums, exactly as OpenCV's 8-bit
/// kernel does it: each sum is pre-shifted by 4 so it fits in i16, multiplied
/// by its weight keeping the high 16 bits (truncating), and the total gets a
/// rounding shift by 2 (4 + 16 + 2 = 22 = 2 × 11 fractional bits).
#[inline]
fn vmix(h0: i32, h1: i32, b0: i32, b1: i32) -> u8 {
    let v = (((h0 >> 4) * b0) >> 16) + (((h1 >> 4) * b1) >> 16);
    // Cannot leave 0..=255 for u8 input, but saturate like OpenCV's pack anyway.
    ((v + 2) >> 2).clamp(0, 255) as u8
}

/// Precomputed taps for resizing a `src_h × src_w × 3` u8 image to `dst_h × dst_w` as
/// `cv2.resize(..., interpolation=cv2.INTER_LINEAR)` does, for the official evaluation's resize
/// of whole frames ([`crate::ViewTensor`]).
#[derive(Clone, Debug)]
pub struct Cv2Linear {
    src_h: usize,
    src_w: usize,
    dst_h: usize,
    dst_w: usize,
    /// One tap per destination row (source row indices, weights).
    rows: Vec<Tap>,
    /// One tap per destination column (source column indices, weights).
    cols: Vec<Tap>,
}

impl Cv2Linear {
    /// Plans the resize; panics on a zero size (a programmer error: callers check sizes).
    pub fn new(src_h: usize, src_w: usize, dst_h: usize, dst_w: usize) -> Cv2Linear {
        assert!(
            src_h > 0 && src_w > 0 && dst_h > 0 && dst_w > 0,
            "Cv2Linear: sizes must be non-zero (src {src_h}x{src_w}, dst {dst_h}x{dst_w})"
        );
        Cv2Linear {
            src_h,
            src_w,
            dst_h,
            dst_w,
            rows: axis_taps(src_h, dst_h, false),
            cols: axis_taps(src_w, dst_w, true),
        }
    }

    /// (src_h, src_w).
    pub fn src_size(&self) -> (usize, usize) {
        (self.src_h, self.src_w)
    }

    /// (dst_h, dst_w).
    pub fn dst_size(&self) -> (usize, usize) {
        (self.dst_h, self.dst_w)
    }

    fn check_region(&self, top: usize, left: usize, h: usize, w: usize) {
        assert!(
            h > 0 && w > 0 && top + h <= self.dst_h && left + w <= self.dst_w,
            "Cv2Linear: region (top {top}, left {left}, {h}x{w}) is empty or outside the {}x{} output",
            self.dst_h,
            self.dst_w
        );
    }

    /// The source rows [r0, r1) and columns [c0, c1) that output region (top, left, h, w) reads.
    pub fn source_window(
        &self,
        top: usize,
        left: usize,
        h: usize,
        w: usize,
    ) -> ((usize, usize), (usize, usize)) {
        self.check_region(top, left, h, w);
        let span = |taps: &[Tap]| {
            // Taps are monotonic, but min/max over the range is cheap and robust.
            let lo = taps.iter().map(|t| t.i0.min(t.i1)).min().unwrap_or(0);
            let hi = taps.iter().map(|t| t.i0.max(t.i1)).max().unwrap_or(0);
            (lo, hi + 1)
        };
        (
            span(&self.rows[top..top + h]),
            span(&self.cols[left..left + w]),
        )
    }

    /// Writes output rows top..top+h, columns left..left+w (packed RGB, row stride w*3) into `out`.
    /// `src` holds at least the source window: packed RGB rows with stride `src_stride` bytes,
    /// whose element (0, 0) is source pixel `origin` = (row, col).
    ///
    /// Panics (programmer error) if the region is outside the output, or `src`/`out` are too small.
    #[allow(clippy::too_many_arguments)] // signature mirrors the (src, region, out) description
    pub fn resize_region(
        &self,
        src: &[u8],
        src_stride: usize,
        origin: (usize, usize),
        top: usize,
        left: usize,
        h: usize,
        w: usize,
        out: &mut [u8],
    ) {
        let ((r0, r1), (c0, c1)) = self.source_window(top, left, h, w);
        let (or, oc) = origin;
        assert!(
            or <= r0 && oc <= c0,
            "Cv2Linear: origin {origin:?} is after the source window start ({r0}, {c0})"
        );
        assert!(
            src_stride >= (c1 - oc) * CN,
            "Cv2Linear: src_stride {src_stride} is shorter than the window's row ({} bytes)",
            (c1 - oc) * CN
        );
        let needed = (r1 - 1 - or) * src_stride + (c1 - oc) * CN;
        assert!(
            src.len() >= needed,
            "Cv2Linear: src has {} bytes but the source window rows {r0}..{r1}, cols {c0}..{c1} need {needed}",
            src.len()
        );
        // Column taps relative to the window origin, as byte offsets.
        let cols: Vec<Tap> = self.cols[left..left + w]
            .iter()
            .map(|t| Tap {
                i0: (t.i0 - oc) * CN,
                i1: (t.i1 - oc) * CN,
                ..*t
            })
            .collect();
        let line_len = (c1 - oc) * CN;
        self.filter(
            |r| {
                let start = (r - or) * src_stride;
                &src[start..start + line_len]
            },
            &cols,
            top,
            h,
            out,
        );
    }

    /// The source rows and columns (sorted, distinct) that output region (top, left, h, w)
    /// reads. A frame much larger than the output is read at about two rows per output row
    /// and two columns per output column: only these need converting to RGB.
    pub fn used(&self, top: usize, left: usize, h: usize, w: usize) -> (Vec<usize>, Vec<usize>) {
        self.check_region(top, left, h, w);
        let distinct = |taps: &[Tap]| {
            let mut v: Vec<usize> = taps.iter().flat_map(|t| [t.i0, t.i1]).collect();
            v.sort_unstable();
            v.dedup();
            v
        };
        (
            distinct(&self.rows[top..top + h]),
            distinct(&self.cols[left..left + w]),
        )
    }

    /// [`Cv2Linear::resize_region`] from only the pixels it reads: `src` holds packed RGB of
    /// the source pixels at `rows × cols` (as [`Cv2Linear::used`] returns them, row stride
    /// `cols.len() × 3` bytes). Same output, to the bit.
    ///
    /// Panics (programmer error) if the region is outside the output, `rows`/`cols` miss a
    /// pixel the region reads, or `src`/`out` are too small.
    #[allow(clippy::too_many_arguments)] // (src, its rows and columns, region, out)
    pub fn resize_gathered(
        &self,
        src: &[u8],
        rows: &[usize],
        cols: &[usize],
        top: usize,
        left: usize,
        h: usize,
        w: usize,
        out: &mut [u8],
    ) {
        self.check_region(top, left, h, w);
        let line_len = cols.len() * CN;
        assert!(
            src.len() >= rows.len() * line_len,
            "Cv2Linear: src has {} bytes for {} gathered rows of {} columns",
            src.len(),
            rows.len(),
            cols.len()
        );
        let at = |set: &[usize], i: usize, what: &str| {
            set.binary_search(&i)
                .unwrap_or_else(|_| panic!("Cv2Linear: gathered {what} miss source index {i}"))
        };
        let taps: Vec<Tap> = self.cols[left..left + w]
            .iter()
            .map(|t| Tap {
                i0: at(cols, t.i0, "columns") * CN,
                i1: at(cols, t.i1, "columns") * CN,
                ..*t
            })
            .collect();
        self.filter(
            |r| {
                let start = at(rows, r, "rows") * line_len;
                &src[start..start + line_len]
            },
            &taps,
            top,
            h,
            out,
        );
    }

    /// The two passes over output rows `top..top + h`: `line(r)` gives source row `r` (the
    /// bytes `cols`' byte offsets index).
    fn filter<'s>(
        &self,
        line: impl Fn(usize) -> &'s [u8],
        cols: &[Tap],
        top: usize,
        h: usize,
        out: &mut [u8],
    ) {
        let row_len = cols.len() * CN;
        assert!(
            out.len() >= h * row_len,
            "Cv2Linear: out has {} bytes, region needs {}",
            out.len(),
            h * row_len
        );
        let hpass = |src_row: usize, dst: &mut [i32]| {
            let line = line(src_row);
            for (t, d) in cols.iter().zip(dst.chunks_exact_mut(CN)) {
                let p0 = &line[t.i0..t.i0 + CN];
                let p1 = &line[t.i1..t.i1 + CN];
                for c in 0..CN {
                    d[c] = p0[c] as i32 * t.w0 + p1[c] as i32 * t.w1;
                }
            }
        };

        // Two horizontally filtered source rows, reused across output rows
        // (upscaling reads the same pair of rows many times in a row).
        let mut bufs = [vec![0i32; row_len], vec![0i32; row_len]];
        let mut held = [usize::MAX; 2];
        for (y, out_row) in out[..h * row_len].chunks_exact_mut(row_len).enumerate() {
            let t = self.rows[top + y];
            let k0 = match held.iter().position(|&r| r == t.i0) {
                Some(k) => k,
                None => {
                    let k = if held[0] == t.i1 { 1 } else { 0 };
                    hpass(t.i0, &mut bufs[k]);
                    held[k] = t.i0;
                    k
                }
            };
            let k1 = match held.iter().position(|&r| r == t.i1) {
                Some(k) => k,
                None => {
                    let k = 1 - k0;
                    hpass(t.i1, &mut bufs[k]);
                    held[k] = t.i1;
                    k
                }
            };
            let (h0, h1) = (&bufs[k0], &bufs[k1]);
            for ((o, &a), &b) in out_row.iter_mut().zip(h0.iter()).zip(h1.iter()) {
                *o = vmix(a, b, t.w0, t.w1);
            }
        }
    }
}

/// Whole-image resize (tests).
#[cfg(test)]
fn resize(src: &[u8], src_h: usize, src_w: usize, dst_h: usize, dst_w: usize) -> Vec<u8> {
    assert_eq!(
        src.len(),
        src_h * src_w * CN,
        "resize: src has {} bytes, expected {src_h}x{src_w}x3",
        src.len()
    );
    let r = Cv2Linear::new(src_h, src_w, dst_h, dst_w);
    let mut out = vec![0u8; dst_h * dst_w * CN];
    r.resize_region(src, src_w * CN, (0, 0), 0, 0, dst_h, dst_w, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic test pattern (also used to generate the cv2 fixtures below).
    fn pat(h: usize, w: usize) -> Vec<u8> {
        let mut v = Vec::with_capacity(h * w * 3);
        for r in 0..h {
            for c in 0..w {
                for ch in 0..3 {
                    let x = r * 37 + c * 11 + ch * 71 + ((r * c) % 13) * 5 + (r * 7 + c * 3).pow(2);
                    v.push((x % 256) as u8);
                }
            }
        }
        v
    }

    /// Small xorshift PRNG so the tests need no dependencies.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn range(&mut self, lo: usize, hi: usize) -> usize {
            lo + (self.next() % (hi - lo) as u64) as usize
        }
    }

    fn noise(rng: &mut Rng, n: usize) -> Vec<u8> {
        (0..n).map(|_| rng.next() as u8).collect()
    }

    #[test]
    fn hand_checked_1x2_to_1x4() {
        // Columns map to f = -0.25, 0.25, 0.75, 1.25: clamp, (1536, 512),
        // (512, 1536), clamp. 255*512 = 130560 -> >>4 = 8160 -> *2048>>16 = 255
        // -> (255+2)>>2 = 64; 255*1536 -> 24480 -> 765 -> 191.
        let src = [0, 0, 0, 255, 255, 255];
        let out = resize(&src, 1, 2, 1, 4);
        assert_eq!(out, [0, 0, 0, 64, 64, 64, 191, 191, 191, 255, 255, 255]);
    }

    #[test]
    fn vertical_formula_is_not_the_textbook_one() {
        // Horizontal sums where OpenCV's staged rounding (>>4, mul-high, +2 >>2)
        // gives 86 while (h0*b0 + h1*b1 + 2^21) >> 22 would give 87.
        let (h0, h1, b0, b1) = (380_555, 15_225, 908, 1140);
        assert_eq!((h0 * b0 + h1 * b1 + (1 << 21)) >> 22, 87);
        assert_eq!(vmix(h0, h1, b0, b1), 86);
    }

    #[test]
    fn cv2_fixtures() {
        // Produced by cv2.resize(pat(h, w), (dw, dh), interpolation=cv2.INTER_LINEAR), OpenCV 5.0.0.
        type Case = ((usize, usize, usize, usize), &'static [u8]);
        let cases: [Case; 4] = [
            (
                (3, 4, 5, 7),
                &[
                    0, 71, 142, 7, 78, 149, 18, 89, 160, 39, 110, 181, 62, 133, 186, 94, 165, 71,
                    114, 185, 0, 34, 105, 176, 48, 119, 153, 70, 141, 117, 101, 121, 141, 128, 104,
                    164, 112, 147, 119, 102, 173, 91, 86, 157, 228, 110, 181, 161, 148, 219, 52,
                    196, 139, 82, 227, 60, 131, 140, 119, 190, 85, 156, 227, 43, 114, 185, 77, 148,
                    127, 131, 202, 35, 118, 137, 81, 100, 75, 136, 116, 150, 123, 126, 197, 115,
                    14, 85, 156, 54, 126, 105, 120, 191, 24, 66, 137, 80, 14, 86, 138, 100, 171,
                    78, 154, 225, 40,
                ],
            ),
            (
                (5, 7, 2, 3),
                &[
                    101, 172, 115, 92, 163, 170, 121, 128, 178, 143, 87, 94, 67, 138, 209, 156, 35,
                    106,
                ],
            ),
            (
                (4, 6, 2, 3),
                &[
                    65, 136, 143, 124, 131, 138, 127, 70, 141, 96, 103, 110, 87, 158, 101, 134, 77,
                    148,
                ],
            ),
            (
                (2, 3, 7, 2),
                &[
                    5, 76, 147, 48, 119, 190, 5, 76, 147, 48, 119, 190, 26, 97, 154, 84, 114, 172,
                    54, 125, 164, 133, 108, 147, 82, 153, 174, 181, 101, 121, 103, 174, 181, 217,
                    96, 103, 103, 174, 181, 217, 96, 103,
                ],
            ),
        ];
        for ((h, w, dh, dw), want) in cases {
            assert_eq!(
                resize(&pat(h, w), h, w, dh, dw),
                want,
                "{h}x{w} -> {dh}x{dw}"
            );
        }
    }

    #[test]
    fn same_size_is_copy() {
        let mut rng = Rng(7);
        for &(h, w) in &[(1, 1), (3, 5), (17, 16), (64, 33)] {
            let src = noise(&mut rng, h * w * 3);
            assert_eq!(resize(&src, h, w, h, w), src);
        }
    }

    #[test]
    fn exact_2x_down_is_rounded_2x2_mean() {
        // OpenCV routes this to INTER_AREA's fast path; our formula must agree.
        let mut rng = Rng(11);
        let (h, w) = (10, 14);
        let src = noise(&mut rng, h * w * 3);
        let out = resize(&src, h, w, h / 2, w / 2);
        for y in 0..h / 2 {
            for x in 0..w / 2 {
                for c in 0..3 {
                    let p = |r: usize, q: usize| src[(r * w + q) * 3 + c] as u32;
                    let s = p(2 * y, 2 * x)
                        + p(2 * y, 2 * x + 1)
                        + p(2 * y + 1, 2 * x)
                        + p(2 * y + 1, 2 * x + 1);
                    assert_eq!(out[(y * (w / 2) + x) * 3 + c] as u32, (s + 2) >> 2);
                }
            }
        }
    }

    #[test]
    fn region_equals_slice_of_whole_and_window_suffices() {
        let mut rng = Rng(0x9e3779b97f4a7c15);
        for _ in 0..300 {
            let (sh, sw) = (rng.range(1, 60), rng.range(1, 60));
            let (dh, dw) = (rng.range(1, 60), rng.range(1, 60));
            let src = noise(&mut rng, sh * sw * 3);
            let whole = resize(&src, sh, sw, dh, dw);
            let r = Cv2Linear::new(sh, sw, dh, dw);
            let (h, w) = (rng.range(1, dh + 1), rng.range(1, dw + 1));
            let (top, left) = (rng.range(0, dh - h + 1), rng.range(0, dw - w + 1));
            let ((r0, r1), (c0, c1)) = r.source_window(top, left, h, w);
            assert!(r0 < r1 && r1 <= sh && c0 < c1 && c1 <= sw);
            // Copy only the window into a padded buffer with a different stride.
            let pad = rng.range(0, 4) * 3;
            let stride = (c1 - c0) * 3 + pad;
            let mut win = vec![0xAAu8; (r1 - r0) * stride];
            for y in r0..r1 {
                let s = (y * sw + c0) * 3;
                let d = (y - r0) * stride;
                win[d..d + (c1 - c0) * 3].copy_from_slice(&src[s..s + (c1 - c0) * 3]);
            }
            let mut out = vec![0u8; h * w * 3];
            r.resize_region(&win, stride, (r0, c0), top, left, h, w, &mut out);
            for y in 0..h {
                let s = ((top + y) * dw + left) * 3;
                assert_eq!(
                    &out[y * w * 3..(y + 1) * w * 3],
                    &whole[s..s + w * 3],
                    "{sh}x{sw}->{dh}x{dw} region ({top},{left},{h},{w}) row {y}"
                );
            }
        }
    }

    #[test]
    fn gathered_pixels_give_the_region() {
        let mut rng = Rng(0x51ed_270b_27a0_3c4f);
        for _ in 0..300 {
            let (sh, sw) = (rng.range(1, 90), rng.range(1, 90));
            let (dh, dw) = (rng.range(1, 40), rng.range(1, 40));
            let src = noise(&mut rng, sh * sw * 3);
            let r = Cv2Linear::new(sh, sw, dh, dw);
            let (h, w) = (rng.range(1, dh + 1), rng.range(1, dw + 1));
            let (top, left) = (rng.range(0, dh - h + 1), rng.range(0, dw - w + 1));
            let mut want = vec![0u8; h * w * 3];
            r.resize_region(&src, sw * 3, (0, 0), top, left, h, w, &mut want);
            let (rows, cols) = r.used(top, left, h, w);
            assert!(rows.len() <= 2 * h && cols.len() <= 2 * w);
            let mut gathered = Vec::with_capacity(rows.len() * cols.len() * 3);
            for &y in &rows {
                for &x in &cols {
                    gathered.extend_from_slice(&src[(y * sw + x) * 3..(y * sw + x) * 3 + 3]);
                }
            }
            let mut got = vec![0u8; h * w * 3];
            r.resize_gathered(&gathered, &rows, &cols, top, left, h, w, &mut got);
            assert_eq!(
                got, want,
                "{sh}x{sw}->{dh}x{dw} region ({top},{left},{h},{w})"
            );
        }
    }

    #[test]
    fn window_is_tight_for_identity_crop() {
        let r = Cv2Linear::new(100, 120, 100, 120);
        assert_eq!(r.source_window(10, 20, 30, 40), ((10, 40), (20, 60)));
    }

    #[test]
    #[should_panic(expected = "outside")]
    fn region_outside_panics() {
        let r = Cv2Linear::new(10, 10, 5, 5);
        r.source_window(3, 0, 3, 5);
    }
}
