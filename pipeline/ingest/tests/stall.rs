//! A store that stalls or fails mid-object never hangs the decoder and never poisons it.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use vjepa_ingest::{
    ByteSource, Decoder, DecoderOptions, IngestError, QuarantineReason, ReadAheadOptions,
    SampleCodec, SampleSpec, make_sample,
};

/// Serves `data`, but reads past `from` sleep for `stall` (a hung connection) or fail.
struct Flaky {
    data: Bytes,
    from: u64,
    stall: Option<Duration>,
}

impl ByteSource for Flaky {
    fn size(&self) -> u64 {
        self.data.len() as u64
    }

    fn read(&self, range: Range<u64>) -> Result<Bytes, IngestError> {
        if range.end > self.from {
            match self.stall {
                Some(d) => std::thread::sleep(d),
                None => {
                    return Err(IngestError::quarantine(
                        QuarantineReason::FetchError,
                        "connection reset",
                    ));
                }
            }
        }
        Ok(self.data.slice(range.start as usize..range.end as usize))
    }

    fn describe(&self) -> String {
        "flaky test source".into()
    }
}

#[test]
fn stalled_or_failing_reads_end_the_clip_in_bounded_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let spec = SampleSpec {
        name: "v".into(),
        width: 160,
        height: 120,
        frames: 120,
        fps: 30,
        codec: SampleCodec::H264Mp4Faststart,
        pattern: "ball".into(),
        bitrate_kbps: None,
        keyframe_interval: None,
    };
    let data: Bytes = std::fs::read(make_sample(dir.path(), &spec).expect("sample"))
        .expect("read")
        .into();
    let mut dec = Decoder::new(DecoderOptions {
        deadline: Duration::from_secs(1),
        // Small chunks so the stall hits mid-stream, after the first frames.
        read_ahead: ReadAheadOptions {
            min_chunk: 4096,
            max_chunk: 4096,
            max_cached: 1 << 20,
        },
        ..DecoderOptions::default()
    })
    .expect("decoder");
    let from = data.len() as u64 / 2;
    let all: Vec<u64> = (0..120).collect();
    for (stall, want) in [
        (Some(Duration::from_secs(3)), QuarantineReason::Timeout),
        (None, QuarantineReason::FetchError),
    ] {
        let t = Instant::now();
        let src = Arc::new(Flaky {
            data: data.clone(),
            from,
            stall,
        });
        let res = dec.decode_clip_from(src, &mut |_| all.clone());
        let took = t.elapsed();
        let err = res.expect_err("a stalled or failing source must not decode");
        println!("{stall:?}: {err} after {took:?}");
        assert_eq!(err.quarantine_reason(), Some(want), "{err}");
        // The deadline plus at most one stalled read.
        assert!(took < Duration::from_secs(5), "took {took:?}");
        // The decoder is fine afterwards.
        let ok = dec
            .decode_clip(data.clone(), &mut |_| vec![0, 60, 119])
            .expect("a good clip after a bad one");
        assert_eq!(ok.indices.len(), 3);
    }
}
