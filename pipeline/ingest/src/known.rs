//! What decoding a video taught that its container does not say cheaply, kept for the video's
//! later clips.
//!
//! Most videos announce everything a clip needs in a few reads (an MP4's `moov`, a Matroska
//! `Info`), and GStreamer reads those anyway. Some do not: a Matroska/WebM file written as a
//! live stream has no duration, so its frames are counted by decoding it to the end; a
//! fragmented MP4 spreads its sample counts over one `moof` box per fragment (a ranged read
//! each); a file that claims a constant rate but is not is only found out after a seek, which
//! is then thrown away. A long job draws every video once per epoch, for days, so each of those
//! costs would be paid again and again. Instead they are paid once per *version* of a video:
//! entries are keyed by [`crate::ByteSource::version`] (location, size and ETag), so a
//! replaced video is learned afresh, and a source without a version is never remembered.
//!
//! A stream whose rate turns out irregular while its frames are counted (a browser's WebM
//! recording) also leaves the times of its frames, by which its later clips seek (within
//! [`TIMES_BUDGET`]; past it, the oldest entries lose their times, not their other facts).

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

use crate::container::{ContainerFacts, FrameTimes};

/// Entries kept by default: a few hundred bytes each, so a few MB at most, plus the frame
/// times of irregular streams (bounded by [`TIMES_BUDGET`]). Only videos that cost something
/// to learn are kept (see [`Learned::worth_keeping`]).
pub const DEFAULT_KNOWN_VIDEOS: usize = 16_384;

/// Most bytes of frame times kept in all (8 bytes a frame: an hour at 30 fps is 864 KB); the
/// oldest entries make room.
pub const TIMES_BUDGET: usize = 64 << 20;

/// What one version of a video is known to be.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Learned {
    /// The container's facts, as read for the first clip.
    pub facts: ContainerFacts,
    /// Frames counted by decoding to the end (nobody announced them).
    pub counted: Option<u64>,
    /// Timestamps were found irregular after a seek: frames are counted from the start, and
    /// never sought to (unless frame times are known).
    pub variable_rate: bool,
    /// When each frame is shown, found while counting the frames of a stream whose rate
    /// turned out irregular (a browser's WebM recording): frames are sought to by these.
    pub frame_times: Option<FrameTimes>,
    /// The frame times (the container's or these) did not match the decoded timestamps:
    /// frames are counted from the start.
    pub times_failed: bool,
    /// The frames were counted to the end with their timestamps (whether times came of it
    /// or not): not again.
    pub times_counted: bool,
    /// The frames a stream whose length is only estimated (duration × nominal rate) turned
    /// out to have: a window planned past them is planned again from this.
    pub frames_found: Option<u64>,
}

impl Learned {
    /// Whether remembering this saves more than the reads GStreamer makes anyway.
    pub fn worth_keeping(&self) -> bool {
        self.counted.is_some()
            || self.variable_rate
            || self.times_failed
            || self.times_counted
            || self.frames_found.is_some()
            || self.facts.fragmented
    }
}

/// A bounded map from a video version to what was learned about it, shared by the decoders of
/// a job (one per loader thread) so that the first clip of a video teaches every thread.
/// When full, the oldest entry makes room.
#[derive(Debug)]
pub struct KnownVideos {
    capacity: usize,
    inner: Mutex<Entries>,
}

#[derive(Debug, Default)]
struct Entries {
    map: HashMap<String, Learned>,
    /// Bytes of frame times held by the entries.
    times_bytes: usize,
    /// Keys in the order they were first remembered (eviction order).
    order: VecDeque<String>,
}

impl Default for KnownVideos {
    fn default() -> Self {
        KnownVideos::new(DEFAULT_KNOWN_VIDEOS)
    }
}

impl KnownVideos {
    /// An empty map of at most `capacity` videos (`0` remembers nothing).
    pub fn new(capacity: usize) -> Self {
        KnownVideos {
            capacity,
            inner: Mutex::new(Entries::default()),
        }
    }

    /// Videos remembered now.
    pub fn len(&self) -> usize {
        self.lock().map.len()
    }

    /// Whether nothing is remembered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub(crate) fn get(&self, version: &str) -> Option<Learned> {
        self.lock().map.get(version).cloned()
    }

    /// Keeps `learned` for `version`, if it is worth keeping; added to what another clip of
    /// the same version (on another thread) may have kept meanwhile.
    pub(crate) fn remember(&self, version: &str, learned: &Learned) {
        if self.capacity == 0 || !learned.worth_keeping() {
            return;
        }
        // The container's frame times come with its facts, which a remembered video keeps
        // only when they cost more than a `moov` read (fragmented MP4, whose facts carry no
        // times); they can run to megabytes: never kept.
        let learned = &Learned {
            facts: ContainerFacts {
                frame_times: None,
                ..learned.facts.clone()
            },
            ..learned.clone()
        };
        let mut e = self.lock();
        let mut merged = match e.map.get(version) {
            Some(old) => {
                let times_failed = old.times_failed || learned.times_failed;
                Learned {
                    facts: old.facts.clone(),
                    counted: learned.counted.or(old.counted),
                    variable_rate: old.variable_rate || learned.variable_rate,
                    times_counted: old.times_counted || learned.times_counted,
                    frames_found: learned.frames_found.or(old.frames_found),
                    frame_times: (learned.frame_times.clone())
                        .or_else(|| old.frame_times.clone())
                        .filter(|_| !times_failed),
                    times_failed,
                }
            }
            None => {
                e.order.push_back(version.to_string());
                let mut new = learned.clone();
                if new.times_failed {
                    new.frame_times = None;
                }
                new
            }
        };
        if times_bytes(&merged) > TIMES_BUDGET {
            // More than all the room there is: the count without the times.
            drop_times(&mut merged);
        }
        let bytes = times_bytes(&merged);
        if let Some(old) = e.map.insert(version.to_string(), merged) {
            e.times_bytes -= times_bytes(&old);
        }
        e.times_bytes += bytes;
        // Too many videos: the oldest others go.
        while e.map.len() > self.capacity {
            let Some(oldest) = e.order.iter().position(|k| k != version) else {
                break;
            };
            if let Some(key) = e.order.remove(oldest)
                && let Some(gone) = e.map.remove(&key)
            {
                e.times_bytes -= times_bytes(&gone);
            }
        }
        // Too many frame times: the oldest others' times go (their counts and facts stay).
        let Entries {
            map,
            order,
            times_bytes: held,
        } = &mut *e;
        for key in order.iter() {
            if *held <= TIMES_BUDGET {
                break;
            }
            if key == version {
                continue;
            }
            if let Some(entry) = map.get_mut(key) {
                *held -= times_bytes(entry);
                drop_times(entry);
            }
        }
    }

    /// Bytes of frame times held now.
    #[cfg(test)]
    fn times_bytes(&self) -> usize {
        self.lock().times_bytes
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Entries> {
        // A holder that panics leaves at worst `times_bytes` off from the entries' sum: the
        // budget is then kept less exactly, nothing else.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

fn times_bytes(learned: &Learned) -> usize {
    learned.frame_times.as_ref().map_or(0, |t| 8 * t.ns().len())
}

/// Forgets an entry's frame times. They were irregular at the stream's nominal rate (that is
/// why they were kept), so its clips count frames from the start rather than try the rate.
fn drop_times(learned: &mut Learned) {
    if learned.frame_times.take().is_some() {
        learned.variable_rate = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counted(n: u64) -> Learned {
        Learned {
            counted: Some(n),
            ..Learned::default()
        }
    }

    #[test]
    fn keeps_only_what_cost_something() {
        let known = KnownVideos::new(4);
        // Announced facts (a plain MP4): nothing to save.
        let plain = Learned {
            facts: ContainerFacts {
                frames: Some(300),
                constant_rate: Some(true),
                ..ContainerFacts::default()
            },
            ..Learned::default()
        };
        known.remember("a", &plain);
        assert!(known.is_empty());
        let fragmented = Learned {
            facts: ContainerFacts {
                frames: Some(300),
                fragmented: true,
                ..ContainerFacts::default()
            },
            ..Learned::default()
        };
        known.remember("b", &fragmented);
        known.remember("c", &counted(7));
        let vfr = Learned {
            variable_rate: true,
            ..Learned::default()
        };
        known.remember("d", &vfr);
        assert_eq!(known.get("b"), Some(fragmented));
        assert_eq!(known.get("c"), Some(counted(7)));
        assert_eq!(known.get("d"), Some(vfr));
        assert_eq!(known.get("a"), None);
    }

    fn timed(frames: u64) -> Learned {
        Learned {
            counted: Some(frames),
            frame_times: FrameTimes::new((0..frames).map(|n| n * 40).collect()),
            ..Learned::default()
        }
    }

    #[test]
    fn frame_times_within_a_budget() {
        let known = KnownVideos::new(100);
        // Times bigger than the whole budget: the count is kept without them (and the rate is
        // known to be irregular).
        let untimed = |frames| Learned {
            variable_rate: true,
            ..counted(frames)
        };
        let huge = (TIMES_BUDGET / 8 + 1) as u64;
        known.remember("huge", &timed(huge));
        assert_eq!(known.get("huge"), Some(untimed(huge)));
        assert_eq!(known.times_bytes(), 0);
        // Three entries of 40 % of the budget each: the oldest loses its times to make room
        // for the third, and keeps its count; the entry without times stays as it was.
        let part = (TIMES_BUDGET / 8 * 2 / 5) as u64;
        for v in ["a", "b", "c"] {
            known.remember(v, &timed(part));
        }
        assert_eq!(known.get("a"), Some(untimed(part)));
        assert_eq!(known.get("b"), Some(timed(part)));
        assert_eq!(known.get("c"), Some(timed(part)));
        assert_eq!(known.get("huge"), Some(untimed(huge)));
        assert_eq!(known.len(), 4);
        assert_eq!(known.times_bytes(), 2 * 8 * part as usize);
        // Times found not to match are dropped, and stay dropped.
        let failed = Learned {
            times_failed: true,
            ..Learned::default()
        };
        known.remember("b", &failed);
        known.remember("b", &timed(part));
        let b = known.get("b").expect("kept");
        assert!(b.times_failed && b.frame_times.is_none() && b.counted == Some(part));
        assert_eq!(known.times_bytes(), 8 * part as usize);
        // A failure alone is worth keeping (later clips do not try the times again).
        known.remember("d", &failed);
        assert_eq!(known.get("d"), Some(failed));
    }

    #[test]
    fn bounded_oldest_out_first() {
        let known = KnownVideos::new(2);
        known.remember("a", &counted(1));
        known.remember("b", &counted(2));
        // Adding to an entry does not grow the map or change the order.
        known.remember("a", &counted(3));
        assert_eq!(known.len(), 2);
        assert_eq!(known.get("a"), Some(counted(3)));
        // What one clip found is not lost to another that did not find it.
        let vfr = Learned {
            variable_rate: true,
            ..Learned::default()
        };
        known.remember("b", &vfr);
        known.remember("b", &counted(2));
        let both = Learned {
            counted: Some(2),
            variable_rate: true,
            ..Learned::default()
        };
        assert_eq!(known.get("b"), Some(both.clone()));
        known.remember("c", &counted(4));
        assert_eq!(known.len(), 2);
        assert_eq!(known.get("a"), None);
        assert_eq!(known.get("b"), Some(both));
        assert_eq!(known.get("c"), Some(counted(4)));
        let none = KnownVideos::new(0);
        none.remember("a", &counted(1));
        assert!(none.is_empty());
    }
}
