//! One V-JEPA training step, timed: our candle model on the shapes of a job config, with the
//! official multi-block masks. Writes the exact inputs (clip, every step's mask indices, resolved
//! configs) to a safetensors file so that the PyTorch peer (`bench/train_step_torch.py`) runs the
//! same work; `bench/train-step.sh` runs both in one go and prints the ratio. With `--device
//! cuda` it times the GPU step (`bench/gpu-step.sh`), in bf16 mixed precision with `--bf16`.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::Parser;
use safetensors::Dtype;
use safetensors::tensor::TensorView;
use vjepa_model::{ComputeDevice, DType, Device, MaskIndices, Tensor, TrainBatch, VJepa};
use vjepa_operators::masking::{Grid, MaskGenerator};
use vjepa_operators::seeding::{Stream, rng_for};
use vjepa_pipeline::config::JobConfig;

#[derive(Parser)]
#[command(about = "Time our training step on a config's shapes and write the shared inputs")]
struct Args {
    /// Job config (YAML) giving the model, clip and mask shapes.
    #[arg(long)]
    config: PathBuf,
    /// Untimed steps first (allocator and cache warm-up).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Masks repeat every this many steps (0: a new draw every step). With `--warmup` equal to
    /// it, the timed steps see exactly the masks the warm-up saw, so per-shape caches (cuDNN
    /// attention graphs, one per new context length) are warm, as they are in a long run,
    /// where the lengths recur.
    #[arg(long, default_value_t = 0)]
    mask_cycle: u64,
    /// Where to write the inputs for the peer.
    #[arg(long)]
    inputs: PathBuf,
    /// Seed for weights, clip and masks.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Compute device: cpu, cuda or cuda:N (CUDA in a `cuda` build).
    #[arg(long, default_value = "cpu")]
    device: ComputeDevice,
    /// Mixed precision: bf16 compute on f32 master weights (what `meta.dtype: bfloat16`
    /// trains with on a GPU).
    #[arg(long)]
    bf16: bool,
    /// Attention on a GPU: auto, cudnn (the `cudnn` feature) or own, as `workers.attention`.
    #[arg(long, default_value = "auto")]
    attention: String,
    /// Activation checkpointing (`model.activation_checkpointing`), also on when the config
    /// sets it.
    #[arg(long)]
    checkpoint_activations: bool,
    /// With --bf16: cast the f32 weights inside every step's graph instead of computing on
    /// the bf16 copies the optimiser and EMA keep (the default; the same numbers), to time the
    /// difference. Implies --graph-blocks (cast weights are not leaves the fused block op can
    /// file gradients for): compare with a --graph-blocks row.
    #[arg(long)]
    cast_weights: bool,
    /// Record every op of the encoder and predictor blocks on candle's graph instead of running
    /// each block as one fused op with its own backward pass (the default; the same numbers),
    /// to time the difference.
    #[arg(long)]
    graph_blocks: bool,
    /// Run the target encoder's pass on a thread of its own (on a GPU: a second stream beside
    /// the context passes; `model.target_stream`), also on when the config sets it.
    #[arg(long)]
    target_stream: bool,
    /// Clips per step instead of the config's data.batch_size.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Write the inputs and stop (no model, no steps): e.g. to count a config's FLOPs.
    #[arg(long)]
    inputs_only: bool,
}

fn main() -> Result<()> {
    let args = Args::parse();
    let cfg = JobConfig::load(&args.config)
        .with_context(|| format!("loading {}", args.config.display()))?;
    let enc = cfg.encoder_config();
    let pred = cfg.predictor_config();
    let ipe = cfg.iterations_per_epoch(1);
    let optim = cfg.optim_config(ipe);
    let batch_size = args.batch_size.unwrap_or(cfg.raw.data.batch_size);
    let (t, h, w) = enc.grid();
    let grid = Grid { t, h, w };
    let generators = cfg
        .mask_configs()
        .into_iter()
        .map(|m| MaskGenerator::new(m, grid))
        .collect::<Result<Vec<_>, _>>()?;

    // A clip of N(0,1)-like values (already "normalised"); values don't change the work.
    let (frames, size) = (enc.num_frames, enc.crop_size);
    let numel = batch_size * 3 * frames * size * size;
    let clip: Vec<f32> = (0..numel)
        .map(|i| {
            let x = (i as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ args.seed;
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    let clips = Tensor::from_vec(
        clip.clone(),
        (batch_size, 3, frames, size, size),
        &Device::Cpu,
    )?;

    let total = args.warmup + args.steps;
    let mut batches = Vec::with_capacity(total);
    let mut index_tensors: Vec<(String, Vec<usize>, Vec<u8>)> = Vec::new();
    for step in 0..total as u64 {
        let draw = if args.mask_cycle > 0 {
            step % args.mask_cycle
        } else {
            step
        };
        let mut positions = rng_for(args.seed, Stream::MaskPositions, draw);
        let mut masks = Vec::with_capacity(generators.len());
        for (i, g) in generators.iter().enumerate() {
            let m = g.generate(args.seed, 0, draw, batch_size, &mut positions)?;
            for (kind, rows) in [("context", &m.context), ("target", &m.target)] {
                let k = rows.first().map_or(0, Vec::len);
                let bytes: Vec<u8> = rows
                    .iter()
                    .flatten()
                    .flat_map(|&v| i64::from(v).to_le_bytes())
                    .collect();
                index_tensors.push((
                    format!("step{step}.mask{i}.{kind}"),
                    vec![rows.len(), k],
                    bytes,
                ));
            }
            masks.push(MaskIndices {
                context: index_tensor(&m.context)?,
                target: index_tensor(&m.target)?,
            });
        }
        batches.push(TrainBatch {
            clips: clips.clone(),
            masks,
        });
    }

    // Shared inputs for the peer.
    let clip_bytes: Vec<u8> = clip.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut views = vec![(
        "clip".to_string(),
        TensorView::new(
            Dtype::F32,
            vec![batch_size, 3, frames, size, size],
            &clip_bytes,
        )?,
    )];
    for (name, shape, bytes) in &index_tensors {
        views.push((
            name.clone(),
            TensorView::new(Dtype::I64, shape.clone(), bytes)?,
        ));
    }
    let meta = HashMap::from([
        ("encoder".to_string(), serde_json::to_string(&enc)?),
        ("predictor".to_string(), serde_json::to_string(&pred)?),
        ("optim".to_string(), serde_json::to_string(&optim)?),
        ("warmup".to_string(), args.warmup.to_string()),
        ("steps".to_string(), args.steps.to_string()),
    ]);
    let bytes = safetensors::serialize(views, Some(meta))?;
    std::fs::write(&args.inputs, bytes)
        .with_context(|| format!("writing {}", args.inputs.display()))?;
    if args.inputs_only {
        return Ok(());
    }

    let device = args.device.open()?;
    let attention = vjepa_model::kernels::AttentionBackend::parse(&args.attention)
        .with_context(|| format!("--attention {:?}: auto, cudnn or own", args.attention))?;
    let attention_runs = if device.is_cuda() {
        vjepa_model::kernels::check_attention_backend(
            attention,
            if args.bf16 { DType::BF16 } else { DType::F32 },
            &cfg.attention_head_dims(),
        )?
    } else {
        "CPU kernels".to_string()
    };
    vjepa_model::kernels::set_attention_backend(attention);
    let mut model = VJepa::new(enc, pred, optim, args.seed, &device)?;
    if args.bf16 {
        model.set_compute_dtype(DType::BF16)?;
        model.set_keep_weight_copies(!args.cast_weights)?;
    }
    // Weights cast inside the graph are not leaves the fused block op can file gradients for:
    // such blocks run on the graph anyway, and the row says so.
    model.set_fused_blocks(!(args.graph_blocks || (args.bf16 && args.cast_weights)));
    model.set_activation_checkpointing(
        args.checkpoint_activations || cfg.raw.model.activation_checkpointing,
    );
    model.set_target_stream(args.target_stream || cfg.raw.model.target_stream)?;
    // The clip goes to the device once, as the peer's does (the step excludes data
    // loading); what the job pays per step to pack and upload a batch is timed on its own.
    let stager = vjepa_model::ClipStager::new(&device);
    let per_clip: Vec<&[f32]> = clip.chunks(numel / batch_size.max(1)).collect();
    let mut stage_times = Vec::new();
    let mut staged = None;
    for _ in 0..3 {
        let start = Instant::now();
        let t = stager.stage(&per_clip, (3, frames, size, size), model.compute_dtype())?;
        device.synchronize()?;
        stage_times.push(start.elapsed().as_secs_f64());
        staged = Some(t);
    }
    if let Some(on_device) = staged {
        for b in &mut batches {
            b.clips = on_device.clone();
        }
    }
    stage_times.sort_by(f64::total_cmp);
    let mut times = Vec::with_capacity(args.steps);
    let mut losses = Vec::with_capacity(total);
    let mut graphs_before_timed = None;
    for (i, batch) in batches.iter().enumerate() {
        if i == args.warmup {
            graphs_before_timed = cudnn_graph_count();
        }
        let start = Instant::now();
        let stats = model.train_step(batch)?;
        // The optimiser and EMA kernels run after the loss is read: wait for them too.
        device.synchronize()?;
        let dt = start.elapsed().as_secs_f64();
        losses.push(stats.loss);
        if i >= args.warmup {
            times.push(dt);
        }
    }
    let mut sorted = times.clone();
    sorted.sort_by(f64::total_cmp);
    let median = sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN);
    let (memory_used, peak_reserved) = device_memory(&device)?;
    println!(
        "{}",
        serde_json::json!({
            "impl": impl_label(&args, &model, device.is_cuda(), attention.as_str()),
            "weight_copies": model.keeps_weight_copies(),
            "fused_blocks": model.fused_blocks(),
            "attention": attention_runs,
            "activation_checkpointing": model.activation_checkpointing(),
            "target_stream": model.target_stream(),
            "target_lane_passes": model.target_lane_passes(),
            "cudnn_graphs": cudnn_graphs(graphs_before_timed),
            "stage_s": stage_times.get(stage_times.len() / 2),
            "config": args.config.display().to_string(),
            "device": args.device.to_string(),
            "dtype": if args.bf16 { "bf16" } else { "f32" },
            "batch_size": batch_size,
            "memory_used_bytes": memory_used,
            "peak_reserved_bytes": peak_reserved,
            "step_s": times,
            "median_s": median,
            "losses": losses,
        })
    );
    Ok(())
}

/// The row's name: ours, with the attention implementation on a GPU and any A/B switch.
fn impl_label(args: &Args, model: &VJepa, cuda: bool, attention: &str) -> String {
    let mut parts = Vec::new();
    if cuda {
        parts.push(format!("attention {attention}"));
    }
    if args.bf16 && args.cast_weights {
        parts.push("weights cast per step".to_string());
    }
    if args.graph_blocks || (args.bf16 && args.cast_weights) {
        parts.push("blocks on the graph".to_string());
    }
    if model.target_stream() {
        parts.push("target pass on its own stream".to_string());
    }
    if model.activation_checkpointing() {
        parts.push("activation checkpointing".to_string());
    }
    if parts.is_empty() {
        "ours (candle)".to_string()
    } else {
        format!("ours (candle, {})", parts.join(", "))
    }
}

fn index_tensor(rows: &[Vec<u32>]) -> Result<Tensor> {
    let k = rows.first().map_or(0, Vec::len);
    let flat: Vec<u32> = rows.iter().flatten().copied().collect();
    Ok(Tensor::from_vec(flat, (rows.len(), k), &Device::Cpu)?)
}

/// cuDNN attention graphs built so far in this process and their build seconds, or `None`
/// without `cudnn`.
fn cudnn_graph_count() -> Option<(usize, f64)> {
    #[cfg(feature = "cudnn")]
    {
        Some(vjepa_model::kernels::cudnn::graph_stats())
    }
    #[cfg(not(feature = "cudnn"))]
    None
}

/// cuDNN attention graphs built during the run and their build seconds, in all and within the
/// timed steps (those after `before_timed`, the count when they began: a timed step builds
/// graphs only when it brings a new context length), or `null` without `cudnn`.
fn cudnn_graphs(before_timed: Option<(usize, f64)>) -> serde_json::Value {
    #[cfg(feature = "cudnn")]
    {
        use vjepa_model::kernels::cudnn;
        let (n, secs) = cudnn::graph_stats();
        let (n0, s0) = before_timed.unwrap_or((0, 0.0));
        let (refused, why) = cudnn::dynamic_refusals();
        serde_json::json!({
            "built": n,
            "build_s": secs,
            "built_timed": n.saturating_sub(n0),
            "build_s_timed": secs - s0,
            "dynamic_shapes": cudnn::dynamic_shapes(),
            "dynamic_refused": refused,
            "dynamic_refused_why": why,
        })
    }
    #[cfg(not(feature = "cudnn"))]
    {
        let _ = before_timed;
        serde_json::Value::Null
    }
}

/// Device memory after the run, `(in use, pool peak)`: total − free (the CUDA context, kernels
/// and library workspaces included: `device_memory_used`) and the memory pool's reserved
/// high-water mark (`pool_reserved_high`, the figure torch's `max_memory_reserved` gives for its
/// peer row); both `null` on the CPU.
#[cfg(feature = "cuda")]
fn device_memory(device: &Device) -> Result<(Option<usize>, Option<u64>)> {
    use vjepa_model::kernels::cuda;
    Ok(match device {
        Device::Cuda(d) => (
            Some(cuda::device_memory_used(d)?),
            Some(cuda::pool_reserved_high(d)?),
        ),
        _ => (None, None),
    })
}

#[cfg(not(feature = "cuda"))]
fn device_memory(_device: &Device) -> Result<(Option<usize>, Option<u64>)> {
    Ok((None, None))
}
