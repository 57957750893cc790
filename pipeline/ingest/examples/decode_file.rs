//! Decodes files with [`vjepa_ingest::Decoder`] and prints what happened.
//!
//! `cargo run --release -p vjepa-ingest --example decode_file -- FILE... [--cut BYTES] [--deadline SECONDS] [--threads N]`
//! (`--cut N` keeps only the first N bytes, to try truncated inputs.)

use std::time::Instant;

use vjepa_ingest::{Decoder, DecoderOptions, VideoInfo};

fn main() {
    let mut files = Vec::new();
    let mut cut: Option<usize> = None;
    let mut opts = DecoderOptions::default();
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        if a == "--cut" {
            cut = args.next().and_then(|v| v.parse().ok());
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
    for f in files {
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
        let t = Instant::now();
        let res = dec.decode_clip(data.into(), &mut |info: &VideoInfo| {
            // 16 frames spread over the first 64 (or the whole video if shorter).
            let len = info.num_frames.clamp(1, 64);
            (0..16).map(|i| i * len / 16).collect()
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
