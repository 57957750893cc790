//! The official frozen evaluation's training transform (spec §9), as `vjepa probe --augment
//! official` applies it to each train clip: RandAugment on the decoded frames at full
//! resolution, a random resized crop to the input size (no flip), then random erasing on the
//! normalised clip. Drawn in that order from one generator, as the official `VideoTransform`.

use rand::Rng;

use crate::erasing::RandomErasing;
use crate::randaugment::RandAugment;
use crate::transform::{self, AugmentConfig, TransformError, TransformParams};

/// The official frozen evaluation's training transform (spec §9), drawn per clip: RandAugment
/// on the decoded frames, a random resized crop to the input size, random erasing.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct TrainAugment {
    pub rand_augment: RandAugment,
    /// Crop area and aspect ranges (the output side is the input size).
    pub crop: AugmentConfig,
    pub erasing: RandomErasing,
}

impl TrainAugment {
    /// `rand-m7-n4-mstd0.5-inc1` (bicubic), crop scale (0.08, 1) and aspect (3/4, 4/3), no
    /// flip, erasing with probability 0.25.
    pub fn official(size: usize) -> Self {
        TrainAugment {
            rand_augment: RandAugment::official(),
            crop: AugmentConfig {
                scale: (0.08, 1.0),
                aspect_ratio: (0.75, 4.0 / 3.0),
                crop_size: size,
            },
            erasing: RandomErasing::official(),
        }
    }

    /// One clip: `frames` (`t` packed RGB frames of `height × width`) augmented in place,
    /// then cropped, resized and normalised to `[3, t, S, S]`, then erased; the crop drawn.
    pub fn clip(
        &self,
        frames: &mut [u8],
        t: usize,
        height: usize,
        width: usize,
        rng: &mut impl Rng,
    ) -> Result<(Vec<f32>, TransformParams), TransformError> {
        self.rand_augment.apply(frames, t, height, width, rng);
        let mut params = transform::sample_params(height, width, &self.crop, rng)?;
        params.flip = false;
        let size = self.crop.crop_size;
        let mut data = transform::apply(frames, t, height, width, &params, size)?;
        self.erasing.apply(&mut data, t, size, rng);
        Ok((data, params))
    }
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
            rand_augment: RandAugment {
                num_ops: 0,
                ..RandAugment::official()
            },
            crop: AugmentConfig {
                scale: (1.0, 1.0),
                aspect_ratio: (40.0 / 30.0, 40.0 / 30.0),
                crop_size: 16,
            },
            erasing: RandomErasing {
                probability: 0.0,
                ..RandomErasing::official()
            },
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
