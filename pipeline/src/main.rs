//! `vjepa`: V-JEPA video pretraining as a streaming dataflow job.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};

use vjepa_pipeline::config::JobConfig;
use vjepa_pipeline::convert::{self, ConvertError};
use vjepa_pipeline::job::{self, TrainOverrides};

#[derive(Parser)]
#[command(
    name = "vjepa",
    version,
    about = "V-JEPA video pretraining as a streaming dataflow job"
)]
struct Cli {
    /// Log format on stderr.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Pretrain from the videos of the config's datasets; writes metrics, quarantine and checkpoints.
    Train {
        /// YAML config (official pretrain keys plus ours).
        #[arg(long)]
        config: PathBuf,
        /// Dataflow worker threads (overrides workers.count).
        #[arg(long)]
        workers: Option<usize>,
        /// Dataset (index file or prefix URL) instead of data.datasets; repeatable.
        #[arg(long = "dataset")]
        datasets: Vec<String>,
        /// Output location instead of outputs.dir.
        #[arg(long)]
        out: Option<String>,
        /// Stop after this many steps (overrides optimization.max_steps).
        #[arg(long)]
        max_steps: Option<u64>,
        /// Seed instead of meta.seed.
        #[arg(long)]
        seed: Option<u64>,
        /// Continue from the latest checkpoint in the output location (the default whenever
        /// it holds one; with this flag a run without any logs that it starts fresh).
        #[arg(long)]
        resume: bool,
        /// Start from step 0 even if the output location holds checkpoints (they are deleted).
        #[arg(long, conflicts_with = "resume")]
        fresh: bool,
        /// Serve /metrics and the status page on this host:port instead of telemetry.listen
        /// (port 0: any free port; the address is logged and written to <out>/telemetry.addr).
        #[arg(long)]
        listen: Option<String>,
        /// Processes in a cluster-mode job (overrides cluster.processes).
        #[arg(long)]
        processes: Option<usize>,
        /// This process's number, 0-based (overrides cluster.process).
        #[arg(long)]
        process: Option<usize>,
        /// One host:port per line, line i for process i (overrides cluster.hostfile).
        #[arg(long)]
        hostfile: Option<String>,
    },
    /// Parse and validate a config without doing any work; lists official keys that are ignored.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
        /// Processes in a cluster-mode job (overrides cluster.processes).
        #[arg(long)]
        processes: Option<usize>,
        /// This process's number, 0-based (overrides cluster.process).
        #[arg(long)]
        process: Option<usize>,
        /// One host:port per line, line i for process i (overrides cluster.hostfile).
        #[arg(long)]
        hostfile: Option<String>,
    },
    /// Load a checkpoint (path or object-store URL) and print what it holds.
    Inspect { checkpoint: String },
    /// Convert a checkpoint between the official `.pth.tar` layout and our `.safetensors`
    /// (direction from the extensions); exit 2 naming the tensor when the input is bad.
    Convert {
        /// Input checkpoint (path or object-store URL).
        input: String,
        /// Output checkpoint (path or object-store URL).
        output: String,
        /// Job config giving the model shape; required to read an official `.pth.tar`.
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Write a small corpus of real encoded videos (H.264/MP4, VP9/WebM) into DIR.
    MakeSamples {
        dir: PathBuf,
        /// Number of videos.
        #[arg(long, default_value_t = 12)]
        count: usize,
    },
    /// Run every fused op forward and backward on CPU and GPU (max relative errors, PASS/FAIL)
    /// and time the GPU ops at ViT-L step shapes. Exits 1 if any check fails.
    #[cfg(feature = "cuda")]
    GpuCheck {
        /// CUDA device ordinal.
        #[arg(long, default_value_t = 0)]
        device: usize,
        /// Timed runs per op (median reported; at least 20).
        #[arg(long, default_value_t = 30)]
        runs: usize,
        /// Skip the correctness checks.
        #[arg(long)]
        no_check: bool,
        /// Skip the timings.
        #[arg(long)]
        no_timing: bool,
        /// Also write the rows as JSON to this file.
        #[arg(long)]
        json: Option<PathBuf>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig {
            config,
            processes,
            process,
            hostfile,
        } => match JobConfig::load(&config).and_then(|mut cfg| {
            cfg.apply_cluster_flags(processes, process, hostfile)?;
            cfg.cluster_addresses()?;
            Ok(cfg)
        }) {
            Ok(cfg) => {
                for (key, why) in &cfg.ignored {
                    println!("ignored: {key} ({why})");
                }
                let enc = cfg.encoder_config();
                println!(
                    "ok: {} — {} (D={}, depth {}, heads {}), {} frames at {}px, batch {}, {} mask configs, outputs to {}",
                    config.display(),
                    cfg.raw.model.model_name,
                    enc.embed_dim,
                    enc.depth,
                    enc.num_heads,
                    cfg.raw.data.num_frames,
                    cfg.raw.data.crop_size,
                    cfg.raw.data.batch_size,
                    cfg.raw.mask.len(),
                    cfg.output_dir().unwrap_or("?"),
                );
                ExitCode::SUCCESS
            }
            Err(e) => config_error(&e),
        },
        Command::Train {
            config,
            workers,
            datasets,
            out,
            max_steps,
            seed,
            resume,
            fresh,
            listen,
            processes,
            process,
            hostfile,
        } => {
            let cfg = match JobConfig::load(&config).and_then(|mut cfg| {
                cfg.apply_cluster_flags(processes, process, hostfile)?;
                cfg.cluster_addresses()?;
                Ok(cfg)
            }) {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            for (key, why) in &cfg.ignored {
                tracing::info!(key = %key, "ignored config key: {why}");
            }
            let overrides = TrainOverrides {
                workers,
                datasets,
                out,
                max_steps,
                seed,
                resume,
                fresh,
                listen,
            };
            match job::run(cfg, overrides) {
                Ok(s) if s.steps == 0 => {
                    println!(
                        "nothing to train: the run in {} is complete at step {} (--fresh starts it again)",
                        s.output, s.first_step
                    );
                    ExitCode::SUCCESS
                }
                Ok(s) => {
                    println!(
                        "trained steps {}..{} (last loss {}), {} quarantined; outputs in {}: metrics.parquet, quarantine.parquet, {}",
                        s.first_step + 1,
                        s.first_step + s.steps,
                        s.last_loss
                            .map(|l| format!("{l:.5}"))
                            .unwrap_or_else(|| "-".into()),
                        s.quarantined,
                        s.output,
                        s.checkpoints.join(", ")
                    );
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::Inspect { checkpoint } => match job::inspect_checkpoint(&checkpoint) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("error: {e:#}");
                ExitCode::from(1)
            }
        },
        #[cfg(feature = "cuda")]
        Command::GpuCheck {
            device,
            runs,
            no_check,
            no_timing,
            json,
        } => gpu_check(device, runs, !no_check, !no_timing, json.as_deref()),
        Command::Convert {
            input,
            output,
            config,
        } => {
            let cfg = match config.as_deref().map(JobConfig::load).transpose() {
                Ok(cfg) => cfg,
                Err(e) => return config_error(&e),
            };
            match convert::convert(&input, &output, cfg.as_ref()) {
                Ok(s) => {
                    println!(
                        "wrote {output} ({} bytes): step {}{}{}",
                        s.bytes_written,
                        s.steps_done,
                        s.epoch.map(|e| format!(", epoch {e}")).unwrap_or_default(),
                        if s.optimizer_state {
                            ""
                        } else {
                            ", no optimiser state in the input (fresh AdamW state)"
                        }
                    );
                    ExitCode::SUCCESS
                }
                Err(e @ (ConvertError::Usage(_) | ConvertError::BadCheckpoint { .. })) => {
                    eprintln!("error: {e}");
                    ExitCode::from(2)
                }
                Err(ConvertError::Io(e)) => {
                    eprintln!("error: {e:#}");
                    ExitCode::from(1)
                }
            }
        }
        Command::MakeSamples { dir, count } => {
            match vjepa_ingest::init().and_then(|_| vjepa_ingest::make_samples(&dir, count)) {
                Ok(paths) => {
                    println!("wrote {} videos to {}", paths.len(), dir.display());
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(1)
                }
            }
        }
    }
}

/// `vjepa gpu-check`: prints each row as it completes, then the tables; exit 1 on any FAIL
/// (2 when the device or a kernel launch fails).
#[cfg(feature = "cuda")]
fn gpu_check(
    device: usize,
    runs: usize,
    check: bool,
    timing: bool,
    json: Option<&std::path::Path>,
) -> ExitCode {
    use vjepa_model::kernels::gpu_check as gc;
    let dev = match vjepa_model::Device::new_cuda(device) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("error: no CUDA device {device}: {e}");
            return ExitCode::from(2);
        }
    };
    let mut checks = Vec::new();
    if check {
        match gc::run_checks(&dev, |r| {
            eprintln!(
                "check {:<28} {:<24} {:<5} {:.3e} {}",
                r.op,
                r.case,
                r.dtype,
                r.max_rel_err,
                if r.pass { "PASS" } else { "FAIL" }
            )
        }) {
            Ok(rows) => checks = rows,
            Err(e) => {
                eprintln!("error: gpu-check: {e}");
                return ExitCode::from(2);
            }
        }
        println!("{}", gc::format_checks(&checks));
    }
    let mut timings = Vec::new();
    if timing {
        match gc::run_timings(&dev, runs, |r| {
            eprintln!(
                "time {:<30} {:<24} {:<5} {:.3} ms",
                r.op, r.shape, r.dtype, r.median_ms
            )
        }) {
            Ok(rows) => timings = rows,
            Err(e) => {
                eprintln!("error: gpu-check timings: {e}");
                return ExitCode::from(2);
            }
        }
        println!("{}", gc::format_timings(&timings));
    }
    if let Some(path) = json {
        let doc = serde_json::json!({ "checks": checks, "timings": timings });
        if let Err(e) = std::fs::write(path, doc.to_string()) {
            eprintln!("error: writing {}: {e}", path.display());
            return ExitCode::from(2);
        }
    }
    let failed = checks.iter().filter(|r| !r.pass).count();
    if failed > 0 {
        println!("gpu-check: {failed} of {} checks FAILED", checks.len());
        return ExitCode::from(1);
    }
    if check {
        println!("gpu-check: all {} checks passed", checks.len());
    }
    ExitCode::SUCCESS
}

fn config_error(e: &vjepa_pipeline::config::ConfigError) -> ExitCode {
    eprintln!("config error: {e}");
    ExitCode::from(2)
}

fn init_logging(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()));
    match format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().init(),
    }
}
