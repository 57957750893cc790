//! Which video the n-th clip of the run comes from.
//!
//! Uniform mixing (spec §1, the official default): like `DistributedSampler(shuffle=True)`,
//! every epoch over the catalog is a fresh permutation, so each video is used once per epoch;
//! unlike it, the permutation is a pure function of (seed, catalog key, epoch), so the sequence
//! does not depend on worker or process counts. Weighted mixing (`datasets_weights`): each clip
//! independently picks dataset d with probability w_d (over the non-empty datasets) and then a
//! video of d uniformly, i.e. per-video weight w_d / n_d as in the official code.

use rand::Rng;
use rand::seq::SliceRandom;
use thiserror::Error;

use crate::seeding::{Stream, rng_for_sub};

/// How clips are spread over datasets (spec §1).
#[derive(Clone, Debug, PartialEq)]
pub enum Mixing {
    /// Uniform over videos: each dataset contributes in proportion to its size.
    Uniform,
    /// One non-negative weight per dataset (`data.datasets_weights`).
    Weighted(Vec<f64>),
}

/// A catalog version that cannot be drawn from.
#[derive(Clone, Debug, Error, PartialEq)]
pub enum SamplerError {
    /// No videos at all.
    #[error("the catalog is empty: no videos to draw from")]
    Empty,
    /// `datasets_weights` does not have one weight per dataset.
    #[error("{weights} dataset weights for {datasets} datasets")]
    WeightCount { weights: usize, datasets: usize },
    /// Weights must be finite and non-negative.
    #[error("dataset weights must be finite and non-negative: {0:?}")]
    BadWeight(Vec<f64>),
    /// Every dataset with a positive weight is empty in this catalog version.
    #[error("every dataset with a positive weight is empty (counts {0:?})")]
    NoWeightedVideos(Vec<usize>),
}

/// The draws of one catalog version. Videos are numbered `0..len` with dataset `d`'s
/// `counts[d]` videos contiguous, datasets in order. `key` names the version's contents, so two
/// versions with the same videos draw the same sequence and different ones draw unrelated ones.
#[derive(Clone, Debug)]
pub struct VersionDraws {
    seed: u64,
    key: u64,
    counts: Vec<usize>,
    offsets: Vec<usize>,
    order: VideoOrder,
    /// Weighted mode: cumulative dataset probabilities (empty datasets get none).
    cumulative: Option<Vec<f64>>,
}

impl VersionDraws {
    /// Draws over `counts[d]` videos per dataset with `mixing`.
    pub fn new(
        seed: u64,
        key: u64,
        counts: Vec<usize>,
        mixing: &Mixing,
    ) -> Result<Self, SamplerError> {
        let total: usize = counts.iter().sum();
        if total == 0 {
            return Err(SamplerError::Empty);
        }
        let mut offsets = Vec::with_capacity(counts.len());
        let mut at = 0;
        for c in &counts {
            offsets.push(at);
            at += c;
        }
        let cumulative = match mixing {
            Mixing::Uniform => None,
            Mixing::Weighted(w) => {
                if w.len() != counts.len() {
                    return Err(SamplerError::WeightCount {
                        weights: w.len(),
                        datasets: counts.len(),
                    });
                }
                if w.iter().any(|x| !x.is_finite() || *x < 0.0) {
                    return Err(SamplerError::BadWeight(w.clone()));
                }
                // Datasets that are empty in this version cannot be drawn: the others share
                // their weight in proportion (renormalised).
                let live: Vec<f64> = w
                    .iter()
                    .zip(&counts)
                    .map(|(w, &n)| if n > 0 { *w } else { 0.0 })
                    .collect();
                let sum: f64 = live.iter().sum();
                if sum <= 0.0 {
                    return Err(SamplerError::NoWeightedVideos(counts.clone()));
                }
                let mut acc = 0.0;
                Some(
                    live.iter()
                        .map(|x| {
                            acc += x / sum;
                            acc
                        })
                        .collect(),
                )
            }
        };
        Ok(VersionDraws {
            seed,
            key,
            order: VideoOrder::keyed(total, seed, key),
            counts,
            offsets,
            cumulative,
        })
    }

    /// Number of videos in the version.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// Always false: an empty version is refused by [`VersionDraws::new`].
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }

    /// Probability that a clip comes from each dataset.
    pub fn dataset_probabilities(&self) -> Vec<f64> {
        match &self.cumulative {
            Some(cum) => {
                let mut prev = 0.0;
                cum.iter()
                    .map(|c| {
                        let p = c - prev;
                        prev = *c;
                        p
                    })
                    .collect()
            }
            None => {
                let total = self.len() as f64;
                self.counts.iter().map(|&n| n as f64 / total).collect()
            }
        }
    }

    /// The video of global clip number `index` (its first choice).
    pub fn video_for(&mut self, index: u64) -> usize {
        if self.cumulative.is_some() {
            let mut rng = rng_for_sub(self.seed, Stream::Mix, index, self.key);
            self.weighted(&mut rng)
        } else {
            self.order.video_for(index).unwrap_or(0)
        }
    }

    /// A replacement for a first choice that could not be used, drawn from `rng` with the same
    /// mixing.
    pub fn replacement<R: Rng>(&self, rng: &mut R) -> usize {
        if self.cumulative.is_some() {
            self.weighted(rng)
        } else {
            rng.random_range(0..self.len())
        }
    }

    fn weighted<R: Rng>(&self, rng: &mut R) -> usize {
        let cum = self.cumulative.as_deref().unwrap_or(&[]);
        let u: f64 = rng.random();
        // The last non-empty dataset takes any rounding remainder of the cumulative sum.
        let last = self.counts.iter().rposition(|&n| n > 0).unwrap_or(0);
        let d = cum
            .iter()
            .zip(&self.counts)
            .position(|(&c, &n)| n > 0 && u < c)
            .unwrap_or(last);
        self.offsets[d] + rng.random_range(0..self.counts[d])
    }
}

/// Deterministic epoch-wise shuffled order over `len` videos.
#[derive(Clone, Debug)]
pub struct VideoOrder {
    len: usize,
    seed: u64,
    key: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl VideoOrder {
    /// An order over `len` videos; `len` must be positive to draw from it.
    pub fn new(len: usize, seed: u64) -> Self {
        Self::keyed(len, seed, 0)
    }

    /// An order whose permutations also depend on `key` (the catalog version's contents).
    pub fn keyed(len: usize, seed: u64, key: u64) -> Self {
        VideoOrder {
            len,
            seed,
            key,
            cached: None,
        }
    }

    /// Number of videos ordered.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when there is nothing to draw.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The video index for global clip number `index`, or `None` for an empty catalog.
    pub fn video_for(&mut self, index: u64) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        let epoch = index / self.len as u64;
        let pos = (index % self.len as u64) as usize;
        let stale = self.cached.as_ref().is_none_or(|(e, _)| *e != epoch);
        if stale {
            let mut perm: Vec<usize> = (0..self.len).collect();
            perm.shuffle(&mut rng_for_sub(self.seed, Stream::Order, epoch, self.key));
            self.cached = Some((epoch, perm));
        }
        self.cached.as_ref().map(|(_, perm)| perm[pos])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_epoch_is_a_permutation() {
        let mut order = VideoOrder::new(7, 1);
        for epoch in 0..3u64 {
            let mut seen: Vec<usize> = (0..7)
                .map(|i| order.video_for(epoch * 7 + i).unwrap())
                .collect();
            seen.sort();
            assert_eq!(seen, (0..7).collect::<Vec<_>>());
        }
    }

    #[test]
    fn order_is_a_function_of_seed_and_index() {
        let mut a = VideoOrder::new(50, 3);
        let mut b = VideoOrder::new(50, 3);
        let fwd: Vec<_> = (0..200).map(|i| a.video_for(i)).collect();
        let back: Vec<_> = (0..200).rev().map(|i| b.video_for(i)).collect();
        assert_eq!(fwd, back.into_iter().rev().collect::<Vec<_>>());
        let mut c = VideoOrder::new(50, 4);
        assert_ne!(fwd, (0..200).map(|i| c.video_for(i)).collect::<Vec<_>>());
        assert_eq!(VideoOrder::new(0, 1).video_for(0), None);
        let mut k = VideoOrder::keyed(50, 3, 9);
        assert_ne!(fwd, (0..200).map(|i| k.video_for(i)).collect::<Vec<_>>());
    }

    fn dataset_of(counts: &[usize], video: usize) -> usize {
        let mut at = 0;
        for (d, n) in counts.iter().enumerate() {
            at += n;
            if video < at {
                return d;
            }
        }
        panic!("video {video} beyond {counts:?}");
    }

    #[test]
    fn weighted_mixing_follows_the_weights_not_the_sizes() {
        // Sizes 10 / 1000 / 300 (one tiny dataset) with weights 0.5 / 0.2 / 0.3: the tiny
        // dataset gives half the clips; within a dataset, videos are drawn uniformly.
        let counts = vec![10, 1000, 300];
        let weights = vec![0.5, 0.2, 0.3];
        let mut draws =
            VersionDraws::new(7, 1, counts.clone(), &Mixing::Weighted(weights.clone())).unwrap();
        let n = 100_000u64;
        let mut per_dataset = [0u64; 3];
        let mut per_video_small = [0u64; 10];
        for g in 0..n {
            let v = draws.video_for(g);
            let d = dataset_of(&counts, v);
            per_dataset[d] += 1;
            if d == 0 {
                per_video_small[v] += 1;
            }
        }
        for (d, w) in weights.iter().enumerate() {
            let p = per_dataset[d] as f64 / n as f64;
            assert!((p - w).abs() < 0.01, "dataset {d}: {p} vs weight {w}");
        }
        // Per-video weight w_d / n_d: each of the 10 small videos gets ~5 % of all clips.
        for (v, &c) in per_video_small.iter().enumerate() {
            let p = c as f64 / n as f64;
            assert!((p - 0.05).abs() < 0.005, "video {v}: {p}");
        }
        // Replacements follow the same mixing.
        let mut rng = rng_for_sub(7, Stream::Clip, 0, 0);
        let mut small = 0u64;
        for _ in 0..20_000 {
            if dataset_of(&counts, draws.replacement(&mut rng)) == 0 {
                small += 1;
            }
        }
        assert!((small as f64 / 20_000.0 - 0.5).abs() < 0.02, "{small}");
        // Deterministic in (seed, key, index).
        let mut again =
            VersionDraws::new(7, 1, counts.clone(), &Mixing::Weighted(weights.clone())).unwrap();
        assert!((0..500).all(|g| again.video_for(g) == draws.video_for(g)));
        let mut other = VersionDraws::new(7, 2, counts, &Mixing::Weighted(weights)).unwrap();
        assert!((0..500).any(|g| other.video_for(g) != draws.video_for(g)));
    }

    #[test]
    fn weights_renormalise_over_non_empty_datasets() {
        let counts = vec![0, 40, 60];
        let mut draws = VersionDraws::new(
            1,
            0,
            counts.clone(),
            &Mixing::Weighted(vec![0.5, 0.25, 0.0]),
        )
        .unwrap();
        assert_eq!(draws.dataset_probabilities(), vec![0.0, 1.0, 0.0]);
        assert!((0..2000).all(|g| dataset_of(&counts, draws.video_for(g)) == 1));
        assert_eq!(
            VersionDraws::new(1, 0, vec![5, 0], &Mixing::Weighted(vec![0.0, 1.0])).unwrap_err(),
            SamplerError::NoWeightedVideos(vec![5, 0])
        );
        assert_eq!(
            VersionDraws::new(1, 0, vec![5], &Mixing::Weighted(vec![0.5, 0.5])).unwrap_err(),
            SamplerError::WeightCount {
                weights: 2,
                datasets: 1
            }
        );
        assert_eq!(
            VersionDraws::new(1, 0, vec![0, 0], &Mixing::Uniform).unwrap_err(),
            SamplerError::Empty
        );
    }

    #[test]
    fn uniform_mixing_is_proportional_to_size() {
        let counts = vec![30, 70];
        let mut draws = VersionDraws::new(5, 3, counts.clone(), &Mixing::Uniform).unwrap();
        assert_eq!(draws.dataset_probabilities(), vec![0.3, 0.7]);
        // Each epoch of 100 clips uses every video once.
        let mut seen: Vec<usize> = (100..200).map(|g| draws.video_for(g)).collect();
        seen.sort();
        assert_eq!(seen, (0..100).collect::<Vec<_>>());
    }
}
