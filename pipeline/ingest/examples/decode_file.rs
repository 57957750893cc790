//! Decodes files with [`vjepa_ingest::Decoder`] and prints what happened.
//!
//! `cargo run --release -p vjepa-ingest --example decode_file -- FILE... [--cut BYTES] [--deadline SECONDS] [--threads N] [--store] [--at FRACTION]`
//! (`--cut N` keeps only the first N bytes, to try truncated inputs; `--at F` puts the clip's
//! 64-frame window that far into the video, 0 the start and 1 the end; `--store` reads the files
//! the job's way, ranged reads through a local `object_store` that names each file's version,
//! so a file given twice shows what its second clip reuses.)

use std::sync::Arc;
use std::time::Instant;

use object_store::local::LocalFileSystem;
use vjepa_ingest::{ByteSource, Decoder, DecoderOptions, ObjectSource, VideoInfo};

fn main() {
    let mut files = Vec::new();
    let mut cut: Option<usize> = None;
    let mut from_store = false;
    let mut at = 0.0f64;
    let mut opts = DecoderOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--cut" {
            cut = args.next().and_then(|v| v.parse().ok());
        } else if a == "--at" {
            at = args
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0)
                .clamp(0.0, 1.0);
        } else if a == "--store" {
            from_store = true;
        } else if a == "--threads" {
            opts.decoder_threads = args.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        } else if a == "--deadline" {
            if let Some(s) = args.next().and_then(|v| v.parse::<f64>().ok()) {
                opts.deadline = std::time::Duration::from_secs_f64(s);
            }
        } else {
            files.push(a);
        }
    }
    let mut dec = match Decoder::new(opts) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("tokio runtime: {e}");
            std::process::exit(2);
        }
    };
    let store = Arc::new(LocalFileSystem::new());
    for f in files {
        let t = Instant::now();
        let source: Arc<dyn ByteSource> = if from_store && cut.is_none() {
            let opened = std::fs::canonicalize(&f)
                .map_err(|e| e.to_string())
                .and_then(|p| {
                    object_store::path::Path::from_filesystem_path(p).map_err(|e| e.to_string())
                })
                .and_then(|p| {
                    ObjectSource::open(store.clone(), p, runtime.handle().clone())
                        .map_err(|e| e.to_string())
                });
            match opened {
                Ok(s) => s,
                Err(e) => {
                    eprintln!("{f}: {e}");
                    continue;
                }
            }
        } else {
            let mut data = match std::fs::read(&f) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("{f}: {e}");
                    continue;
                }
            };
            if let Some(n) = cut {
                data.truncate(n);
            }
            Arc::new(bytes::Bytes::from(data))
        };
        let res = dec.decode_clip_from(source, &mut |info: &VideoInfo| {
            // 16 frames spread over 64 (or the whole video if shorter), from `--at`.
            let len = info.num_frames.clamp(1, 64);
            let start = (at * info.num_frames.saturating_sub(len) as f64) as u64;
            (0..16).map(|i| start + i * len / 16).collect()
        });
        match res {
            Ok(clip) => println!(
                "{f}: ok {:?} {} frames in {:?}; {:?}",
                clip.info,
                clip.indices.len(),
                t.elapsed(),
                clip.stats
            ),
            Err(e) => println!("{f}: {e} (after {:?})", t.elapsed()),
        }
    }
}
