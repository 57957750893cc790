//! Decoding the frames of one clip: only the window the clip needs, from ranged reads.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;
use gst::prelude::*;
use gst_video::prelude::*;
use gstreamer as gst;
use gstreamer_app as gst_app;
use gstreamer_video as gst_video;

use crate::clock::{FrameClock, irregular_times, on_grid};
use crate::container::{self, ContainerFacts};
use crate::error::{IngestError, QuarantineReason};
use crate::frame::{Colour, YuvFrame};
use crate::hwdecode::{self, VideoDecoderKind};
use crate::known::{KnownVideos, Learned};
use crate::skip::{self, SkipPlan};
use crate::source::{ByteSource, ReadAhead, ReadAheadOptions};

/// How long one `try_pull_sample` waits before the bus and the deadline are checked again.
const POLL: Duration = Duration::from_millis(20);

/// When the stream ends before the requested frames, the clip is padded with the last frame
/// only if at most this fraction of the announced frame count (and at least
/// [`TRUNCATION_MIN_FRAMES`] frames) is missing; a bigger shortfall is
/// [`QuarantineReason::Truncated`].
const TRUNCATION_FRACTION: f64 = 0.10;
/// See [`TRUNCATION_FRACTION`].
const TRUNCATION_MIN_FRAMES: u64 = 2;

/// Whether a stream that ends after `found` frames falls short of `announced` by more than
/// the padding tolerance.
fn falls_short(announced: u64, found: u64) -> bool {
    let tolerance = ((announced as f64 * TRUNCATION_FRACTION) as u64).max(TRUNCATION_MIN_FRAMES);
    announced > found + tolerance
}

/// Whether the announced frame count is GStreamer's estimate (duration × nominal rate) for a
/// Matroska/WebM file known to be complete (its `Segment` size said, and all there): a
/// variable rate makes it wrong, and a stream ending early then does not mean a cut file.
fn estimated_length(facts: &ContainerFacts, frames_hint: Option<u64>) -> bool {
    frames_hint.is_none() && facts.has_duration == Some(true) && facts.complete
}

/// A seek aims this many frames before the wanted one: demuxers snap to key frames by decode
/// time, which runs ahead of presentation time by the B-frame reorder depth (usually ≤ 3).
/// If a seek still lands past the frame, it is retried from 8× further back.
const SEEK_MARGIN_FRAMES: f64 = 4.0;

/// How long the pipeline may sit with no running streaming thread (and no frame, EOS or
/// error) before it is declared dead; see [`Waiter::next_sample`].
const DEAD_GRACE: Duration = Duration::from_millis(300);

/// Options for a [`Decoder`].
#[derive(Clone, Debug)]
pub struct DecoderOptions {
    /// Wall-clock budget for one decode call, from the call to the last frame (default 60 s).
    /// Exceeding it is [`QuarantineReason::Timeout`].
    pub deadline: Duration,
    /// Largest frame accepted, in pixels (width × height; default 4096 × 4096). Larger frames
    /// are [`QuarantineReason::TooLarge`] (checked on the parsed stream caps before the decoder
    /// allocates anything, when the parser announces a size, and again on decoded frames).
    pub max_pixels: u64,
    /// Threads per video decoder (`max-threads` of `avdec_*`, `threads` of `vp8dec`/`vp9dec`);
    /// `0` (default) keeps the decoder's own choice (one per core). Use `1` when running one
    /// decoder per core.
    pub decoder_threads: u32,
    /// Seek (to the key frame at or before the wanted frame) instead of decoding through a gap
    /// of at least this many frames (default 64, one clip's span). `u64::MAX` never seeks.
    pub seek_min_frames: u64,
    /// Chunk sizes and cache bound of the ranged reads.
    pub read_ahead: ReadAheadOptions,
    /// Drop H.264 frames that nothing references and the clip does not use before they reach
    /// the decoder (default `true`; only while frames are numbered from timestamps).
    pub skip_unneeded: bool,
    /// Software decoders only (default), or NVDEC where it takes the stream.
    pub video_decoder: VideoDecoderKind,
}

impl Default for DecoderOptions {
    fn default() -> Self {
        DecoderOptions {
            deadline: Duration::from_secs(60),
            max_pixels: 4096 * 4096,
            decoder_threads: 0,
            seek_min_frames: 64,
            read_ahead: ReadAheadOptions::default(),
            skip_unneeded: true,
            video_decoder: VideoDecoderKind::Software,
        }
    }
}

/// How one pass over a stream ended.
enum Pass {
    /// The planned frames were delivered.
    Delivered,
    /// Nobody announced the length: the frames were counted (nothing delivered).
    Counted(u64),
    /// No clock could number the frames after the seek the window needs: they were counted
    /// for their times (nothing delivered), kept in `learned` if usable.
    TimesLearned,
    /// The nominal rate was found not to number the frames (marked in `learned`): run again
    /// without it.
    Retry,
    /// The stream ended short of an estimated length: run again, counting its frames first.
    Recount,
}

/// What the container/stream says about a video, known once the first frame is decoded.
#[derive(Clone, Debug, PartialEq)]
pub struct VideoInfo {
    /// Frame width in pixels (native, as decoded).
    pub width: u32,
    /// Frame height in pixels (native, as decoded).
    pub height: u32,
    /// Frames per second from the caps; for streams without a nominal rate, from the first
    /// frame's duration; `0.0` if neither is known.
    pub fps: f64,
    /// Duration the container announces, if any.
    pub duration_ns: Option<u64>,
    /// Best estimate of the frame count: `duration × fps` rounded (exact for constant-frame-rate
    /// files); `0` when the duration or the rate is unknown.
    pub num_frames: u64,
}

/// What one decode call did, for metrics and logs.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DecodeStats {
    /// Size of the object.
    pub object_bytes: u64,
    /// Bytes fetched from the source (ranged reads, including read-ahead).
    pub bytes_read: u64,
    /// Fetch requests made.
    pub read_requests: u64,
    /// Frames that came out of the decoder (including skipped ones before the window).
    pub frames_decoded: u64,
    /// Seeks made.
    pub seeks: u32,
    /// Frames dropped before the decoder: unreferenced ones the clip does not use, and, when
    /// H.264/H.265/VP9 frames are counted, the ones counted there.
    pub frames_skipped: u64,
    /// The frames came from an NVDEC decoder (`false`: software, or no video decoder ran).
    /// In NVDEC mode a software decoder takes over for codecs NVDEC lacks and where no NVDEC
    /// element could open, so counting this is how a run tells how much NVDEC really decoded.
    pub nvdec: bool,
    /// An NVDEC decoder failed on this clip and a software decoder decoded it again (see
    /// [`Decoder::decode`]); the other counts cover both passes.
    pub nvdec_fallback: bool,
    /// An earlier clip of this version of the video taught what its container does not say
    /// cheaply (its frame count, its fragments, an irregular rate), and this clip used that
    /// instead of learning it again ([`crate::KnownVideos`]).
    pub learned_earlier: bool,
    /// Wall-clock time of the call.
    pub elapsed: Duration,
}

/// Receives a clip's frames as they are decoded.
///
/// `plan` is called once, when the first frame has told the stream's size and rate; it returns
/// the frame numbers wanted (0-based presentation order; any order; may repeat; may exceed the
/// frames that exist). Then `frame(slot, …)` is called once for each distinct frame number with
/// the first slot that wants it, and `repeat(from, to)` for the other slots wanting the same
/// frame. Slots past the end of the stream get the last decoded frame (see
/// [`Decoder::decode`]).
pub trait FrameSink {
    /// The frame numbers wanted, given the stream's info.
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64>;
    /// Frame for position `slot` of the plan.
    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError>;
    /// Position `to` wants the same frame as position `from` (already delivered).
    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError>;
}

/// Decoded frames of one clip: RGB, native resolution, packed `T × H × W × 3` `u8` (no row
/// padding), in the order of `indices`.
#[derive(Clone, Debug)]
pub struct DecodedClip {
    /// The stream's info (as passed to the `choose` callback).
    pub info: VideoInfo,
    /// The frame indices as returned by `choose` (frame `t` of `frames` is `indices[t]`).
    pub indices: Vec<u64>,
    /// Frame width (same as `info.width`).
    pub width: u32,
    /// Frame height (same as `info.height`).
    pub height: u32,
    /// `indices.len() × height × width × 3` bytes of RGB.
    pub frames: Vec<u8>,
    /// What the decode cost.
    pub stats: DecodeStats,
}

impl DecodedClip {
    /// Bytes in one frame (`height × width × 3`).
    pub fn frame_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }

    /// Number of frames (`indices.len()`).
    pub fn num_frames(&self) -> usize {
        self.indices.len()
    }

    /// The RGB bytes of frame `t` (`0 ≤ t < indices.len()`).
    pub fn frame(&self, t: usize) -> Option<&[u8]> {
        let n = self.frame_len();
        self.frames.get(t * n..(t + 1) * n)
    }
}

/// A [`FrameSink`] that keeps native-resolution RGB frames (for [`Decoder::decode_clip`]).
struct RgbSink<'a> {
    choose: &'a mut dyn FnMut(&VideoInfo) -> Vec<u64>,
    info: Option<VideoInfo>,
    indices: Vec<u64>,
    size: (usize, usize),
    frames: Vec<u8>,
}

impl FrameSink for RgbSink<'_> {
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64> {
        self.info = Some(info.clone());
        self.indices = (self.choose)(info);
        self.indices.clone()
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        let len = frame.width * frame.height * 3;
        if self.frames.is_empty() {
            self.size = (frame.width, frame.height);
            let total = len.checked_mul(self.indices.len()).ok_or_else(|| {
                quarantine(QuarantineReason::TooLarge, "clip size overflows usize")
            })?;
            self.frames.try_reserve_exact(total).map_err(|e| {
                quarantine(
                    QuarantineReason::TooLarge,
                    format!("cannot allocate {total} bytes for the clip: {e}"),
                )
            })?;
            self.frames.resize(total, 0);
        }
        if (frame.width, frame.height) != self.size {
            return Err(size_changed(self.size, (frame.width, frame.height)));
        }
        frame.to_rgb(&mut self.frames[slot * len..(slot + 1) * len])
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        let len = self.size.0 * self.size.1 * 3;
        self.frames
            .copy_within(from * len..(from + 1) * len, to * len);
        Ok(())
    }
}

fn size_changed(was: (usize, usize), now: (usize, usize)) -> IngestError {
    quarantine(
        QuarantineReason::DecodeError,
        format!(
            "frame size changed mid-stream from {}x{} to {}x{}",
            was.0, was.1, now.0, now.1
        ),
    )
}

/// Passes a sink's calls through, and gives a second pass over the same stream (NVDEC's
/// software fallback) the first pass's plan: the sink plans (draws its random frames and crop)
/// once per clip.
struct Replay<'a> {
    inner: &'a mut dyn FrameSink,
    /// Every plan made, by the stream info it was made for (a clip planned from an estimated
    /// length and again from the real one has two; a software retry after NVDEC asks again).
    planned: Vec<(VideoInfo, Vec<u64>)>,
}

impl FrameSink for Replay<'_> {
    fn plan(&mut self, info: &VideoInfo) -> Vec<u64> {
        if let Some((_, indices)) = self.planned.iter().find(|(seen, _)| seen == info) {
            return indices.clone();
        }
        let indices = self.inner.plan(info);
        self.planned.push((info.clone(), indices.clone()));
        indices
    }

    fn frame(&mut self, slot: usize, frame: &YuvFrame<'_>) -> Result<(), IngestError> {
        self.inner.frame(slot, frame)
    }

    fn repeat(&mut self, from: usize, to: usize) -> Result<(), IngestError> {
        self.inner.repeat(from, to)
    }
}

/// Whether a software decoder may succeed where an NVDEC one failed with `reason`: the
/// decoder's own failures, not the file's bytes, the store or the deadline.
fn software_may_decode(reason: QuarantineReason) -> bool {
    matches!(
        reason,
        QuarantineReason::DecodeError
            | QuarantineReason::NoFrames
            | QuarantineReason::Truncated
            | QuarantineReason::UnsupportedFormat
    )
}

/// A per-worker video decoder.
///
/// It keeps one GStreamer pipeline (`appsrc ! decodebin ! videoconvert ! appsink`, I420 out)
/// and reuses it from clip to clip (the first pipeline of a process costs 90–375 ms; a reused
/// one reaches its first frame in a few ms); after a failed clip the pipeline is rebuilt. It is
/// always brought down to `Null` before a call returns. A `Decoder` is `Send`; use one per
/// thread.
pub struct Decoder {
    opts: DecoderOptions,
    clips: u64,
    pipe: Option<Pipe>,
    /// The last pass ended with an NVDEC element as the video decoder.
    nvdec_last: bool,
    /// NVDEC mode's software decoder for clips an NVDEC decoder failed on (made on first need).
    software: Option<Box<Decoder>>,
    /// What earlier clips learned about the videos (shared with other decoders or not).
    known: Arc<KnownVideos>,
}

/// A built pipeline and the state its callbacks share with the polling thread.
struct Pipe {
    pipeline: gst::Pipeline,
    appsrc: gst_app::AppSrc,
    appsink: gst_app::AppSink,
    shared: Arc<Mutex<Shared>>,
    feed: Arc<Mutex<Feed>>,
    skip: Arc<Mutex<SkipPlan>>,
}

/// What `appsrc` serves: the current clip's bytes and the read position.
#[derive(Default)]
struct Feed {
    source: Option<Arc<ReadAhead>>,
    position: u64,
}

/// State shared between the streaming threads' callbacks and the polling thread; reset per clip.
#[derive(Default)]
struct Shared {
    /// A raw video pad of decodebin got linked to `videoconvert`.
    video_linked: bool,
    /// decodebin emitted `no-more-pads`.
    no_more_pads: bool,
    /// Caps names of the non-video pads decodebin exposed (sent to `fakesink`).
    other_pads: Vec<String>,
    /// The fakesinks added for them (removed after the clip).
    fakesinks: Vec<gst::Element>,
    /// A callback decided to refuse the input.
    refuse: Option<(QuarantineReason, String)>,
    /// A read failed for the store's sake, not the input's ([`IngestError::Unavailable`]), or
    /// because the object was replaced meanwhile ([`IngestError::Changed`]).
    unavailable: Option<IngestError>,
    /// `autoplug-continue` calls so far (the first one carries the type-find result).
    autoplug_calls: u32,
    /// The video decoder behind the linked video pad.
    video_decoder: Option<hwdecode::UsedDecoder>,
    /// Whether the video decoder decodebin plugged last is an NVDEC one (known before the pad
    /// is exposed, so also when the decoder fails before its first frame).
    plugged_nvdec: Option<bool>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Sets the pipeline to `Null` when dropped (every exit path of a decode, panics included).
struct NullOnDrop(gst::Pipeline);

impl Drop for NullOnDrop {
    fn drop(&mut self) {
        if let Err(e) = self.0.set_state(gst::State::Null) {
            tracing::warn!(error = %e, "setting the decode pipeline to Null failed");
        }
    }
}

fn fatal(what: &str, e: impl std::fmt::Display) -> IngestError {
    IngestError::Fatal(format!("{what}: {e}"))
}

fn quarantine(reason: QuarantineReason, detail: impl Into<String>) -> IngestError {
    IngestError::quarantine(reason, detail)
}

/// The progress of one clip's decode, for messages.
struct Progress {
    decoded: u64,
    started: Instant,
}

impl Decoder {
    /// Creates a decoder (calls [`crate::init`]).
    pub fn new(opts: DecoderOptions) -> Result<Self, IngestError> {
        crate::init()?;
        hwdecode::check_available(opts.video_decoder)?;
        Ok(Decoder {
            opts,
            clips: 0,
            pipe: None,
            nvdec_last: false,
            software: None,
            known: Arc::new(KnownVideos::default()),
        })
    }

    /// Keeps what clips teach about their videos in `known` (by default each decoder has its
    /// own): decoders that share one learn each video once between them.
    pub fn with_known_videos(mut self, known: Arc<KnownVideos>) -> Self {
        self.known = known;
        self
    }

    /// The options this decoder was created with.
    pub fn options(&self) -> &DecoderOptions {
        &self.opts
    }

    /// Decodes the frames `choose` asks for from an in-memory video; RGB at native size.
    ///
    /// See [`Decoder::decode`]; `choose(&info)` plays the role of [`FrameSink::plan`]. An empty
    /// list from `choose` returns a clip with no frames (info only).
    pub fn decode_clip(
        &mut self,
        data: Bytes,
        choose: &mut dyn FnMut(&VideoInfo) -> Vec<u64>,
    ) -> Result<DecodedClip, IngestError> {
        self.decode_clip_from(Arc::new(data), choose)
    }

    /// [`Decoder::decode_clip`] from any [`ByteSource`] (e.g. an [`crate::ObjectSource`]).
    pub fn decode_clip_from(
        &mut self,
        source: Arc<dyn ByteSource>,
        choose: &mut dyn FnMut(&VideoInfo) -> Vec<u64>,
    ) -> Result<DecodedClip, IngestError> {
        let mut sink = RgbSink {
            choose,
            info: None,
            indices: Vec::new(),
            size: (0, 0),
            frames: Vec::new(),
        };
        let stats = self.decode(source, &mut sink)?;
        let info = sink
            .info
            .ok_or_else(|| IngestError::Fatal("decode finished without stream info".into()))?;
        Ok(DecodedClip {
            width: info.width,
            height: info.height,
            info,
            indices: sink.indices,
            frames: sink.frames,
            stats,
        })
    }

    /// Decodes the frames `sink` plans from `source`, delivering them as 8-bit I420.
    ///
    /// The bytes are read with ranged reads through a [`ReadAhead`] cache, served to `appsrc`
    /// in random-access mode (so MP4 with the `moov` atom at the end works without a full
    /// download). Once the first frame is decoded, `sink.plan(&info)` gives the frame numbers.
    /// Frames are numbered in presentation order from 0. When the next wanted frame is at least
    /// [`DecoderOptions::seek_min_frames`] ahead, the pipeline seeks to the key frame at or
    /// before it (frame numbers then come from timestamps: exact for constant-frame-rate
    /// streams); decoding stops as soon as the last wanted frame is in. If the stream ends
    /// first, the missing positions get the last decoded frame (the estimate from the duration
    /// can be off by a frame) unless the shortfall suggests a cut-off file
    /// ([`QuarantineReason::Truncated`]).
    ///
    /// The frame count comes from the container's index where it has one (MP4), else from
    /// duration × rate, else from a counting pass. What a clip learns that way (a count, a
    /// fragmented MP4's facts, a rate found irregular) is kept for the video's later clips
    /// when the source names its version ([`ByteSource::version`],
    /// [`Decoder::with_known_videos`]). Unreferenced H.264/H.265 frames the plan does
    /// not use are dropped before the decoder while frames are numbered from timestamps
    /// ([`DecoderOptions::skip_unneeded`]).
    ///
    /// In NVDEC mode, a clip whose NVDEC decoder fails (a decode error, no frames, too few
    /// frames, an output it cannot negotiate) is decoded again by a software decoder, from the
    /// bytes already read and with the same plan (`sink.plan` is not called again for the same
    /// stream info); [`DecodeStats::nvdec_fallback`] says so, and the second pass has a
    /// deadline of its own.
    ///
    /// Audio and subtitle streams are not decoded. Every wait is bounded by
    /// [`DecoderOptions::deadline`]; the pipeline is set to `Null` before returning.
    pub fn decode(
        &mut self,
        source: Arc<dyn ByteSource>,
        sink: &mut dyn FrameSink,
    ) -> Result<DecodeStats, IngestError> {
        let started = Instant::now();
        self.clips += 1;
        let size = source.size();
        let describe = source.describe();
        if size == 0 {
            return Err(quarantine(
                QuarantineReason::EmptyFile,
                "object has 0 bytes",
            ));
        }
        let mut version = source.version();
        let feed = Arc::new(ReadAhead::new(source, self.opts.read_ahead));
        let read_failed = std::cell::Cell::new(false);
        let read = |at: u64, n: u64| {
            let got = feed.read_at(at, n).ok();
            read_failed.set(read_failed.get() || got.is_none());
            got
        };
        let earlier = version.as_deref().and_then(|v| self.known.get(v));
        let mut stats = DecodeStats {
            object_bytes: size,
            learned_earlier: earlier.is_some(),
            ..DecodeStats::default()
        };
        let mut learned = match earlier {
            Some(known) => known,
            None => {
                // A read that failed reads as "not said" (a fragment count given up on): the
                // clip can still decode, but such facts are not the video's to remember.
                let facts = container::facts(size, &read);
                if read_failed.get() {
                    version = None;
                }
                Learned {
                    facts,
                    ..Learned::default()
                }
            }
        };
        let mut sink = Replay {
            inner: sink,
            planned: Vec::new(),
        };
        let mut result = self.decode_feed(&feed, &mut sink, started, &mut stats, &mut learned);
        if let Err(IngestError::Quarantine { reason, detail }) = &result
            && self.nvdec_last
            && software_may_decode(*reason)
        {
            // An NVDEC decoder that opened can still fail on a stream (a profile or size it
            // lacks, a CUDA error): decode the clip again in software rather than lose it.
            tracing::warn!(
                source = %describe,
                reason = reason.as_str(),
                %detail,
                "NVDEC failed on this clip; decoding it again in software"
            );
            let software = self.software_decoder()?;
            let retry_started = Instant::now();
            result =
                software.decode_feed(&feed, &mut sink, retry_started, &mut stats, &mut learned);
            stats.nvdec = false;
            stats.nvdec_fallback = true;
        }
        stats.bytes_read = feed.bytes_fetched();
        stats.read_requests = feed.requests();
        stats.elapsed = started.elapsed();
        // Only from a clean clip: a failed read can leave the facts half-read.
        if let (Ok(()), Some(v)) = (&result, &version) {
            self.known.remember(v, &learned);
        }
        let result = match result {
            Ok(()) => Ok(stats),
            Err(IngestError::Quarantine {
                reason: reason @ (QuarantineReason::DemuxError | QuarantineReason::NoFrames),
                detail,
            }) => match container::mp4_cut_off(size, &read)
                .or_else(|| container::matroska_cut_off(size, &read))
            {
                // A cut-off upload is a common failure; name it.
                Some(cut) => Err(quarantine(
                    QuarantineReason::Truncated,
                    format!("{cut} ({detail})"),
                )),
                None => Err(quarantine(reason, detail)),
            },
            Err(e) => Err(e),
        };
        match &result {
            Ok(st) => tracing::debug!(
                clip = self.clips,
                source = %describe,
                bytes_read = st.bytes_read,
                frames_decoded = st.frames_decoded,
                seeks = st.seeks,
                nvdec = st.nvdec,
                elapsed_ms = st.elapsed.as_secs_f64() * 1e3,
                "decoded clip"
            ),
            Err(e) => tracing::debug!(
                clip = self.clips,
                source = %describe,
                error = %e,
                elapsed_ms = started.elapsed().as_secs_f64() * 1e3,
                "clip refused"
            ),
        }
        result
    }

    /// Decodes one clip from `feed` (counting the frames first where nobody announces them),
    /// adding what it finds out to `learned`.
    fn decode_feed(
        &mut self,
        feed: &Arc<ReadAhead>,
        sink: &mut dyn FrameSink,
        started: Instant,
        stats: &mut DecodeStats,
        learned: &mut Learned,
    ) -> Result<(), IngestError> {
        // The previous pass asked for a count (see [`Pass::Recount`]).
        let mut recount = false;
        loop {
            let count_first = std::mem::take(&mut recount);
            match self.attempt(feed, sink, started, stats, learned, count_first)? {
                Pass::Counted(counted) => {
                    tracing::debug!(counted, "frame count unknown: counted the frames first");
                    learned.counted = Some(counted);
                }
                Pass::TimesLearned => {
                    tracing::debug!(
                        timed = learned.frame_times.is_some(),
                        "no clock for the window: counted the frames for their times first"
                    );
                }
                Pass::Retry => {}
                Pass::Recount => recount = true,
                Pass::Delivered => return Ok(()),
            }
        }
    }

    /// NVDEC mode's software decoder (same options, software decoders only).
    fn software_decoder(&mut self) -> Result<&mut Decoder, IngestError> {
        let opts = DecoderOptions {
            video_decoder: VideoDecoderKind::Software,
            ..self.opts.clone()
        };
        Ok(match &mut self.software {
            Some(d) => d,
            none => none.insert(Box::new(Decoder::new(opts)?)),
        })
    }

    /// One pass over the stream on the (reused or new) pipeline; see [`Decoder::run`].
    fn attempt(
        &mut self,
        feed: &Arc<ReadAhead>,
        sink: &mut dyn FrameSink,
        started: Instant,
        stats: &mut DecodeStats,
        learned: &mut Learned,
        recount: bool,
    ) -> Result<Pass, IngestError> {
        self.nvdec_last = false;
        let pipe = match self.pipe.take() {
            Some(p) => p,
            None => self.build_pipeline()?,
        };
        *lock(&pipe.shared) = Shared::default();
        *lock(&pipe.skip) = SkipPlan::default();
        {
            let mut f = lock(&pipe.feed);
            f.source = Some(Arc::clone(feed));
            f.position = 0;
        }
        pipe.appsrc
            .set_size(i64::try_from(feed.size()).unwrap_or(i64::MAX));
        let guard = NullOnDrop(pipe.pipeline.clone());
        let result = self.run(&pipe, sink, started, stats, learned, recount);
        drop(guard);
        stats.frames_skipped += lock(&pipe.skip).dropped;
        {
            let st = lock(&pipe.shared);
            if let Some(used) = &st.video_decoder {
                stats.nvdec = used.nvdec;
            }
            self.nvdec_last = st.plugged_nvdec == Some(true);
        }
        lock(&pipe.feed).source = None;
        let fakesinks = std::mem::take(&mut lock(&pipe.shared).fakesinks);
        for s in fakesinks {
            let _ = s.set_state(gst::State::Null);
            let _ = pipe.pipeline.remove(&s);
        }
        // Reuse the pipeline only after a clean run; a failed one is rebuilt from scratch.
        if result.is_ok() && pipe.pipeline.current_state() == gst::State::Null {
            self.pipe = Some(pipe);
        }
        result
    }

    /// Builds `appsrc ! decodebin ! videoconvert ! appsink` (I420), serving the current feed.
    fn build_pipeline(&self) -> Result<Pipe, IngestError> {
        let shared = Arc::new(Mutex::new(Shared::default()));
        let feed = Arc::new(Mutex::new(Feed::default()));
        let feed_need = Arc::clone(&feed);
        let feed_seek = Arc::clone(&feed);
        let shared_need = Arc::clone(&shared);
        let callbacks = gst_app::AppSrcCallbacks::builder()
            .need_data(move |src, length| {
                let (source, offset) = {
                    let f = lock(&feed_need);
                    (f.source.clone(), f.position)
                };
                let Some(source) = source else {
                    let _ = src.end_of_stream();
                    return;
                };
                let size = source.size();
                if offset >= size {
                    let _ = src.end_of_stream();
                    return;
                }
                // Random access: push exactly what was asked for (or what is left).
                let n = u64::from(length).min(size - offset).max(1);
                let chunk = match source.read_at(offset, n) {
                    Ok(b) if !b.is_empty() => b,
                    Ok(_) => {
                        let _ = src.end_of_stream();
                        return;
                    }
                    Err(e) => {
                        let mut st = lock(&shared_need);
                        match e {
                            IngestError::Quarantine { reason, detail } => {
                                st.refuse.get_or_insert((reason, detail));
                            }
                            IngestError::Fatal(d) => {
                                st.refuse.get_or_insert((QuarantineReason::FetchError, d));
                            }
                            passing @ (IngestError::Unavailable(_) | IngestError::Changed(_)) => {
                                st.unavailable.get_or_insert(passing);
                            }
                        }
                        drop(st);
                        let _ = src.end_of_stream();
                        return;
                    }
                };
                let end = offset + chunk.len() as u64;
                let mut buffer = gst::Buffer::from_slice(chunk);
                if let Some(b) = buffer.get_mut() {
                    b.set_offset(offset);
                    b.set_offset_end(end);
                }
                lock(&feed_need).position = end;
                if let Err(e) = src.push_buffer(buffer) {
                    tracing::trace!(error = ?e, "appsrc push_buffer refused (flushing)");
                }
            })
            .seek_data(move |_, offset| {
                let mut f = lock(&feed_seek);
                match &f.source {
                    Some(s) if offset <= s.size() => {
                        f.position = offset;
                        true
                    }
                    _ => false,
                }
            })
            .build();
        let appsrc = gst_app::AppSrc::builder()
            .name("src")
            .stream_type(gst_app::AppStreamType::RandomAccess)
            .format(gst::Format::Bytes)
            .callbacks(callbacks)
            .build();

        let decodebin = gst::ElementFactory::make("decodebin")
            .name("decode")
            .build()
            .map_err(|e| fatal("creating decodebin", e))?;
        let convert = gst::ElementFactory::make("videoconvert")
            .name("convert")
            .build()
            .map_err(|e| fatal("creating videoconvert", e))?;
        let convert_sink = convert
            .static_pad("sink")
            .ok_or_else(|| IngestError::Fatal("videoconvert has no sink pad".into()))?;
        // NVDEC mode answers the decoders' caps queries with what `videoconvert` takes.
        hwdecode::connect(&decodebin, self.opts.video_decoder, &convert_sink)?;
        // 8-bit 4:2:0: passthrough for most streams; videoconvert converts the rest (10-bit,
        // 4:4:4, NV12, …). Colour conversion happens later, on output pixels only.
        let i420 = gst::Caps::builder("video/x-raw")
            .field("format", "I420")
            .build();
        let appsink = gst_app::AppSink::builder()
            .name("sink")
            .caps(&i420)
            .sync(false)
            .max_buffers(2)
            .drop(false)
            .enable_last_sample(false)
            .build();

        let pipeline = gst::Pipeline::with_name("vjepa-decode");
        if self.opts.video_decoder == VideoDecoderKind::Nvdec
            && let Some(bus) = pipeline.bus()
        {
            hwdecode::share_cuda_contexts(&bus);
        }
        pipeline
            .add_many([
                appsrc.upcast_ref::<gst::Element>(),
                &decodebin,
                &convert,
                appsink.upcast_ref(),
            ])
            .map_err(|e| fatal("assembling the decode pipeline", e))?;
        appsrc
            .link(&decodebin)
            .map_err(|e| fatal("linking appsrc to decodebin", e))?;
        convert
            .link(&appsink)
            .map_err(|e| fatal("linking videoconvert to appsink", e))?;

        let skip = Arc::new(Mutex::new(SkipPlan::default()));
        let threads = self.opts.decoder_threads;
        let skip_unneeded = self.opts.skip_unneeded;
        let skip_probe = Arc::clone(&skip);
        let shared_ea = Arc::clone(&shared);
        if let Some(bin) = decodebin.downcast_ref::<gst::Bin>() {
            bin.connect_deep_element_added(move |_, _, element| {
                if let Some(used) = hwdecode::element_decoder(element) {
                    lock(&shared_ea).plugged_nvdec = Some(used.nvdec);
                }
                if threads > 0 {
                    limit_decoder_threads(element, threads);
                }
                if skip_unneeded {
                    skip::attach(element, &skip_probe);
                }
            });
        }

        // Do not decode audio/subtitles; refuse still images and oversized frames early.
        let max_pixels = self.opts.max_pixels;
        let shared_ac = Arc::clone(&shared);
        decodebin.connect("autoplug-continue", false, move |args| {
            let keep_going = autoplug_continue(args, max_pixels, &shared_ac);
            Some(keep_going.to_value())
        });

        let shared_pa = Arc::clone(&shared);
        let pipeline_weak = pipeline.downgrade();
        let kind = self.opts.video_decoder;
        decodebin.connect_pad_added(move |_, pad| {
            on_pad_added(pad, &convert_sink, &pipeline_weak, &shared_pa, kind);
        });
        let shared_nmp = Arc::clone(&shared);
        decodebin.connect_no_more_pads(move |_| {
            lock(&shared_nmp).no_more_pads = true;
        });
        Ok(Pipe {
            pipeline,
            appsrc,
            appsink,
            shared,
            feed,
            skip,
        })
    }

    /// Runs the pipeline until the planned frames are in (or it fails).
    ///
    /// When neither an exact frame count (container index, or a counting pass) nor a
    /// trustworthy duration is known, the stream is counted to its end without delivering
    /// anything ([`Pass::Counted`]): the caller runs again with that count. So it is when the
    /// window needs a seek but no clock can number the frames after one, and counting is
    /// cheap, or when `recount` (the previous pass ended short of an estimated length)
    /// ([`Pass::TimesLearned`]): the times and the count found make a clock and a length.
    fn run(
        &self,
        pipe: &Pipe,
        sink: &mut dyn FrameSink,
        started: Instant,
        stats: &mut DecodeStats,
        learned: &mut Learned,
        recount: bool,
    ) -> Result<Pass, IngestError> {
        // A copy: `learned` takes what this pass finds out.
        let facts = &learned.facts.clone();
        // The exact frame count, where known (container index, or a counting pass).
        let frames_hint = facts.frames.or(learned.counted);
        let pipeline = &pipe.pipeline;
        let shared = &*pipe.shared;
        let deadline = started + self.opts.deadline;
        let bus = pipeline
            .bus()
            .ok_or_else(|| IngestError::Fatal("pipeline has no bus".into()))?;
        // Messages of an earlier clip must not leak into this one.
        while bus.pop().is_some() {}
        let mut watch = BusWatch::default();
        let mut progress = Progress {
            decoded: 0,
            started,
        };

        if let Err(e) = pipeline.set_state(gst::State::Playing) {
            // The reason (e.g. type finding failed) is usually on the bus already.
            watch.drain(&bus);
            if let Some(passing) = lock(shared).unavailable.take() {
                return Err(passing);
            }
            if let Some(err) = watch.error.take() {
                return Err(err);
            }
            if let Some((reason, detail)) = lock(shared).refuse.take() {
                return Err(quarantine(reason, detail));
            }
            return Err(quarantine(
                QuarantineReason::DecodeError,
                format!("pipeline refused to start: {e}"),
            ));
        }

        // Phase 1: the first frame gives the stream info; then the sink plans the frames.
        let mut waiter = Waiter {
            pipeline,
            appsink: &pipe.appsink,
            bus: &bus,
            shared,
            deadline,
            idle_since: None,
        };
        let Some(first) = waiter.next_sample(self, &mut watch, &progress)? else {
            let st = lock(shared);
            if !st.video_linked {
                return Err(no_video_reason(&st, &watch));
            }
            return Err(quarantine(
                QuarantineReason::NoFrames,
                "stream ended before the first frame was decoded",
            ));
        };
        // An MP4 whose edit list starts inside a frame (cut with `-c copy` off the frame
        // grid): the decoder gives that frame too, its timestamp clipped to the cut; ffmpeg
        // (and so the frame count) leaves it out, and so does this, here and wherever the
        // stream is decoded from its start again (below: frames before frame 0).
        let first = if facts.clipped_lead {
            waiter
                .next_sample(self, &mut watch, &progress)?
                .unwrap_or(first)
        } else {
            first
        };
        let mut frame_info = frame_video_info(&first, self.opts.max_pixels)?;
        let mut colour = colour_of(first.caps(), facts);
        let (width, height) = (frame_info.width(), frame_info.height());
        let mut info = stream_info(pipeline, &first, &frame_info);
        if facts.has_duration == Some(false) {
            // Matroska without a Duration: what GStreamer reports is an estimate.
            info.num_frames = 0;
        }
        if let Some(n) = frames_hint {
            info.num_frames = n;
        }
        // Nobody knows the length: count to the end.
        let count_all = info.num_frames == 0;
        let mut indices = if count_all {
            Vec::new()
        } else {
            tracing::trace!(?info, "stream info");
            sink.plan(&info)
        };
        // A window planned from an estimated length past the frames an earlier pass found:
        // planned again from what was found, exactly when that pass would have had to (the
        // same clip whether or not the length was known beforehand).
        if !count_all
            && self.opts.skip_unneeded
            && estimated_length(facts, frames_hint)
            && let Some(found) = learned.frames_found
            && indices.iter().any(|&i| i >= found)
            && falls_short(info.num_frames, found)
        {
            tracing::debug!(
                estimated = info.num_frames,
                found,
                "the window lies past the frames there are: planned from the frames found"
            );
            info.num_frames = found;
            indices = sink.plan(&info);
        }

        // Frame numbers from timestamps (needed after a seek): a constant frame rate, or the
        // frames' times from the container's sample table or from counting. Not when an
        // earlier clip found them irregular: it ended up counting from the start.
        let caps_rate = frame_info.fps();
        let pts0 = first.buffer().and_then(|b| b.pts());
        // Seeks are in stream time; buffer timestamps are in the segment's own time, which an
        // MP4 edit list starts at its media time (the B-frame delay; for a file cut with
        // `-c copy`, up to a GOP): the difference is taken off every seek target.
        let stream_offset: i64 = pts0
            .zip(first.segment())
            .and_then(|(pts, segment)| {
                let segment = segment.downcast_ref::<gst::ClockTime>()?;
                let stream = segment.to_stream_time(pts)?;
                Some(pts.nseconds() as i64 - stream.nseconds() as i64)
            })
            .unwrap_or(0);
        let to_stream = |at: u64| (at as i64 - stream_offset).max(0) as u64;
        let times = (facts.frame_times.as_ref())
            .or(learned.frame_times.as_ref())
            .filter(|_| !learned.times_failed);
        let clock = match (pts0, times) {
            (Some(pts0), Some(times)) => Some(FrameClock::Table {
                pts0: pts0.nseconds(),
                times: times.clone(),
            }),
            (Some(pts0), None)
                if !learned.variable_rate
                    && caps_rate.numer() > 0
                    && caps_rate.denom() > 0
                    && facts.constant_rate != Some(false) =>
            {
                Some(FrameClock::Constant {
                    pts0: pts0.nseconds(),
                    frame_ns: 1e9 * f64::from(caps_rate.denom()) / f64::from(caps_rate.numer()),
                })
            }
            _ => None,
        };
        let can_seek = self.opts.seek_min_frames != u64::MAX && clock.is_some();
        // Whether counting this stream for its frames' times is cheap and may pay: it has no
        // sample table (an MP4's edit list can hide frames that counting would see) and has
        // not been counted for them yet, and its frames are counted before the decoder.
        let learnable = self.opts.seek_min_frames != u64::MAX
            && self.opts.skip_unneeded
            && pts0.is_some()
            && facts.frames.is_none()
            && !facts.fragmented
            && !learned.times_counted
            && !learned.times_failed
            && frame_info.interlace_mode() == gst_video::VideoInterlaceMode::Progressive
            && lock(shared)
                .video_decoder
                .as_ref()
                .is_some_and(|d| skip::counts_before_decoder(&d.factory));
        let far = indices
            .iter()
            .max()
            .is_some_and(|&m| m >= self.opts.seek_min_frames);
        let learn_times = !count_all && learnable && (recount || (clock.is_none() && far));

        if count_all || learn_times {
            // Count to the end (bounded by the deadline). H.264 and H.265 pictures and shown
            // VP9 frames of a progressive stream are counted as they reach the decoder and
            // dropped there (`skip.rs`; in an interlaced stream an access unit can be a
            // field); what is already in the decoder, and other codecs, are decoded and
            // counted as they come out.
            lock(&pipe.skip).count_only =
                frame_info.interlace_mode() == gst_video::VideoInterlaceMode::Progressive;
            let mut decoded = 1u64;
            // Every frame's timestamp, for when the rate turns out irregular.
            let pts_of = |s: &gst::Sample| s.buffer().and_then(|b| b.pts()).map(|p| p.nseconds());
            let mut times: Option<Vec<u64>> = pts_of(&first).map(|p| vec![p]);
            drop(first);
            while let Some(sample) = waiter.next_sample(self, &mut watch, &progress)? {
                decoded += 1;
                progress.decoded += 1;
                match (pts_of(&sample), &mut times) {
                    (Some(p), Some(t)) => t.push(p),
                    _ => times = None,
                }
            }
            stats.frames_decoded += decoded;
            let mut skip = lock(&pipe.skip);
            let count = decoded + skip.dropped;
            if let Some(t) = &mut times
                && !skip.counted_untimed
            {
                t.append(&mut skip.counted_pts);
                let rate = frame_info.fps();
                let frame_ns = (rate.numer() > 0 && rate.denom() > 0)
                    .then(|| 1e9 * f64::from(rate.denom()) / f64::from(rate.numer()));
                // Only times a nominal rate would number wrongly are kept (any, when the rate
                // is known not to number them).
                let frame_ns = frame_ns.filter(|_| !learned.variable_rate);
                let mut t = std::mem::take(t);
                t.sort_unstable();
                // Off the declared rate's grid, even where no times can be kept (two frames at
                // one time): that rate does not number these frames.
                if frame_ns.is_some_and(|f| !on_grid(&t, f)) {
                    learned.variable_rate = true;
                }
                learned.frame_times = irregular_times(t, frame_ns);
            }
            learned.times_counted = true;
            if estimated_length(facts, frames_hint) {
                learned.frames_found = Some(count);
            }
            return Ok(if count_all {
                Pass::Counted(count)
            } else {
                Pass::TimesLearned
            });
        }

        // Positions of `indices` in ascending index order (robust to unsorted input).
        let mut order: Vec<usize> = (0..indices.len()).collect();
        order.sort_by_key(|&t| indices[t]);
        let mut next = 0usize;
        let mut current = Some(first);
        let mut last: Option<(gst::Buffer, u64)> = None;
        let mut last_caps: Option<gst::Caps> = None;
        // An MP4 (its sample table gives the rate, or the times) numbers frames from
        // timestamps from the start; everything else counts until a seek.
        let timed_from_start = matches!(clock, Some(FrameClock::Table { .. }))
            || (clock.is_some() && facts.constant_rate == Some(true));
        {
            let mut sp = lock(&pipe.skip);
            sp.clock = clock.clone();
            let mut wanted = indices.clone();
            wanted.sort_unstable();
            wanted.dedup();
            sp.wanted = wanted;
            sp.active = timed_from_start;
        }
        // Frame number of the next decoded frame when counting; `None` when numbers come from
        // timestamps (after a seek, or from the start, above).
        let mut counter: Option<u64> = if timed_from_start { None } else { Some(0) };
        // The last seek: the frame it is for, how far before it it aimed (frames), and whether
        // a frame at or before the target has come out since.
        let mut seek: Option<(u64, f64, bool)> = None;
        let mut seek_failed = false;
        let mut max_number = 0u64;
        // Timestamp of the previous frame since the last seek (consecutive frames must follow
        // each other by the clock for numbers from timestamps to be right).
        let mut prev_pts: Option<u64> = None;
        let seek_to = |target: u64, margin: f64, stats: &mut DecodeStats| -> bool {
            let Some(clock) = &clock else {
                return false;
            };
            let at = to_stream(clock.time_of(target as f64 - margin));
            let flags =
                gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT | gst::SeekFlags::SNAP_BEFORE;
            match pipeline.seek_simple(flags, gst::ClockTime::from_nseconds(at)) {
                Ok(()) => {
                    stats.seeks += 1;
                    tracing::trace!(target, margin, at_ns = at, "seeked");
                    true
                }
                Err(e) => {
                    tracing::debug!(target, error = %e, "seek refused; decoding through");
                    false
                }
            }
        };

        // Phase 2: go through the stream (seeking over big gaps), deliver the planned frames.
        while next < order.len() {
            let target = indices[order[next]];
            let position = counter.unwrap_or(max_number + 1);
            if can_seek
                && !seek_failed
                && current.is_none()
                && target >= position.saturating_add(self.opts.seek_min_frames)
                && seek.is_none_or(|(t, _, _)| target > t)
            {
                if seek_to(target, SEEK_MARGIN_FRAMES, stats) {
                    seek = Some((target, SEEK_MARGIN_FRAMES, false));
                    counter = None;
                    lock(&pipe.skip).active = true;
                    last = None;
                    prev_pts = None;
                } else {
                    seek_failed = true;
                }
            }
            let sample = match current.take() {
                Some(s) => s,
                None => match waiter.next_sample(self, &mut watch, &progress)? {
                    Some(s) => s,
                    None => break,
                },
            };
            if facts.clipped_lead
                && let (Some(pts), Some(pts0)) = (sample.buffer().and_then(|b| b.pts()), pts0)
                && pts < pts0
            {
                continue;
            }
            // Re-parse the frame layout only when the caps object changes.
            let caps_changed = match (sample.caps(), last_caps.as_ref()) {
                (Some(c), Some(prev)) => c.as_ptr() != prev.as_ptr(),
                _ => true,
            };
            if caps_changed {
                let vi = frame_video_info(&sample, self.opts.max_pixels)?;
                if vi.width() != width || vi.height() != height {
                    return Err(size_changed(
                        (width as usize, height as usize),
                        (vi.width() as usize, vi.height() as usize),
                    ));
                }
                colour = colour_of(sample.caps(), facts);
                frame_info = vi;
                last_caps = sample.caps_owned();
            }
            progress.decoded += 1;
            let number = match counter {
                Some(n) => {
                    counter = Some(n + 1);
                    n
                }
                None => match (sample.buffer().and_then(|b| b.pts()), &clock) {
                    (Some(pts), Some(clock)) => clock.number(pts.nseconds()).unwrap_or(0),
                    // No timestamp: the frame after the previous one.
                    _ => max_number + 1,
                },
            };
            if let Some((seek_target, margin, false)) = seek {
                if number <= seek_target {
                    seek = Some((seek_target, margin, true));
                } else if margin < seek_target as f64 && !seek_failed {
                    // Landed past the wanted frame: demuxers snap by decode time, which runs
                    // ahead of presentation time with B-frames. Aim further back and retry.
                    let wider = margin * 8.0;
                    tracing::debug!(seek_target, number, wider, "seek landed past the frame");
                    if seek_to(seek_target, wider, stats) {
                        seek = Some((seek_target, wider, false));
                        prev_pts = None;
                        continue;
                    }
                    seek_failed = true;
                } else {
                    tracing::debug!(seek_target, number, "seek landed past the frame at 0");
                    seek = Some((seek_target, margin, true));
                }
            }
            if counter.is_none()
                && let (Some(pts), Some(clock)) = (sample.buffer().and_then(|b| b.pts()), &clock)
            {
                let pts = pts.nseconds();
                // One frame apart, plus any frames dropped before the decoder in between.
                let irregular = clock.frame_at(pts).is_none()
                    || prev_pts.is_some_and(|p| {
                        let skipped = lock(&pipe.skip).dropped_between(p, pts);
                        !clock.follows(p, pts, skipped)
                    });
                prev_pts = Some(pts);
                if irregular {
                    // Not constant-rate after all: numbers from timestamps would be wrong.
                    // Start over from the beginning, counting frames, without seeking.
                    tracing::debug!(number, "irregular timestamps; counting instead");
                    // A table's times were irregular at the nominal rate (or it would not have
                    // been kept): that rate is not tried either.
                    learned.variable_rate = true;
                    if matches!(clock, FrameClock::Table { .. }) {
                        learned.times_failed = true;
                    } else if learnable {
                        // Cheaper than decoding from the start to every later window: count
                        // the frames for their times, then seek by them.
                        stats.frames_decoded += progress.decoded;
                        return Ok(Pass::Retry);
                    }
                    seek_failed = true;
                    lock(&pipe.skip).active = false;
                    let start = to_stream(pts0.map_or(0, |p| p.nseconds()));
                    let flags = gst::SeekFlags::FLUSH | gst::SeekFlags::KEY_UNIT;
                    if pipeline
                        .seek_simple(flags, gst::ClockTime::from_nseconds(start))
                        .is_err()
                    {
                        return Err(quarantine(
                            QuarantineReason::DecodeError,
                            "variable frame rate detected after a seek, and seeking back failed",
                        ));
                    }
                    stats.seeks += 1;
                    counter = Some(0);
                    next = 0;
                    last = None;
                    max_number = 0;
                    seek = None;
                    continue;
                }
            }
            max_number = max_number.max(number);
            let mut delivered: Option<usize> = None;
            while next < order.len() && indices[order[next]] <= number {
                let t = order[next];
                match delivered {
                    Some(from) => sink.repeat(from, t)?,
                    None => {
                        with_frame(sample.buffer(), &frame_info, colour, |f| sink.frame(t, f))?;
                        delivered = Some(t);
                    }
                }
                next += 1;
            }
            // Keep the buffer, not the sample: appsink reuses its sample object.
            last = sample.buffer_owned().map(|b| (b, number));
            drop(sample);
        }
        stats.frames_decoded += progress.decoded;

        if next < order.len() {
            // The stream ended before the largest requested index.
            let Some((last, last_number)) = last else {
                return Err(quarantine(QuarantineReason::NoFrames, "no frame decoded"));
            };
            let decoded = last_number + 1;
            let expected = info.num_frames;
            if falls_short(expected, decoded) {
                // An estimated length (a complete Matroska file whose rate drops, or whose
                // audio outlasts the video): count the frames there are, before the decoder
                // (a decoder that drops frames on an error must not set the length), and plan
                // the clip again from that count. Once counted, a short stream is truncated.
                if estimated_length(facts, frames_hint) && learnable {
                    return Ok(Pass::Recount);
                }
                return Err(quarantine(
                    QuarantineReason::Truncated,
                    format!(
                        "stream ended after {decoded} frames but {} {expected} ({} at {:.3} fps)",
                        if learned.frames_found == Some(expected) {
                            "counting them before the decoder found"
                        } else {
                            "the container announces"
                        },
                        info.duration_ns.map_or_else(
                            || "no duration".to_string(),
                            |ns| format!("{:.3} s", ns as f64 / 1e9)
                        ),
                        info.fps
                    ),
                ));
            }
            let missing = order.len() - next;
            tracing::debug!(
                decoded,
                announced = expected,
                missing,
                max_requested = indices[order[order.len() - 1]],
                "stream ended before the requested frames; padding with the last frame"
            );
            let mut filled_from: Option<usize> = None;
            for &t in &order[next..] {
                match filled_from {
                    Some(from) => sink.repeat(from, t)?,
                    None => {
                        with_frame(Some(&last), &frame_info, colour, |f| sink.frame(t, f))?;
                        filled_from = Some(t);
                    }
                }
            }
        }
        Ok(Pass::Delivered)
    }

    /// Polls the bus and the callbacks' verdicts; errors out on failure or past the deadline.
    fn check(
        &self,
        bus: &gst::Bus,
        watch: &mut BusWatch,
        shared: &Mutex<Shared>,
        deadline: Instant,
        progress: &Progress,
    ) -> Result<(), IngestError> {
        watch.drain(bus);
        {
            let mut st = lock(shared);
            // A read failure is the root cause of whatever the demuxer says next.
            if let Some(passing) = st.unavailable.take() {
                return Err(passing);
            }
            if let Some((reason, detail)) = st.refuse.take() {
                return Err(quarantine(reason, detail));
            }
            drop(st);
            if let Some(err) = watch.error.take() {
                return Err(err);
            }
            let st = lock(shared);
            if st.no_more_pads && !st.video_linked {
                drop(st);
                // A missing-plugin message may have been posted just before no-more-pads.
                watch.drain(bus);
                if let Some(err) = watch.error.take() {
                    return Err(err);
                }
                let st = lock(shared);
                return Err(no_video_reason(&st, watch));
            }
        }
        if Instant::now() >= deadline {
            return Err(quarantine(
                QuarantineReason::Timeout,
                format!(
                    "deadline of {:?} passed after {} decoded frames ({:?} elapsed)",
                    self.opts.deadline,
                    progress.decoded,
                    progress.started.elapsed()
                ),
            ));
        }
        Ok(())
    }
}

/// Maps a decoded I420 buffer and hands it to `f` as a [`YuvFrame`].
fn with_frame(
    buffer: Option<&gst::BufferRef>,
    info: &gst_video::VideoInfo,
    colour: Colour,
    f: impl FnOnce(&YuvFrame<'_>) -> Result<(), IngestError>,
) -> Result<(), IngestError> {
    let buffer = buffer
        .ok_or_else(|| quarantine(QuarantineReason::DecodeError, "sample without a buffer"))?;
    let frame = gst_video::VideoFrameRef::from_buffer_ref_readable(buffer, info).map_err(|e| {
        quarantine(
            QuarantineReason::DecodeError,
            format!("cannot map decoded frame: {e}"),
        )
    })?;
    let plane = |i: u32| {
        frame.plane_data(i).map_err(|e| {
            quarantine(
                QuarantineReason::DecodeError,
                format!("cannot read plane {i} of a decoded frame: {e}"),
            )
        })
    };
    let strides = frame.plane_stride();
    let stride = |i: usize| {
        strides
            .get(i)
            .and_then(|&s| usize::try_from(s).ok())
            .ok_or_else(|| quarantine(QuarantineReason::DecodeError, "bad plane stride"))
    };
    let yuv = YuvFrame {
        width: info.width() as usize,
        height: info.height() as usize,
        planes: [plane(0)?, plane(1)?, plane(2)?],
        strides: [stride(0)?, stride(1)?, stride(2)?],
        colour,
    };
    f(&yuv)
}

/// The stream's YUV→RGB conversion from its colorimetry tags, as ffmpeg's default conversion
/// (and so decord, the official loader) makes it: the tagged matrix and range; BT.601 where the
/// matrix is not tagged, whatever the size (GStreamer's own default would be BT.709 from 720
/// lines up); limited range where the range is not tagged.
///
/// The caps' `colorimetry` string is read here rather than through `VideoInfo`, which throws a
/// partly tagged value away for its size-based default: `1:0:0:0` (full range, matrix not
/// tagged: a `yuvj420p` H.264 stream) would lose its range, and `2:0:0:0` at 720p would become
/// BT.709.
///
/// An MP4 whose `colr` box says full range is converted as full range whatever the caps say
/// (see [`ContainerFacts::full_range`]).
fn colour_of(caps: Option<&gst::CapsRef>, facts: &ContainerFacts) -> Colour {
    let tag = caps
        .and_then(|c| c.structure(0))
        .and_then(|s| s.get::<&str>("colorimetry").ok());
    let colour = colour_from_tag(tag);
    Colour {
        full_range: colour.full_range || facts.full_range == Some(true),
        ..colour
    }
}

/// [`colour_of`] for a `colorimetry` caps value (`None`: untagged).
fn colour_from_tag(tag: Option<&str>) -> Colour {
    use gst_video::VideoColorMatrix as M;
    let Some(c) = tag.and_then(|t| t.parse::<gst_video::VideoColorimetry>().ok()) else {
        return Colour::BT601;
    };
    let base = match c.matrix() {
        M::Bt709 => Colour::BT709,
        M::Bt2020 => Colour::BT2020,
        M::Fcc => Colour {
            kr: 0.30,
            kb: 0.11,
            full_range: false,
        },
        M::Smpte240m => Colour {
            kr: 0.212,
            kb: 0.087,
            full_range: false,
        },
        _ => Colour::BT601,
    };
    Colour {
        full_range: c.range() == gst_video::VideoColorRange::Range0_255,
        ..base
    }
}

/// Polls `appsink` for the next frame while watching the bus, the callbacks, the deadline and
/// whether the pipeline can still make progress.
struct Waiter<'a> {
    pipeline: &'a gst::Pipeline,
    appsink: &'a gst_app::AppSink,
    bus: &'a gst::Bus,
    shared: &'a Mutex<Shared>,
    deadline: Instant,
    /// Since when no streaming thread has been running (see [`no_running_task`]).
    idle_since: Option<Instant>,
}

impl Waiter<'_> {
    /// The next decoded frame, or `None` at the end of the stream.
    ///
    /// decodebin swallows an error that a pull-mode demuxer posts while decodebin is still
    /// bringing it to PAUSED (it filters errors during that state change and discards them
    /// when the change succeeds), e.g. qtdemux on an MP4 cut before its `moov` atom. The
    /// pipeline then sits idle with no running streaming thread and no EOS: that state,
    /// lasting [`DEAD_GRACE`], is reported as a quarantine instead of waiting for the deadline.
    fn next_sample(
        &mut self,
        decoder: &Decoder,
        watch: &mut BusWatch,
        progress: &Progress,
    ) -> Result<Option<gst::Sample>, IngestError> {
        loop {
            decoder.check(self.bus, watch, self.shared, self.deadline, progress)?;
            if let Some(sample) = self
                .appsink
                .try_pull_sample(gst::ClockTime::from_nseconds(POLL.as_nanos() as u64))
            {
                self.idle_since = None;
                return Ok(Some(sample));
            }
            if self.appsink.is_eos() || watch.eos {
                // Surface a pending error (or verdict) rather than ending normally.
                decoder.check(self.bus, watch, self.shared, self.deadline, progress)?;
                return Ok(None);
            }
            if no_running_task(self.pipeline) {
                let since = *self.idle_since.get_or_insert_with(Instant::now);
                if since.elapsed() >= DEAD_GRACE {
                    decoder.check(self.bus, watch, self.shared, self.deadline, progress)?;
                    if self.appsink.is_eos() {
                        return Ok(None);
                    }
                    let st = lock(self.shared);
                    let detail = format!(
                        "pipeline stopped without an error or EOS after {} frames (an early \
                         demuxer error was swallowed by decodebin; streams: [{}])",
                        progress.decoded,
                        st.other_pads.join(", ")
                    );
                    let reason = if progress.decoded == 0 && !st.video_linked {
                        QuarantineReason::DemuxError
                    } else {
                        QuarantineReason::DecodeError
                    };
                    return Err(quarantine(reason, detail));
                }
            } else {
                self.idle_since = None;
            }
        }
    }
}

/// `true` when no pad task (streaming thread) in the pipeline is running: nothing can make
/// progress any more. `false` when unsure (e.g. the element tree changed while iterating).
fn no_running_task(pipeline: &gst::Pipeline) -> bool {
    let mut any_task = false;
    let mut it = pipeline.iterate_recurse();
    loop {
        match it.next() {
            Ok(Some(element)) => {
                for pad in element.pads() {
                    match pad.task_state() {
                        gst::TaskState::Started => return false,
                        gst::TaskState::Paused => any_task = true,
                        _ => {}
                    }
                }
            }
            Ok(None) => return any_task,
            Err(_) => return false,
        }
    }
}

/// Why there is no video pad: a missing decoder, or no video stream at all.
fn no_video_reason(st: &Shared, watch: &BusWatch) -> IngestError {
    if let Some(missing) = &watch.missing_plugin {
        return quarantine(
            QuarantineReason::UnsupportedFormat,
            format!("no decoder installed: {missing}"),
        );
    }
    if let Some(video) = st.other_pads.iter().find(|c| c.starts_with("video/")) {
        return quarantine(
            QuarantineReason::UnsupportedFormat,
            format!("video stream {video} was not decoded"),
        );
    }
    quarantine(
        QuarantineReason::NoVideoStream,
        format!("streams found: [{}]", st.other_pads.join(", ")),
    )
}

/// What the bus said so far.
#[derive(Default)]
struct BusWatch {
    /// The first error, classified.
    error: Option<IngestError>,
    /// An error was already reported (later ones are consequences).
    errored: bool,
    /// The pipeline posted EOS.
    eos: bool,
    /// Description of a `missing-plugin` element message.
    missing_plugin: Option<String>,
}

impl BusWatch {
    fn drain(&mut self, bus: &gst::Bus) {
        while let Some(msg) = bus.pop() {
            use gst::MessageView;
            match msg.view() {
                MessageView::Error(err) => {
                    let src = msg
                        .src()
                        .map(|s| s.path_string().to_string())
                        .unwrap_or_default();
                    tracing::debug!(
                        src = %src,
                        error = %err.error(),
                        debug = ?err.debug(),
                        "pipeline error"
                    );
                    if !self.errored {
                        self.errored = true;
                        let debug = err.debug().map(|d| d.to_string());
                        self.error = Some(classify_error(
                            &err.error(),
                            &src,
                            debug.as_deref(),
                            self.missing_plugin.as_deref(),
                        ));
                    }
                }
                MessageView::Warning(w) => {
                    tracing::debug!(error = %w.error(), debug = ?w.debug(), "pipeline warning");
                }
                MessageView::Eos(_) => self.eos = true,
                MessageView::Element(el) => {
                    if let Some(s) = el.structure()
                        && s.name() == "missing-plugin"
                    {
                        let detail = s
                            .get::<String>("name")
                            .or_else(|_| s.get::<gst::Caps>("detail").map(|c| c.to_string()))
                            .unwrap_or_else(|_| s.to_string());
                        tracing::debug!(%detail, "missing plugin");
                        self.missing_plugin.get_or_insert(detail);
                    }
                }
                _ => {}
            }
        }
    }
}

/// Sets a decoder's thread count property, if it has one.
fn limit_decoder_threads(element: &gst::Element, threads: u32) {
    let is_decoder = element
        .factory()
        .is_some_and(|f| f.klass().contains("Decoder"));
    if !is_decoder {
        return;
    }
    for name in ["max-threads", "threads"] {
        let Some(pspec) = element.find_property(name) else {
            continue;
        };
        if !pspec.flags().contains(gst::glib::ParamFlags::WRITABLE) {
            continue;
        }
        match gst::glib::Value::deserialize_with_pspec(&threads.to_string(), &pspec) {
            Ok(v) => {
                element.set_property_from_value(name, &v);
                tracing::trace!(element = %element.name(), name, threads, "decoder threads set");
            }
            Err(_) => tracing::debug!(element = %element.name(), name, "cannot set threads"),
        }
        return;
    }
}

/// Maps a GStreamer error message to a quarantine reason.
fn classify_error(
    err: &gst::glib::Error,
    src: &str,
    debug: Option<&str>,
    missing_plugin: Option<&str>,
) -> IngestError {
    let mut detail = format!("{err} (from {src})");
    if let Some(d) = debug {
        detail.push_str(": ");
        detail.push_str(d);
    }
    let reason = if let Some(e) = err.kind::<gst::StreamError>() {
        match e {
            gst::StreamError::TypeNotFound => QuarantineReason::NotAVideo,
            gst::StreamError::CodecNotFound | gst::StreamError::WrongType => {
                QuarantineReason::UnsupportedFormat
            }
            gst::StreamError::Demux => QuarantineReason::DemuxError,
            _ => QuarantineReason::DecodeError,
        }
    } else if let Some(e) = err.kind::<gst::CoreError>() {
        match e {
            gst::CoreError::MissingPlugin | gst::CoreError::Negotiation => {
                QuarantineReason::UnsupportedFormat
            }
            _ => QuarantineReason::DecodeError,
        }
    } else {
        QuarantineReason::DecodeError
    };
    // decodebin's own verdict when every stream hit EOS before its first buffer.
    let reason = if reason == QuarantineReason::DecodeError
        && debug.is_some_and(|d| d.contains("all streams without buffers"))
    {
        QuarantineReason::NoFrames
    } else {
        reason
    };
    let reason = match (reason, missing_plugin) {
        (QuarantineReason::DecodeError, Some(_)) => QuarantineReason::UnsupportedFormat,
        (r, _) => r,
    };
    quarantine(reason, detail)
}

/// `autoplug-continue` handler: `false` stops decodebin from plugging more elements for a pad
/// (the pad is then exposed as it is). Audio, text and subtitles are never decoded.
fn autoplug_continue(args: &[gst::glib::Value], max_pixels: u64, shared: &Mutex<Shared>) -> bool {
    let Some(caps) = args.get(2).and_then(|v| v.get::<gst::Caps>().ok()) else {
        return true;
    };
    let Some(s) = caps.structure(0) else {
        return true;
    };
    let name = s.name().as_str();
    // decodebin asks first about the type-find result, i.e. the type of the whole object.
    let top_level = {
        let mut st = lock(shared);
        st.autoplug_calls += 1;
        st.autoplug_calls == 1
    };
    if name.starts_with("audio/")
        || name.starts_with("text/")
        || name.starts_with("subpicture/")
        || name.starts_with("closedcaption/")
        || name.starts_with("application/x-subtitle")
        || name.starts_with("application/x-ssa")
        || name.starts_with("application/x-ass")
    {
        return false;
    }
    if top_level && name.starts_with("image/") {
        // The whole object is a still image (not e.g. MJPEG frames inside AVI).
        lock(shared).refuse.get_or_insert((
            QuarantineReason::NotAVideo,
            format!("the object is a still image ({name})"),
        ));
        return false;
    }
    if name.starts_with("video/") || name.starts_with("image/") {
        let w = s.get::<i32>("width").ok();
        let h = s.get::<i32>("height").ok();
        if let (Some(w), Some(h)) = (w, h) {
            let pixels = u64::from(w.unsigned_abs()) * u64::from(h.unsigned_abs());
            if pixels > max_pixels {
                lock(shared).refuse.get_or_insert((
                    QuarantineReason::TooLarge,
                    format!("{w}x{h} = {pixels} pixels > limit {max_pixels} ({name})"),
                ));
                return false;
            }
        }
    }
    true
}

/// `pad-added` handler: the first raw video pad goes to `videoconvert`, anything else to a
/// `fakesink` (so demuxers never see not-linked).
fn on_pad_added(
    pad: &gst::Pad,
    convert_sink: &gst::Pad,
    pipeline: &gst::glib::WeakRef<gst::Pipeline>,
    shared: &Mutex<Shared>,
    kind: VideoDecoderKind,
) {
    let caps = pad.current_caps().unwrap_or_else(|| pad.query_caps(None));
    let name = caps
        .structure(0)
        .map(|s| s.name().to_string())
        .unwrap_or_else(|| "(no caps)".to_string());
    let system_memory = caps
        .features(0)
        .is_none_or(|f| f.contains(gst::CAPS_FEATURE_MEMORY_SYSTEM_MEMORY));
    {
        let mut st = lock(shared);
        if name == "video/x-raw" && !st.video_linked {
            if !system_memory {
                st.refuse.get_or_insert((
                    QuarantineReason::UnsupportedFormat,
                    format!("decoded video is not in system memory: {caps}"),
                ));
                return;
            }
            match pad.link(convert_sink) {
                Ok(_) => {
                    st.video_linked = true;
                    st.video_decoder = hwdecode::used_decoder(pad);
                    if let Some(used) = &st.video_decoder {
                        hwdecode::log_first_use(used, kind);
                    }
                    tracing::trace!(%caps, decoder = ?st.video_decoder, "video pad linked");
                }
                Err(e) => {
                    st.refuse.get_or_insert((
                        QuarantineReason::UnsupportedFormat,
                        format!("cannot convert {caps} to RGB: {e:?}"),
                    ));
                }
            }
            return;
        }
        st.other_pads.push(name.clone());
    }
    tracing::trace!(caps = %name, "non-video pad sent to fakesink");
    let Some(pipeline) = pipeline.upgrade() else {
        return;
    };
    let sink = match gst::ElementFactory::make("fakesink")
        .property("sync", false)
        .property("async", false)
        .property("enable-last-sample", false)
        .build()
    {
        Ok(s) => s,
        Err(e) => {
            tracing::warn!(error = %e, "cannot create fakesink");
            return;
        }
    };
    if pipeline.add(&sink).is_err() {
        return;
    }
    lock(shared).fakesinks.push(sink.clone());
    if let Err(e) = sink.sync_state_with_parent() {
        tracing::debug!(error = %e, "fakesink state sync failed");
    }
    if let Some(sink_pad) = sink.static_pad("sink")
        && let Err(e) = pad.link(&sink_pad)
    {
        tracing::debug!(error = ?e, "linking a non-video pad to fakesink failed");
    }
}

/// The decoded frame layout from a sample's caps; refuses oversized frames.
fn frame_video_info(
    sample: &gst::Sample,
    max_pixels: u64,
) -> Result<gst_video::VideoInfo, IngestError> {
    let caps = sample
        .caps()
        .ok_or_else(|| quarantine(QuarantineReason::DecodeError, "decoded frame without caps"))?;
    let vi = gst_video::VideoInfo::from_caps(caps).map_err(|e| {
        quarantine(
            QuarantineReason::DecodeError,
            format!("unusable caps {caps}: {e}"),
        )
    })?;
    if vi.format() != gst_video::VideoFormat::I420 {
        return Err(IngestError::Fatal(format!(
            "appsink delivered {} instead of I420",
            vi.format()
        )));
    }
    let pixels = u64::from(vi.width()) * u64::from(vi.height());
    if pixels > max_pixels {
        return Err(quarantine(
            QuarantineReason::TooLarge,
            format!(
                "{}x{} = {pixels} pixels > limit {max_pixels}",
                vi.width(),
                vi.height()
            ),
        ));
    }
    if pixels == 0 {
        return Err(quarantine(
            QuarantineReason::DecodeError,
            "decoded frame has zero size",
        ));
    }
    Ok(vi)
}

/// [`VideoInfo`] from the first sample and the duration query.
fn stream_info(
    pipeline: &gst::Pipeline,
    first: &gst::Sample,
    frame_info: &gst_video::VideoInfo,
) -> VideoInfo {
    let rate = frame_info.fps();
    let mut fps = if rate.numer() > 0 && rate.denom() > 0 {
        f64::from(rate.numer()) / f64::from(rate.denom())
    } else {
        0.0
    };
    if fps <= 0.0
        && let Some(d) = first.buffer().and_then(|b| b.duration())
        && d.nseconds() > 0
    {
        fps = 1e9 / d.nseconds() as f64;
    }
    let duration_ns = pipeline
        .query_duration::<gst::ClockTime>()
        .map(|d| d.nseconds())
        .filter(|&d| d > 0);
    let num_frames = match duration_ns {
        Some(d) if fps > 0.0 => (d as f64 * fps / 1e9).round() as u64,
        _ => 0,
    };
    VideoInfo {
        width: frame_info.width(),
        height: frame_info.height(),
        fps,
        duration_ns,
        num_frames,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Colorimetry caps values as decoders and demuxers give them → ffmpeg's conversion.
    #[test]
    fn colour_follows_the_tags_and_ffmpegs_defaults() {
        gst::init().unwrap();
        let full = |c: Colour| Colour {
            full_range: true,
            ..c
        };
        for (tag, want) in [
            (None, Colour::BT601),
            (Some("bt601"), Colour::BT601),
            (Some("bt709"), Colour::BT709),
            (Some("bt2020"), Colour::BT2020),
            // Full range, matrix not tagged (yuvj420p H.264): BT.601 full range.
            (Some("1:0:0:0"), full(Colour::BT601)),
            // Nothing but the range (limited) at any size: BT.601 (GStreamer's default for
            // 720 lines and up would be BT.709).
            (Some("2:0:0:0"), Colour::BT601),
            (Some("0:0:0:0"), Colour::BT601),
            (Some("1:3:5:1"), full(Colour::BT709)),
            (Some("2:4:5:4"), Colour::BT601),
            (Some("not a colorimetry"), Colour::BT601),
        ] {
            let got = colour_from_tag(tag);
            assert_eq!(
                (got.kr, got.kb, got.full_range),
                (want.kr, want.kb, want.full_range),
                "{tag:?}"
            );
        }
    }

    /// Counts `plan` calls; each plan draws new frame numbers, as the job's sinks do.
    struct Drawing {
        plans: u64,
    }

    impl FrameSink for Drawing {
        fn plan(&mut self, _info: &VideoInfo) -> Vec<u64> {
            self.plans += 1;
            vec![self.plans, self.plans * 10]
        }
        fn frame(&mut self, _slot: usize, _frame: &YuvFrame<'_>) -> Result<(), IngestError> {
            Ok(())
        }
        fn repeat(&mut self, _from: usize, _to: usize) -> Result<(), IngestError> {
            Ok(())
        }
    }

    fn info(width: u32) -> VideoInfo {
        VideoInfo {
            width,
            height: 240,
            fps: 30.0,
            duration_ns: Some(10_000_000_000),
            num_frames: 300,
        }
    }

    #[test]
    fn a_second_pass_over_the_same_stream_keeps_the_first_plan() {
        let mut inner = Drawing { plans: 0 };
        let mut replay = Replay {
            inner: &mut inner,
            planned: Vec::new(),
        };
        assert_eq!(replay.plan(&info(320)), vec![1, 10]);
        assert_eq!(replay.plan(&info(320)), vec![1, 10]);
        // Another stream info (the second decoder saw something else): plan again.
        assert_eq!(replay.plan(&info(640)), vec![2, 20]);
        // Back to the first (a software retry after NVDEC re-planned from a found length):
        // the first plan, not a third.
        assert_eq!(replay.plan(&info(320)), vec![1, 10]);
        assert_eq!(replay.plan(&info(640)), vec![2, 20]);
        assert_eq!(inner.plans, 2);
    }

    #[test]
    fn software_retries_decoder_failures_only() {
        let retried: Vec<&str> = QuarantineReason::ALL
            .into_iter()
            .filter(|r| software_may_decode(*r))
            .map(|r| r.as_str())
            .collect();
        assert_eq!(
            retried,
            [
                "unsupported_format",
                "decode_error",
                "truncated",
                "no_frames"
            ]
        );
    }
}
