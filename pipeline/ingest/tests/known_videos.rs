//! What a clip learns about a video that its container does not say cheaply (a frame count
//! found by decoding to the end, a fragmented MP4's sample counts, a rate found irregular after
//! a seek) is used by the video's later clips, per version of the video, and gives the same
//! frames.

mod common;
#[path = "common/media.rs"]
mod media;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;
use common::launch_to_file;
use media::{ffmpeg, find_boxes, slowing_mkv, timed_testsrc};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use vjepa_ingest::{
    ByteSource, DecodedClip, Decoder, DecoderOptions, IngestError, KnownVideos, ObjectSource,
    ReadAheadOptions,
};

/// A local directory read the production way: a HEAD, then ranged reads pinned to the ETag
/// it found (so each object names its version).
struct Local {
    rt: tokio::runtime::Runtime,
    store: Arc<dyn ObjectStore>,
}

impl Local {
    fn new(dir: &Path) -> Self {
        Local {
            rt: tokio::runtime::Runtime::new().expect("runtime"),
            store: Arc::new(LocalFileSystem::new_with_prefix(dir).expect("store")),
        }
    }

    fn open(&self, name: &str) -> Arc<dyn ByteSource> {
        ObjectSource::open(
            Arc::clone(&self.store),
            name.into(),
            self.rt.handle().clone(),
        )
        .expect("object opens")
    }
}

/// 250 frames of 320×240 noise at 2 Mbit/s in 1-second `moof` fragments (about 250 KB each).
fn fragmented_mp4(dir: &Path) -> PathBuf {
    let path = dir.join("fragmented.mp4");
    launch_to_file(
        "videotestsrc num-buffers=250 pattern=snow ! \
         video/x-raw,format=I420,width=320,height=240,framerate=25/1 ! \
         x264enc bitrate=2000 key-int-max=25 ! h264parse ! mp4mux fragment-duration=1000",
        &path,
    );
    path
}

/// A decoder whose read-ahead chunks are smaller than a fragment: each `moof` read is a
/// request of its own.
fn small_chunk_decoder() -> Decoder {
    Decoder::new(DecoderOptions {
        read_ahead: ReadAheadOptions {
            min_chunk: 16 << 10,
            max_chunk: 64 << 10,
            ..ReadAheadOptions::default()
        },
        ..DecoderOptions::default()
    })
    .expect("decoder")
}

/// Decodes `want` from `source`, returning the clip and the frame count it was planned with.
fn clip(dec: &mut Decoder, source: Arc<dyn ByteSource>, want: &[u64]) -> (DecodedClip, u64) {
    let mut announced = 0;
    let clip = dec
        .decode_clip_from(source, &mut |info| {
            announced = info.num_frames;
            want.to_vec()
        })
        .expect("decode");
    (clip, announced)
}

fn same_frames(a: &DecodedClip, b: &DecodedClip, what: &str) {
    assert_eq!(a.indices, b.indices, "{what}");
    for t in 0..a.indices.len() {
        assert!(a.frame(t) == b.frame(t), "{what}: frame {t} differs");
    }
}

/// H.264 in Matroska written as a live stream: no Duration, so nobody announces the frames.
fn live_mkv(dir: &Path, name: &str, frames: u32) {
    launch_to_file(
        &format!(
            "videotestsrc num-buffers={frames} pattern=ball ! \
             video/x-raw,format=I420,width=160,height=120,framerate=25/1 ! \
             x264enc key-int-max=25 ! h264parse ! matroskamux streamable=true"
        ),
        &dir.join(name),
    );
}

#[test]
fn a_counted_video_is_counted_once_per_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    live_mkv(dir.path(), "live.mkv", 300);
    let local = Local::new(dir.path());
    let known = Arc::new(KnownVideos::default());
    let mut dec = Decoder::new(DecoderOptions::default())
        .expect("decoder")
        .with_known_videos(Arc::clone(&known));
    let late: Vec<u64> = (0..16).map(|i| 230 + i * 4).collect();

    // First clip: counted to the end (H.264 access units counted before the decoder, not
    // decoded), then the window.
    let (first, n1) = clip(&mut dec, local.open("live.mkv"), &late);
    println!("first {:?}", first.stats);
    assert_eq!(n1, 300);
    assert!(!first.stats.learned_earlier);
    assert!(first.stats.frames_skipped >= 200, "{:?}", first.stats);
    assert_eq!(known.len(), 1);

    // Later clips of the same version: the count is known, the window is sought.
    let (second, n2) = clip(&mut dec, local.open("live.mkv"), &late);
    println!("second {:?}", second.stats);
    assert_eq!(n2, 300);
    assert!(second.stats.learned_earlier);
    assert!(second.stats.frames_decoded < 150, "{:?}", second.stats);
    same_frames(&first, &second, "second clip");

    // Another decoder sharing the map learns nothing again.
    let mut other = Decoder::new(DecoderOptions::default())
        .expect("decoder")
        .with_known_videos(Arc::clone(&known));
    let (third, n3) = clip(&mut other, local.open("live.mkv"), &late);
    assert_eq!(n3, 300);
    assert!(third.stats.learned_earlier);
    same_frames(&first, &third, "another decoder");

    // Bytes that name no version are never taken for a known video.
    let bytes: Bytes = std::fs::read(dir.path().join("live.mkv"))
        .expect("read")
        .into();
    for _ in 0..2 {
        let (mem, n) = clip(&mut dec, Arc::new(bytes.clone()), &late);
        assert_eq!(n, 300);
        assert!(!mem.stats.learned_earlier);
        assert!(mem.stats.frames_skipped >= 200);
        same_frames(&first, &mem, "in memory");
    }

    // The same bytes written again (a new file: a new ETag): a new version, counted afresh.
    let tmp = dir.path().join("live.tmp");
    std::fs::copy(dir.path().join("live.mkv"), &tmp).expect("copy");
    std::fs::rename(&tmp, dir.path().join("live.mkv")).expect("rename");
    let (again, _) = clip(&mut dec, local.open("live.mkv"), &late);
    assert!(!again.stats.learned_earlier);
    same_frames(&first, &again, "rewritten");

    // The video replaced by a shorter one: a new version, counted afresh.
    live_mkv(dir.path(), "live.mkv", 200);
    let (replaced, n4) = clip(&mut dec, local.open("live.mkv"), &[150, 199]);
    assert_eq!(n4, 200);
    assert!(!replaced.stats.learned_earlier);
    assert_eq!(known.len(), 3);
}

/// Progressive H.264 and H.265, and VP9, without a length are counted as their access units
/// (packets) reach the decoder, not decoded; an interlaced stream, whose access units can be
/// fields, is decoded to be counted. Every count is the frame count.
#[test]
fn streams_without_a_length_are_counted_right() {
    let dir = tempfile::tempdir().expect("tempdir");
    let caps = "video/x-raw,format=I420,width=160,height=120,framerate=25/1";
    let cases = [
        (
            "h264 B-frames, live Matroska",
            format!(
                "videotestsrc num-buffers=137 pattern=ball ! {caps} ! x264enc bframes=3 ! \
                 h264parse ! matroskamux streamable=true"
            ),
            137,
            true,
        ),
        (
            "h265, live Matroska",
            format!(
                "videotestsrc num-buffers=121 pattern=ball ! {caps} ! \
                 x265enc speed-preset=ultrafast ! h265parse ! matroskamux streamable=true"
            ),
            121,
            true,
        ),
        (
            "h265 elementary stream",
            format!(
                "videotestsrc num-buffers=93 pattern=ball ! {caps} ! \
                 x265enc speed-preset=ultrafast ! h265parse ! \
                 video/x-h265,stream-format=byte-stream"
            ),
            93,
            true,
        ),
        (
            "h264 interlaced, live Matroska",
            format!(
                "videotestsrc num-buffers=88 pattern=ball ! {caps},interlace-mode=interleaved ! \
                 x264enc interlaced=true ! h264parse ! matroskamux streamable=true"
            ),
            88,
            false,
        ),
    ];
    let mut dec = Decoder::new(DecoderOptions::default()).expect("decoder");
    for (i, (what, pipeline, frames, dropped)) in cases.iter().enumerate() {
        let path = dir.path().join(format!("case-{i}"));
        launch_to_file(pipeline, &path);
        let bytes: Bytes = std::fs::read(&path).expect("read").into();
        // Frame 0 only: no seek, so nothing else is dropped before the decoder.
        let (c, n) = clip(&mut dec, Arc::new(bytes), &[0]);
        println!("{what}: {n} frames, {:?}", c.stats);
        assert_eq!(n, *frames, "{what}");
        if *dropped {
            assert!(
                c.stats.frames_skipped + 20 >= *frames,
                "{what}: {:?}",
                c.stats
            );
        } else {
            assert_eq!(c.stats.frames_skipped, 0, "{what}");
            assert!(c.stats.frames_decoded >= *frames, "{what}: {:?}", c.stats);
        }
    }

    // VP9 with hidden alternate reference frames (two-pass libvpx), each packed in a
    // superframe with the frame it precedes, written live: 120 shown frames, more coded.
    // Only shown frames count.
    let arf = dir.path().join("arf.webm");
    let arf = arf.to_str().expect("utf-8 temp path");
    let passlog = dir.path().join("vp9-pass");
    let vp9 = [
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=25",
        "-frames:v",
        "120",
        "-c:v",
        "libvpx-vp9",
        "-deadline",
        "good",
        "-cpu-used",
        "4",
        "-auto-alt-ref",
        "1",
        "-lag-in-frames",
        "25",
        "-b:v",
        "300k",
        "-passlogfile",
        passlog.to_str().expect("utf-8 temp path"),
    ];
    ffmpeg(&[&vp9[..], &["-pass", "1", "-f", "null", "-"]].concat());
    ffmpeg(&[&vp9[..], &["-pass", "2", "-f", "webm", "-live", "1", arf]].concat());
    let split = ffmpeg(&[
        "-i",
        arf,
        "-c",
        "copy",
        "-bsf:v",
        "vp9_superframe_split",
        "-f",
        "framecrc",
        "-",
    ]);
    let coded = String::from_utf8_lossy(&split)
        .lines()
        .filter(|l| l.starts_with("0,"))
        .count();
    assert!(coded > 120, "no hidden frames were coded ({coded})");
    let bytes: Bytes = std::fs::read(dir.path().join("arf.webm"))
        .expect("read")
        .into();
    let (c, n) = clip(&mut dec, Arc::new(bytes), &[0]);
    println!(
        "vp9, {} hidden frames: {n} frames, {:?}",
        coded - 120,
        c.stats
    );
    assert_eq!(n, 120);
    assert!(c.stats.frames_skipped + 20 >= 120, "{:?}", c.stats);
}

/// Bytes with a version that fail the first read touching one offset (a store that answered
/// one request late), like a network store can.
struct FailsOnce {
    bytes: Bytes,
    at: u64,
    failed: Arc<AtomicBool>,
}

impl ByteSource for FailsOnce {
    fn size(&self) -> u64 {
        self.bytes.size()
    }

    fn read(&self, range: std::ops::Range<u64>) -> Result<Bytes, IngestError> {
        if range.contains(&self.at) && !self.failed.swap(true, Ordering::SeqCst) {
            return Err(IngestError::Unavailable("timed out (test)".into()));
        }
        self.bytes.read(range)
    }

    fn describe(&self) -> String {
        "fails once".into()
    }

    fn version(&self) -> Option<String> {
        Some("fails-once v1".into())
    }
}

/// A read that failed while the container's facts were read (one `moof` of a fragmented MP4)
/// does not make the clip fail, but what it left unsaid is not kept as the video's facts.
#[test]
fn facts_read_with_a_failure_are_not_kept() {
    let dir = tempfile::tempdir().expect("tempdir");
    let bytes: Bytes = std::fs::read(fragmented_mp4(dir.path()))
        .expect("read")
        .into();
    let last_moof = find_boxes(&bytes, &[b"moof"]).last().expect("a moof").start as u64;
    let mut dec = small_chunk_decoder();
    let early: Vec<u64> = (0..16).collect();
    let failed = Arc::new(AtomicBool::new(false));
    let source = |bytes: &Bytes| -> Arc<dyn ByteSource> {
        Arc::new(FailsOnce {
            bytes: bytes.clone(),
            at: last_moof + 4,
            failed: Arc::clone(&failed),
        })
    };
    let (first, n1) = clip(&mut dec, source(&bytes), &early);
    println!("first: {n1} frames, {:?}", first.stats);
    assert!(
        failed.load(Ordering::SeqCst),
        "the facts never read the last fragment"
    );
    // The next clip reads the facts again (and, with no failure, keeps them).
    let (second, n2) = clip(&mut dec, source(&bytes), &early);
    println!("second: {n2} frames, {:?}", second.stats);
    assert!(!second.stats.learned_earlier);
    assert_eq!(n2, 250);
    let (third, _) = clip(&mut dec, source(&bytes), &early);
    assert!(third.stats.learned_earlier);
    same_frames(&first, &third, "third clip");
}

/// A file that claims a constant rate but is not (found by the first clip's seek landing
/// wrong) is counted once for its frames' times, and sought in by them from then on, with the
/// frames a decode from the start gives. Before the times were learned: the first clip went
/// back to the start, and every later clip was decoded from the start.
#[test]
fn a_rate_found_irregular_is_sought_in_by_its_counted_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Claims 30 fps, but from frame 30 on its frames come every 100 ms.
    let out = dir.path().join("vfr.mkv");
    ffmpeg(&[
        "-f",
        "lavfi",
        "-i",
        "testsrc2=size=160x120:rate=30:duration=3",
        "-vf",
        "setpts='if(lt(N,30),N/30,1+(N-30)/10)/TB'",
        "-fps_mode",
        "passthrough",
        "-c:v",
        "libx264",
        "-g",
        "15",
        out.to_str().expect("utf-8 temp path"),
    ]);
    let local = Local::new(dir.path());
    let options = DecoderOptions {
        seek_min_frames: 8,
        ..DecoderOptions::default()
    };
    let mut dec = Decoder::new(options.clone()).expect("decoder");
    let mut from_start = Decoder::new(DecoderOptions {
        seek_min_frames: u64::MAX,
        ..options
    })
    .expect("decoder");
    let window: Vec<u64> = (60..90).step_by(2).collect();
    let (reference, _) = clip(&mut from_start, local.open("vfr.mkv"), &window);
    let (first, _) = clip(&mut dec, local.open("vfr.mkv"), &window);
    println!("first {:?}", first.stats);
    // A seek by the claimed rate, found wrong; a count; a seek by the times.
    assert_eq!(first.stats.seeks, 2, "{:?}", first.stats);
    same_frames(&first, &reference, "first clip");
    let (second, _) = clip(&mut dec, local.open("vfr.mkv"), &window);
    println!("second {:?}", second.stats);
    assert!(second.stats.learned_earlier);
    assert_eq!(second.stats.seeks, 1);
    assert!(second.stats.frames_decoded < reference.stats.frames_decoded);
    same_frames(&second, &reference, "second clip");
}

/// A stream recorded live with an irregular rate (a browser's WebM: no Duration, timestamps
/// that jitter): its frames' times are found while counting them, and the video's later clips
/// seek by them and get the same frames as a decode from the start. Before the times were
/// kept: the first such clip's seek was found wrong (a second seek, back to the start), and
/// every later clip was decoded from the start.
#[test]
fn an_irregular_live_stream_is_sought_in_by_its_counted_times() {
    let dir = tempfile::tempdir().expect("tempdir");
    for (name, codec) in [("rec.webm", "libvpx-vp9"), ("rec.mkv", "libx264")] {
        timed_testsrc(
            &dir.path().join(name),
            300,
            1000,
            "N*33+mod(N*N*7\\,11)*3",
            &[
                "-c:v",
                codec,
                "-g",
                "30",
                "-deadline",
                "realtime",
                "-cpu-used",
                "8",
                "-live",
                "1",
            ],
        );
        let local = Local::new(dir.path());
        let mut dec = Decoder::new(DecoderOptions::default())
            .expect("decoder")
            .with_known_videos(Arc::new(KnownVideos::default()));
        let mut from_start = Decoder::new(DecoderOptions {
            seek_min_frames: u64::MAX,
            ..DecoderOptions::default()
        })
        .expect("decoder")
        .with_known_videos(Arc::new(KnownVideos::new(0)));
        let (_, n) = clip(&mut dec, local.open(name), &[0]);
        assert_eq!(n, 300, "{name}: counted");
        for start in [120u64, 236] {
            let window: Vec<u64> = (0..16).map(|i| start + 4 * i).collect();
            let (sought, _) = clip(&mut dec, local.open(name), &window);
            let (reference, _) = clip(&mut from_start, local.open(name), &window);
            println!("{name} at {start}: {:?}", sought.stats);
            assert!(sought.stats.learned_earlier, "{name}");
            // One seek (no second one back to the start), and fewer frames decoded than from
            // the start (a stream without Cues is sought in by its clusters: up to 5 s early).
            assert!(
                sought.stats.seeks == 1
                    && sought.stats.frames_decoded < reference.stats.frames_decoded,
                "{name} at {start}: not sought: {:?}, from the start {:?}",
                sought.stats,
                reference.stats
            );
            same_frames(&sought, &reference, &format!("{name} at {start}"));
        }
    }
}

/// The clip drawn from a Matroska file whose estimated length is wrong (its rate drops, or its
/// audio outlasts its video) is the
/// same whether or not an earlier clip found its real length: the window is planned from the
/// estimate first, and again from the real length only when it lies past it, as the first clip
/// to find out had to. (A resumed run, whose decoders know nothing yet, draws the clips the
/// stopped run would have.)
#[test]
fn a_found_length_gives_the_clip_an_unknowing_decoder_gives() {
    let dir = tempfile::tempdir().expect("tempdir");
    // 60 frames at 30 fps, then 240 at 10 fps: 300 frames, estimated at 778.
    slowing_mkv(dir.path());
    // 300 frames at 30 fps beside 14 s of audio (and the encoder's padding): the Duration is
    // the audio's, 420 frames or more.
    launch_to_file(
        "videotestsrc num-buffers=300 pattern=ball ! \
         video/x-raw,format=I420,width=160,height=120,framerate=30/1 ! \
         x264enc key-int-max=30 ! h264parse ! mux. \
         audiotestsrc num-buffers=600 samplesperbuffer=1050 ! audioconvert ! vorbisenc ! mux. \
         matroskamux name=mux",
        &dir.path().join("long-audio.mkv"),
    );
    let local = Local::new(dir.path());
    for (name, estimated) in [("slowing.mkv", 778), ("long-audio.mkv", 420)] {
        // A window a fraction of the way into whatever length the decoder announces; the
        // lengths it was planned from, in order (a loader's plan draws random numbers at every
        // call, so the calls must be the same too).
        let decode = |dec: &mut Decoder, fraction: f64| {
            let mut asked = Vec::new();
            let clip = dec
                .decode_clip_from(local.open(name), &mut |info| {
                    asked.push(info.num_frames);
                    let start = (fraction * info.num_frames.saturating_sub(32) as f64) as u64;
                    (0..16).map(|i| start + 2 * i).collect()
                })
                .expect("decode");
            (clip, asked)
        };
        let mut knowing = Decoder::new(DecoderOptions::default())
            .expect("decoder")
            .with_known_videos(Arc::new(KnownVideos::default()));
        // The first clip finds the length (its window at 90 % of the estimate is past
        // frame 300).
        let (first, asked) = decode(&mut knowing, 0.9);
        assert_eq!(first.info.num_frames, 300, "{name}: {:?}", first.stats);
        assert!(
            asked.len() == 2 && asked[0] >= estimated && asked[1] == 300,
            "{name}: planned from {asked:?}"
        );
        for fraction in [0.1, 0.3, 0.5, 0.9] {
            let (warm, warm_asked) = decode(&mut knowing, fraction);
            assert!(warm.stats.learned_earlier);
            let mut unknowing = Decoder::new(DecoderOptions::default())
                .expect("decoder")
                .with_known_videos(Arc::new(KnownVideos::default()));
            let (cold, cold_asked) = decode(&mut unknowing, fraction);
            println!(
                "{name} at {fraction}: planned from {warm_asked:?}, window from {}; warm {:?}; cold {:?}",
                warm.indices[0], warm.stats, cold.stats
            );
            assert_eq!(warm_asked, cold_asked, "{name} at {fraction}");
            same_frames(&warm, &cold, &format!("{name} at {fraction}"));
        }
    }
}

#[test]
fn a_fragmented_mp4_has_its_fragments_read_once() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = fragmented_mp4(dir.path());
    let moofs = find_boxes(&std::fs::read(&path).expect("read"), &[b"moof"]).len();
    assert!(moofs >= 8, "mp4mux wrote {moofs} fragments");
    let local = Local::new(dir.path());
    let mut dec = small_chunk_decoder();
    let early: Vec<u64> = (0..16).collect();
    let (first, n1) = clip(&mut dec, local.open("fragmented.mp4"), &early);
    let (second, n2) = clip(&mut dec, local.open("fragmented.mp4"), &early);
    println!(
        "{moofs} fragments\nfirst {:?}\nsecond {:?}",
        first.stats, second.stats
    );
    assert_eq!((n1, n2), (250, 250));
    assert!(!first.stats.learned_earlier && second.stats.learned_earlier);
    assert!(
        second.stats.read_requests + 3 <= first.stats.read_requests,
        "{} fragments: {} requests, then {}",
        moofs,
        first.stats.read_requests,
        second.stats.read_requests
    );
    same_frames(&first, &second, "second clip");
}
