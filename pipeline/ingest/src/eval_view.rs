//! The official evaluation's spatial views, exactly: each frame resized as a whole with
//! OpenCV's bilinear resize on 8-bit RGB (the short side to `S`, or to `int(S·256/224)` for a
//! single view), then `S × S` crops cut out of the resized frame at whole-pixel offsets, then
//! `/255` and normalised in f32 (spec §9; `EvalVideoTransform` and the evaluation branch of
//! `VideoTransform`).
//!
//! Resizing the whole frame and cropping after is not the same as resizing a crop box: the
//! sample positions differ by a fraction of a pixel, and the 8-bit rounding of the resized
//! frame is part of the official input. Only the output pixels of each view are computed, from
//! the source pixels they read ([`Cv2Linear::resize_gathered`]: about two rows and columns per
//! output row and column), each converted once from I420.

use crate::cv2_resize::Cv2Linear;
use crate::error::{IngestError, QuarantineReason};
use crate::frame::{ClipPlanes, YuvFrame, check_std};

/// One evaluation view: the size the whole frame is resized to and where the `size × size`
/// crop sits in the resized frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct EvalView {
    /// The decoded frame's rows and columns the view was made for.
    pub source: (usize, usize),
    /// Resized frame rows and columns (the source size when the official code skips the
    /// resize: its short side already is the target).
    pub resized: (usize, usize),
    /// Crop top row and left column in the resized frame.
    pub top: usize,
    pub left: usize,
    /// Output side `S`.
    pub size: usize,
}

impl EvalView {
    /// The region of the source frame the view covers, rounded to whole pixels, as
    /// (top, left, height, width): the view's box scaled back by the short side's factor.
    /// What a features table records as the view's crop.
    pub fn source_region(&self) -> (usize, usize, usize, usize) {
        let short = self.source.0.min(self.source.1).max(1);
        let scale = short as f64 / self.resized.0.min(self.resized.1).max(1) as f64;
        let side = ((self.size as f64 * scale).round_ties_even() as usize).clamp(1, short);
        let at = |offset: usize, extent: usize| {
            ((offset as f64 * scale).round() as usize).min(extent.saturating_sub(side))
        };
        (
            at(self.top, self.source.0),
            at(self.left, self.source.1),
            side,
            side,
        )
    }
}

/// The frame size after `resize_clip(clip, short)`: the short side becomes `short`, the long
/// side `int(short · long / short_side)` (Python's float division, truncated). A frame whose
/// short side already is `short` is left as it is.
pub fn resized_size(height: usize, width: usize, short: usize) -> (usize, usize) {
    if (width <= height && width == short) || (height <= width && height == short) {
        return (height, width);
    }
    let scaled = |long: usize, side: usize| ((short * long) as f64 / side.max(1) as f64) as usize;
    if width < height {
        (scaled(height, width), short)
    } else {
        (short, scaled(width, height))
    }
}

/// The official evaluation's views of a `height × width` video at output side `size`.
///
/// * One view: resize the short side to `int(size·256/224)`, then the centre `size × size`
///   crop (`CenterCrop`: offsets `int(round((extent − size)/2))`, ties to even).
/// * `views ≥ 2`: resize the short side to `size`, then crops at `k · ((long − size) //
///   (views − 1))` along the long side (columns when the frame is not taller than wide).
pub fn eval_views(height: usize, width: usize, size: usize, views: usize) -> Vec<EvalView> {
    if views <= 1 {
        let short = size * 256 / 224;
        let (h, w) = resized_size(height, width, short);
        let centre = |extent: usize| (extent.saturating_sub(size) as f64 / 2.0).round_ties_even();
        return vec![EvalView {
            source: (height, width),
            resized: (h, w),
            top: centre(h) as usize,
            left: centre(w) as usize,
            size,
        }];
    }
    let (h, w) = resized_size(height, width, size);
    let step = h.max(w).saturating_sub(size) / (views - 1);
    (0..views)
        .map(|k| {
            let start = k * step;
            let (top, left) = if h > w { (start, 0) } else { (0, start) };
            EvalView {
                source: (height, width),
                resized: (h, w),
                top,
                left,
                size,
            }
        })
        .collect()
}

/// `ClipToTensor` then `Normalize` for one channel, per 8-bit value: `(u / 255 − mean) / std`
/// in f32, each operation rounded as torch rounds it.
fn normalise_table(mean: f32, std: f32) -> [f32; 256] {
    std::array::from_fn(|u| (u as f32 / 255.0 - mean) / std)
}

/// One view's clip being filled frame by frame: f32 `[3, T, S, S]`, channel-major, normalised
/// as the official evaluation normalises (ImageNet mean and std after `/255`).
pub struct ViewTensor {
    view: EvalView,
    planes: ClipPlanes,
    tables: [[f32; 256]; 3],
    resize: Cv2Linear,
    /// The source rows and columns the view reads (ascending): only these are converted.
    rows: Vec<usize>,
    cols: Vec<usize>,
    /// Scratch: the gathered source pixels in RGB, and the view in RGB.
    gathered: Vec<u8>,
    pixels: Vec<u8>,
}

impl ViewTensor {
    /// An empty clip of `frames` frames of `view`, normalised with `mean` and `std` (0..1
    /// units, e.g. ImageNet's `(0.485, 0.456, 0.406)`, `(0.229, 0.224, 0.225)`).
    pub fn new(
        view: EvalView,
        frames: usize,
        mean: [f32; 3],
        std: [f32; 3],
    ) -> Result<Self, IngestError> {
        let s = view.size;
        let planes = ClipPlanes::new(s, frames)?;
        let fits = view.source.0 > 0
            && view.source.1 > 0
            && view.top + s <= view.resized.0
            && view.left + s <= view.resized.1;
        if !fits {
            return Err(IngestError::Fatal(format!(
                "view {s}² at ({}, {}) outside the {}x{} resized frame",
                view.top, view.left, view.resized.1, view.resized.0
            )));
        }
        check_std(&std)?;
        let resize = Cv2Linear::new(view.source.0, view.source.1, view.resized.0, view.resized.1);
        let (rows, cols) = resize.used(view.top, view.left, s, s);
        Ok(ViewTensor {
            view,
            planes,
            tables: std::array::from_fn(|c| normalise_table(mean[c], std[c])),
            resize,
            rows,
            cols,
            gathered: Vec::new(),
            pixels: vec![0; s * s * 3],
        })
    }

    /// Writes frame `slot` (`0 ≤ slot < T`) from a decoded frame.
    pub fn put(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        frame.validate()?;
        self.planes.check_slot(slot)?;
        if (frame.height, frame.width) != self.view.source {
            return Err(IngestError::quarantine(
                QuarantineReason::DecodeError,
                format!(
                    "a {}x{} frame in a {}x{} video (size changed mid-stream?)",
                    frame.width, frame.height, self.view.source.1, self.view.source.0
                ),
            ));
        }
        let EvalView {
            top, left, size: s, ..
        } = self.view;
        let mut gathered = std::mem::take(&mut self.gathered);
        gathered.resize(self.rows.len() * self.cols.len() * 3, 0);
        frame.to_rgb_at(&self.rows, &self.cols, &mut gathered)?;
        self.resize.resize_gathered(
            &gathered,
            &self.rows,
            &self.cols,
            top,
            left,
            s,
            s,
            &mut self.pixels,
        );
        self.gathered = gathered;
        self.normalise(slot);
        Ok(())
    }

    /// Writes frame `slot` from a whole packed RGB frame (tests: the reference path).
    #[cfg(test)]
    fn fill(&mut self, slot: usize, rgb: &[u8], stride: usize, origin: (usize, usize)) {
        let EvalView {
            top, left, size: s, ..
        } = self.view;
        self.resize
            .resize_region(rgb, stride, origin, top, left, s, s, &mut self.pixels);
        self.normalise(slot);
    }

    /// The view's 8-bit pixels, normalised into frame `slot`.
    fn normalise(&mut self, slot: usize) {
        let outs = self.planes.frame_mut(slot);
        for ((out, table), c) in outs.into_iter().zip(&self.tables).zip(0..) {
            for (d, px) in out.iter_mut().zip(self.pixels.chunks_exact(3)) {
                *d = table[usize::from(px[c])];
            }
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::frame::Colour;

    const MEAN: [f32; 3] = [0.485, 0.456, 0.406];
    const STD: [f32; 3] = [0.229, 0.224, 0.225];

    fn u32_at(b: &[u8], at: &mut usize) -> usize {
        let v = u32::from_le_bytes(b[*at..*at + 4].try_into().expect("4 bytes"));
        *at += 4;
        v as usize
    }

    /// Every view of every golden case equals, to the bit, what OpenCV and torch make of the
    /// same frame (`tools/reference/make_eval_view_golden.py`).
    #[test]
    fn views_equal_opencv_and_torch() {
        let blob = include_bytes!("../tests/goldens/eval_views.bin");
        assert_eq!(&blob[..4], b"EVG1");
        let mut at = 4;
        let cases = u32_at(blob, &mut at);
        assert_eq!(cases, 10);
        for _ in 0..cases {
            let (h, w) = (u32_at(blob, &mut at), u32_at(blob, &mut at));
            let (s, views) = (u32_at(blob, &mut at), u32_at(blob, &mut at));
            let frame = &blob[at..at + h * w * 3];
            at += h * w * 3;
            let made = eval_views(h, w, s, views);
            assert_eq!(made.len(), views);
            for (k, view) in made.into_iter().enumerate() {
                let n = 3 * s * s;
                let want: Vec<f32> = blob[at..at + 4 * n]
                    .chunks_exact(4)
                    .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                    .collect();
                at += 4 * n;
                let mut t = ViewTensor::new(view, 1, MEAN, STD).expect("view");
                t.fill(0, frame, w * 3, (0, 0));
                let got = t.into_data();
                let differ = got
                    .iter()
                    .zip(&want)
                    .filter(|(a, b)| a.to_bits() != b.to_bits())
                    .count();
                assert_eq!(differ, 0, "{h}x{w} S {s}, view {k} of {views}: {view:?}");
            }
        }
        assert_eq!(at, blob.len());
    }

    #[test]
    fn view_geometry_follows_the_official_transforms() {
        // Several views: short side to S, crops at k · ((long − S) // (views − 1)).
        let v = eval_views(240, 320, 224, 3);
        assert_eq!(v[0].resized, (224, 298));
        let lefts: Vec<usize> = v.iter().map(|v| v.left).collect();
        assert_eq!(lefts, [0, 37, 74]);
        assert!(v.iter().all(|v| v.top == 0 && v.source == (240, 320)));
        // Portrait: along the rows.
        let v = eval_views(320, 240, 224, 3);
        assert_eq!(v[2].resized, (298, 224));
        assert_eq!((v[2].top, v[2].left), (74, 0));
        // The short side already at S: no resize.
        assert_eq!(eval_views(224, 400, 224, 2)[1].resized, (224, 400));
        assert_eq!(eval_views(224, 400, 224, 2)[1].left, 176);
        // One view: short side to int(S·256/224) = 256, centre crop, Python's round.
        let v = eval_views(240, 320, 224, 1);
        assert_eq!(v.len(), 1);
        assert_eq!(v[0].resized, (256, 341));
        assert_eq!((v[0].top, v[0].left), (16, 58));
        // (27 − 24) / 2 = 1.5 rounds to 2; (43 − 28) / 2 = 7.5 rounds to 8.
        assert_eq!((eval_views(33, 33, 24, 1)[0].top), 2);
        assert_eq!(eval_views(30, 41, 28, 1)[0].resized, (32, 43));
        assert_eq!(eval_views(30, 41, 28, 1)[0].left, 8);
        assert_eq!(resized_size(1080, 1920, 224), (224, 398));
        assert_eq!(resized_size(1920, 1080, 256), (455, 256));
    }

    fn yuv(w: usize, h: usize, seed: u64) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let mut x = seed;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        };
        let (cw, ch) = (w.div_ceil(2), h.div_ceil(2));
        let y = (0..w * h).map(|_| next()).collect();
        let u = (0..cw * ch).map(|_| next()).collect();
        let v = (0..cw * ch).map(|_| next()).collect();
        (y, u, v)
    }

    /// A tightly packed BT.601 I420 frame over the planes of [`yuv`].
    fn bt601<'a>(y: &'a [u8], u: &'a [u8], v: &'a [u8], w: usize, h: usize) -> YuvFrame<'a> {
        let cw = w.div_ceil(2);
        YuvFrame {
            width: w,
            height: h,
            planes: [y, u, v],
            strides: [w, cw, cw],
            colour: Colour::BT601,
        }
    }

    /// From I420, only the view's source window is converted: the result is the one of the
    /// whole frame converted to RGB first.
    #[test]
    fn from_i420_equals_whole_rgb_frame() {
        for (h, w, s, views) in [(90, 160, 32, 3), (161, 97, 40, 1), (50, 50, 64, 2)] {
            let (y, u, v) = yuv(w, h, (h * w) as u64);
            let frame = bt601(&y, &u, &v, w, h);
            let mut rgb = vec![0u8; h * w * 3];
            frame.to_rgb(&mut rgb).expect("rgb");
            for view in eval_views(h, w, s, views) {
                let mut a = ViewTensor::new(view, 2, MEAN, STD).expect("view");
                a.put(1, &frame).expect("put");
                a.copy_slot(1, 0).expect("copy");
                assert!(a.is_complete());
                let mut b = ViewTensor::new(view, 2, MEAN, STD).expect("view");
                b.fill(0, &rgb, w * 3, (0, 0));
                b.fill(1, &rgb, w * 3, (0, 0));
                assert_eq!(a.into_data(), b.into_data(), "{h}x{w} {view:?}");
            }
            // A frame of another size is a quarantine, not a silently other view.
            let mut t =
                ViewTensor::new(eval_views(h + 2, w, s, views)[0], 1, MEAN, STD).expect("view");
            assert!(matches!(
                t.put(0, &frame),
                Err(IngestError::Quarantine { .. })
            ));
        }
    }

    /// Timing, not a check: `cargo test --release -p vjepa-ingest --lib view_tensor_timing --
    /// --ignored --nocapture`. The evaluation views of 16 frames, against the training crop
    /// ([`crate::ClipTensor`]) of the same output size, at three input sizes.
    #[test]
    #[ignore]
    fn view_tensor_timing() {
        for (w, h) in [(640, 360), (1920, 1080), (3840, 2160)] {
            let (y, u, v) = yuv(w, h, 3);
            let frame = bt601(&y, &u, &v, w, h);
            let time = |put: &mut dyn FnMut()| {
                let reps = 5;
                let start = std::time::Instant::now();
                for _ in 0..reps {
                    put();
                }
                start.elapsed().as_secs_f64() * 1e3 / f64::from(reps)
            };
            let views = eval_views(h, w, 224, 3);
            let mut tensors: Vec<ViewTensor> = views
                .iter()
                .map(|&v| ViewTensor::new(v, 16, MEAN, STD).expect("view"))
                .collect();
            let three = time(&mut || {
                for t in &mut tensors {
                    for slot in 0..16 {
                        t.put(slot, &frame).expect("put");
                    }
                }
            });
            let g = crate::ClipGeometry {
                top: 0,
                left: 0,
                height: h,
                width: h,
                size: 224,
                flip: false,
                mean: [123.7, 116.3, 103.5],
                std: [58.4, 57.1, 57.4],
            };
            let mut crop = crate::ClipTensor::new(g, 16).expect("clip");
            let one = time(&mut || {
                for slot in 0..16 {
                    crop.put(slot, &frame).expect("put");
                }
            });
            println!(
                "{w}x{h}: 3 evaluation views {three:.1} ms per 16 frames; one training crop of the short side {one:.1} ms"
            );
        }
    }
}
