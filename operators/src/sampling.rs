//! Frame-index sampling for pretraining clips (spec §1, "Frame index sampling").
//!
//! One clip per video (`num_clips = 1`): a window of `frames_per_clip * frame_step` source
//! frames is placed at a random end position and `frames_per_clip` indices are spread over it
//! with numpy `linspace` semantics (so the spacing is `clip_len / (fpc - 1)`, not exactly
//! `frame_step`). Videos no longer than the window take the "short video" branch: indices spread
//! over the whole video, padded with the last frame.

use rand::Rng;
use thiserror::Error;

/// Errors for clip-sampling inputs that admit no valid index list.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
pub enum SamplingError {
    /// The video has no frames, so there is nothing to index.
    #[error("video has no frames")]
    EmptyVideo,
    /// `frames_per_clip` or `frame_step` is zero.
    #[error("invalid clip sampling: frames_per_clip={frames_per_clip}, frame_step={frame_step}")]
    InvalidSampling {
        /// Configured frames per clip.
        frames_per_clip: usize,
        /// Configured frame step.
        frame_step: usize,
    },
}

/// How many frames a clip has and the nominal stride between them (16 and 4 in every
/// pretraining config).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ClipSampling {
    /// Frames in one clip (16).
    pub frames_per_clip: usize,
    /// Nominal source-frame stride (4); the window spans `frames_per_clip * frame_step` frames.
    pub frame_step: usize,
}

impl ClipSampling {
    /// The pretraining setting: 16 frames, step 4 (64-frame window).
    pub const PRETRAIN: ClipSampling = ClipSampling {
        frames_per_clip: 16,
        frame_step: 4,
    };

    /// Source frames covered by one clip window (`fpc * step`, 64).
    pub fn clip_len(&self) -> u64 {
        self.frames_per_clip as u64 * self.frame_step as u64
    }

    fn validate(&self) -> Result<(), SamplingError> {
        if self.frames_per_clip == 0 || self.frame_step == 0 {
            return Err(SamplingError::InvalidSampling {
                frames_per_clip: self.frames_per_clip,
                frame_step: self.frame_step,
            });
        }
        Ok(())
    }
}

impl Default for ClipSampling {
    fn default() -> Self {
        Self::PRETRAIN
    }
}

/// numpy `linspace(a, b, n)` with `endpoint=True`, in f64 like numpy: `step = (b-a)/(n-1)`,
/// value `a + i*step`, last element exactly `b`; `n == 1` gives `[a]`, `n == 0` gives `[]`.
pub fn linspace(a: f64, b: f64, n: usize) -> Vec<f64> {
    match n {
        0 => Vec::new(),
        1 => vec![a],
        _ => {
            let step = (b - a) / (n - 1) as f64;
            let mut v: Vec<f64> = (0..n).map(|i| a + i as f64 * step).collect();
            v[n - 1] = b;
            v
        }
    }
}

/// numpy `clip(x, lo, hi).astype(int64)` for the non-negative values used here (truncation
/// equals floor). Like numpy, `hi` wins when `lo > hi`.
fn clip_floor(x: f64, lo: u64, hi: u64) -> u64 {
    let c = x.max(lo as f64).min(hi as f64);
    // c >= 0 here (lo, hi are u64), so the cast is a floor.
    c as u64
}

/// The deterministic part of the long branch: `fpc` indices `floor(linspace(start, end, fpc))`
/// clipped to `[start, end-1]` (the last index is `end - 1`). If `end <= start` every index is
/// `start`.
pub fn window_indices(start: u64, end: u64, fpc: usize) -> Vec<u64> {
    if end <= start {
        return vec![start; fpc];
    }
    linspace(start as f64, end as f64, fpc)
        .into_iter()
        .map(|x| clip_floor(x, start, end - 1))
        .collect()
}

/// The short-video branch (`num_frames <= fpc * step`): `k = num_frames / step`,
/// `floor(linspace(0, L, k))` followed by `fpc - k` copies of `L`, all clipped to `[0, L-1]`.
/// Spreads the clip over the whole video and pads with the last frame (k = 0 ⇒ all last frame).
/// `k` is capped at `fpc`, so longer videos passed here get `floor(linspace(0, L, fpc))`.
pub fn short_video_indices(num_frames: u64, s: ClipSampling) -> Result<Vec<u64>, SamplingError> {
    s.validate()?;
    if num_frames == 0 {
        return Err(SamplingError::EmptyVideo);
    }
    let fpc = s.frames_per_clip;
    let k = usize::try_from(num_frames / s.frame_step as u64)
        .unwrap_or(usize::MAX)
        .min(fpc);
    let l = num_frames as f64;
    let mut out: Vec<u64> = linspace(0.0, l, k)
        .into_iter()
        .map(|x| clip_floor(x, 0, num_frames - 1))
        .collect();
    out.resize(fpc, num_frames - 1);
    Ok(out)
}

/// The spec's pretraining rule for a video of `num_frames` frames, returning `fpc` frame indices.
///
/// Long branch (`L > clip_len`): `end ~ UniformInt[clip_len, L-1]` (one draw from `rng`),
/// `start = end - clip_len`, then [`window_indices`]. Short branch (`L <= clip_len`):
/// [`short_video_indices`], no random draw.
pub fn pretrain_indices(
    num_frames: u64,
    s: ClipSampling,
    rng: &mut impl Rng,
) -> Result<Vec<u64>, SamplingError> {
    s.validate()?;
    if num_frames == 0 {
        return Err(SamplingError::EmptyVideo);
    }
    let clip_len = s.clip_len();
    if num_frames > clip_len {
        let end = rng.random_range(clip_len..num_frames);
        let start = end - clip_len;
        Ok(window_indices(start, end, s.frames_per_clip))
    } else {
        short_video_indices(num_frames, s)
    }
}

/// The evaluation's frame indices (spec §9; the loader's `allow_clip_overlap` branch): the
/// video's `L` frames are split into `segments` partitions of `L / segments` frames, one clip each.
///
/// * Partition longer than the clip window (`fpc * step`): a window ending at
///   `end ~ UniformInt[clip_len, partition_len - 1]` (one draw from `rng` per segment; with
///   `random_window == false` the first window, `end = clip_len`) inside each partition,
///   [`window_indices`], shifted by `i * partition_len`.
/// * Otherwise (clips may overlap): `sample_len = min(clip_len, L) - 1`, `k = sample_len / step`,
///   `floor(linspace(0, sample_len, k))` then `fpc - k` copies of `sample_len`, all clipped to
///   `[0, sample_len - 1]` (the official clip bound: the last frame of the window is never read),
///   shifted by `i * ((L - clip_len) / (segments - 1))` when `L > clip_len`, else unshifted. A
///   one-frame video gives frame 0 everywhere (the official `-1` index reads that frame).
pub fn eval_segment_indices(
    num_frames: u64,
    s: ClipSampling,
    segments: usize,
    random_window: bool,
    rng: &mut impl Rng,
) -> Result<Vec<Vec<u64>>, SamplingError> {
    s.validate()?;
    if num_frames == 0 {
        return Err(SamplingError::EmptyVideo);
    }
    let segments = segments.max(1);
    let fpc = s.frames_per_clip;
    let clip_len = s.clip_len();
    let partition_len = num_frames / segments as u64;
    let mut out = Vec::with_capacity(segments);
    for i in 0..segments as u64 {
        if partition_len > clip_len {
            let end = if random_window {
                rng.random_range(clip_len..partition_len)
            } else {
                clip_len
            };
            let offset = i * partition_len;
            out.push(
                window_indices(end - clip_len, end, fpc)
                    .into_iter()
                    .map(|x| x + offset)
                    .collect(),
            );
        } else {
            let sample_len = clip_len.min(num_frames) - 1;
            if sample_len == 0 {
                out.push(vec![0; fpc]);
                continue;
            }
            let k = usize::try_from(sample_len / s.frame_step as u64)
                .unwrap_or(usize::MAX)
                .min(fpc);
            let mut idx: Vec<u64> = linspace(0.0, sample_len as f64, k)
                .into_iter()
                .map(|x| clip_floor(x, 0, sample_len - 1))
                .collect();
            idx.resize(fpc, sample_len - 1);
            let shift = if num_frames > clip_len && segments > 1 {
                i * ((num_frames - clip_len) / (segments as u64 - 1))
            } else {
                0
            };
            out.push(idx.into_iter().map(|x| x + shift).collect());
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::seeding::{Stream, rng_for};

    const S: ClipSampling = ClipSampling::PRETRAIN;

    #[test]
    fn linspace_numpy() {
        assert!(linspace(0.0, 1.0, 0).is_empty());
        assert_eq!(linspace(3.0, 9.0, 1), vec![3.0]);
        assert_eq!(linspace(0.0, 4.0, 5), vec![0.0, 1.0, 2.0, 3.0, 4.0]);
        let v = linspace(0.0, 64.0, 16);
        assert_eq!(v[15], 64.0);
        assert!((v[1] - 64.0 / 15.0).abs() < 1e-12);
    }

    #[test]
    fn spec_example_start_zero() {
        assert_eq!(
            window_indices(0, 64, 16),
            vec![0, 4, 8, 12, 17, 21, 25, 29, 34, 38, 42, 46, 51, 55, 59, 63]
        );
        // Translation invariance of the window for integer starts.
        let w: Vec<u64> = window_indices(100, 164, 16)
            .iter()
            .map(|x| x - 100)
            .collect();
        assert_eq!(w, window_indices(0, 64, 16));
    }

    #[test]
    fn short_branch_examples() {
        // L = 40: k = 10, linspace(0, 40, 10) step 4.444.., last clipped to 39, then 6 x 39.
        assert_eq!(
            short_video_indices(40, S).unwrap(),
            vec![0, 4, 8, 13, 17, 22, 26, 31, 35, 39, 39, 39, 39, 39, 39, 39]
        );
        // L = 3: k = 0 ⇒ 16 copies of the last frame.
        assert_eq!(short_video_indices(3, S).unwrap(), vec![2; 16]);
        // L = 1.
        assert_eq!(short_video_indices(1, S).unwrap(), vec![0; 16]);
        // L = 64 is still the short branch: linspace(0, 64, 16) clipped to 63, no draw.
        let mut rng = rng_for(0, Stream::Clip, 0);
        let a = pretrain_indices(64, S, &mut rng).unwrap();
        assert_eq!(a, window_indices(0, 64, 16));
        assert_eq!(a, short_video_indices(64, S).unwrap());
        // L = 7: k = 1 ⇒ [0] then 15 x 6.
        let mut want = vec![0];
        want.extend([6; 15]);
        assert_eq!(short_video_indices(7, S).unwrap(), want);
    }

    #[test]
    fn long_branch_range() {
        for &len in &[65u64, 66, 100, 301, 10_000] {
            let mut rng = rng_for(7, Stream::Clip, len);
            let mut min_start = u64::MAX;
            let mut max_last = 0;
            for _ in 0..2000 {
                let idx = pretrain_indices(len, S, &mut rng).unwrap();
                assert_eq!(idx.len(), 16);
                assert!(idx.windows(2).all(|w| w[0] <= w[1]));
                let start = idx[0];
                assert_eq!(idx[15], start + 63);
                assert!(idx[15] < len - 1, "end <= L-1 ⇒ last index <= L-2");
                let rel: Vec<u64> = idx.iter().map(|x| x - start).collect();
                assert_eq!(rel, window_indices(0, 64, 16));
                min_start = min_start.min(start);
                max_last = max_last.max(idx[15]);
            }
            // Both extremes of end ∈ [64, L-1] are reachable for small L.
            if len <= 100 {
                assert_eq!(min_start, 0);
                assert_eq!(max_last, len - 2);
            }
        }
    }

    #[test]
    fn invalid_inputs() {
        let mut rng = rng_for(0, Stream::Clip, 0);
        assert_eq!(
            pretrain_indices(0, S, &mut rng),
            Err(SamplingError::EmptyVideo)
        );
        let bad = ClipSampling {
            frames_per_clip: 16,
            frame_step: 0,
        };
        assert!(matches!(
            pretrain_indices(10, bad, &mut rng),
            Err(SamplingError::InvalidSampling { .. })
        ));
        assert_eq!(window_indices(5, 5, 3), vec![5, 5, 5]);
    }

    #[test]
    fn deterministic_for_same_stream() {
        let a = pretrain_indices(500, S, &mut rng_for(1, Stream::Clip, 9)).unwrap();
        let b = pretrain_indices(500, S, &mut rng_for(1, Stream::Clip, 9)).unwrap();
        assert_eq!(a, b);
    }

    #[test]
    fn eval_segments_match_the_official_loader() {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(1);
        // 300 frames, 2 segments of 150 > 64: first windows (no random draw) in each.
        let fixed = eval_segment_indices(300, S, 2, false, &mut rng).unwrap();
        assert_eq!(fixed[0], window_indices(0, 64, 16));
        assert_eq!(fixed[1], window_indices(150, 214, 16));
        // Random windows stay inside their partition.
        for _ in 0..50 {
            let r = eval_segment_indices(300, S, 2, true, &mut rng).unwrap();
            assert!(r[0][0] < 150 - 64 && r[0][15] < 150);
            assert!(r[1][0] >= 150 && r[1][15] < 300);
        }
        // 100 frames, 2 segments of 50 <= 64 (overlap): sample_len 63, k 15, clip to 62,
        // second segment shifted by (100 - 64) / 1 = 36. numpy:
        // np.clip(np.concatenate((np.linspace(0, 63, 15), [63])), 0, 62).astype(int)
        let first = vec![0, 4, 9, 13, 18, 22, 27, 31, 36, 40, 45, 49, 54, 58, 62, 62];
        let o = eval_segment_indices(100, S, 2, true, &mut rng).unwrap();
        assert_eq!(o[0], first);
        assert_eq!(o[1], first.iter().map(|x| x + 36).collect::<Vec<_>>());
        // A 10-frame video: sample_len 9, k 2 ⇒ [0, 8 (9 clipped)] then 8s; unshifted.
        let short = eval_segment_indices(10, S, 3, true, &mut rng).unwrap();
        assert_eq!(short.len(), 3);
        assert_eq!(short[0][..3], [0, 8, 8]);
        assert_eq!(short[2], short[0]);
        assert_eq!(
            eval_segment_indices(1, S, 2, true, &mut rng).unwrap()[1],
            vec![0; 16]
        );
    }
}
