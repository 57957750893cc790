//! Our side of the probe's training-transform benchmark (`bench/train-transform.sh`): decodes
//! one 16-frame clip of a video, writes its RGB frames for the peer (the official evaluation's
//! `VideoTransform`, run on the same frames), then draws the transform `--draws` times and
//! prints, as one JSON line, the time per clip and per draw the statistics the script compares
//! between the two (per-channel mean and standard deviation of the normalised output).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use vjepa_ingest::{Decoder, DecoderOptions};
use vjepa_operators::train_augment::TrainAugment;

#[derive(Parser)]
#[command(about = "Time the probe's training transform on one clip and print its statistics")]
struct Args {
    /// A video (any container GStreamer reads).
    #[arg(long)]
    video: PathBuf,
    /// Where to write the clip's frames (`T × H × W × 3` u8) for the peer.
    #[arg(long)]
    raw: PathBuf,
    /// Frames per clip and the step between them (the first clip: 0, step, 2·step, …).
    #[arg(long, default_value_t = 16)]
    frames: usize,
    #[arg(long, default_value_t = 4)]
    frame_step: usize,
    /// Output side.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Draws of the transform (timed together).
    #[arg(long, default_value_t = 200)]
    draws: usize,
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

#[derive(serde::Serialize)]
struct Report {
    name: &'static str,
    height: usize,
    width: usize,
    frames: usize,
    draws: usize,
    ms_per_clip: f64,
    /// Per draw: mean R, G, B, std R, G, B.
    stats: Vec<[f64; 6]>,
}

fn main() -> Result<()> {
    let a = Args::parse();
    vjepa_ingest::init()?;
    let bytes =
        std::fs::read(&a.video).with_context(|| format!("reading {}", a.video.display()))?;
    let indices: Vec<u64> = (0..a.frames).map(|i| (i * a.frame_step) as u64).collect();
    let mut decoder = Decoder::new(DecoderOptions::default())?;
    let clip = decoder.decode_clip(bytes.into(), &mut |_| indices.clone())?;
    let (h, w, t) = (clip.height as usize, clip.width as usize, a.frames);
    std::fs::write(&a.raw, &clip.frames).with_context(|| format!("writing {}", a.raw.display()))?;
    let augment = TrainAugment::official(a.size);

    // Warm-up, then the timed draws (each on a fresh copy of the decoded frames).
    let mut outputs = Vec::with_capacity(a.draws);
    let mut rng = ChaCha8Rng::seed_from_u64(a.seed ^ 0x5eed);
    let mut warm = clip.frames.clone();
    augment.clip(&mut warm, t, h, w, &mut rng)?;
    let started = Instant::now();
    for i in 0..a.draws {
        let mut frames = clip.frames.clone();
        let mut rng = ChaCha8Rng::seed_from_u64(a.seed.wrapping_add(i as u64));
        outputs.push(augment.clip(&mut frames, t, h, w, &mut rng)?);
    }
    let seconds = started.elapsed().as_secs_f64();

    let plane = a.size * a.size;
    let stats = outputs
        .iter()
        .map(|(data, _)| {
            let mut s = [0.0; 6];
            for c in 0..3 {
                let ch = &data[c * t * plane..(c + 1) * t * plane];
                let n = ch.len() as f64;
                let mean = ch.iter().map(|&v| f64::from(v)).sum::<f64>() / n;
                let var = ch
                    .iter()
                    .map(|&v| (f64::from(v) - mean).powi(2))
                    .sum::<f64>()
                    / n;
                s[c] = mean;
                s[3 + c] = var.sqrt();
            }
            s
        })
        .collect();
    let report = Report {
        name: "ours",
        height: h,
        width: w,
        frames: t,
        draws: a.draws,
        ms_per_clip: 1e3 * seconds / a.draws.max(1) as f64,
        stats,
    };
    println!("{}", serde_json::to_string(&report)?);
    Ok(())
}
