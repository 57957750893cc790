//! Frame numbers from timestamps. After a seek the decoder can no longer count frames from the
//! start, so it numbers each frame by its presentation time instead. Frame `n` of a
//! constant-rate stream is shown `n` frame durations after frame 0. The times of a
//! variable-rate MP4's frames come from its sample table (`container.rs`). In both cases the
//! decoder checks that consecutive frames really are consecutive ([`FrameClock::follows`]),
//! and it counts from the start instead when they are not.

use crate::container::{FrameTimes, MAX_TIMED_FRAMES};

/// How timestamps map to frame numbers for one clip's decode.
#[derive(Clone, Debug)]
pub(crate) enum FrameClock {
    /// Frame `n` at `pts0 + n × frame_ns`.
    Constant { pts0: u64, frame_ns: f64 },
    /// Frame `n` at `pts0 + times[n]`.
    Table { pts0: u64, times: FrameTimes },
}

impl FrameClock {
    /// Frame 0's timestamp.
    pub fn pts0(&self) -> u64 {
        match self {
            FrameClock::Constant { pts0, .. } | FrameClock::Table { pts0, .. } => *pts0,
        }
    }

    /// The frame nearest to `pts`; `None` before frame 0 (by more than half a frame).
    pub fn number(&self, pts: u64) -> Option<u64> {
        let rel = pts as f64 - self.pts0() as f64;
        match self {
            FrameClock::Constant { frame_ns, .. } => {
                let n = (rel / frame_ns).round();
                (n.is_finite() && n >= 0.0).then_some(n as u64)
            }
            FrameClock::Table { times, .. } => {
                let t = times.ns();
                if rel < 0.0 {
                    let first_gap = t.get(1).map_or(f64::INFINITY, |&g| g as f64);
                    return (-rel * 2.0 < first_gap).then_some(0);
                }
                let rel = rel as u64;
                let i = t.partition_point(|&x| x < rel);
                let before = i.checked_sub(1).map(|j| (j, rel - t[j]));
                let after = t.get(i).map(|&x| (i, x - rel));
                match (before, after) {
                    (Some((j, d0)), Some((k, d1))) => Some(if d1 < d0 { k } else { j } as u64),
                    (Some((j, _)), None) => Some(j as u64),
                    (None, Some((k, _))) => Some(k as u64),
                    (None, None) => None,
                }
            }
        }
    }

    /// The frame shown at `pts`, if `pts` is within half a frame of when one is shown
    /// (always, for a constant rate: its frames are checked against each other instead).
    pub fn frame_at(&self, pts: u64) -> Option<u64> {
        let n = self.number(pts)?;
        match self {
            FrameClock::Constant { .. } => Some(n),
            FrameClock::Table { pts0, times } => {
                let t = times.ns();
                let i = usize::try_from(n).ok()?;
                let at = *t.get(i)? as f64;
                let gap = |a: usize, b: usize| match (t.get(a), t.get(b)) {
                    (Some(&x), Some(&y)) => y as f64 - x as f64,
                    _ => f64::INFINITY,
                };
                let half =
                    0.5 * gap(i, i + 1).min(i.checked_sub(1).map_or(f64::INFINITY, |j| gap(j, i)));
                let rel = pts as f64 - *pts0 as f64;
                ((rel - at).abs() < half).then_some(n)
            }
        }
    }

    /// When frame `n` is shown (`n` may be fractional for a constant rate, and is clamped to
    /// the table's frames), for a seek.
    pub fn time_of(&self, n: f64) -> u64 {
        let n = n.max(0.0);
        match self {
            FrameClock::Constant { pts0, frame_ns } => (*pts0 as f64 + n * frame_ns) as u64,
            FrameClock::Table { pts0, times } => {
                let t = times.ns();
                let i = (n.floor() as usize).min(t.len().saturating_sub(1));
                pts0 + t.get(i).copied().unwrap_or(0)
            }
        }
    }

    /// Whether a frame at `pts` can be the one after the frame at `prev`, with `skipped`
    /// frames dropped before the decoder in between.
    pub fn follows(&self, prev: u64, pts: u64, skipped: usize) -> bool {
        match self {
            FrameClock::Constant { frame_ns, .. } => {
                ((pts as f64 - prev as f64) - (1.0 + skipped as f64) * frame_ns).abs()
                    <= 0.5 * frame_ns
            }
            FrameClock::Table { .. } => match (self.frame_at(prev), self.frame_at(pts)) {
                (Some(a), Some(b)) => b == a + 1 + skipped as u64,
                _ => false,
            },
        }
    }
}

/// The times of a stream's frames, from every frame's timestamp found while counting them
/// (in any order), when they are worth keeping: `None` when they are regular at `frame_ns`
/// (the stream's nominal frame duration: every frame within half a frame of where a constant
/// clock puts it, so that it numbers them all right), when two frames share a time, or when
/// there are more than [`MAX_TIMED_FRAMES`].
pub(crate) fn irregular_times(mut pts: Vec<u64>, frame_ns: Option<f64>) -> Option<FrameTimes> {
    if pts.len() as u64 > MAX_TIMED_FRAMES {
        return None;
    }
    pts.sort_unstable();
    let first = *pts.first()?;
    if frame_ns.is_some_and(|f| on_grid(&pts, f)) {
        return None;
    }
    FrameTimes::new(pts.iter().map(|&p| p - first).collect())
}

/// Whether every one of these timestamps (sorted) is within half a frame of where a constant
/// clock of `frame_ns` from the first puts it. Each frame against the grid, not against its
/// neighbour: a rate a little off the nominal one (29.97 fps said to be 30) drifts a frame in
/// half a minute.
pub(crate) fn on_grid(sorted: &[u64], frame_ns: f64) -> bool {
    let Some(&first) = sorted.first() else {
        return true;
    };
    sorted
        .iter()
        .enumerate()
        .all(|(n, &p)| ((p - first) as f64 - n as f64 * frame_ns).abs() < 0.5 * frame_ns)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table(ns: &[u64]) -> FrameClock {
        FrameClock::Table {
            pts0: 1_000,
            times: FrameTimes::new(ns.to_vec()).expect("increasing"),
        }
    }

    #[test]
    fn constant_rate_numbers() {
        let c = FrameClock::Constant {
            pts0: 1_000,
            frame_ns: 100.0,
        };
        assert_eq!(c.number(1_000), Some(0));
        assert_eq!(c.number(1_449), Some(4));
        assert_eq!(c.number(1_451), Some(5));
        assert_eq!(c.number(960), Some(0));
        assert_eq!(c.number(900), None);
        assert_eq!(c.time_of(3.0), 1_300);
        assert_eq!(c.time_of(-2.0), 1_000);
        assert!(c.follows(1_000, 1_100, 0));
        assert!(c.follows(1_000, 1_300, 2));
        assert!(!c.follows(1_000, 1_300, 0));
    }

    #[test]
    fn table_numbers_frames_by_their_own_times() {
        // 3 frames 100 apart, then 2 frames 300 apart.
        let c = table(&[0, 100, 200, 500, 800]);
        assert_eq!(c.number(1_000), Some(0));
        assert_eq!(c.number(1_140), Some(1));
        assert_eq!(c.number(1_160), Some(2));
        assert_eq!(c.number(1_340), Some(2));
        assert_eq!(c.number(1_360), Some(3));
        assert_eq!(c.number(5_000), Some(4));
        assert_eq!(c.number(960), Some(0));
        assert_eq!(c.number(900), None);
        assert_eq!(c.time_of(3.0), 1_500);
        assert_eq!(c.time_of(3.7), 1_500);
        assert_eq!(c.time_of(99.0), 1_800);
        assert_eq!(c.time_of(-8.0), 1_000);
        // Consecutive by the table, not by a rate.
        assert!(c.follows(1_200, 1_500, 0));
        assert!(c.follows(1_201, 1_499, 0));
        assert!(c.follows(1_000, 1_500, 2));
        assert!(!c.follows(1_000, 1_500, 0));
        // A timestamp between two frames' times is no frame of the table.
        assert!(!c.follows(1_200, 1_350, 0));
        assert!(!c.follows(1_200, 1_650, 0));
        assert_eq!(c.frame_at(1_499), Some(3));
        assert_eq!(c.frame_at(1_350), None);
        assert_eq!(c.frame_at(1_000 + 800 + 149), Some(4));
        assert_eq!(c.frame_at(1_000 + 800 + 151), None);
    }

    #[test]
    fn counted_times_kept_only_when_irregular() {
        // 30 fps in milliseconds (33, 34, 33, …): regular, nothing kept.
        let ms = |v: &[u64]| v.iter().map(|&m| m * 1_000_000).collect::<Vec<_>>();
        let regular = ms(&[1000, 1033, 1067, 1100, 1133]);
        assert_eq!(irregular_times(regular.clone(), Some(1e9 / 30.0)), None);
        // Without a nominal rate the times are kept, in order, from the first.
        let kept = irregular_times(regular, None).expect("times");
        assert_eq!(kept.ns(), ms(&[0, 33, 67, 100, 133]).as_slice());
        // A gap of two frames, found in decode order: kept, sorted.
        let gap = ms(&[1000, 1067, 1033, 1133, 1100, 1200]);
        let kept = irregular_times(gap, Some(1e9 / 30.0)).expect("times");
        assert_eq!(kept.ns(), ms(&[0, 33, 67, 100, 133, 200]).as_slice());
        // 29.97 fps said to be 30: every gap is close to a frame, but by the 17th second the
        // frames are half a frame behind the grid.
        let slow: Vec<u64> = (0..600).map(|n| n * 1_001_000_000 / 30).collect();
        assert!(irregular_times(slow[..480].to_vec(), Some(1e9 / 30.0)).is_none());
        assert!(irregular_times(slow, Some(1e9 / 30.0)).is_some());
        // Two frames at one time, or none at all: nothing.
        assert_eq!(irregular_times(ms(&[0, 50, 50]), Some(1e9 / 30.0)), None);
        assert_eq!(irregular_times(Vec::new(), None), None);
    }

    #[test]
    fn times_must_start_at_zero_and_increase() {
        assert!(FrameTimes::new(vec![0, 10, 10]).is_none());
        assert!(FrameTimes::new(vec![5, 10]).is_none());
        assert!(FrameTimes::new(Vec::new()).is_none());
        assert!(FrameTimes::new(vec![0]).is_some());
    }
}
