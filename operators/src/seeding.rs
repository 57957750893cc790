//! Deterministic, independent random streams.
//!
//! The reference implementation draws from several unrelated RNGs (Python `random`, numpy's global
//! RNG, per-worker torch RNGs, a counter-seeded `torch.Generator`). We cannot reproduce those
//! streams, so every random decision here comes from a ChaCha8 generator keyed by
//! `(seed, stream, index)`: results do not depend on worker count, scheduling or the order in
//! which clips are processed, and different purposes never share a stream.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

/// The purpose a random stream serves; each purpose gets its own key space so that, e.g., the
/// clip-transform draws for clip 7 are unrelated to the mask-position draws for batch 7.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Stream {
    /// Shuffling / ordering of the video list (per epoch).
    Order,
    /// Per-clip draws: frame window and spatial augmentation.
    Clip,
    /// Per-batch block-size draw of a mask generator.
    MaskBlockSize,
    /// Per-batch block-position draws of a mask generator.
    MaskPositions,
    /// Model parameter initialisation.
    Init,
    /// Weighted dataset mixing: the dataset and video of a clip when `datasets_weights` is set.
    Mix,
}

impl Stream {
    /// A fixed, arbitrary tag per stream (stable across builds; do not derive from discriminants).
    fn tag(self) -> u64 {
        match self {
            Stream::Order => 0x4f52_4445_525f_5354,         // "ORDER_ST"
            Stream::Clip => 0x434c_4950_5f5f_5354,          // "CLIP__ST"
            Stream::MaskBlockSize => 0x4d42_4c4b_535a_5354, // "MBLKSZST"
            Stream::MaskPositions => 0x4d50_4f53_4954_5354, // "MPOSITST"
            Stream::Init => 0x494e_4954_5f5f_5354,          // "INIT__ST"
            Stream::Mix => 0x4d49_585f_5f5f_5354,           // "MIX___ST"
        }
    }
}

/// The splitmix64 output function: a bijective 64-bit mixer with good avalanche, so inputs that
/// differ in one bit map to unrelated outputs.
#[inline]
pub fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// FNV-1a over bytes, fed piece by piece: a stable 64-bit key of names and listings (the same
/// in every process and on every platform, unlike `std`'s hasher; not cryptographic).
#[derive(Clone, Copy, Debug)]
pub struct Fnv1a(u64);

impl Default for Fnv1a {
    fn default() -> Self {
        Fnv1a(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv1a {
    /// Feeds `bytes`.
    pub fn add(&mut self, bytes: &[u8]) -> &mut Self {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3);
        }
        self
    }

    /// The hash of everything fed so far.
    pub fn finish(&self) -> u64 {
        self.0
    }

    /// The hash of `bytes` alone.
    pub fn of(bytes: &[u8]) -> u64 {
        Fnv1a::default().add(bytes).finish()
    }
}

const GOLDEN: u64 = 0x9e37_79b9_7f4a_7c15;

/// A ChaCha8 RNG for `(seed, stream, index)`, e.g. `stream = Stream::Clip`, `index` = global clip
/// number. Same as [`rng_for_sub`] with `sub = 0`.
pub fn rng_for(seed: u64, stream: Stream, index: u64) -> ChaCha8Rng {
    rng_for_sub(seed, stream, index, 0)
}

/// A ChaCha8 RNG for `(seed, stream, index, sub)`; `sub` separates otherwise identical requests
/// (e.g. the mask generator id within a batch) without the collisions that `index ^ sub` would
/// cause.
///
/// Each component is absorbed through a bijective mixer, so for fixed other components distinct
/// values always give distinct 64-bit states; the state is then expanded with splitmix64 into the
/// 256-bit ChaCha key. Nearby indices therefore give unrelated streams.
pub fn rng_for_sub(seed: u64, stream: Stream, index: u64, sub: u64) -> ChaCha8Rng {
    let mut x = mix64(seed.wrapping_add(GOLDEN));
    x = mix64(x ^ stream.tag());
    x = mix64(x.wrapping_add(GOLDEN) ^ index);
    x = mix64(x.wrapping_add(GOLDEN) ^ sub);
    let mut key = [0u8; 32];
    let mut state = x;
    for chunk in key.chunks_exact_mut(8) {
        state = state.wrapping_add(GOLDEN);
        chunk.copy_from_slice(&mix64(state).to_le_bytes());
    }
    ChaCha8Rng::from_seed(key)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    /// The published FNV-1a 64 test vectors; feeding in pieces is feeding at once (the
    /// catalog key and per-video seeds written before this type existed stay the same).
    #[test]
    fn fnv1a_matches_the_reference_vectors() {
        assert_eq!(Fnv1a::of(b""), 0xcbf2_9ce4_8422_2325);
        assert_eq!(Fnv1a::of(b"a"), 0xaf63_dc4c_8601_ec8c);
        assert_eq!(Fnv1a::of(b"foobar"), 0x8594_4171_f739_67e8);
        assert_eq!(
            Fnv1a::default().add(b"foo").add(b"bar").finish(),
            Fnv1a::of(b"foobar")
        );
    }

    fn first(mut r: ChaCha8Rng) -> u64 {
        r.random()
    }

    #[test]
    fn deterministic() {
        assert_eq!(
            first(rng_for(234, Stream::Clip, 5)),
            first(rng_for(234, Stream::Clip, 5))
        );
        assert_eq!(
            first(rng_for(234, Stream::Clip, 5)),
            first(rng_for_sub(234, Stream::Clip, 5, 0))
        );
    }

    #[test]
    fn streams_differ() {
        let mut seen = std::collections::HashSet::new();
        for seed in 0..4u64 {
            for stream in [
                Stream::Order,
                Stream::Clip,
                Stream::MaskBlockSize,
                Stream::MaskPositions,
                Stream::Init,
                Stream::Mix,
            ] {
                for index in 0..64u64 {
                    for sub in 0..3u64 {
                        assert!(seen.insert(first(rng_for_sub(seed, stream, index, sub))));
                    }
                }
            }
        }
    }

    #[test]
    fn nearby_indices_uncorrelated() {
        // Bits of the first output of consecutive indices should agree about half the time.
        let mut agree = 0u32;
        let n = 2000u64;
        for i in 0..n {
            let a = first(rng_for(1, Stream::Clip, i));
            let b = first(rng_for(1, Stream::Clip, i + 1));
            agree += (!(a ^ b)).count_ones();
        }
        let frac = f64::from(agree) / (64.0 * n as f64);
        assert!((frac - 0.5).abs() < 0.01, "{frac}");
    }
}
