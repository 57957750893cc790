//! What the container's own index says, read with a few small ranged reads: the exact frame
//! count and whether the frame rate is constant (MP4/MOV sample tables), whether a Matroska/WebM
//! file announces its duration, and whether the top-level structure runs past the end of the
//! object (a cut-off upload).
//!
//! GStreamer reports a duration, not a frame count; `duration × rate` is wrong for
//! variable-frame-rate files, for files whose audio outlasts the video, and for files without a
//! duration. The official loader (decord) counts frames from the container index; so do we
//! where the index is cheap to read.

use std::sync::Arc;

use bytes::Bytes;

/// Largest `moov` box read for its sample tables (an hour of 60 fps video needs about 3 MB).
const MAX_MOOV: u64 = 64 << 20;
/// Bytes of a Matroska file's start read for its `Info` element.
const MKV_HEAD: u64 = 256 << 10;

/// What the container says about its video, where it says it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ContainerFacts {
    /// Exact number of video frames (MP4/MOV sample count), when known.
    pub frames: Option<u64>,
    /// `Some(false)` when the container's timing says the frame rate varies (frame numbers
    /// cannot be derived from timestamps, so no seeking).
    pub constant_rate: Option<bool>,
    /// `Some(false)` when the container announces no duration (Matroska without `Duration`):
    /// any duration GStreamer reports is a guess.
    pub has_duration: Option<bool>,
    /// `Some(true)` when the MP4/MOV video track's `colr` box (`nclx`) says full range.
    /// GStreamer 1.22's qtdemux drops that bit and tags such a stream limited range, where
    /// ffmpeg (and so decord) converts it as full.
    pub full_range: Option<bool>,
    /// The MP4 is fragmented (`mvex`): its sample counts were read from one `moof` box per
    /// fragment, a ranged read each.
    pub fragmented: bool,
    /// The Matroska `Segment` declares its size, and the object holds all of it (not a cut-off
    /// upload, as far as its size can tell).
    pub complete: bool,
    /// The MP4's edit list starts inside a frame (a cut with `-c copy` off the frame grid):
    /// GStreamer's decoder outputs that frame first, its timestamp clipped, where ffmpeg
    /// leaves it out (and the frame count does not include it).
    pub clipped_lead: bool,
    /// When each frame of a variable-rate MP4 is shown, from its sample table: frames can be
    /// sought to and told apart by timestamp although the rate varies (a phone's recording,
    /// whose frame durations jitter, is the common case).
    pub frame_times: Option<FrameTimes>,
}

/// Presentation times of a video's frames in presentation order (the order decord numbers
/// them in), in nanoseconds after frame 0's; strictly increasing.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrameTimes(Arc<[u64]>);

impl FrameTimes {
    /// `None` unless the times start at 0 and strictly increase (two frames at one time could
    /// not be told apart).
    pub fn new(ns: Vec<u64>) -> Option<FrameTimes> {
        (ns.first() == Some(&0) && ns.windows(2).all(|w| w[0] < w[1]))
            .then(|| FrameTimes(ns.into()))
    }

    /// The times, frame 0's first.
    pub fn ns(&self) -> &[u64] {
        &self.0
    }
}

/// Most frames whose times are kept (8 bytes each): nearly ten hours at 60 fps.
pub(crate) const MAX_TIMED_FRAMES: u64 = 1 << 21;

/// Reads `n` bytes at `at` (fewer at the end of the object; `None` on a read error).
pub type ReadFn<'a> = &'a dyn Fn(u64, u64) -> Option<Bytes>;

/// Facts from the container at the start of an object of `len` bytes.
pub fn facts(len: u64, read: ReadFn<'_>) -> ContainerFacts {
    let Some(head) = read(0, 16) else {
        return ContainerFacts::default();
    };
    if head.get(4..8) == Some(b"ftyp".as_slice()) {
        return mp4_facts(len, read).unwrap_or_default();
    }
    if head.get(0..4) == Some([0x1A, 0x45, 0xDF, 0xA3].as_slice()) {
        return ContainerFacts {
            has_duration: matroska_has_duration(len, read),
            complete: matroska_segment_end(len, read).is_some_and(|end| end <= len),
            ..ContainerFacts::default()
        };
    }
    ContainerFacts::default()
}

/// An ISO-BMFF box header at `at`: (size of the whole box, type, header length).
fn box_header(len: u64, at: u64, read: ReadFn<'_>) -> Option<(u64, [u8; 4], u64)> {
    let b = read(at, 16)?;
    let size32 = u64::from(u32::from_be_bytes(b.get(0..4)?.try_into().ok()?));
    let kind: [u8; 4] = b.get(4..8)?.try_into().ok()?;
    let (size, header) = match size32 {
        0 => (len - at, 8),
        1 => (u64::from_be_bytes(b.get(8..16)?.try_into().ok()?), 16),
        n => (n, 8),
    };
    (size >= header).then_some((size, kind, header))
}

/// Child boxes of a box payload held in memory: (type, payload).
fn children(payload: &[u8]) -> impl Iterator<Item = ([u8; 4], &[u8])> {
    let mut at = 0usize;
    std::iter::from_fn(move || {
        let b = payload.get(at..at + 8)?;
        let size32 = u32::from_be_bytes(b[0..4].try_into().ok()?) as usize;
        let kind: [u8; 4] = b[4..8].try_into().ok()?;
        let (size, header) = match size32 {
            0 => (payload.len() - at, 8),
            1 => {
                let s = payload.get(at + 8..at + 16)?;
                (
                    usize::try_from(u64::from_be_bytes(s.try_into().ok()?)).ok()?,
                    16,
                )
            }
            n => (n, 8),
        };
        if size < header {
            return None;
        }
        let body = payload.get(at + header..at.checked_add(size)?)?;
        at += size;
        Some((kind, body))
    })
}

fn child<'a>(payload: &'a [u8], kind: &[u8; 4]) -> Option<&'a [u8]> {
    children(payload).find(|(k, _)| k == kind).map(|(_, b)| b)
}

fn be32(b: &[u8], at: usize) -> Option<u64> {
    Some(u64::from(u32::from_be_bytes(
        b.get(at..at + 4)?.try_into().ok()?,
    )))
}

/// Most `moof` boxes read to count a fragmented file's samples: one small read each (a ranged
/// GET from object storage, the media data between them skipped), once per version of the
/// file in a job (the decoder remembers the answer, `known.rs`). A file with more fragments
/// gets GStreamer's estimate from its duration.
const MAX_FRAGMENTS: usize = 64;
/// Largest `moof` box read.
const MAX_MOOF: u64 = 1 << 20;
/// Most frames of a fragmented file decoded from its start rather than sought in (two
/// minutes at 25 fps: well inside the decode deadline).
const MAX_DECODED_THROUGH: u64 = 3000;

/// Frame count and rate constancy of the first video track of an MP4/MOV.
fn mp4_facts(len: u64, read: ReadFn<'_>) -> Option<ContainerFacts> {
    let mut at = 0u64;
    let moov = loop {
        if at + 8 > len {
            return None;
        }
        let (size, kind, header) = box_header(len, at, read)?;
        if &kind == b"moov" {
            if size > MAX_MOOV {
                return None;
            }
            let body = read(at + header, size - header)?;
            if (body.len() as u64) < size - header {
                return None; // cut off: the caller names it
            }
            at = at.checked_add(size)?;
            break body;
        }
        at = at.checked_add(size)?;
    };
    let fragmented = child(&moov, b"mvex").is_some();
    for (kind, trak) in children(&moov) {
        if &kind != b"trak" {
            continue;
        }
        let Some(mdia) = child(trak, b"mdia") else {
            continue;
        };
        let is_video = child(mdia, b"hdlr").and_then(|h| h.get(8..12)) == Some(b"vide".as_slice());
        if !is_video {
            continue;
        }
        let stbl = child(mdia, b"minf").and_then(|m| child(m, b"stbl"))?;
        let frames = if let Some(stsz) = child(stbl, b"stsz") {
            be32(stsz, 8)?
        } else {
            be32(child(stbl, b"stz2")?, 8)?
        };
        let full_range = child(stbl, b"stsd").and_then(nclx_full_range);
        if fragmented {
            // The samples are in `moof` boxes spread over the file (GStreamer's duration
            // covers the first ones only). Frames are not numbered from timestamps either:
            // without an edit list the first one's is the B-frame delay, which a seek does not
            // account for.
            // Samples may sit in the `moov` too (its sample table), before the fragments.
            let counted = child(trak, b"tkhd")
                .and_then(track_id)
                .and_then(|id| fragment_samples(len, at, read, id))
                .map(|in_fragments| frames + in_fragments)
                .filter(|&n| n > 0);
            return Some(match counted {
                Some(n) => ContainerFacts {
                    frames: Some(n),
                    // A long file is sought in, as a decode from the start to a late window
                    // could outlast the decode deadline; its frames after a seek may then come
                    // out up to the B-frame delay early.
                    constant_rate: (n <= MAX_DECODED_THROUGH).then_some(false),
                    has_duration: None,
                    full_range,
                    fragmented: true,
                    frame_times: None,
                    complete: false,
                    clipped_lead: false,
                },
                // Too many fragments to read for every clip (a long file), or cut short:
                // GStreamer's estimate (duration × rate), and seeks, as a decode from the
                // start to a late window could outlast the decode deadline. Frames after a
                // seek may then come out up to the B-frame delay early.
                None => ContainerFacts {
                    full_range,
                    fragmented: true,
                    ..ContainerFacts::default()
                },
            });
        }
        // Constant rate: every sample but possibly the last has the same duration.
        let constant_rate = child(stbl, b"stts").and_then(|stts| {
            let entries = be32(stts, 4)? as usize;
            let mut deltas = Vec::new();
            let mut counted = 0u64;
            for i in 0..entries.min(1 << 20) {
                let count = be32(stts, 8 + 8 * i)?;
                let delta = be32(stts, 12 + 8 * i)?;
                counted += count;
                if count > 0 && !(i + 1 == entries && count == 1 && counted == frames) {
                    deltas.push(delta);
                }
            }
            Some(deltas.windows(2).all(|w| w[0] == w[1]))
        });
        // The frames the edit list shows: a file cut with `ffmpeg -ss … -c copy` keeps the
        // samples back to the key frame before the cut, and its edit list hides them (GStreamer
        // and ffmpeg output only the shown ones).
        let media_ts = child(mdia, b"mdhd").and_then(header_timescale);
        let movie_ts = child(&moov, b"mvhd").and_then(header_timescale);
        let edit = single_edit(trak);
        let wanted = constant_rate == Some(false) || matches!(edit, Some(Some(_)));
        let times = (wanted && frames <= MAX_TIMED_FRAMES)
            .then(|| composition_times(stbl, frames))
            .flatten();
        let shown = match (&times, edit) {
            (Some(t), Some(edit)) => Some(shown_by(t, edit, media_ts, movie_ts)),
            _ => None,
        };
        let frames = shown.map_or(frames, |s| s.len() as u64);
        // A sample before the edit's start that is still showing at it.
        let clipped_lead = match (&times, edit) {
            (Some(t), Some(Some(edit))) => {
                let from = t.partition_point(|&c| c < edit.start);
                from > 0 && t.get(from) != Some(&edit.start)
            }
            _ => false,
        };
        let frame_times = match (shown, media_ts) {
            (Some(s), Some(ts)) if constant_rate == Some(false) => frame_times(s, ts),
            _ => None,
        };
        return Some(ContainerFacts {
            frames: (frames > 0).then_some(frames),
            constant_rate,
            has_duration: None,
            full_range,
            fragmented: false,
            frame_times,
            complete: false,
            clipped_lead,
        });
    }
    None
}

/// An `mvhd` or `mdhd` payload's timescale (units per second; after the creation and
/// modification times, 4 or 8 bytes each by version).
fn header_timescale(header: &[u8]) -> Option<u64> {
    let ts = match header.first()? {
        0 => be32(header, 12),
        1 => be32(header, 20),
        _ => None,
    }?;
    (ts > 0).then_some(ts)
}

/// The one piece of a track an edit list shows.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Edit {
    /// Media time it starts at (track timescale).
    start: i64,
    /// How long it lasts (movie timescale); 0: to the end.
    duration: u64,
}

/// The piece of a track its edit list shows: `Some(None)` without an edit list (or with one
/// that only delays the track: an empty edit first), `Some(Some(edit))` for one piece at
/// normal speed, `None` for anything else (several pieces, another speed: frames would not be
/// shown in sample-table order).
fn single_edit(trak: &[u8]) -> Option<Option<Edit>> {
    let Some(elst) = child(trak, b"edts").and_then(|e| child(e, b"elst")) else {
        return Some(None);
    };
    let version = *elst.first()?;
    let entries = usize::try_from(be32(elst, 4)?).ok()?;
    let (size, time_at, rate_at) = match version {
        0 => (12, 4, 8),
        1 => (20, 8, 16),
        _ => return None,
    };
    let mut found = None;
    for i in 0..entries {
        let at = 8 + i * size;
        let (duration, time) = match version {
            0 => (
                be32(elst, at)?,
                i64::from(be32(elst, at + time_at)? as u32 as i32),
            ),
            _ => (
                u64::from_be_bytes(elst.get(at..at + 8)?.try_into().ok()?),
                i64::from_be_bytes(elst.get(at + time_at..at + time_at + 8)?.try_into().ok()?),
            ),
        };
        if time == -1 {
            // An empty edit: the track starts later. Only before the media.
            if found.is_some() {
                return None;
            }
            continue;
        }
        if found.is_some() || be32(elst, at + rate_at)? != 0x0001_0000 {
            return None;
        }
        found = Some(Edit {
            start: time,
            duration,
        });
    }
    Some(found)
}

/// The composition times (sorted) an edit shows: from its start, for its duration.
fn shown_by(
    sorted: &[i64],
    edit: Option<Edit>,
    media_ts: Option<u64>,
    movie_ts: Option<u64>,
) -> &[i64] {
    let Some(edit) = edit else {
        return sorted;
    };
    let from = sorted.partition_point(|&t| t < edit.start);
    let to = match (edit.duration, media_ts, movie_ts) {
        (d, Some(media), Some(movie)) if d > 0 => {
            // t < start + d × media / movie, in integers: t × movie < start × movie + d × media.
            let limit =
                i128::from(edit.start) * i128::from(movie) + i128::from(d) * i128::from(media);
            sorted.partition_point(|&t| i128::from(t) * i128::from(movie) < limit)
        }
        _ => sorted.len(),
    };
    sorted.get(from..to.max(from)).unwrap_or(&[])
}

/// When each of the `frames` samples of a sample table is shown, in its timescale: decode
/// times from `stts` plus composition offsets from `ctts` (signed, as GStreamer and ffmpeg
/// read them in both versions), sorted. `None` when the tables do not cover exactly `frames`
/// samples.
fn composition_times(stbl: &[u8], frames: u64) -> Option<Vec<i64>> {
    let n = usize::try_from(frames).ok()?;
    let stts = child(stbl, b"stts")?;
    let entries = usize::try_from(be32(stts, 4)?).ok()?;
    // The tables must cover the samples before anything is allocated for them.
    let mut covered = 0u64;
    for i in 0..entries {
        covered = covered.saturating_add(be32(stts, 8 + 8 * i)?);
    }
    if covered != frames {
        return None;
    }
    let mut times: Vec<i64> = Vec::with_capacity(n);
    let mut dts = 0i64;
    for i in 0..entries {
        let count = be32(stts, 8 + 8 * i)?;
        let delta = i64::try_from(be32(stts, 12 + 8 * i)?).ok()?;
        if times.len() as u64 + count > frames {
            return None;
        }
        for _ in 0..count {
            times.push(dts);
            dts = dts.checked_add(delta)?;
        }
    }
    if times.len() != n {
        return None;
    }
    if let Some(ctts) = child(stbl, b"ctts") {
        let mut at = 0usize;
        for i in 0..usize::try_from(be32(ctts, 4)?).ok()? {
            let count = usize::try_from(be32(ctts, 8 + 8 * i)?).ok()?;
            let offset = i64::from(be32(ctts, 12 + 8 * i)? as u32 as i32);
            for t in times.get_mut(at..at.checked_add(count)?)? {
                *t += offset;
            }
            at += count;
        }
    }
    times.sort_unstable();
    Some(times)
}

/// The times of the frames shown (sorted composition times), in nanoseconds after the first;
/// `None` if two share a time.
fn frame_times(shown: &[i64], timescale: u64) -> Option<FrameTimes> {
    let first = *shown.first()?;
    let ns = shown
        .iter()
        .map(|&t| {
            let units = u128::try_from(t - first).ok()?;
            u64::try_from(units * 1_000_000_000 / u128::from(timescale)).ok()
        })
        .collect::<Option<Vec<u64>>>()?;
    FrameTimes::new(ns)
}

/// A `tkhd` payload's track ID (after the creation and modification times, 4 or 8 bytes each
/// by version).
fn track_id(tkhd: &[u8]) -> Option<u64> {
    match tkhd.first()? {
        0 => be32(tkhd, 12),
        1 => be32(tkhd, 20),
        _ => None,
    }
}

/// Samples of track `track` in the `moof` boxes from `at` to the end: the `sample_count` of
/// every `trun` of its `traf`s. `None` when the boxes run past the end or there are too many
/// to read.
fn fragment_samples(len: u64, mut at: u64, read: ReadFn<'_>, track: u64) -> Option<u64> {
    let mut samples = 0u64;
    let mut fragments = 0usize;
    while at + 8 <= len {
        let (size, kind, header) = box_header(len, at, read)?;
        if size > len - at {
            return None;
        }
        if &kind == b"moof" {
            fragments += 1;
            if fragments > MAX_FRAGMENTS || size > MAX_MOOF {
                return None;
            }
            let body = read(at + header, size - header)?;
            for (k, traf) in children(&body) {
                if &k != b"traf" || child(traf, b"tfhd").and_then(|t| be32(t, 4)) != Some(track) {
                    continue;
                }
                for (k, trun) in children(traf) {
                    if &k == b"trun" {
                        samples += be32(trun, 4)?;
                    }
                }
            }
        }
        at = at.checked_add(size)?;
    }
    Some(samples)
}

/// The full-range flag of the first sample entry's `colr` box of type `nclx` (ISO/IEC 23001-8
/// colour parameters: primaries, transfer and matrix as u16, then the flag in the top bit),
/// from an `stsd` payload. QuickTime's `nclc` carries no range: `None`.
fn nclx_full_range(stsd: &[u8]) -> Option<bool> {
    // Full box header (4) and entry count (4); then the first sample entry, a box whose
    // visual fields take 78 bytes before its child boxes.
    let entry = children(stsd.get(8..)?).next()?.1;
    // A sample entry may carry several (an ICC profile's first, say).
    let colr = children(entry.get(78..)?)
        .find(|(kind, body)| kind == b"colr" && body.get(0..4) == Some(b"nclx".as_slice()))?
        .1;
    Some(colr.get(10)? & 0x80 != 0)
}

/// For ISO-BMFF: describes how the top-level box structure runs past the end of the object (a
/// cut-off upload), or `None` if it is complete or not ISO-BMFF at all.
pub fn mp4_cut_off(len: u64, read: ReadFn<'_>) -> Option<String> {
    if box_header(len, 0, read)?.1 != *b"ftyp" {
        return None;
    }
    let mut offset = 0u64;
    let mut saw_moov = false;
    while offset + 8 <= len {
        let (size, kind, _) = box_header(len, offset, read)?;
        saw_moov |= kind == *b"moov";
        if size > len - offset {
            return Some(format!(
                "MP4 cut off: top-level box '{}' at byte {offset} declares {size} bytes, only {} \
                 present{}",
                String::from_utf8_lossy(&kind),
                len - offset,
                if saw_moov {
                    ""
                } else {
                    "; no moov index before the cut"
                }
            ));
        }
        offset += size;
    }
    None
}

/// An EBML element header at `at` in `b`: (id, data size (None = unknown), header length).
fn ebml_header(b: &[u8], at: usize) -> Option<(u32, Option<u64>, usize)> {
    let first = *b.get(at)?;
    let id_len = first.leading_zeros() as usize + 1;
    if id_len > 4 {
        return None;
    }
    let mut id = 0u32;
    for i in 0..id_len {
        id = (id << 8) | u32::from(*b.get(at + i)?);
    }
    let s0 = *b.get(at + id_len)?;
    let size_len = s0.leading_zeros() as usize + 1;
    if size_len > 8 {
        return None;
    }
    let mut size = u64::from(s0) & ((1u64 << (8 - size_len)) - 1);
    let mut all_ones = size == (1u64 << (8 - size_len)) - 1;
    for i in 1..size_len {
        let byte = *b.get(at + id_len + i)?;
        all_ones &= byte == 0xFF;
        size = (size << 8) | u64::from(byte);
    }
    Some((id, (!all_ones).then_some(size), id_len + size_len))
}

const EBML_SEGMENT: u32 = 0x1853_8067;
const EBML_INFO: u32 = 0x1549_A966;
const EBML_DURATION: u32 = 0x4489;
const EBML_CLUSTER: u32 = 0x1F43_B675;

/// Whether a Matroska/WebM file's `Info` element has a `Duration` (`None` if not found).
fn matroska_has_duration(len: u64, read: ReadFn<'_>) -> Option<bool> {
    let head = read(0, MKV_HEAD.min(len))?;
    let (_, ebml_size, h) = ebml_header(&head, 0)?;
    let mut at = h + usize::try_from(ebml_size?).ok()?;
    let (id, _, h) = ebml_header(&head, at)?;
    if id != EBML_SEGMENT {
        return None;
    }
    at += h;
    while let Some((id, size, h)) = ebml_header(&head, at) {
        match id {
            EBML_INFO => {
                let body = head.get(at + h..at + h + usize::try_from(size?).ok()?)?;
                let mut i = 0;
                while let Some((cid, csize, ch)) = ebml_header(body, i) {
                    if cid == EBML_DURATION {
                        return Some(true);
                    }
                    i += ch + usize::try_from(csize?).ok()?;
                }
                return Some(false);
            }
            EBML_CLUSTER => return None,
            _ => at += h + usize::try_from(size?).ok()?,
        }
    }
    None
}

/// Where a Matroska/WebM file's `Segment` says it ends (`None`: not Matroska, or a size left
/// unknown, as a live recording leaves it).
fn matroska_segment_end(len: u64, read: ReadFn<'_>) -> Option<u64> {
    let head = read(0, 4096.min(len))?;
    if head.get(0..4) != Some([0x1A, 0x45, 0xDF, 0xA3].as_slice()) {
        return None;
    }
    let (_, ebml_size, h) = ebml_header(&head, 0)?;
    let at = h + usize::try_from(ebml_size?).ok()?;
    let (id, size, h) = ebml_header(&head, at)?;
    if id != EBML_SEGMENT {
        return None;
    }
    Some((at + h) as u64 + size?)
}

/// For Matroska/WebM: describes a `Segment` whose declared size runs past the end of the object.
pub fn matroska_cut_off(len: u64, read: ReadFn<'_>) -> Option<String> {
    let end = matroska_segment_end(len, read)?;
    (end > len).then(|| {
        format!("Matroska cut off: the Segment declares {end} bytes, the object has {len}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(data: &[u8]) -> impl Fn(u64, u64) -> Option<Bytes> + '_ {
        move |at, n| {
            let s = (at as usize).min(data.len());
            let e = ((at + n) as usize).min(data.len());
            Some(Bytes::copy_from_slice(&data[s..e]))
        }
    }

    fn boxed(kind: &[u8; 4], payload: &[u8]) -> Vec<u8> {
        let mut v = ((payload.len() + 8) as u32).to_be_bytes().to_vec();
        v.extend_from_slice(kind);
        v.extend_from_slice(payload);
        v
    }

    fn full(kind: &[u8; 4], fields: &[u32]) -> Vec<u8> {
        let mut p = vec![0u8; 4]; // version + flags
        for f in fields {
            p.extend_from_slice(&f.to_be_bytes());
        }
        boxed(kind, &p)
    }

    /// An MP4 with one video track of `frames` samples and the given stts entries.
    fn mp4(frames: u32, stts: &[(u32, u32)]) -> Vec<u8> {
        let mut stts_fields = vec![stts.len() as u32];
        for &(c, d) in stts {
            stts_fields.extend([c, d]);
        }
        let stbl = boxed(
            b"stbl",
            &[full(b"stsz", &[0, frames]), full(b"stts", &stts_fields)].concat(),
        );
        let hdlr = full(b"hdlr", &[0, u32::from_be_bytes(*b"vide"), 0, 0, 0]);
        let mdia = boxed(b"mdia", &[hdlr, boxed(b"minf", &stbl)].concat());
        let moov = boxed(b"moov", &boxed(b"trak", &mdia));
        [
            boxed(b"ftyp", b"isom0000"),
            boxed(b"mdat", &[0u8; 100]),
            moov,
        ]
        .concat()
    }

    #[test]
    fn mp4_frame_count_and_rate() {
        let cfr = mp4(90, &[(89, 512), (1, 100)]);
        let f = facts(cfr.len() as u64, &reader(&cfr));
        assert_eq!(f.frames, Some(90));
        assert_eq!(f.constant_rate, Some(true));
        let vfr = mp4(90, &[(30, 512), (60, 1536)]);
        let f = facts(vfr.len() as u64, &reader(&vfr));
        assert_eq!((f.frames, f.constant_rate), (Some(90), Some(false)));
        // Cut before the moov: nothing known, and the cut is named.
        let cut = &cfr[..120];
        assert_eq!(
            facts(cut.len() as u64, &reader(cut)),
            ContainerFacts::default()
        );
        assert!(mp4_cut_off(cut.len() as u64, &reader(cut)).is_some());
        assert_eq!(mp4_cut_off(cfr.len() as u64, &reader(&cfr)), None);
    }

    /// A variable-rate track's frame times: decode times plus composition offsets (signed),
    /// in presentation order, in nanoseconds after the first.
    #[test]
    fn mp4_frame_times_in_presentation_order() {
        // Decode times 0, 10, 20, 40, 50 (timescale 100 per second); composition offsets
        // reorder them as B-frames do.
        let stts = full(b"stts", &[3, 2, 10, 1, 20, 2, 10]);
        let ctts = full(b"ctts", &[3, 1, 20, 1, 30, 3, (-10i32) as u32]);
        let stbl = |with_ctts: bool| {
            let mut b = [full(b"stsz", &[0, 5]), stts.clone()].concat();
            if with_ctts {
                b.extend(ctts.clone());
            }
            b
        };
        let ns = |t: &[u64]| t.iter().map(|&u| u * 10_000_000).collect::<Vec<_>>();
        // The times of the frames an edit from `start` to the end shows.
        let presentation_times = |stbl: &[u8], frames: u64, ts: u64, start: Option<i64>| {
            let edit = start.map(|start| Edit { start, duration: 0 });
            composition_times(stbl, frames)
                .and_then(|c| frame_times(shown_by(&c, edit, None, None), ts))
        };
        // No offsets: the decode times.
        let without = presentation_times(&stbl(false), 5, 100, None).expect("times");
        assert_eq!(without.ns(), ns(&[0, 10, 20, 40, 50]).as_slice());
        // pts: 0+20, 10+30, 20-10, 40-10, 50-10 = 20, 40, 10, 30, 40: two frames at 40.
        assert_eq!(presentation_times(&stbl(true), 5, 100, None), None);
        let ctts = full(b"ctts", &[3, 1, 20, 1, 35, 3, (-10i32) as u32]);
        let b = [full(b"stsz", &[0, 5]), stts.clone(), ctts].concat();
        // 20, 45, 10, 30, 40 → 10, 20, 30, 40, 45.
        let with = presentation_times(&b, 5, 100, None).expect("times");
        assert_eq!(with.ns(), ns(&[0, 10, 20, 30, 35]).as_slice());
        // An edit list from the first shown frame (ffmpeg's for B-frames) changes nothing;
        // one that starts later hides the frames before it (a cut with `-c copy`).
        assert_eq!(presentation_times(&b, 5, 100, Some(10)), Some(with.clone()));
        assert_eq!(presentation_times(&b, 5, 100, Some(0)), Some(with));
        let later = presentation_times(&b, 5, 100, Some(11)).expect("times");
        assert_eq!(later.ns(), ns(&[0, 10, 20, 25]).as_slice());
        // Offsets for more samples than the table has: no times.
        let long_ctts = full(b"ctts", &[1, 6, 0]);
        let b = [full(b"stsz", &[0, 5]), stts.clone(), long_ctts].concat();
        assert_eq!(presentation_times(&b, 5, 100, None), None);
        // Tables that do not cover the samples: nothing.
        assert_eq!(presentation_times(&stbl(false), 6, 100, None), None);
        assert_eq!(presentation_times(&stbl(false), 4, 100, None), None);
        // In the facts of a variable-rate file only, with the `mdhd` timescale (version 0:
        // 32-bit times; version 1: 64-bit) and the edit list.
        let mdhd0 = full(b"mdhd", &[0, 0, 100, 50, 0]);
        let mut mdhd1 = vec![1, 0, 0, 0];
        mdhd1.extend([0u8; 16]);
        mdhd1.extend(100u32.to_be_bytes());
        mdhd1.extend([0u8; 12]);
        let mdhd1 = boxed(b"mdhd", &mdhd1);
        let file = |mdhd: &[u8], edts: &[u8], stbl: Vec<u8>| {
            let hdlr = full(b"hdlr", &[0, u32::from_be_bytes(*b"vide"), 0, 0, 0]);
            let mdia = boxed(
                b"mdia",
                &[mdhd.to_vec(), hdlr, boxed(b"minf", &boxed(b"stbl", &stbl))].concat(),
            );
            let trak = boxed(b"trak", &[edts.to_vec(), mdia].concat());
            [boxed(b"ftyp", b"isom0000"), boxed(b"moov", &trak)].concat()
        };
        let shown = |mdhd: &[u8], edts: &[u8]| {
            let vfr = file(mdhd, edts, stbl(false));
            let f = facts(vfr.len() as u64, &reader(&vfr));
            assert_eq!(f.constant_rate, Some(false));
            (f.frames, f.frame_times)
        };
        let times = |mdhd: &[u8], edts: &[u8]| shown(mdhd, edts).1;
        assert_eq!(times(&mdhd0, &[]), Some(without.clone()));
        assert_eq!(times(&mdhd1, &[]), Some(without.clone()));
        assert_eq!(times(&full(b"mdhd", &[0, 0, 0, 50, 0]), &[]), None);
        let elst = |edits: &[(u32, i32, u32)]| {
            let mut fields = vec![edits.len() as u32];
            for &(duration, time, rate) in edits {
                fields.extend([duration, time as u32, rate]);
            }
            boxed(b"edts", &full(b"elst", &fields))
        };
        let normal = 0x0001_0000;
        // A delay (an empty edit), then the media from its start: the times.
        let delayed = elst(&[(20, -1, normal), (500, 0, normal)]);
        assert_eq!(times(&mdhd0, &delayed), Some(without));
        // From a later frame (media time 10 of 0, 10, 20, 40, 50): the frames from it, counted
        // and timed from it. No movie timescale here (no `mvhd`): to the end.
        let (frames, later) = shown(&mdhd0, &elst(&[(500, 10, normal)]));
        assert_eq!(frames, Some(4));
        assert_eq!(later.expect("times").ns(), ns(&[0, 10, 30, 40]).as_slice());
        // In two pieces, or at another speed: no times, and every sample counted.
        let pieces = elst(&[(20, 0, normal), (20, 30, normal)]);
        assert_eq!(shown(&mdhd0, &pieces), (Some(5), None));
        assert_eq!(
            shown(&mdhd0, &elst(&[(500, 0, 0x0002_0000)])),
            (Some(5), None)
        );
        let cfr = file(
            &mdhd0,
            &[],
            [full(b"stsz", &[0, 5]), full(b"stts", &[1, 5, 10])].concat(),
        );
        let f = facts(cfr.len() as u64, &reader(&cfr));
        assert_eq!((f.constant_rate, f.frame_times), (Some(true), None));
    }

    /// A constant-rate file cut with `ffmpeg -ss … -c copy`: the edit list shows the frames from
    /// its media time for its duration (movie timescale), and only those are counted.
    #[test]
    fn an_edit_list_counts_the_frames_it_shows() {
        // 10 frames 512 apart (timescale 15360: 30 fps); movie timescale 1000.
        let cts: Vec<i64> = (0..10).map(|n| n * 512).collect();
        let edit = |start, duration| Some(Edit { start, duration });
        let n = |e| shown_by(&cts, e, Some(15360), Some(1000)).len();
        assert_eq!(n(None), 10);
        // From frame 3 to the end (0: to the end; or a duration past it).
        assert_eq!(n(edit(3 * 512, 0)), 7);
        assert_eq!(n(edit(3 * 512, 10_000)), 7);
        assert_eq!(n(edit(3 * 512 - 1, 10_000)), 7);
        // From frame 3 for 100 ms: frames 3, 4, 5 (at 0, 33.3, 66.7 ms of it).
        assert_eq!(n(edit(3 * 512, 100)), 3);
        assert_eq!(n(edit(3 * 512, 101)), 4);
        // Past the last frame: nothing.
        assert_eq!(n(edit(100_000, 0)), 0);
        // Without the timescales the duration cannot be read: to the end.
        assert_eq!(
            shown_by(&cts, edit(3 * 512, 100), None, Some(1000)).len(),
            7
        );
    }

    /// A sample entry's `colr nclx` range flag, as ffmpeg writes it for `-color_range pc`.
    #[test]
    fn mp4_colour_box_range() {
        let stsd = |colr: Option<Vec<u8>>| -> Vec<u8> {
            let mut entry = vec![0u8; 78];
            entry.extend(boxed(b"avcC", &[1, 2, 3]));
            if let Some(c) = colr {
                entry.extend(c);
            }
            entry.extend(boxed(b"pasp", &[0; 8]));
            [
                vec![0u8; 4],
                1u32.to_be_bytes().to_vec(),
                boxed(b"avc1", &entry),
            ]
            .concat()
        };
        let nclx = |flag: u8| {
            let mut p = b"nclx".to_vec();
            p.extend([0, 1, 0, 1, 0, 1, flag]);
            boxed(b"colr", &p)
        };
        assert_eq!(nclx_full_range(&stsd(Some(nclx(0x80)))), Some(true));
        assert_eq!(nclx_full_range(&stsd(Some(nclx(0x00)))), Some(false));
        // An ICC profile box first, then the nclx one.
        let mut prof = b"prof".to_vec();
        prof.extend([0; 12]);
        let both = [boxed(b"colr", &prof), nclx(0x80)].concat();
        assert_eq!(nclx_full_range(&stsd(Some(both))), Some(true));
        let mut nclc = b"nclc".to_vec();
        nclc.extend([0, 1, 0, 1, 0, 1]);
        assert_eq!(nclx_full_range(&stsd(Some(boxed(b"colr", &nclc)))), None);
        assert_eq!(nclx_full_range(&stsd(None)), None);
        assert_eq!(nclx_full_range(&[0; 6]), None);
    }

    /// Fragmented MP4 (an `mvex` in the `moov`): frames counted from the fragments' `trun`
    /// boxes, never numbered from timestamps.
    #[test]
    fn fragmented_mp4_counts_its_fragments() {
        // No video track: nothing known.
        let moov = boxed(b"moov", &boxed(b"mvex", &full(b"trex", &[1, 1, 0, 0, 0])));
        let frag = [boxed(b"ftyp", b"isom0000"), moov, boxed(b"moof", &[0; 16])].concat();
        assert_eq!(
            facts(frag.len() as u64, &reader(&frag)),
            ContainerFacts::default()
        );
        // A video track (ID 2) with 3 samples in its sample table and fragments of 5 and 7,
        // an audio track's (ID 1) fragment between: 15 frames, never numbered from
        // timestamps.
        let stbl = boxed(b"stbl", &full(b"stsz", &[0, 3]));
        let hdlr = full(b"hdlr", &[0, u32::from_be_bytes(*b"vide"), 0, 0, 0]);
        let mdia = boxed(b"mdia", &[hdlr, boxed(b"minf", &stbl)].concat());
        let tkhd = full(b"tkhd", &[0, 0, 2, 0, 0]);
        let trak = boxed(b"trak", &[tkhd, mdia].concat());
        let moov = boxed(
            b"moov",
            &[trak, boxed(b"mvex", &full(b"trex", &[2, 1, 0, 0, 0]))].concat(),
        );
        let moof = |track: u32, runs: &[u32]| {
            let mut traf = full(b"tfhd", &[track]);
            for &n in runs {
                traf.extend(full(b"trun", &[n, 0]));
            }
            boxed(
                b"moof",
                &[full(b"mfhd", &[1]), boxed(b"traf", &traf)].concat(),
            )
        };
        let frag = [
            boxed(b"ftyp", b"isom0000"),
            moov,
            moof(2, &[5]),
            boxed(b"mdat", &[0; 300]),
            moof(1, &[40]),
            boxed(b"mdat", &[0; 100]),
            moof(2, &[4, 3]),
            boxed(b"mdat", &[0; 300]),
        ]
        .concat();
        let f = facts(frag.len() as u64, &reader(&frag));
        assert_eq!(
            (f.frames, f.constant_rate, f.fragmented),
            (Some(15), Some(false), true)
        );
        // Too long to decode from the start for a late window: counted, and sought in.
        let mut long = frag.clone();
        long.extend(moof(2, &[MAX_DECODED_THROUGH as u32]));
        let f = facts(long.len() as u64, &reader(&long));
        assert_eq!(
            (f.frames, f.constant_rate),
            (Some(MAX_DECODED_THROUGH + 15), None)
        );
        // Cut inside the last fragment, or more fragments than are read for a clip: nothing
        // known (the duration's estimate, and seeks).
        let estimate = ContainerFacts {
            fragmented: true,
            ..ContainerFacts::default()
        };
        let cut = &frag[..frag.len() - 10];
        assert_eq!(facts(cut.len() as u64, &reader(cut)), estimate);
        let mut many = frag.clone();
        for _ in 0..MAX_FRAGMENTS {
            many.extend(moof(2, &[1]));
        }
        assert_eq!(facts(many.len() as u64, &reader(&many)), estimate);
    }

    #[test]
    fn mp4_cut_off_detection() {
        let mut file = boxed(b"ftyp", &[0; 16]);
        file.extend(boxed(b"mdat", &[0; 1000]));
        file.extend(boxed(b"moov", &[0; 200]));
        let cut = |d: &[u8]| mp4_cut_off(d.len() as u64, &reader(d));
        assert_eq!(cut(&file), None);
        let c = cut(&file[..500]).expect("cut in mdat");
        assert!(c.contains("'mdat'") && c.contains("no moov"), "{c}");
        assert!(cut(&file[..file.len() - 1]).is_some());
        assert_eq!(cut(b"not an mp4 at all"), None);
        assert_eq!(cut(&[]), None);
        // Malformed box sizes are not called truncation.
        let mut bad = boxed(b"ftyp", &[0; 16]);
        bad.extend_from_slice(&[0, 0, 0, 3, b'f', b'r', b'e', b'e']);
        assert_eq!(cut(&bad), None);
    }

    fn ebml(id: &[u8], payload: &[u8]) -> Vec<u8> {
        let mut v = id.to_vec();
        v.extend_from_slice(&(0x0100_0000_0000_0000u64 | payload.len() as u64).to_be_bytes());
        v.extend_from_slice(payload);
        v
    }

    #[test]
    fn matroska_duration_and_cut() {
        let header = ebml(&[0x1A, 0x45, 0xDF, 0xA3], &ebml(&[0x42, 0x82], b"webm"));
        let info_with = ebml(&[0x15, 0x49, 0xA9, 0x66], &ebml(&[0x44, 0x89], &[0; 8]));
        let info_without = ebml(
            &[0x15, 0x49, 0xA9, 0x66],
            &ebml(&[0x2A, 0xD7, 0xB1], &[0; 3]),
        );
        for (info, want) in [(info_with, Some(true)), (info_without, Some(false))] {
            let file = [
                header.clone(),
                ebml(
                    &[0x18, 0x53, 0x80, 0x67],
                    &[info, vec![0xEC, 0x80]].concat(),
                ),
            ]
            .concat();
            let f = facts(file.len() as u64, &reader(&file));
            assert_eq!(f.has_duration, want);
            assert!(f.complete);
            assert_eq!(matroska_cut_off(file.len() as u64, &reader(&file)), None);
            let cut = &file[..file.len() - 3];
            assert!(matroska_cut_off(cut.len() as u64, &reader(cut)).is_some());
            assert!(!facts(cut.len() as u64, &reader(cut)).complete);
            // A Segment of unknown size (all ones, as a live recording leaves it): not known
            // to be complete, nor cut.
            let mut unknown = file.clone();
            let at = header.len() + 4;
            unknown[at..at + 8].copy_from_slice(&[0x01, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF, 0xFF]);
            assert!(!facts(unknown.len() as u64, &reader(&unknown)).complete);
            assert_eq!(
                matroska_cut_off(unknown.len() as u64, &reader(&unknown)),
                None
            );
        }
    }
}
