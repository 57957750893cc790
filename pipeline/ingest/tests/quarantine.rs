//! Bad inputs are quarantined: never a panic, never a hang, and the decoder stays usable.

mod common;

use std::time::{Duration, Instant};

use bytes::Bytes;
use common::{corpus, read, vjepa_indices};
use vjepa_ingest::{Decoder, DecoderOptions, IngestError, QuarantineReason, VideoInfo};

const DEADLINE: Duration = Duration::from_secs(10);

fn decoder() -> Decoder {
    Decoder::new(DecoderOptions {
        deadline: DEADLINE,
        ..DecoderOptions::default()
    })
    .expect("decoder")
}

/// Decodes the spec's indices over the whole announced length; returns the quarantine reason.
fn refuse(dec: &mut Decoder, data: Bytes, what: &str) -> QuarantineReason {
    let t = Instant::now();
    let res = dec.decode_clip(data, &mut |info: &VideoInfo| {
        // Ask for frames up to the announced end (like a clip ending at the last frame).
        let len = info.num_frames.max(1);
        vjepa_indices(len, len.saturating_sub(64))
    });
    let elapsed = t.elapsed();
    assert!(
        elapsed < DEADLINE + Duration::from_secs(2),
        "{what}: took {elapsed:?}"
    );
    match res {
        Err(IngestError::Quarantine { reason, detail }) => {
            println!("{what}: {} ({detail}) in {elapsed:?}", reason.as_str());
            reason
        }
        Err(e) => panic!("{what}: expected quarantine, got {e}"),
        Ok(clip) => panic!("{what}: expected quarantine, decoded {:?}", clip.info),
    }
}

/// The decoder still decodes a good file.
fn still_works(dec: &mut Decoder) {
    let clip = dec
        .decode_clip(read(&corpus().mp4), &mut |_: &VideoInfo| vec![0, 5, 10])
        .expect("good file after a bad one");
    assert_eq!(clip.frames.len(), 3 * 320 * 240 * 3);
}

fn random_bytes(n: usize, seed: u64) -> Bytes {
    let mut x = seed;
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect::<Vec<u8>>()
        .into()
}

#[test]
fn empty_bytes() {
    let mut dec = decoder();
    assert_eq!(
        refuse(&mut dec, Bytes::new(), "empty"),
        QuarantineReason::EmptyFile
    );
    still_works(&mut dec);
}

#[test]
fn random_bytes_and_text() {
    let mut dec = decoder();
    for (n, seed) in [(1usize, 1u64), (100, 2), (4096, 3), (200_000, 4)] {
        let r = refuse(
            &mut dec,
            random_bytes(n, seed),
            &format!("{n} random bytes"),
        );
        assert_ne!(r, QuarantineReason::Timeout);
        still_works(&mut dec);
    }
    let text = Bytes::from_static(b"This is not a video, just a text file renamed to video.mp4.\n");
    assert_eq!(refuse(&mut dec, text, "text"), QuarantineReason::NotAVideo);
    still_works(&mut dec);
}

#[test]
fn still_image_is_not_a_video() {
    let mut dec = decoder();
    assert_eq!(
        refuse(&mut dec, read(&corpus().png), "png"),
        QuarantineReason::NotAVideo
    );
    still_works(&mut dec);
}

#[test]
fn audio_only_has_no_video_stream() {
    let mut dec = decoder();
    assert_eq!(
        refuse(&mut dec, read(&corpus().ogg_audio), "ogg vorbis"),
        QuarantineReason::NoVideoStream
    );
    still_works(&mut dec);
}

#[test]
fn truncated_files() {
    let c = corpus();
    let mut dec = decoder();
    for path in [&c.mp4, &c.mp4_faststart, &c.webm] {
        let full = read(path);
        for (label, len) in [("half", full.len() / 2), ("1 KiB", 1024)] {
            let what = format!("{} cut to {label}", path.display());
            let r = refuse(&mut dec, full.slice(..len), &what);
            assert_ne!(r, QuarantineReason::Timeout, "{what}");
            still_works(&mut dec);
        }
    }
    // Cut-off uploads are reported as truncated: MP4 by its box structure (moov at the end is
    // lost), faststart MP4 and WebM by the frame shortfall against the announced duration.
    for path in [&c.mp4, &c.mp4_faststart, &c.webm] {
        let full = read(path);
        let r = refuse(&mut dec, full.slice(..full.len() / 2), "half");
        assert_eq!(r, QuarantineReason::Truncated, "{}", path.display());
    }
}

#[test]
fn truncated_file_still_serves_early_frames() {
    // Only frames before the cut are requested: the clip decodes.
    let c = corpus();
    let mut dec = decoder();
    let full = read(&c.mp4_faststart);
    let clip = dec
        .decode_clip(full.slice(..full.len() / 2), &mut |_: &VideoInfo| {
            vec![0, 10, 20]
        })
        .expect("early frames of a cut-off faststart mp4");
    assert_eq!(clip.info.num_frames, 100);
}

#[test]
fn corrupted_payload_never_panics_or_hangs() {
    let c = corpus();
    let mut dec = decoder();
    for path in [&c.mp4, &c.mp4_faststart, &c.webm] {
        let full = read(path);
        for seed in 0..3u64 {
            let mut bytes = full.to_vec();
            let noise = random_bytes(2048, seed + 10);
            let at = bytes.len() / 4 + (seed as usize * bytes.len() / 5);
            let end = (at + noise.len()).min(bytes.len());
            bytes[at..end].copy_from_slice(&noise[..end - at]);
            let t = Instant::now();
            let res = dec.decode_clip(Bytes::from(bytes), &mut |info: &VideoInfo| {
                vjepa_indices(info.num_frames, 0)
            });
            println!(
                "{} corrupted at {at} (seed {seed}): {:?} in {:?}",
                path.display(),
                res.as_ref()
                    .map(|c| c.indices.len())
                    .map_err(|e| e.to_string()),
                t.elapsed()
            );
            assert!(t.elapsed() < DEADLINE + Duration::from_secs(2));
            if let Err(e) = res {
                assert!(e.quarantine_reason().is_some(), "{e}");
            }
        }
    }
    still_works(&mut dec);
}

#[test]
fn limits_too_large_and_timeout() {
    let c = corpus();
    let mut small = Decoder::new(DecoderOptions {
        max_pixels: 100 * 100,
        deadline: DEADLINE,
        ..DecoderOptions::default()
    })
    .expect("decoder");
    assert_eq!(
        refuse(&mut small, read(&c.mp4), "320x240 over 100x100 limit"),
        QuarantineReason::TooLarge
    );
    assert_eq!(
        refuse(&mut small, read(&c.webm), "webm over limit"),
        QuarantineReason::TooLarge
    );
    let mut hurried = Decoder::new(DecoderOptions {
        deadline: Duration::ZERO,
        ..DecoderOptions::default()
    })
    .expect("decoder");
    assert_eq!(
        refuse(&mut hurried, read(&c.mp4), "zero deadline"),
        QuarantineReason::Timeout
    );
    still_works(&mut decoder());
}
