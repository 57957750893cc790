//! Decoded frames as the decoder hands them out (planar 4:2:0 YUV, 8 bit) and the two ways out of
//! them: crop → bilinear resize → colour conversion → normalisation straight into a clip tensor
//! ([`ClipTensor`]), or plain RGB at native resolution ([`YuvFrame::to_rgb`]).
//!
//! Scaling before colour conversion is what makes the ingest fast: the colour conversion (and
//! every float operation) runs only on the source pixels the `S × S` output reads (four per
//! output pixel), never on the whole native frame. Each of them is converted exactly as the
//! reference RGB24 frame holds it (clamped, rounded to u8) and then interpolated in torch's
//! order, so the result equals the reference order (decode to RGB, then crop/resize, spec §1)
//! up to float rounding. Chroma is upsampled by replication (each 4:2:0 chroma sample covers its
//! 2×2 luma block), as ffmpeg's default YUV→RGB conversion does (and with it decord, the
//! official loader).

use crate::error::{IngestError, QuarantineReason};

/// The YUV→RGB matrix and range of a stream, from its caps (colorimetry).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Colour {
    /// Red luma coefficient `Kr` (BT.601 0.299, BT.709 0.2126, BT.2020 0.2627).
    pub kr: f32,
    /// Blue luma coefficient `Kb` (BT.601 0.114, BT.709 0.0722, BT.2020 0.0593).
    pub kb: f32,
    /// `true` for full-range (0–255) samples, `false` for limited range (Y 16–235, C 16–240).
    pub full_range: bool,
}

impl Colour {
    /// BT.601, limited range: what SD video is unless tagged otherwise.
    pub const BT601: Colour = Colour {
        kr: 0.299,
        kb: 0.114,
        full_range: false,
    };
    /// BT.709, limited range: what HD video is unless tagged otherwise.
    pub const BT709: Colour = Colour {
        kr: 0.2126,
        kb: 0.0722,
        full_range: false,
    };
    /// BT.2020 (non-constant luminance), limited range.
    pub const BT2020: Colour = Colour {
        kr: 0.2627,
        kb: 0.0593,
        full_range: false,
    };

    /// The conversion as `rgb = m · (y − y0, u − 128, v − 128)`, pre-scaled to 0..255 output.
    fn matrix(&self) -> Matrix {
        let (ys, cs, y0) = if self.full_range {
            (1.0f32, 1.0f32, 0.0f32)
        } else {
            (255.0 / 219.0, 255.0 / 224.0, 16.0)
        };
        let (kr, kb) = (self.kr, self.kb);
        let kg = 1.0 - kr - kb;
        Matrix {
            y0,
            ys,
            rv: 2.0 * (1.0 - kr) * cs,
            gu: -2.0 * (1.0 - kb) * kb / kg * cs,
            gv: -2.0 * (1.0 - kr) * kr / kg * cs,
            bu: 2.0 * (1.0 - kb) * cs,
        }
    }
}

#[derive(Clone, Copy)]
struct Matrix {
    y0: f32,
    ys: f32,
    rv: f32,
    gu: f32,
    gv: f32,
    bu: f32,
}

impl Matrix {
    /// RGB clamped and rounded to 0..255, as an RGB24 frame holds it.
    #[inline(always)]
    fn rgb_u8(&self, y: f32, u: f32, v: f32) -> [f32; 3] {
        // Values are clamped to 0..=255, so rounding half away from zero is floor(x + 0.5),
        // and truncation is floor for non-negative x: one SSE2 conversion, no libm call.
        self.rgb(y, u, v).map(|x| (x + 0.5) as i32 as f32)
    }

    #[inline(always)]
    fn rgb(&self, y: f32, u: f32, v: f32) -> [f32; 3] {
        let y = (y - self.y0) * self.ys;
        let (u, v) = (u - 128.0, v - 128.0);
        [
            (y + self.rv * v).clamp(0.0, 255.0),
            (y + self.gu * u + self.gv * v).clamp(0.0, 255.0),
            (y + self.bu * u).clamp(0.0, 255.0),
        ]
    }
}

/// One decoded frame: 8-bit planar 4:2:0 (I420), borrowed from the decoder's buffer.
///
/// Chroma planes are `ceil(width/2) × ceil(height/2)`; strides are in bytes.
#[derive(Clone, Copy, Debug)]
pub struct YuvFrame<'a> {
    /// Luma width in pixels.
    pub width: usize,
    /// Luma height in pixels.
    pub height: usize,
    /// Y, U, V planes.
    pub planes: [&'a [u8]; 3],
    /// Bytes per row of each plane.
    pub strides: [usize; 3],
    /// How to turn the samples into RGB.
    pub colour: Colour,
}

impl<'a> YuvFrame<'a> {
    /// Width and height of the chroma planes.
    pub fn chroma_size(&self) -> (usize, usize) {
        (self.width.div_ceil(2), self.height.div_ceil(2))
    }

    /// Checks that the planes hold `width × height` (luma) and the chroma size at their strides.
    pub fn validate(&self) -> Result<(), IngestError> {
        let (cw, ch) = self.chroma_size();
        let dims = [(self.width, self.height), (cw, ch), (cw, ch)];
        if self.width == 0 || self.height == 0 {
            return Err(bad_frame("zero-size frame".into()));
        }
        for (p, &(w, h)) in dims.iter().enumerate() {
            let need = self.strides[p]
                .checked_mul(h - 1)
                .and_then(|x| x.checked_add(w))
                .ok_or_else(|| bad_frame("plane size overflows".into()))?;
            if self.strides[p] < w || self.planes[p].len() < need {
                return Err(bad_frame(format!(
                    "plane {p}: {} bytes at stride {} for {w}x{h}",
                    self.planes[p].len(),
                    self.strides[p]
                )));
            }
        }
        Ok(())
    }

    /// Packed RGB at native resolution (`height × width × 3` bytes, no padding), rounded to u8.
    ///
    /// Chroma is replicated over its 2×2 block, as in [`ClipTensor`]. Used by tests and
    /// tools that want plain frames; training goes through [`ClipTensor`].
    pub fn to_rgb(&self, dst: &mut [u8]) -> Result<(), IngestError> {
        self.validate()?;
        let (w, h) = (self.width, self.height);
        if dst.len() != w * h * 3 {
            return Err(bad_frame(format!(
                "RGB buffer of {} bytes for {w}x{h}",
                dst.len()
            )));
        }
        self.convert(0..h, 0..w, w, dst);
        Ok(())
    }

    /// Packed RGB of the pixels at `rows × cols` (indices ascending; row stride `cols.len() × 3`
    /// bytes), each exactly as [`YuvFrame::to_rgb`] gives it: for a resize that reads only a
    /// few rows and columns of a large frame.
    pub fn to_rgb_at(
        &self,
        rows: &[usize],
        cols: &[usize],
        dst: &mut [u8],
    ) -> Result<(), IngestError> {
        self.validate()?;
        let (w, h) = (self.width, self.height);
        let inside = |set: &[usize], n: usize| set.iter().all(|&i| i < n);
        if !inside(rows, h) || !inside(cols, w) {
            return Err(bad_frame(format!(
                "pixels outside the {w}x{h} frame asked for"
            )));
        }
        if dst.len() != rows.len() * cols.len() * 3 {
            return Err(bad_frame(format!(
                "RGB buffer of {} bytes for {} rows of {} pixels",
                dst.len(),
                rows.len(),
                cols.len()
            )));
        }
        self.convert(rows.iter().copied(), cols.iter().copied(), cols.len(), dst);
        Ok(())
    }

    /// The conversion behind the `to_rgb*` methods; indices already checked.
    fn convert(
        &self,
        rows: impl Iterator<Item = usize>,
        cols: impl Iterator<Item = usize> + Clone,
        ncols: usize,
        dst: &mut [u8],
    ) {
        if ncols == 0 {
            return;
        }
        let m = self.colour.matrix();
        let [yp, up, vp] = self.planes;
        let [ys, us, vs] = self.strides;
        for (y, out) in rows.zip(dst.chunks_exact_mut(ncols * 3)) {
            let yrow = &yp[y * ys..];
            let (urow, vrow) = (&up[(y >> 1) * us..], &vp[(y >> 1) * vs..]);
            for (x, px) in cols.clone().zip(out.chunks_exact_mut(3)) {
                let rgb = m.rgb_u8(
                    f32::from(yrow[x]),
                    f32::from(urow[x >> 1]),
                    f32::from(vrow[x >> 1]),
                );
                for c in 0..3 {
                    px[c] = rgb[c] as u8;
                }
            }
        }
    }
}

fn bad_frame(detail: String) -> IngestError {
    IngestError::quarantine(
        QuarantineReason::DecodeError,
        format!("unusable frame: {detail}"),
    )
}

/// Bilinear taps of torch's `interpolate(mode="bilinear", align_corners=False)` along one axis:
/// output `o` reads input `i0, i1` with weights `w0, w1` at `(o + 0.5)·in/out − 0.5`, clamped.
fn taps(input: usize, output: usize) -> Vec<(usize, usize, f32, f32)> {
    let scale = input as f32 / output as f32;
    (0..output)
        .map(|o| {
            let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
            let i0 = (src.floor() as usize).min(input - 1);
            let l1 = (src - i0 as f32).clamp(0.0, 1.0);
            let i1 = if i0 + 1 < input { i0 + 1 } else { i0 };
            (i0, i1, 1.0 - l1, l1)
        })
        .collect()
}

/// Where a clip's frames go: crop box, output side, flip, normalisation (spec §1 transform).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipGeometry {
    /// Crop box top row, in frame pixels.
    pub top: usize,
    /// Crop box left column.
    pub left: usize,
    /// Crop box rows.
    pub height: usize,
    /// Crop box columns.
    pub width: usize,
    /// Output side `S` (the crop is resized to `S × S`).
    pub size: usize,
    /// Mirror horizontally (after resizing).
    pub flip: bool,
    /// Per-channel mean, in 0..255 units (spec: `255 · (0.485, 0.456, 0.406)`).
    pub mean: [f32; 3],
    /// Per-channel standard deviation, in 0..255 units (spec: `255 · (0.229, 0.224, 0.225)`).
    pub std: [f32; 3],
}

/// A clip tensor being filled frame by frame: f32 `[3, T, S, S]`, channel-major, normalised.
///
/// Each frame is cropped, resized (torch bilinear, `align_corners=False`, no antialias) and
/// colour-converted in one pass that converts only the crop's rows the output reads, so memory
/// is `O(T·S²)` whatever the input resolution.
pub struct ClipTensor {
    geometry: ClipGeometry,
    planes: ClipPlanes,
    /// Frame size the taps were computed for, and the taps.
    taps: Option<(usize, usize, Taps2d)>,
}

struct Taps2d {
    /// Per output row: frame rows (i0, i1) and weights (w0, w1).
    rows: Vec<(usize, usize, f32, f32)>,
    /// The crop's columns the output reads (relative to its left edge, ascending): a crop
    /// more than twice as wide as the output reads only two columns per output column, so
    /// only these are converted to RGB.
    used: Vec<usize>,
    /// Per output column (flip applied): positions in `used`, weights.
    cols: Vec<(usize, usize, f32, f32)>,
}

impl Taps2d {
    fn new(g: &ClipGeometry) -> Self {
        let rows = taps(g.height, g.size)
            .into_iter()
            .map(|(i0, i1, w0, w1)| (g.top + i0, g.top + i1, w0, w1))
            .collect();
        let mut cols = taps(g.width, g.size);
        if g.flip {
            cols.reverse();
        }
        let mut used: Vec<usize> = cols.iter().flat_map(|&(x0, x1, _, _)| [x0, x1]).collect();
        used.sort_unstable();
        used.dedup();
        let at = |x: usize| used.partition_point(|&u| u < x);
        let cols = cols
            .iter()
            .map(|&(x0, x1, b0, b1)| (at(x0), at(x1), b0, b1))
            .collect();
        Taps2d { rows, used, cols }
    }
}

impl ClipTensor {
    /// An empty clip of `frames` frames; fails if the output is empty or too large to allocate.
    pub fn new(geometry: ClipGeometry, frames: usize) -> Result<Self, IngestError> {
        check_std(&geometry.std)?;
        Ok(ClipTensor {
            geometry,
            planes: ClipPlanes::new(geometry.size, frames)?,
            taps: None,
        })
    }

    /// The geometry this clip was made with.
    pub fn geometry(&self) -> &ClipGeometry {
        &self.geometry
    }

    /// Writes frame `slot` (`0 ≤ slot < T`) from a decoded frame.
    ///
    /// The crop box must lie inside the frame (a mid-stream size change is a quarantine).
    pub fn put(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        frame.validate()?;
        self.planes.check_slot(slot)?;
        let g = self.geometry;
        let inside = g.height > 0
            && g.width > 0
            && g.top + g.height <= frame.height
            && g.left + g.width <= frame.width;
        if !inside {
            return Err(IngestError::quarantine(
                QuarantineReason::DecodeError,
                format!(
                    "crop {}x{}+{}+{} outside the {}x{} frame (size changed mid-stream?)",
                    g.width, g.height, g.left, g.top, frame.width, frame.height
                ),
            ));
        }
        let fresh =
            !matches!(&self.taps, Some((w, h, _)) if *w == frame.width && *h == frame.height);
        if fresh {
            self.taps = Some((frame.width, frame.height, Taps2d::new(&g)));
        }
        let Some((_, _, t2)) = &self.taps else {
            return Err(IngestError::Fatal("taps missing".into()));
        };
        let m = frame.colour.matrix();
        let (s, left) = (g.size, g.left);
        let cw = t2.used.len();
        let [yp, up, vp] = frame.planes;
        let [ys, us, vs] = frame.strides;
        let mut outs = self.planes.frame_mut(slot);
        // The used columns of one source row of the crop converted to RGB (planar), and two
        // horizontally resized rows cached by row parity: each output row reads rows i0 and
        // i1 ∈ {i0, i0 + 1}, and i0 never decreases. Every source pixel is converted at most
        // once per frame, and only where the output reads it.
        let mut conv = vec![0.0f32; 3 * cw];
        let mut cache = [vec![0.0f32; 3 * s], vec![0.0f32; 3 * s]];
        let mut tag = [usize::MAX; 2];
        for (oy, &(r0, r1, a0, a1)) in t2.rows.iter().enumerate() {
            for r in [r0, r1] {
                let parity = r & 1;
                if tag[parity] == r {
                    continue;
                }
                // As the reference RGB24 frame holds them: clamped, rounded, chroma replicated.
                let yrow = &yp[r * ys + left..r * ys + left + g.width];
                let (urow, vrow) = (&up[(r >> 1) * us..], &vp[(r >> 1) * vs..]);
                let (cr, rest) = conv.split_at_mut(cw);
                let (cg, cb) = rest.split_at_mut(cw);
                for (j, &x) in t2.used.iter().enumerate() {
                    let c = (left + x) >> 1;
                    let [pr, pg, pb] =
                        m.rgb_u8(f32::from(yrow[x]), f32::from(urow[c]), f32::from(vrow[c]));
                    cr[j] = pr;
                    cg[j] = pg;
                    cb[j] = pb;
                }
                let buf = &mut cache[parity];
                for c in 0..3 {
                    let src = &conv[c * cw..(c + 1) * cw];
                    let dst = &mut buf[c * s..(c + 1) * s];
                    for (d, &(x0, x1, b0, b1)) in dst.iter_mut().zip(&t2.cols) {
                        *d = b0 * src[x0] + b1 * src[x1];
                    }
                }
                tag[parity] = r;
            }
            // torch's order: h0 · (horizontal row i0) + h1 · (horizontal row i1).
            let (h0, h1) = (&cache[r0 & 1], &cache[r1 & 1]);
            for (c, out) in outs.iter_mut().enumerate() {
                let dst = &mut out[oy * s..(oy + 1) * s];
                let (p, q) = (&h0[c * s..(c + 1) * s], &h1[c * s..(c + 1) * s]);
                let (mean, std) = (g.mean[c], g.std[c]);
                for ((d, &x), &y) in dst.iter_mut().zip(p).zip(q) {
                    *d = (a0 * x + a1 * y - mean) / std;
                }
            }
        }
        Ok(())
    }

    /// Copies frame `from` into slot `to` (repeated indices, padding).
    pub fn copy_slot(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        self.planes.copy_slot(from, to)
    }

    /// Whether every slot has been written.
    pub fn is_complete(&self) -> bool {
        self.planes.is_complete()
    }

    /// The tensor, `[3, T, S, S]` f32.
    pub fn into_data(self) -> Vec<f32> {
        self.planes.into_data()
    }
}

/// Refuses a normalisation std that would divide by zero or carry a NaN.
pub(crate) fn check_std(std: &[f32; 3]) -> Result<(), IngestError> {
    if std.iter().any(|&v| v == 0.0 || !v.is_finite()) {
        return Err(IngestError::Fatal(format!("bad normalisation std {std:?}")));
    }
    Ok(())
}

/// The `[3, T, S, S]` f32 buffer a clip is written into frame by frame, and which frames are
/// written: shared by the training crop ([`ClipTensor`]) and the evaluation views
/// ([`crate::ViewTensor`]).
pub(crate) struct ClipPlanes {
    plane: usize,
    frames: usize,
    data: Vec<f32>,
    filled: Vec<bool>,
}

impl ClipPlanes {
    /// `frames` frames of `size × size`; fails if that is empty or too large to allocate.
    pub(crate) fn new(size: usize, frames: usize) -> Result<Self, IngestError> {
        let len = size
            .checked_mul(size)
            .and_then(|x| x.checked_mul(frames))
            .and_then(|x| x.checked_mul(3))
            .filter(|&n| n > 0)
            .ok_or_else(|| {
                IngestError::Fatal(format!("bad clip shape: {frames} frames of {size}²"))
            })?;
        Ok(ClipPlanes {
            plane: size * size,
            frames,
            data: vec![0.0; len],
            filled: vec![false; frames],
        })
    }

    /// Refuses a slot past the clip's frames.
    pub(crate) fn check_slot(&self, slot: usize) -> Result<(), IngestError> {
        if slot >= self.frames {
            return Err(IngestError::Fatal(format!(
                "frame slot {slot} out of {}",
                self.frames
            )));
        }
        Ok(())
    }

    /// The R, G and B planes of frame `slot` (checked by [`ClipPlanes::check_slot`]), which
    /// counts as written.
    pub(crate) fn frame_mut(&mut self, slot: usize) -> [&mut [f32]; 3] {
        self.filled[slot] = true;
        let (plane, t) = (self.plane, self.frames);
        let (r_all, rest) = self.data.split_at_mut(t * plane);
        let (g_all, b_all) = rest.split_at_mut(t * plane);
        let base = slot * plane;
        [
            &mut r_all[base..base + plane],
            &mut g_all[base..base + plane],
            &mut b_all[base..base + plane],
        ]
    }

    pub(crate) fn copy_slot(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        if from >= self.frames || to >= self.frames || !self.filled[from] {
            return Err(IngestError::Fatal(format!(
                "cannot copy frame slot {from} to {to} of {}",
                self.frames
            )));
        }
        let plane = self.plane;
        for c in 0..3 {
            let src = (c * self.frames + from) * plane;
            let dst = (c * self.frames + to) * plane;
            self.data.copy_within(src..src + plane, dst);
        }
        self.filled[to] = true;
        Ok(())
    }

    pub(crate) fn is_complete(&self) -> bool {
        self.filled.iter().all(|&f| f)
    }

    pub(crate) fn into_data(self) -> Vec<f32> {
        self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A frame with smooth but non-trivial content in all three planes.
    fn planes(w: usize, h: usize, stride_pad: usize) -> (Vec<u8>, Vec<u8>, Vec<u8>, [usize; 3]) {
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let (ys, cs) = (w + stride_pad, cw + stride_pad);
        let mut y = vec![0u8; ys * h];
        let mut u = vec![0u8; cs * ch];
        let mut v = vec![0u8; cs * ch];
        for r in 0..h {
            for c in 0..w {
                y[r * ys + c] = (16 + (r * 7 + c * 3) % 220) as u8;
            }
        }
        for r in 0..ch {
            for c in 0..cw {
                u[r * cs + c] = (64 + (r * 5 + c * 11) % 128) as u8;
                v[r * cs + c] = (200 - (r * 3 + c * 2) % 150) as u8;
            }
        }
        (y, u, v, [ys, cs, cs])
    }

    #[test]
    fn grey_and_primaries_convert_exactly() {
        let m = Colour::BT601.matrix();
        // Limited-range black, white, mid grey.
        assert_eq!(m.rgb(16.0, 128.0, 128.0), [0.0, 0.0, 0.0]);
        let w = m.rgb(235.0, 128.0, 128.0);
        assert!(w.iter().all(|&c| (c - 255.0).abs() < 1e-3), "{w:?}");
        // BT.709 red (limited): Y=63, Cb=102, Cr=240 → about (255, 0, 0).
        let r = Colour::BT709.matrix().rgb(63.0, 102.0, 240.0);
        assert!(
            (r[0] - 255.0).abs() < 2.0 && r[1] < 2.0 && r[2] < 2.0,
            "{r:?}"
        );
        // Full range keeps 0..255.
        let f = Colour {
            full_range: true,
            ..Colour::BT601
        }
        .matrix();
        assert_eq!(f.rgb(0.0, 128.0, 128.0), [0.0, 0.0, 0.0]);
        assert_eq!(f.rgb(255.0, 128.0, 128.0), [255.0, 255.0, 255.0]);
    }

    #[test]
    fn identity_geometry_equals_native_rgb() {
        // Resizing a full-frame crop to its own size touches luma 1:1, so the tensor must equal
        // the native RGB conversion up to its u8 rounding.
        let (w, h) = (12, 12);
        let (y, u, v, strides) = planes(w, h, 3);
        let frame = YuvFrame {
            width: w,
            height: h,
            planes: [&y, &u, &v],
            strides,
            colour: Colour::BT709,
        };
        let mut rgb = vec![0u8; w * h * 3];
        frame.to_rgb(&mut rgb).unwrap();
        let g = ClipGeometry {
            top: 0,
            left: 0,
            height: h,
            width: w,
            size: w,
            flip: false,
            mean: [0.0; 3],
            std: [1.0; 3],
        };
        let mut clip = ClipTensor::new(g, 2).unwrap();
        clip.put(1, &frame).unwrap();
        clip.copy_slot(1, 0).unwrap();
        assert!(clip.is_complete());
        let data = clip.into_data();
        for c in 0..3 {
            for t in 0..2 {
                for p in 0..w * h {
                    let ours = data[(c * 2 + t) * w * h + p];
                    let want = f32::from(rgb[p * 3 + c]);
                    assert!(
                        (ours - want).abs() <= 0.5 + 1e-3,
                        "c{c} p{p}: {ours} vs {want}"
                    );
                }
            }
        }
    }

    #[test]
    fn flip_mirrors_and_crop_stays_inside() {
        let (w, h) = (9, 7); // odd sizes: chroma planes are 5x4
        let (y, u, v, strides) = planes(w, h, 0);
        let frame = YuvFrame {
            width: w,
            height: h,
            planes: [&y, &u, &v],
            strides,
            colour: Colour::BT601,
        };
        let mk = |flip| ClipGeometry {
            top: 1,
            left: 2,
            height: 6,
            width: 7,
            size: 5,
            flip,
            mean: [10.0, 20.0, 30.0],
            std: [2.0, 3.0, 4.0],
        };
        let mut a = ClipTensor::new(mk(false), 1).unwrap();
        let mut b = ClipTensor::new(mk(true), 1).unwrap();
        a.put(0, &frame).unwrap();
        b.put(0, &frame).unwrap();
        let (a, b) = (a.into_data(), b.into_data());
        for c in 0..3 {
            for r in 0..5 {
                for x in 0..5 {
                    assert_eq!(a[c * 25 + r * 5 + x], b[c * 25 + r * 5 + (4 - x)]);
                }
            }
        }
        // A crop that does not fit is refused, not read out of bounds.
        let mut bad = ClipTensor::new(
            ClipGeometry {
                top: 2,
                height: 6,
                ..mk(false)
            },
            1,
        )
        .unwrap();
        assert!(bad.put(0, &frame).is_err());
        // Short planes are refused.
        let short = YuvFrame {
            planes: [&y[..10], &u, &v],
            ..frame
        };
        assert!(short.validate().is_err());
    }

    /// Timing, not a check: `cargo test --release -p vjepa-ingest --lib clip_tensor_timing -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn clip_tensor_timing() {
        let (w, h) = (640, 360);
        let (y, u, v, strides) = planes(w, h, 0);
        let frame = YuvFrame {
            width: w,
            height: h,
            planes: [&y, &u, &v],
            strides,
            colour: Colour::BT601,
        };
        let g = ClipGeometry {
            top: 10,
            left: 50,
            height: 300,
            width: 400,
            size: 224,
            flip: true,
            mean: [123.7, 116.3, 103.5],
            std: [58.4, 57.1, 57.4],
        };
        let mut clip = ClipTensor::new(g, 16).unwrap();
        let reps = 20;
        let start = std::time::Instant::now();
        for _ in 0..reps {
            for slot in 0..16 {
                clip.put(slot, &frame).unwrap();
            }
        }
        let ms = start.elapsed().as_secs_f64() * 1e3 / f64::from(reps);
        println!("clip tensor: {ms:.2} ms per 16-frame 224x224 clip from 640x360");
    }
}
