//! Shared helpers for the job's integration tests: a real sample corpus, a small config, and
//! running the real `vjepa` binary.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

pub fn bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_vjepa"))
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// Labelled indexes (`path label` lines) over the videos of a [`make_corpus`] directory, labelled
/// by container (`mp4` / `webm`): the first `train` videos in name order go to `dir/train.csv`,
/// the rest to `dir/val.csv`. Returns (train, val).
pub fn labelled_indexes(videos: &Path, dir: &Path, train: usize) -> (PathBuf, PathBuf) {
    let mut names: Vec<String> = std::fs::read_dir(videos)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    assert!(
        train < names.len(),
        "{train} train videos of {}",
        names.len()
    );
    let line = |n: &String| {
        let label = if n.ends_with(".webm") { "webm" } else { "mp4" };
        format!("{} {label}", videos.join(n).display())
    };
    let (train_names, val_names) = names.split_at(train);
    let paths = (dir.join("train.csv"), dir.join("val.csv"));
    for (path, part) in [(&paths.0, train_names), (&paths.1, val_names)] {
        std::fs::write(path, part.iter().map(line).collect::<Vec<_>>().join("\n")).unwrap();
    }
    paths
}

/// Writes `count` real encoded videos (H.264/MP4 and VP9/WebM) into `dir`.
pub fn make_corpus(dir: &Path, count: usize) {
    let out = Command::new(bin())
        .args([
            "make-samples",
            dir.to_str().unwrap(),
            "--count",
            &count.to_string(),
        ])
        .output()
        .expect("run vjepa make-samples");
    assert!(
        out.status.success(),
        "make-samples failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// `count` made videos in `root/made`, the first `present` of them (by name) copied into
/// `root/videos`, for tests that add the others later: (made, their sorted names, videos).
pub fn partial_corpus(
    root: &Path,
    count: usize,
    present: usize,
) -> (PathBuf, Vec<String>, PathBuf) {
    let made = root.join("made");
    make_corpus(&made, count);
    let names = sorted_names(&made);
    let videos = root.join("videos");
    std::fs::create_dir_all(&videos).unwrap();
    for name in &names[..present] {
        std::fs::copy(made.join(name), videos.join(name)).unwrap();
    }
    (made, names, videos)
}

/// A [`small_config`] text that also writes `clips.parquet` (`outputs.clips: true`).
pub fn with_clip_records(text: String) -> String {
    let text = text.replace("  log_every: 10\n", "  log_every: 10\n  clips: true\n");
    assert!(
        text.contains("clips: true"),
        "quickstart.yaml layout changed"
    );
    text
}

/// Every clip record of a run in a local directory (all files of the table), by (step, slot).
pub fn read_clips(out: &Path) -> Vec<vjepa_storage::tables::ClipRow> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vjepa_storage::Store::open(out.to_str().unwrap(), &Default::default(), false)
        .expect("output dir");
    rt.block_on(vjepa_storage::tables::read_clips_all(&store))
        .expect("clips table readable")
}

/// The file names in `dir`, sorted (a made corpus, in a stable order).
pub fn sorted_names(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

/// The quickstart config, shrunk for tests: fewer steps, smaller crops.
pub fn small_config(dataset: &str, out: &str, steps: u64) -> String {
    let text = std::fs::read_to_string(repo_root().join("configs/quickstart.yaml")).unwrap();
    let text = text
        .replace("    - samples/videos/ ", &format!("    - {dataset} "))
        .replace("  folder: out/quickstart/", &format!("  folder: {out}"))
        .replace("  dir: out/quickstart/", &format!("  dir: {out}"))
        .replace("  crop_size: 96", "  crop_size: 64")
        .replace("  checkpoint_every: 30", "  checkpoint_every: 4")
        // Any free port: tests run side by side.
        .replace("  listen: 127.0.0.1:9464", "  listen: 127.0.0.1:0");
    assert!(
        text.contains(dataset) && text.contains(out) && text.contains("listen: 127.0.0.1:0"),
        "quickstart.yaml layout changed"
    );
    let text = text.replace(
        "  epochs: 6\n",
        &format!("  epochs: 6\n  max_steps: {steps}\n"),
    );
    assert!(text.contains("max_steps"), "quickstart.yaml layout changed");
    text
}

/// Writes the small config for a local corpus directory and output directory; returns its path.
pub fn write_config(path: &Path, videos: &Path, out: &Path, steps: u64) -> PathBuf {
    let text = small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        steps,
    );
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

pub fn run_train(config: &Path, envs: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(["train", "--config", config.to_str().unwrap()])
        .args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output().expect("run vjepa train")
}

pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "vjepa failed ({:?}):\nstdout:\n{}\nstderr:\n{}",
        out.status.code(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

pub fn read_metrics(
    location: &str,
    s3: &vjepa_storage::S3Settings,
) -> Vec<vjepa_storage::tables::MetricsRow> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vjepa_storage::Store::open(location, s3, false).unwrap();
    // Every file of the table: `metrics.parquet` and the `metrics-from-N` of rolls and resumes.
    rt.block_on(vjepa_storage::tables::read_metrics_all(&store))
        .expect("metrics readable")
}

pub fn read_quarantine(location: &str) -> Vec<vjepa_storage::tables::QuarantineRow> {
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = vjepa_storage::Store::open(location, &Default::default(), false).unwrap();
    rt.block_on(vjepa_storage::tables::read_quarantine_all(&store))
        .expect("quarantine readable")
}

/// Two runs' metrics agree step for step: same steps, bit-identical losses, same token counts.
pub fn assert_same_trace<'a>(
    expected: &[vjepa_storage::tables::MetricsRow],
    actual: impl IntoIterator<Item = &'a vjepa_storage::tables::MetricsRow>,
) {
    let actual: Vec<_> = actual.into_iter().collect();
    assert_eq!(actual.len(), expected.len());
    for (a, b) in expected.iter().zip(actual) {
        assert_eq!(a.step, b.step);
        assert_eq!(
            a.loss.to_bits(),
            b.loss.to_bits(),
            "step {}: {} vs {}",
            a.step,
            a.loss,
            b.loss
        );
        assert_eq!(a.context_tokens, b.context_tokens, "step {}", a.step);
        assert_eq!(a.target_tokens, b.target_tokens, "step {}", a.step);
    }
}

/// Where a features row's clip sits in its frames: a spatial view of the evaluation (spec §9)
/// or a training crop recorded in `clips.parquet`.
pub enum RowCrop {
    /// View `view` of `views` along the long side (`vjepa extract`).
    View { view: usize, views: usize },
    /// Crop box `[top, left, height, width]` and flip, as the clips table records them.
    Recorded { crop: [i64; 4], flip: bool },
}

/// The clip of a features row decoded and transformed on its own, independently of the
/// dataflow that wrote the row: its frames of its local (`file://`) video, cropped, flipped
/// and resized to `size`, as `[1, 3, T, size, size]`.
pub fn decode_row_clip(
    decoder: &mut vjepa_ingest::Decoder,
    uri: &str,
    frames: &[i64],
    crop: RowCrop,
    size: usize,
) -> vjepa_model::Tensor {
    use vjepa_operators::transform::{CropBox, TransformParams};
    let path = uri.strip_prefix("file://").expect("a local video");
    let bytes = bytes::Bytes::from(std::fs::read(path).unwrap());
    let indices: Vec<u64> = frames.iter().map(|&f| f as u64).collect();
    let params = match crop {
        RowCrop::View { view, views } => {
            // The official evaluation's way, on plain RGB frames: the whole frame resized with
            // cv2's bilinear (8-bit out), the view cut out, `/255`, normalised in f32.
            let decoded = decoder
                .decode_clip(bytes.clone(), &mut |_| indices.clone())
                .unwrap();
            let (h, w) = (decoded.height as usize, decoded.width as usize);
            let v = vjepa_ingest::eval_views(h, w, size, views)[view];
            let plan = vjepa_ingest::Cv2Linear::new(h, w, v.resized.0, v.resized.1);
            let t = indices.len();
            let mut data = vec![0f32; 3 * t * size * size];
            let mut pixels = vec![0u8; size * size * 3];
            for (f, frame) in decoded.frames.chunks_exact(h * w * 3).enumerate() {
                plan.resize_region(frame, w * 3, (0, 0), v.top, v.left, size, size, &mut pixels);
                for (i, px) in pixels.chunks_exact(3).enumerate() {
                    for c in 0..3 {
                        let (m, sd) = (
                            vjepa_operators::transform::MEAN[c] as f32,
                            vjepa_operators::transform::STD[c] as f32,
                        );
                        data[(c * t + f) * size * size + i] = (px[c] as f32 / 255.0 - m) / sd;
                    }
                }
            }
            return vjepa_model::Tensor::from_vec(
                data,
                (1, 3, t, size, size),
                &vjepa_model::Device::Cpu,
            )
            .unwrap();
        }
        RowCrop::Recorded { crop, flip } => TransformParams {
            crop: CropBox {
                top: crop[0] as usize,
                left: crop[1] as usize,
                height: crop[2] as usize,
                width: crop[3] as usize,
            },
            flip,
        },
    };
    let (data, _) = vjepa_pipeline::loader::decode_to_tensor(
        decoder,
        std::sync::Arc::new(bytes),
        &indices,
        &params,
        size,
    )
    .unwrap();
    vjepa_model::Tensor::from_vec(
        data,
        (1, 3, indices.len(), size, size),
        &vjepa_model::Device::Cpu,
    )
    .unwrap()
}

/// Mean over tokens of an encoder output `[1, N, D]`: the features table's embedding.
pub fn mean_pooled(tokens: vjepa_model::Tensor) -> Vec<f32> {
    tokens
        .mean(1)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()
}

/// `videos` sample videos in `dir/videos` and the small model pretrained `steps` steps on them
/// (outputs in `dir/out`). Returns (the videos' directory, the last checkpoint).
pub fn pretrained_corpus(dir: &Path, videos: usize, steps: u64) -> (PathBuf, PathBuf) {
    let corpus = dir.join("videos");
    make_corpus(&corpus, videos);
    let out = dir.join("out");
    let config = write_config(&dir.join("c.yaml"), &corpus, &out, steps);
    assert_ok(&run_train(&config, &[], &[]));
    let checkpoint = out.join(format!("checkpoints/step-{steps:08}.safetensors"));
    (corpus, checkpoint)
}

/// `vjepa <cmd> --checkpoint … --train … --val … --out …` (`cmd`: probe or finetune), for the
/// caller's further arguments.
pub fn eval_command(cmd: &str, checkpoint: &Path, train: &Path, val: &Path, out: &Path) -> Command {
    let mut c = Command::new(bin());
    c.args([cmd, "--checkpoint"])
        .arg(checkpoint)
        .arg("--train")
        .arg(train)
        .arg("--val")
        .arg(val)
        .arg("--out")
        .arg(out);
    c
}

/// The `top-1 …` line `vjepa probe` / `finetune` print (empty when there is none).
pub fn top1_line(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find(|l| l.starts_with("top-1"))
        .map(str::to_string)
        .unwrap_or_default()
}

/// The `probabilities` column of `dir/predictions.parquet`, one list per validation video.
pub fn read_probabilities(dir: &Path) -> Vec<Vec<f32>> {
    use arrow::array::{Array, Float32Array, ListArray};
    let file = std::fs::File::open(dir.join("predictions.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut out = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let probs = batch.column_by_name("probabilities").unwrap();
        let probs = probs.as_any().downcast_ref::<ListArray>().unwrap();
        for i in 0..probs.len() {
            let p = probs.value(i);
            let p = p.as_any().downcast_ref::<Float32Array>().unwrap();
            out.push(p.values().to_vec());
        }
    }
    out
}

/// The rows of `dir/epochs.parquet`, in order (read as the run reads its own when it resumes).
pub fn read_epochs(dir: &Path) -> Vec<vjepa_storage::eval_epochs::EpochRow> {
    vjepa_storage::eval_epochs::read_file(&dir.join("epochs.parquet")).unwrap()
}

/// The validation top-1 (%) of a `top-1 …` line.
pub fn top1_of(line: &str) -> f64 {
    line.trim_start_matches("top-1 ")
        .split(' ')
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or(f64::NAN)
}

/// [`small_config`] reaching `server`: its endpoint and region, plain HTTP (the quickstart
/// leaves `storage.s3` unset).
pub fn s3_small_config(
    server: &vjepa_storage::testing::S3Server,
    dataset: &str,
    out: &str,
    steps: u64,
) -> String {
    let text = small_config(dataset, out, steps)
        .replace(
            "    endpoint: null",
            &format!("    endpoint: {}", server.endpoint),
        )
        .replace("    region: null", "    region: us-east-1")
        .replace("    allow_http: false", "    allow_http: true");
    assert!(
        text.contains(&server.endpoint) && text.contains("allow_http: true"),
        "quickstart.yaml storage.s3 layout changed"
    );
    text
}

/// Copies every file of `videos` into `bucket/videos/` on `server` (creating the bucket);
/// returns that directory.
pub fn videos_into_bucket(
    server: &vjepa_storage::testing::S3Server,
    bucket: &str,
    videos: &Path,
) -> PathBuf {
    let dst = server.create_bucket(bucket).unwrap().join("videos");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(videos).unwrap() {
        let e = e.unwrap();
        std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
    }
    dst
}

/// A config edit for [`s3_corpus_config`]: no periodic checkpoint within a test's steps, so
/// the only checkpoint is the one a stop writes.
pub fn without_periodic_checkpoints(text: String) -> String {
    let text = text.replace("  checkpoint_every: 4", "  checkpoint_every: 1000");
    assert!(text.contains("checkpoint_every: 1000"));
    text
}

/// A 4-video corpus in bucket `corpus` of `server` and the small config over it
/// (`s3://corpus/videos/`, 200 steps, outputs in local `dir/out/`), changed by `edit`, written
/// to `dir/s3.yaml`. Returns (config, output directory).
pub fn s3_corpus_config(
    server: &vjepa_storage::testing::S3Server,
    dir: &Path,
    edit: impl Fn(String) -> String,
) -> (PathBuf, PathBuf) {
    let videos = dir.join("videos");
    make_corpus(&videos, 4);
    videos_into_bucket(server, "corpus", &videos);
    let out = dir.join("out");
    let cfg = dir.join("s3.yaml");
    let text = s3_small_config(
        server,
        "s3://corpus/videos/",
        &format!("{}/", out.display()),
        200,
    );
    std::fs::write(&cfg, edit(text)).unwrap();
    (cfg, out)
}

/// The environment that gives `server`'s credentials to the job.
pub fn s3_env(server: &vjepa_storage::testing::S3Server) -> [(&'static str, &str); 2] {
    [
        ("AWS_ACCESS_KEY_ID", server.access_key.as_str()),
        ("AWS_SECRET_ACCESS_KEY", server.secret_key.as_str()),
    ]
}

/// Sends SIGTERM to process `pid` (as `kubectl delete` or `systemctl stop` would).
pub fn sigterm(pid: u32) {
    let kill = Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status()
        .expect("kill -TERM");
    assert!(kill.success(), "kill -TERM {pid}");
}

/// The run's catalog version records (`catalog/step-*.json`), in step order.
pub fn version_records(
    rt: &tokio::runtime::Runtime,
    out: &vjepa_storage::Store,
) -> Vec<vjepa_pipeline::catalog::VersionRecord> {
    rt.block_on(vjepa_pipeline::catalog::VersionRecord::read_all(
        out,
        u64::MAX,
    ))
    .expect("catalog records readable")
}
