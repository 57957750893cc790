//! The official `VideoTransform`'s augmentations beyond the plain crop and flip, drawn per
//! clip from one generator in its order: RandAugment on the decoded frames at full resolution,
//! a random resized crop to the input size (one box, or with motion shift two boxes
//! interpolated over the frames), a horizontal flip, then random erasing on the normalised
//! clip. Two presets: the frozen evaluation's training transform (spec §9, `vjepa probe
//! --augment official`) and pretraining's `data_aug` options (`auto_augment`, `motion_shift`,
//! `reprob`), which the released pretraining configs leave off.

use rand::Rng;

use crate::erasing::RandomErasing;
use crate::randaugment::RandAugment;
use crate::transform::{self, AugmentConfig, CropBox, TransformError, TransformParams};

/// One clip's augmentation, as the official `VideoTransform` draws it.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainAugment {
    /// RandAugment on the decoded frames (`None`: off).
    pub rand_augment: Option<RandAugment>,
    /// Crop area and aspect ranges (the output side is the input size).
    pub crop: AugmentConfig,
    /// Motion shift: a second box is drawn for the last frame and the frames between get
    /// boxes linearly interpolated between the two (the official
    /// `random_resized_crop_with_shift`).
    pub motion_shift: bool,
    /// A horizontal flip of the whole clip with probability ½.
    pub flip: bool,
    /// Random erasing of the normalised clip (`None`: off).
    pub erasing: Option<RandomErasing>,
}

impl TrainAugment {
    /// The official frozen evaluation's training transform: `rand-m7-n4-mstd0.5-inc1`
    /// (bicubic), crop scale (0.08, 1) and aspect (3/4, 4/3), no flip, erasing with
    /// probability 0.25.
    pub fn official(size: usize) -> Self {
        TrainAugment {
            rand_augment: Some(RandAugment::official()),
            crop: AugmentConfig {
                scale: (0.08, 1.0),
                aspect_ratio: (0.75, 4.0 / 3.0),
                crop_size: size,
            },
            motion_shift: false,
            flip: false,
            erasing: Some(RandomErasing::official()),
        }
    }

    /// Pretraining's transform with the `data_aug` options: the crop ranges and the flip as
    /// always, plus RandAugment (`auto_augment`), motion shift and random erasing with
    /// probability `reprob` (0: off).
    pub fn pretrain(
        crop: AugmentConfig,
        auto_augment: bool,
        motion_shift: bool,
        reprob: f64,
    ) -> Self {
        TrainAugment {
            rand_augment: auto_augment.then(RandAugment::official),
            crop,
            motion_shift,
            flip: true,
            erasing: (reprob > 0.0).then(|| RandomErasing {
                probability: reprob,
                ..RandomErasing::official()
            }),
        }
    }

    /// One clip: `frames` (`t` packed RGB frames of `height × width`) augmented in place, then
    /// cropped, resized, flipped and normalised to `[3, t, S, S]`, then erased. Returns the
    /// clip and its parameters (with motion shift, the first frame's box).
    pub fn clip(
        &self,
        frames: &mut [u8],
        t: usize,
        height: usize,
        width: usize,
        rng: &mut impl Rng,
    ) -> Result<(Vec<f32>, TransformParams), TransformError> {
        if let Some(ra) = &self.rand_augment {
            ra.apply(frames, t, height, width, rng);
        }
        let size = self.crop.crop_size;
        let (mut data, params) = if self.motion_shift {
            let first = transform::sample_crop(height, width, &self.crop, rng)?;
            let last = transform::sample_crop(height, width, &self.crop, rng)?;
            let flip = self.flip && rng.random::<f64>() < 0.5;
            let boxes = shifted_boxes(first, last, t);
            let data = crop_each_frame(frames, t, height, width, &boxes, flip, size)?;
            (data, TransformParams { crop: first, flip })
        } else {
            // The flip coin is drawn either way (the evaluation's preset discards it).
            let mut params = transform::sample_params(height, width, &self.crop, rng)?;
            params.flip &= self.flip;
            let data = transform::apply(frames, t, height, width, &params, size)?;
            (data, params)
        };
        if let Some(erasing) = &self.erasing {
            erasing.apply(&mut data, t, size, rng);
        }
        Ok((data, params))
    }
}

/// The per-frame boxes of a motion shift from `first` to `last` over `t` frames: each of
/// top, left, height and width as `int(torch.linspace(a, b, t))` (float32, truncated), as the
/// official `random_resized_crop_with_shift`.
pub fn shifted_boxes(first: CropBox, last: CropBox, t: usize) -> Vec<CropBox> {
    let line = |a: usize, b: usize| linspace_f32(a as f32, b as f32, t);
    let (top, left) = (line(first.top, last.top), line(first.left, last.left));
    let (height, width) = (
        line(first.height, last.height),
        line(first.width, last.width),
    );
    (0..t)
        .map(|k| CropBox {
            top: top[k] as usize,
            left: left[k] as usize,
            height: height[k] as usize,
            width: width[k] as usize,
        })
        .collect()
}

/// `torch.linspace(a, b, steps)` in float32 as torch's CPU kernel computes it: the first half
/// `a + step·i`, the second half `b − step·(steps − 1 − i)`, `step = (b − a) / (steps − 1)`.
fn linspace_f32(a: f32, b: f32, steps: usize) -> Vec<f32> {
    if steps <= 1 {
        return vec![a; steps];
    }
    let step = (b - a) / (steps - 1) as f32;
    let half = steps / 2;
    (0..steps)
        .map(|i| {
            if i < half {
                a + step * i as f32
            } else {
                b - step * (steps - 1 - i) as f32
            }
        })
        .collect()
}

/// Frame `k` cropped to `boxes[k]`, resized to `size × size` (bilinear, as the one-box
/// crop), flipped when `flip`, normalised: `[3, t, S, S]`.
fn crop_each_frame(
    frames: &[u8],
    t: usize,
    height: usize,
    width: usize,
    boxes: &[CropBox],
    flip: bool,
    size: usize,
) -> Result<Vec<f32>, TransformError> {
    let len = height * width * 3;
    if frames.len() != t * len || boxes.len() != t {
        return Err(TransformError::BadLength {
            got: frames.len(),
            expected: t * len,
        });
    }
    let plane = size * size;
    let mut out = vec![0f32; 3 * t * plane];
    for (k, (crop, frame)) in boxes.iter().zip(frames.chunks_exact(len)).enumerate() {
        // Float rounding in the lines could reach a row or column past the frame: the slice
        // then ends at the frame's edge, as a torch slice does.
        let crop = CropBox {
            height: crop.height.min(height.saturating_sub(crop.top)).max(1),
            width: crop.width.min(width.saturating_sub(crop.left)).max(1),
            ..*crop
        };
        let one = transform::apply(
            frame,
            1,
            height,
            width,
            &TransformParams { crop, flip },
            size,
        )?;
        for c in 0..3 {
            out[(c * t + k) * plane..(c * t + k + 1) * plane]
                .copy_from_slice(&one[c * plane..(c + 1) * plane]);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    /// A 3-frame clip of 30×40 frames with structure in every channel.
    fn frames() -> Vec<u8> {
        let mut f = Vec::new();
        for t in 0..3 {
            for y in 0..30 {
                for x in 0..40 {
                    f.extend_from_slice(&[(5 * x + t) as u8, (7 * y) as u8, (x * y % 251) as u8]);
                }
            }
        }
        f
    }

    /// `int(torch.linspace(a, b, 16))` as torch 2.15 gives it, where a running sum
    /// `a + i·step` would end one short.
    #[test]
    fn box_lines_follow_torch_linspace() {
        let cases: [(usize, usize, [usize; 16]); 3] = [
            (
                998,
                21,
                [
                    998, 932, 867, 802, 737, 672, 607, 542, 476, 411, 346, 281, 216, 151, 86, 21,
                ],
            ),
            (
                133,
                8,
                [
                    133, 124, 116, 108, 99, 91, 83, 74, 66, 58, 49, 41, 33, 24, 16, 8,
                ],
            ),
            (
                706,
                210,
                [
                    706, 672, 639, 606, 573, 540, 507, 474, 441, 408, 375, 342, 309, 276, 243, 210,
                ],
            ),
        ];
        for (a, b, want) in cases {
            let got: Vec<usize> = linspace_f32(a as f32, b as f32, 16)
                .into_iter()
                .map(|v| v as usize)
                .collect();
            assert_eq!(got, want, "{a} → {b}");
        }
        assert_eq!(linspace_f32(5.0, 9.0, 1), vec![5.0]);
        let (first, last) = (
            CropBox {
                top: 0,
                left: 10,
                height: 20,
                width: 30,
            },
            CropBox {
                top: 6,
                left: 1,
                height: 14,
                width: 30,
            },
        );
        let boxes = shifted_boxes(first, last, 4);
        assert_eq!((boxes[0], boxes[3]), (first, last));
        assert_eq!(
            boxes[1],
            CropBox {
                top: 2,
                left: 7,
                height: 18,
                width: 30
            }
        );
    }

    /// Motion shift crops each frame with its own box: with the same box for every frame it is
    /// the one-box crop, flip included; with moving boxes each frame is its own crop.
    #[test]
    fn each_frame_gets_its_own_box() {
        let f = frames();
        let crop = CropBox {
            top: 3,
            left: 5,
            height: 20,
            width: 24,
        };
        for flip in [false, true] {
            let params = TransformParams { crop, flip };
            let one = transform::apply(&f, 3, 30, 40, &params, 8).unwrap();
            let each = crop_each_frame(&f, 3, 30, 40, &[crop; 3], flip, 8).unwrap();
            assert_eq!(each, one, "flip {flip}");
        }
        let moving = [
            crop,
            CropBox { top: 0, ..crop },
            CropBox {
                left: 16,
                width: 24,
                ..crop
            },
        ];
        let each = crop_each_frame(&f, 3, 30, 40, &moving, false, 8).unwrap();
        let len = 30 * 40 * 3;
        for (k, b) in moving.iter().enumerate() {
            let params = TransformParams {
                crop: *b,
                flip: false,
            };
            let one = transform::apply(&f[k * len..(k + 1) * len], 1, 30, 40, &params, 8).unwrap();
            for c in 0..3 {
                assert_eq!(
                    &each[(c * 3 + k) * 64..(c * 3 + k + 1) * 64],
                    &one[c * 64..(c + 1) * 64],
                    "frame {k} channel {c}"
                );
            }
        }
        assert!(crop_each_frame(&f[1..], 3, 30, 40, &moving, false, 8).is_err());
    }

    /// Pretraining's preset: off, it is the plain pretraining transform (crop and flip drawn
    /// as `sample_params` draws them); on, it flips about half the clips, erases every clip
    /// with `reprob` 1, and with motion shift moves the box from the first frame to the last.
    #[test]
    fn the_pretraining_options() {
        let crop = AugmentConfig {
            scale: (0.3, 1.0),
            aspect_ratio: (0.75, 1.35),
            crop_size: 8,
        };
        let off = TrainAugment::pretrain(crop, false, false, 0.0);
        assert_eq!((off.rand_augment, off.erasing), (None, None));
        for seed in 0..8 {
            let mut f = frames();
            let (got, params) = off
                .clip(&mut f, 3, 30, 40, &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            let want_params =
                transform::sample_params(30, 40, &crop, &mut ChaCha8Rng::seed_from_u64(seed))
                    .unwrap();
            assert_eq!(params, want_params);
            assert_eq!(
                got,
                transform::apply(&frames(), 3, 30, 40, &params, 8).unwrap()
            );
        }

        let all = TrainAugment::pretrain(crop, true, true, 1.0);
        assert!(all.rand_augment.is_some() && all.motion_shift && all.flip);
        let mut flips = 0;
        let mut moved = 0;
        for seed in 0..40 {
            let mut f = frames();
            let (data, params) = all
                .clip(&mut f, 3, 30, 40, &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            assert_eq!(data.len(), 3 * 3 * 64);
            assert!(data.iter().all(|v| v.is_finite()));
            flips += usize::from(params.flip);
            // The first box, then the last: redraw them to see the shift.
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            RandAugment::official().draw(&mut rng);
            let first = transform::sample_crop(30, 40, &crop, &mut rng).unwrap();
            let last = transform::sample_crop(30, 40, &crop, &mut rng).unwrap();
            assert_eq!(params.crop, first);
            moved += usize::from(first != last);
        }
        assert!((10..=30).contains(&flips), "{flips} of 40 flipped");
        assert!(moved > 30, "{moved}");

        // reprob 1: every clip erased (a box of standard-normal noise, where the plain clip
        // has the normalised frame values).
        let erase = TrainAugment::pretrain(crop, false, false, 1.0);
        for seed in 0..5 {
            let mut f = frames();
            let (data, params) = erase
                .clip(&mut f, 3, 30, 40, &mut ChaCha8Rng::seed_from_u64(seed))
                .unwrap();
            let plain = transform::apply(&frames(), 3, 30, 40, &params, 8).unwrap();
            assert_ne!(data, plain, "seed {seed}: erased");
        }
    }

    #[test]
    fn the_training_transform_is_seeded_and_reduces_to_the_plain_crop() {
        let aug = TrainAugment::official(16);
        let run = |seed: u64| {
            let mut f = frames();
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            aug.clip(&mut f, 3, 30, 40, &mut rng).unwrap()
        };
        let (a, pa) = run(1);
        assert_eq!(a.len(), 3 * 3 * 16 * 16);
        assert!(a.iter().all(|v| v.is_finite()));
        assert!(!pa.flip, "the evaluation's transform has no flip");
        let c = pa.crop;
        assert!(c.top + c.height <= 30 && c.left + c.width <= 40);
        assert_eq!(run(1), (a.clone(), pa), "same seed, same clip");
        let differs = (2..6).filter(|&s| run(s).0 != a).count();
        assert_eq!(differs, 4, "other seeds draw other clips");

        // With nothing drawn (no operations, no erasing, the whole frame kept) it is the
        // plain crop-resize-normalise of the frames.
        let plain = TrainAugment {
            rand_augment: Some(RandAugment {
                num_ops: 0,
                ..RandAugment::official()
            }),
            crop: AugmentConfig {
                scale: (1.0, 1.0),
                aspect_ratio: (40.0 / 30.0, 40.0 / 30.0),
                crop_size: 16,
            },
            motion_shift: false,
            flip: false,
            erasing: Some(RandomErasing {
                probability: 0.0,
                ..RandomErasing::official()
            }),
        };
        let mut f = frames();
        let mut rng = ChaCha8Rng::seed_from_u64(9);
        let (got, params) = plain.clip(&mut f, 3, 30, 40, &mut rng).unwrap();
        assert_eq!(
            (
                params.crop.top,
                params.crop.left,
                params.crop.height,
                params.crop.width
            ),
            (0, 0, 30, 40)
        );
        let want = transform::apply(&frames(), 3, 30, 40, &params, 16).unwrap();
        assert_eq!(got, want);
    }
}
