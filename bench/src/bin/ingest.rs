//! Our side of the ingest benchmark (`bench/ingest.sh`), plus the plan that all three decoders
//! (ours, ffmpeg, decord) share.
//!
//! * `ingest plan` probes the benchmark videos with our decoder and writes, per clip, the file,
//!   the 16 frame indices (spec §1 `pretrain_indices`) and the random-resized-crop box and flip
//!   (spec §1 `sample_params`), all from seeded streams, so every decoder does the same work.
//! * `ingest run` decodes one group of the plan with `THREADS` worker threads, one
//!   [`Decoder`] each (`decoder_threads: 1`), as the job's loader does: ranged reads through
//!   `object_store` (a local directory here) into
//!   [`vjepa_pipeline::loader::decode_to_tensor`], which gives the normalised `[3, 16, S, S]`
//!   tensor. It prints clips/s and bytes read per clip as JSON. Warm-up clips are decoded
//!   before the clock starts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Barrier, Mutex};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::{Parser, Subcommand};
use object_store::ObjectStore;
use object_store::local::LocalFileSystem;
use serde::{Deserialize, Serialize};
use tokio::runtime::Handle;
use vjepa_ingest::{ByteSource, Decoder, DecoderOptions, ObjectSource};
use vjepa_operators::sampling::{ClipSampling, pretrain_indices};
use vjepa_operators::seeding::{Stream, rng_for};
use vjepa_operators::transform::{self, AugmentConfig, TransformParams};
use vjepa_pipeline::loader::decode_to_tensor;

#[derive(Parser)]
#[command(about = "Ingest benchmark: write the shared clip plan, or time our decoder on it")]
struct Args {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Probe the videos and write the clip plan (JSON) to stdout.
    Plan {
        /// `GROUP=PATH` per video (e.g. `360p-h264=target/ingest-bench/media/a.mp4`).
        #[arg(required = true)]
        videos: Vec<String>,
        /// Timed clips per group (spread round-robin over the group's videos).
        #[arg(long, default_value_t = 24)]
        clips: usize,
        /// Untimed warm-up clips per group.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Seed of the clip streams.
        #[arg(long, default_value_t = 0)]
        seed: u64,
        /// Output side S.
        #[arg(long, default_value_t = 224)]
        crop_size: usize,
    },
    /// Decode one group of a plan with THREADS workers and print the timing (JSON) to stdout.
    Run {
        /// The plan written by `plan`.
        #[arg(long)]
        plan: PathBuf,
        /// Which group of the plan.
        #[arg(long)]
        group: String,
        /// Worker threads (one decoder each).
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Times each timed clip is decoded.
        #[arg(long, default_value_t = 1)]
        repeat: usize,
        /// Write the tensors of these clip ids as raw little-endian f32 `[3,T,S,S]` to
        /// `DUMP_DIR/<id>.f32` (for the fidelity check).
        #[arg(long, value_delimiter = ',')]
        dump: Vec<usize>,
        /// Directory for `--dump`.
        #[arg(long)]
        dump_dir: Option<PathBuf>,
    },
}

/// One video of the plan, as our decoder saw it.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct PlanFile {
    path: String,
    group: String,
    width: u32,
    height: u32,
    fps: f64,
    num_frames: u64,
    bytes: u64,
}

/// One clip: which file, which frames, which crop — the same for every decoder.
#[derive(Serialize, Deserialize, Clone, Debug)]
struct PlanClip {
    id: usize,
    group: String,
    file: usize,
    warmup: bool,
    indices: Vec<u64>,
    params: TransformParams,
}

#[derive(Serialize, Deserialize, Debug)]
struct Plan {
    seed: u64,
    crop_size: usize,
    files: Vec<PlanFile>,
    clips: Vec<PlanClip>,
}

fn main() -> Result<()> {
    match Args::parse().cmd {
        Cmd::Plan {
            videos,
            clips,
            warmup,
            seed,
            crop_size,
        } => {
            let plan = make_plan(&videos, clips, warmup, seed, crop_size)?;
            println!("{}", serde_json::to_string_pretty(&plan)?);
        }
        Cmd::Run {
            plan,
            group,
            threads,
            repeat,
            dump,
            dump_dir,
        } => {
            let text = std::fs::read_to_string(&plan)
                .with_context(|| format!("reading {}", plan.display()))?;
            let plan: Plan = serde_json::from_str(&text).context("parsing the plan")?;
            let report = run(&plan, &group, threads, repeat, &dump, dump_dir.as_deref())?;
            println!("{}", serde_json::to_string(&report)?);
        }
    }
    Ok(())
}

fn make_plan(
    videos: &[String],
    clips: usize,
    warmup: usize,
    seed: u64,
    crop_size: usize,
) -> Result<Plan> {
    let mut decoder = Decoder::new(DecoderOptions {
        decoder_threads: 1,
        ..DecoderOptions::default()
    })?;
    let mut files = Vec::new();
    for arg in videos {
        let (group, path) = arg
            .split_once('=')
            .with_context(|| format!("expected GROUP=PATH, got {arg:?}"))?;
        let data = std::fs::read(path).with_context(|| format!("reading {path}"))?;
        let bytes = data.len() as u64;
        // An empty index list decodes the first frame only and returns the stream info.
        let clip = decoder
            .decode_clip(data.into(), &mut |_| Vec::new())
            .with_context(|| format!("probing {path}"))?;
        let info = clip.info;
        if info.num_frames == 0 {
            bail!("{path}: the decoder reports no frame count");
        }
        files.push(PlanFile {
            path: path.to_string(),
            group: group.to_string(),
            width: info.width,
            height: info.height,
            fps: info.fps,
            num_frames: info.num_frames,
            bytes,
        });
    }
    let mut groups: BTreeMap<String, Vec<usize>> = BTreeMap::new();
    for (i, f) in files.iter().enumerate() {
        groups.entry(f.group.clone()).or_default().push(i);
    }
    let augment = AugmentConfig::pretrain(crop_size);
    let mut out = Vec::new();
    for (group, members) in &groups {
        for k in 0..warmup + clips {
            let id = out.len();
            let file = members[k % members.len()];
            let f = &files[file];
            let mut rng = rng_for(seed, Stream::Clip, id as u64);
            let indices = pretrain_indices(f.num_frames, ClipSampling::PRETRAIN, &mut rng)?;
            let params =
                transform::sample_params(f.height as usize, f.width as usize, &augment, &mut rng)?;
            out.push(PlanClip {
                id,
                group: group.clone(),
                file,
                warmup: k < warmup,
                indices,
                params,
            });
        }
    }
    Ok(Plan {
        seed,
        crop_size,
        files,
        clips: out,
    })
}

/// What `run` prints.
#[derive(Serialize)]
struct RunReport {
    group: String,
    threads: usize,
    clips: usize,
    seconds: f64,
    clips_per_s: f64,
    /// CPU time (user + system, all threads of the process) of the timed part; robust to other
    /// load on the machine, unlike `seconds`. `None` where `/proc/self/stat` is unreadable.
    cpu_seconds: Option<f64>,
    /// Mean bytes our decoder fetched per clip (ranged reads, including read-ahead).
    bytes_read_per_clip: f64,
    /// Mean file size of the clips' videos.
    file_bytes_per_clip: f64,
}

/// Where our decoder reads the plan's files: the local file system through `object_store`
/// (ranged GETs), the same path the job takes for an S3 bucket.
struct Store {
    store: Arc<dyn ObjectStore>,
    runtime: Handle,
}

impl Store {
    fn source(&self, file: &PlanFile) -> Result<Arc<dyn ByteSource>> {
        let abs = std::fs::canonicalize(&file.path)
            .with_context(|| format!("resolving {}", file.path))?;
        let path = object_store::path::Path::from_absolute_path(&abs)
            .with_context(|| format!("object path for {}", abs.display()))?;
        let source = ObjectSource::open(Arc::clone(&self.store), path, self.runtime.clone())
            .with_context(|| format!("opening {}", file.path))?;
        Ok(source)
    }
}

/// One decoded clip: the tensor and the bytes fetched for it.
fn decode_one(
    decoder: &mut Decoder,
    store: &Store,
    file: &PlanFile,
    clip: &PlanClip,
    crop_size: usize,
) -> Result<(Vec<f32>, u64)> {
    let source = store.source(file)?;
    let (tensor, stats) = decode_to_tensor(decoder, source, &clip.indices, &clip.params, crop_size)
        .with_context(|| format!("clip {} ({})", clip.id, file.path))?;
    Ok((tensor, stats.bytes_read))
}

/// User + system CPU time of this process so far (all threads, finished ones included), from
/// `/proc/self/stat` (fields 14 and 15, in clock ticks of `USER_HZ` = 100 on Linux).
fn process_cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // The command name (field 2) may contain spaces: count fields after its closing ')'.
    let rest = stat.get(stat.rfind(')')? + 1..)?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) as f64 / 100.0)
}

fn write_f32(path: &Path, data: &[f32]) -> Result<()> {
    let bytes: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    std::fs::write(path, bytes).with_context(|| format!("writing {}", path.display()))
}

fn run(
    plan: &Plan,
    group: &str,
    threads: usize,
    repeat: usize,
    dump: &[usize],
    dump_dir: Option<&Path>,
) -> Result<RunReport> {
    let threads = threads.max(1);
    let in_group: Vec<&PlanClip> = plan.clips.iter().filter(|c| c.group == group).collect();
    let warm: Vec<&PlanClip> = in_group.iter().copied().filter(|c| c.warmup).collect();
    let timed: Vec<&PlanClip> = in_group.iter().copied().filter(|c| !c.warmup).collect();
    if timed.is_empty() {
        bail!("group {group:?} has no timed clips in the plan");
    }
    if !dump.is_empty() && dump_dir.is_none() {
        bail!("--dump needs --dump-dir");
    }
    // Every timed clip `repeat` times, in plan order.
    let work: Vec<&PlanClip> = (0..repeat.max(1))
        .flat_map(|_| timed.iter().copied())
        .collect();
    let next = AtomicUsize::new(0);
    let ready = Barrier::new(threads + 1);
    let go = Barrier::new(threads + 1);
    let bytes_read = Mutex::new(0u64);
    let crop = plan.crop_size;
    // Reads block on this runtime from GStreamer's streaming threads (as in the job).
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the tokio runtime")?;
    let store = Store {
        store: Arc::new(LocalFileSystem::new()),
        runtime: runtime.handle().clone(),
    };
    let store = &store;

    let (seconds, cpu_seconds, results) =
        std::thread::scope(|s| -> Result<(f64, Option<f64>, Vec<Result<()>>)> {
            let handles: Vec<_> = (0..threads)
                .map(|worker| {
                    let (warm, work, next, ready, go, bytes_read) =
                        (&warm, &work, &next, &ready, &go, &bytes_read);
                    s.spawn(move || -> Result<()> {
                        let mut decoder = Decoder::new(DecoderOptions {
                            decoder_threads: 1,
                            ..DecoderOptions::default()
                        });
                        // Warm-up (untimed): the first pipeline in a process is slow to build.
                        let warmed = match decoder.as_mut() {
                            Ok(d) if !warm.is_empty() => {
                                let c = warm[worker % warm.len()];
                                decode_one(d, store, &plan.files[c.file], c, crop).map(|_| ())
                            }
                            Ok(_) => Ok(()),
                            Err(e) => Err(anyhow::anyhow!("creating a decoder: {e}")),
                        };
                        ready.wait();
                        go.wait();
                        let mut decoder = decoder?;
                        warmed?;
                        let mut local_bytes = 0u64;
                        loop {
                            let i = next.fetch_add(1, Ordering::Relaxed);
                            let Some(c) = work.get(i) else { break };
                            let (tensor, bytes) =
                                decode_one(&mut decoder, store, &plan.files[c.file], c, crop)?;
                            local_bytes += bytes;
                            std::hint::black_box(&tensor);
                        }
                        *bytes_read.lock().unwrap_or_else(|p| p.into_inner()) += local_bytes;
                        Ok(())
                    })
                })
                .collect();
            ready.wait();
            let cpu_start = process_cpu_seconds();
            let started = Instant::now();
            go.wait();
            let results: Vec<Result<()>> = handles
                .into_iter()
                .map(|h| {
                    h.join()
                        .unwrap_or_else(|_| Err(anyhow::anyhow!("worker panicked")))
                })
                .collect();
            let seconds = started.elapsed().as_secs_f64();
            let cpu = process_cpu_seconds().zip(cpu_start).map(|(b, a)| b - a);
            Ok((seconds, cpu, results))
        })?;
    for r in results {
        r?;
    }
    // The fidelity dumps, after the clock stopped.
    if let Some(dir) = dump_dir.filter(|_| !dump.is_empty()) {
        let mut decoder = Decoder::new(DecoderOptions {
            decoder_threads: 1,
            ..DecoderOptions::default()
        })?;
        for c in timed.iter().filter(|c| dump.contains(&c.id)) {
            let (tensor, _) = decode_one(&mut decoder, store, &plan.files[c.file], c, crop)?;
            write_f32(&dir.join(format!("{}.f32", c.id)), &tensor)?;
        }
    }
    let n = work.len();
    let total_bytes = *bytes_read.lock().unwrap_or_else(|p| p.into_inner());
    let file_bytes: u64 = work.iter().map(|c| plan.files[c.file].bytes).sum();
    Ok(RunReport {
        group: group.to_string(),
        threads,
        clips: n,
        seconds,
        clips_per_s: n as f64 / seconds,
        cpu_seconds,
        bytes_read_per_clip: total_bytes as f64 / n as f64,
        file_bytes_per_clip: file_bytes as f64 / n as f64,
    })
}
