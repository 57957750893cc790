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
        /// Continue from the latest checkpoint in the output location.
        #[arg(long)]
        resume: bool,
    },
    /// Parse and validate a config without doing any work; lists official keys that are ignored.
    CheckConfig {
        #[arg(long)]
        config: PathBuf,
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
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    match cli.command {
        Command::CheckConfig { config } => match JobConfig::load(&config) {
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
        } => {
            let cfg = match JobConfig::load(&config) {
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
            };
            match job::run(cfg, overrides) {
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
