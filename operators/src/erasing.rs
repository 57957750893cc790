//! Random erasing as the official frozen evaluation applies it to a training clip (spec §9:
//! probability 0.25, pixel mode, one box): on the normalised, cropped clip, one box drawn
//! for the whole clip (timm's `cube` variant, the default of the official copy) and filled
//! in every frame with its own standard-normal noise.

use rand::Rng;

use crate::transform::{py_round, uniform};

/// timm's `RandomErasing(probability, mode='pixel', max_count=1)` with the default area and
/// aspect ranges.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RandomErasing {
    /// Probability a clip gets a box.
    pub probability: f64,
    /// Box area as a share of the frame, `(0.02, 1/3)`.
    pub area: (f64, f64),
    /// Box aspect (h/w) range, sampled log-uniformly: `(0.3, 1/0.3)`.
    pub aspect: (f64, f64),
}

/// Box tries before a clip is left unerased (the cube variant's 100).
const TRIES: usize = 100;

/// Where a box was drawn, in output pixels.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ErasedBox {
    pub top: usize,
    pub left: usize,
    pub height: usize,
    pub width: usize,
}

impl RandomErasing {
    /// The official evaluation's `RandomErasing(0.25, mode='pixel', max_count=1)`.
    pub fn official() -> Self {
        RandomErasing {
            probability: 0.25,
            area: (0.02, 1.0 / 3.0),
            aspect: (0.3, 1.0 / 0.3),
        }
    }

    /// Draws the clip's box, in timm's order: the coin (`random() > p` skips), then up to
    /// 100 tries of `area = U(area)·H·W`, `aspect = exp(U(ln lo, ln hi))`,
    /// `h = round(√(area·aspect))`, `w = round(√(area/aspect))`, accepted when `w < W` and
    /// `h < H`, placed at `top = randint(0, H − h)`, `left = randint(0, W − w)`.
    pub fn draw(&self, height: usize, width: usize, rng: &mut impl Rng) -> Option<ErasedBox> {
        if rng.random::<f64>() > self.probability {
            return None;
        }
        let area = (height * width) as f64;
        let log_aspect = (self.aspect.0.ln(), self.aspect.1.ln());
        for _ in 0..TRIES {
            let target = uniform(rng, self.area.0, self.area.1) * area;
            let aspect = uniform(rng, log_aspect.0, log_aspect.1).exp();
            let h = py_round((target * aspect).sqrt());
            let w = py_round((target / aspect).sqrt());
            if w < width && h < height {
                let top = rng.random_range(0..=height - h);
                let left = rng.random_range(0..=width - w);
                return Some(ErasedBox {
                    top,
                    left,
                    height: h,
                    width: w,
                });
            }
        }
        None
    }

    /// Draws a box for the clip `data` (`[3, T, S, S]` f32, normalised) and fills it in every
    /// frame and channel with standard-normal values; returns the box.
    pub fn apply(
        &self,
        data: &mut [f32],
        frames: usize,
        size: usize,
        rng: &mut impl Rng,
    ) -> Option<ErasedBox> {
        let b = self.draw(size, size, rng)?;
        let plane = size * size;
        let mut normal = Normals::default();
        for c in 0..3 {
            for t in 0..frames {
                let base = (c * frames + t) * plane;
                for y in b.top..b.top + b.height {
                    let row = base + y * size;
                    for v in &mut data[row + b.left..row + b.left + b.width] {
                        *v = normal.next(rng) as f32;
                    }
                }
            }
        }
        Some(b)
    }
}

/// Standard-normal draws, two per Box–Muller pair of uniforms.
#[derive(Default)]
pub(crate) struct Normals {
    spare: Option<f64>,
}

impl Normals {
    pub(crate) fn next(&mut self, rng: &mut impl Rng) -> f64 {
        if let Some(v) = self.spare.take() {
            return v;
        }
        let u1: f64 = 1.0 - rng.random::<f64>(); // (0, 1]: ln stays finite
        let u2: f64 = rng.random();
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f64::consts::TAU * u2).sin_cos();
        self.spare = Some(r * s);
        r * c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn a_quarter_of_clips_get_one_box_of_the_drawn_size() {
        let e = RandomErasing::official();
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut hits = 0;
        for _ in 0..4000 {
            if let Some(b) = e.draw(224, 224, &mut rng) {
                hits += 1;
                let share = (b.height * b.width) as f64 / (224.0 * 224.0);
                assert!((0.015..0.36).contains(&share), "{share}");
                assert!(b.top + b.height <= 224 && b.left + b.width <= 224);
            }
        }
        assert!((900..1100).contains(&hits), "{hits} of 4000");
    }

    #[test]
    fn the_box_is_the_same_in_every_frame_and_the_rest_is_untouched() {
        let e = RandomErasing {
            probability: 1.0,
            ..RandomErasing::official()
        };
        let (t, s) = (3, 16);
        let mut data = vec![7.0f32; 3 * t * s * s];
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let b = e
            .apply(&mut data, t, s, &mut rng)
            .expect("probability 1 draws a box");
        let inside = |y: usize, x: usize| {
            (b.top..b.top + b.height).contains(&y) && (b.left..b.left + b.width).contains(&x)
        };
        let mut noise = Vec::new();
        for c in 0..3 {
            for f in 0..t {
                for y in 0..s {
                    for x in 0..s {
                        let v = data[((c * t + f) * s + y) * s + x];
                        if inside(y, x) {
                            noise.push(f64::from(v));
                        } else {
                            assert_eq!(v, 7.0);
                        }
                    }
                }
            }
        }
        // Standard-normal fill, fresh per frame (not one frame's noise repeated).
        let n = noise.len() as f64;
        let mean = noise.iter().sum::<f64>() / n;
        let var = noise.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / n;
        assert!(
            mean.abs() < 0.3 && (0.6..1.4).contains(&var),
            "{mean} {var}"
        );
        let per_frame = noise.len() / (3 * t);
        assert_ne!(noise[..per_frame], noise[per_frame..2 * per_frame]);
    }
}
