//! Which video the n-th clip of the run comes from.
//!
//! Like the official `DistributedSampler(shuffle=True)`, every epoch over the catalog is a fresh
//! permutation, so each video is used once per epoch; unlike it, the permutation is a pure
//! function of (seed, epoch), so the sequence does not depend on worker or process counts.

use rand::seq::SliceRandom;

use crate::seeding::{Stream, rng_for};

/// Deterministic epoch-wise shuffled order over `len` videos.
#[derive(Clone, Debug)]
pub struct VideoOrder {
    len: usize,
    seed: u64,
    cached: Option<(u64, Vec<usize>)>,
}

impl VideoOrder {
    /// An order over `len` videos; `len` must be positive to draw from it.
    pub fn new(len: usize, seed: u64) -> Self {
        VideoOrder {
            len,
            seed,
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
            perm.shuffle(&mut rng_for(self.seed, Stream::Order, epoch));
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
    }
}
