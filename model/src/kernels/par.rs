//! Parallel loops of the CPU kernels, on candle's own CPU worker pool.
//!
//! candle 0.11 runs its element-wise CPU ops (residual adds, the gradient accumulation of every
//! backward edge) on a barrier pool whose workers spin for a while after each op before parking.
//! A second pool beside it (rayon, which the kernels used first) fights those spinning threads
//! for the cores: on 2 cores the quickstart `train_step` took 112–140 ms with the kernels on
//! rayon against 86–97 ms with candle's pool switched off (`CANDLE_NUM_THREADS=1`). Sharing
//! candle's pool keeps one set of threads for all CPU work of a step.
//!
//! Work is cut into units fixed by the shape alone; a unit's result never depends on which thread
//! runs it, so every kernel is bit-for-bit independent of the thread count.

use std::ops::Range;
use std::sync::OnceLock;

use super::SyncPtr;

#[cfg(test)]
thread_local! {
    static SERIAL: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Runs `f` with every parallel loop of this thread executed serially, in index order (tests
/// compare against it to show results don't depend on scheduling).
#[cfg(test)]
pub(crate) fn serial<R>(f: impl FnOnce() -> R) -> R {
    SERIAL.set(true);
    let r = f();
    SERIAL.set(false);
    r
}

/// Calls `f` on disjoint sub-ranges covering `0..n`, in parallel.
pub(crate) fn for_each_range(n: usize, f: impl Fn(Range<usize>) + Sync) {
    #[cfg(test)]
    if SERIAL.get() {
        f(0..n);
        return;
    }
    match n {
        0 => {}
        1 => f(0..1),
        _ => candle_core::utils::barrier_pool().execute_chunked(n, f),
    }
}

/// `f(i)` for `i` in `0..n`, in parallel; results in index order.
pub(crate) fn map<R: Send + Sync>(n: usize, f: impl Fn(usize) -> R + Sync) -> Vec<R> {
    let slots: Vec<OnceLock<R>> = (0..n).map(|_| OnceLock::new()).collect();
    for_each_range(n, |units| {
        for i in units {
            // Each index is visited exactly once, so the slot is always empty here.
            let _ = slots[i].set(f(i));
        }
    });
    slots
        .into_iter()
        .map(|s| s.into_inner().expect("the pool runs every unit"))
        .collect()
}

/// `f(i, chunk_i)` over the `chunk`-sized pieces of `data` (the last may be shorter), in
/// parallel; results in chunk order.
pub(crate) fn map_chunks_mut<T: Send, R: Send + Sync>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let len = data.len();
    let chunk = chunk.max(1);
    let ptr = SyncPtr(data.as_mut_ptr());
    map(len.div_ceil(chunk), |i| {
        let lo = i * chunk;
        let hi = (lo + chunk).min(len);
        // SAFETY: units cover disjoint ranges [lo, hi) inside `data`, which stays mutably
        // borrowed (and otherwise untouched) for the whole call.
        let piece = unsafe { std::slice::from_raw_parts_mut(ptr.get().add(lo), hi - lo) };
        f(i, piece)
    })
}

/// `f(i, chunk_i)` over the `chunk`-sized pieces of `data`, in parallel.
pub(crate) fn chunks_mut<T: Send>(
    data: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T]) + Sync,
) {
    map_chunks_mut(data, chunk, f);
}

/// Like [`chunks_mut`] over two equally long slices cut at the same places.
pub(crate) fn chunks2_mut<T: Send>(
    a: &mut [T],
    b: &mut [T],
    chunk: usize,
    f: impl Fn(usize, &mut [T], &mut [T]) + Sync,
) {
    assert_eq!(a.len(), b.len(), "chunks2_mut: slices of different lengths");
    let chunk = chunk.max(1);
    let pb = SyncPtr(b.as_mut_ptr());
    chunks_mut(a, chunk, |i, pa| {
        // SAFETY: same disjoint range of `b` as `pa` is of `a`; `b` is mutably borrowed
        // for the whole call and has a's length.
        let pb = unsafe { std::slice::from_raw_parts_mut(pb.get().add(i * chunk), pa.len()) };
        f(i, pa, pb)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn map_keeps_index_order_and_chunks_cover_everything() {
        assert_eq!(
            map(1000, |i| i * 2),
            (0..1000).map(|i| i * 2).collect::<Vec<_>>()
        );
        assert!(map(0, |i| i).is_empty());
        let mut v = vec![0usize; 1001];
        let lens = map_chunks_mut(&mut v, 100, |i, c| {
            c.iter_mut().for_each(|x| *x = i);
            c.len()
        });
        assert_eq!(lens.len(), 11);
        assert_eq!(lens[10], 1);
        assert!(v.iter().enumerate().all(|(j, &x)| x == j / 100));
        let (mut a, mut b) = (vec![0u32; 37], vec![0u32; 37]);
        chunks2_mut(&mut a, &mut b, 5, |i, pa, pb| {
            pa.iter_mut().for_each(|x| *x = i as u32);
            pb.iter_mut().for_each(|x| *x = 2 * i as u32);
        });
        assert!(a.iter().zip(&b).all(|(x, y)| 2 * x == *y));
        assert_eq!(a[36], 7);
    }
}
