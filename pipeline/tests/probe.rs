//! Pretrain → probe end to end at the smallest size (issue 8, acceptance 2): a short V-JEPA run,
//! then `vjepa probe` on labelled indexes of the same kind of videos; checks the artifacts (the
//! features tables with tokens, the probe's weights under the official names, the predictions
//! table) and that a label fraction keeps a per-class subset.

mod common;

use std::process::Command;

use common::*;
use vjepa_model::Device;
use vjepa_model::probe::{AttentiveProbe, ProbeConfig};
use vjepa_storage::Store;
use vjepa_storage::features::read_features;

#[test]
fn pretrain_then_probe_writes_its_artifacts() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 4);

    // Label = container (mp4 vs webm); 6 train videos, 2 validation videos.
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 6);

    let probe_dir = tmp.path().join("probe");
    let run = eval_command("probe", &checkpoint, &train_csv, &val_csv, &probe_dir)
        .args(["--views", "2", "--epochs", "3", "--batch-size", "4"])
        .args(["--augment", "none"])
        .output()
        .unwrap();
    assert_ok(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(stdout.contains("top-1"), "{stdout}");
    assert!(
        stdout.contains("/ 2 validation videos; 6 train videos, 2 classes"),
        "{stdout}"
    );

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(probe_dir.to_str().unwrap(), &Default::default(), false).unwrap();
    let train_rows = rt
        .block_on(read_features(&store, "train-features.parquet"))
        .unwrap();
    let val_rows = rt
        .block_on(read_features(&store, "val-features.parquet"))
        .unwrap();
    assert_eq!(train_rows.len(), 6);
    assert_eq!(val_rows.len(), 4, "2 videos × 2 views");
    let d = train_rows[0].embedding.len();
    assert!(
        train_rows
            .iter()
            .all(|r| r.tokens.len() % d == 0 && !r.tokens.is_empty())
    );

    // The probe: official names, loads back with the encoder's width and heads.
    let bytes = std::fs::read(probe_dir.join("probe.safetensors")).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
    assert!(tensors.contains_key("pooler.query_tokens"));
    assert!(tensors.contains_key("pooler.cross_attention_block.xattn.kv.weight"));
    let model =
        vjepa_model::VJepa::from_safetensors(&std::fs::read(&checkpoint).unwrap(), &Device::Cpu)
            .unwrap();
    let cfg = ProbeConfig {
        embed_dim: d,
        num_heads: model.encoder_config().num_heads,
        num_classes: 2,
        mlp_ratio: 4.0,
    };
    AttentiveProbe::from_tensors(cfg, &tensors, &Device::Cpu).unwrap();

    // Predictions: one row per validation video, probabilities summing to 1.
    let probabilities = read_probabilities(&probe_dir);
    for p in &probabilities {
        let sum: f32 = p.iter().sum();
        assert!((sum - 1.0).abs() < 1e-4, "{sum}");
    }
    assert_eq!(probabilities.len(), 2);

    // The epochs table: one row per epoch; validation only after the last (the default
    // without an evaluation config), and that one is the printed top-1.
    let epochs = read_epochs(&probe_dir);
    assert_eq!(
        epochs.iter().map(|e| e.epoch).collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert!(
        epochs[..2]
            .iter()
            .all(|e| e.val_top1.is_nan() && e.val_videos == 0)
    );
    assert_eq!(epochs[2].val_videos, 2);
    assert!((epochs[2].val_top1 - top1_of(&top1_line(&run))).abs() < 0.006);
    assert!(
        epochs
            .iter()
            .all(|e| e.train_loss.is_finite() && e.train_top1 >= 0.0)
    );

    // A label fraction keeps ceil(fraction · count) per class (here at another input size:
    // the backbone is built for it).
    let low_dir = tmp.path().join("probe-low");
    let low = eval_command("probe", &checkpoint, &train_csv, &val_csv, &low_dir)
        .args(["--epochs", "1", "--label-fraction", "0.3", "--size", "80"])
        .output()
        .unwrap();
    assert_ok(&low);
    assert!(
        String::from_utf8_lossy(&low.stderr).contains("backbone built for the input size"),
        "{}",
        String::from_utf8_lossy(&low.stderr)
    );
    let stdout = String::from_utf8_lossy(&low.stdout);
    let train = std::fs::read_to_string(&train_csv).unwrap();
    let webm = train.lines().filter(|l| l.ends_with(" webm")).count();
    let keep = |c: usize| ((c as f64) * 0.3).ceil() as usize;
    let expected = keep(webm) + keep(train.lines().count() - webm);
    assert!(
        stdout.contains(&format!("; {expected} train videos, 2 classes")),
        "{stdout}"
    );
}

/// `--token-cache none` (nothing held between epochs: the backbone reads the videos again every
/// epoch) trains on the same batches as the in-memory probe and so gives the same probe: same
/// top-1 line (final loss included), same probabilities, the same validation after every epoch
/// (`--val-every 1`); and it writes no token tables.
#[test]
fn streaming_probe_matches_the_in_memory_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 2);
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 6);
    let probe = |cache: &str, fraction: &str| {
        let dir = tmp.path().join(format!("probe-{cache}-{fraction}"));
        let run = eval_command("probe", &checkpoint, &train_csv, &val_csv, &dir)
            .args(["--segments", "2", "--views", "2", "--epochs", "3"])
            .args(["--batch-size", "4", "--seed", "3", "--token-cache", cache])
            .args(["--label-fraction", fraction, "--augment", "none"])
            .args(["--val-every", "1"])
            .output()
            .unwrap();
        assert_ok(&run);
        (dir, top1_line(&run))
    };
    for fraction in ["1.0", "0.5"] {
        let (mem_dir, mem) = probe("memory", fraction);
        let (stream_dir, stream) = probe("none", fraction);
        assert!(mem.contains("2 classes"), "{mem}");
        assert_eq!(stream, mem, "label fraction {fraction}");
        assert!(mem_dir.join("train-features.parquet").exists());
        assert!(!stream_dir.join("train-features.parquet").exists());
        let (a, b) = (
            read_probabilities(&mem_dir),
            read_probabilities(&stream_dir),
        );
        assert_eq!(a.len(), 2);
        assert_eq!(a, b, "the same probabilities, to the bit");
        let (a, b) = (read_epochs(&mem_dir), read_epochs(&stream_dir));
        assert_eq!(a.len(), 3);
        assert!(
            a.iter()
                .all(|e| e.val_videos == 2 && e.val_top1.is_finite())
        );
        assert!((a[2].val_top1 - top1_of(&mem)).abs() < 0.006, "{a:?} {mem}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(
                (x.epoch, x.val_top1, x.val_videos),
                (y.epoch, y.val_top1, y.val_videos)
            );
            assert!((x.train_loss - y.train_loss).abs() < 1e-4, "{a:?} vs {b:?}");
            assert_eq!(x.train_top1, y.train_top1);
        }
    }
}

/// The default train clips go through the official training transform, drawn anew every
/// epoch: the run streams (no token tables), is reproducible for a seed, trains on other clips
/// than the fixed view (another final loss), and refuses to hold its clips in memory.
#[test]
fn official_augmentation_draws_new_train_clips_every_epoch() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 2);
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 6);
    let probe = |name: &str, extra: &[&str]| {
        let dir = tmp.path().join(name);
        let run = eval_command("probe", &checkpoint, &train_csv, &val_csv, &dir)
            .args([
                "--segments",
                "2",
                "--epochs",
                "2",
                "--batch-size",
                "3",
                "--seed",
                "5",
            ])
            .args(extra)
            .output()
            .unwrap();
        (dir, run)
    };
    let (dir, first) = probe("official", &[]);
    assert_ok(&first);
    let official = top1_line(&first);
    assert!(official.contains("6 train videos, 2 classes"), "{official}");
    assert!(!dir.join("train-features.parquet").exists());
    let (_, again) = probe("official-again", &["--augment", "official"]);
    assert_ok(&again);
    assert_eq!(top1_line(&again), official, "same seed, same draws");
    let (_, fixed) = probe("fixed", &["--augment", "none", "--token-cache", "none"]);
    assert_ok(&fixed);
    let loss = |line: &str| line.rsplit("final train loss ").next().unwrap().to_string();
    assert_ne!(
        loss(&top1_line(&fixed)),
        loss(&official),
        "augmented clips train to another loss"
    );
    let (_, refused) = probe("refused", &["--token-cache", "memory"]);
    assert_eq!(refused.status.code(), Some(2), "refused before any work");
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(
        err.contains("--augment official") && err.contains("memory"),
        "{err}"
    );
}

/// An official evaluation config gives the probe its datasets, sampling, optimisation and
/// checkpoint: the same run as the flags it maps to (the per-GPU batch times the GPUs); a
/// flag overrides it; what is not implemented is refused (exit 2) naming the key.
#[test]
fn an_official_eval_config_drives_the_probe() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 2);
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 6);
    let folder = checkpoint.parent().unwrap();
    let file = checkpoint.file_name().unwrap().to_str().unwrap();
    let eval_yaml = format!(
        "nodes: 1\ntasks_per_node: 3\ntag: test\neval_name: video_classification_frozen\n\
         data:\n  dataset_train: {}\n  dataset_val: {}\n  dataset_type: VideoDataset\n\
         \x20 num_classes: 2\n  frames_per_clip: 16\n  num_segments: 2\n\
         \x20 num_views_per_segment: 2\n  frame_step: 4\n\
         optimization:\n  attend_across_segments: true\n  num_epochs: 2\n  resolution: 64\n\
         \x20 batch_size: 1\n  weight_decay: 0.02\n  lr: 0.002\n  start_lr: 0.002\n\
         \x20 final_lr: 0.0\n  warmup: 0.\n  use_bfloat16: true\n\
         pretrain:\n  model_name: vit_tiny\n  checkpoint_key: target_encoder\n\
         \x20 clip_duration: null\n  frames_per_clip: 16\n  tubelet_size: 2\n\
         \x20 uniform_power: true\n  use_silu: false\n  patch_size: 16\n  folder: {}\n\
         \x20 checkpoint: {file}\n",
        train_csv.display(),
        val_csv.display(),
        folder.display()
    );
    let eval = tmp.path().join("eval.yaml");
    std::fs::write(&eval, &eval_yaml).unwrap();
    let common = ["--augment", "none", "--token-cache", "none", "--seed", "2"];

    let from_config = |name: &str, extra: &[&str]| {
        Command::new(bin())
            .args(["probe", "--eval-config"])
            .arg(&eval)
            .arg("--out")
            .arg(tmp.path().join(name))
            .args(common)
            .args(extra)
            .output()
            .unwrap()
    };
    let by_config = from_config("by-config", &[]);
    assert_ok(&by_config);
    let flags = eval_command(
        "probe",
        &checkpoint,
        &train_csv,
        &val_csv,
        &tmp.path().join("flags"),
    )
    .args([
        "--segments",
        "2",
        "--views",
        "2",
        "--epochs",
        "2",
        "--batch-size",
        "3",
    ])
    .args(["--lr", "0.002", "--weight-decay", "0.02"])
    .args(common)
    .output()
    .unwrap();
    assert_ok(&flags);
    let line = top1_line(&by_config);
    assert!(
        line.contains("/ 2 validation videos; 6 train videos, 2 classes"),
        "{line}"
    );
    assert_eq!(line, top1_line(&flags));
    // As the official evaluation, a run from its config validates after every epoch; the
    // flags' run only after the last, with the same result.
    let (every, last) = (
        read_epochs(&tmp.path().join("by-config")),
        read_epochs(&tmp.path().join("flags")),
    );
    assert!(every.iter().all(|e| e.val_videos == 2), "{every:?}");
    assert!(last[0].val_top1.is_nan() && last[1].val_top1 == every[1].val_top1);

    let one_epoch = from_config("override", &["--epochs", "1"]);
    assert_ok(&one_epoch);
    assert_ne!(top1_line(&one_epoch), line, "--epochs overrides num_epochs");

    // Integer labels below data.num_classes (the official CSVs): one output per announced
    // class, label k at output k.
    let relabel = |from: &std::path::Path, name: &str| {
        let text = std::fs::read_to_string(from).unwrap();
        let to = tmp.path().join(name);
        std::fs::write(&to, text.replace(" mp4", " 3").replace(" webm", " 1")).unwrap();
        to
    };
    let (train_int, val_int) = (
        relabel(&train_csv, "train-int.csv"),
        relabel(&val_csv, "val-int.csv"),
    );
    let int_yaml = eval_yaml
        .replace(
            &train_csv.display().to_string(),
            &train_int.display().to_string(),
        )
        .replace(
            &val_csv.display().to_string(),
            &val_int.display().to_string(),
        )
        .replace("  num_classes: 2", "  num_classes: 5");
    std::fs::write(&eval, &int_yaml).unwrap();
    let five = from_config("five-classes", &[]);
    assert_ok(&five);
    let five_line = top1_line(&five);
    assert!(
        five_line.contains("6 train videos, 5 classes"),
        "{five_line}"
    );
    let probabilities = read_probabilities(&tmp.path().join("five-classes"));
    assert!(probabilities.iter().all(|p| p.len() == 5));

    std::fs::write(&eval, eval_yaml.replace("  warmup: 0.", "  warmup: 2.")).unwrap();
    let refused = from_config("refused", &[]);
    assert_eq!(refused.status.code(), Some(2));
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("optimization.warmup"), "{err}");
}

/// Streaming runs fail rather than report a top-1 when no train video could be read, and a
/// validation label the head has no output for is refused before training.
#[test]
fn a_probe_with_nothing_to_learn_from_fails() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 4, 2);
    let (_, val_csv) = labelled_indexes(&videos, tmp.path(), 2);
    let bad = tmp.path().join("broken.mp4");
    std::fs::write(&bad, b"not a video at all").unwrap();
    let bad2 = tmp.path().join("broken2.webm");
    std::fs::write(&bad2, b"not a video either").unwrap();
    let train_csv = tmp.path().join("broken.csv");
    std::fs::write(
        &train_csv,
        format!("{} mp4\n{} webm\n", bad.display(), bad2.display()),
    )
    .unwrap();
    for extra in [
        &["--augment", "official"][..],
        &["--augment", "none", "--token-cache", "none"],
    ] {
        let run = eval_command(
            "probe",
            &checkpoint,
            &train_csv,
            &val_csv,
            &tmp.path().join("p"),
        )
        .args(["--epochs", "1"])
        .args(extra)
        .output()
        .unwrap();
        assert!(!run.status.success(), "{extra:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(
            err.contains("no train video could be read"),
            "{extra:?}: {err}"
        );
        assert!(top1_line(&run).is_empty());
    }

    // A local index that is not there: named at once, before the checkpoint is read.
    let missing = tmp.path().join("no-such.csv");
    let run = eval_command(
        "probe",
        &checkpoint,
        &missing,
        &val_csv,
        &tmp.path().join("m"),
    )
    .output()
    .unwrap();
    assert_eq!(run.status.code(), Some(2), "refused before any work");
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(
        err.contains("--train") && err.contains("no-such.csv"),
        "{err}"
    );
    assert!(!err.contains("model loaded"), "{err}");

    // A validation label that is not a train class: refused before any epoch.
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 2);
    let val = std::fs::read_to_string(&val_csv).unwrap();
    let odd = tmp.path().join("odd-val.csv");
    std::fs::write(
        &odd,
        val.replacen(" mp4", " avi", 1).replacen(" webm", " avi", 1),
    )
    .unwrap();
    for extra in [
        &["--augment", "official"][..],
        &["--augment", "none", "--token-cache", "memory"],
    ] {
        let dir = tmp.path().join("q");
        let run = eval_command("probe", &checkpoint, &train_csv, &odd, &dir)
            .args(["--epochs", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert_eq!(run.status.code(), Some(2), "{extra:?}");
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("validation label `avi`"), "{err}");
        assert!(!err.contains("epoch=1"), "refused before training: {err}");
        assert!(
            !dir.join("train-features.parquet").exists(),
            "refused before the clips are read"
        );
    }

    // A failed run in the directory of a finished one leaves none of the earlier results
    // to pass for its own.
    let reused = tmp.path().join("reused");
    let ok = eval_command("probe", &checkpoint, &train_csv, &val_csv, &reused)
        .args(["--epochs", "1"])
        .output()
        .unwrap();
    assert_ok(&ok);
    assert!(reused.join("predictions.parquet").exists());
    let all_bad = tmp.path().join("all-bad.csv");
    std::fs::write(
        &all_bad,
        format!("{} mp4\n{} webm\n", bad.display(), bad2.display()),
    )
    .unwrap();
    let failed = eval_command("probe", &checkpoint, &train_csv, &all_bad, &reused)
        .args(["--epochs", "1"])
        .output()
        .unwrap();
    assert_eq!(
        failed.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&failed.stderr)
    );
    // A checkpoint that is not there: refused before any work, no --out made.
    let nowhere = tmp.path().join("nowhere");
    let missing = eval_command(
        "probe",
        &tmp.path().join("no-such.safetensors"),
        &train_csv,
        &val_csv,
        &nowhere,
    )
    .output()
    .unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(!nowhere.exists());

    // A checkpoint that is one of --out's outputs is refused, and kept.
    let own = reused.join("encoder.safetensors");
    std::fs::copy(&checkpoint, &own).unwrap();
    let refused = eval_command("probe", &own, &train_csv, &val_csv, &reused)
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2));
    assert!(own.exists());
    std::fs::remove_file(&own).unwrap();
    for stale in ["predictions.parquet", "probe.safetensors", "epochs.parquet"] {
        assert!(
            !reused.join(stale).exists(),
            "{stale} left from the earlier run"
        );
    }

    // A broken video among good ones, in both splits: quarantined in the first epoch's
    // table (the first evaluation's) and not read again (no table for the second epoch);
    // the run goes on with the others, validating on the same videos after each epoch.
    let mix = |csv: &std::path::Path, name: &str| {
        let good = std::fs::read_to_string(csv).unwrap();
        let mixed = tmp.path().join(name);
        std::fs::write(&mixed, format!("{good}\n{} mp4\n", bad.display())).unwrap();
        mixed
    };
    let (mixed, mixed_val) = (mix(&train_csv, "mixed.csv"), mix(&val_csv, "mixed-val.csv"));
    let dir = tmp.path().join("mixed");
    let run = eval_command("probe", &checkpoint, &mixed, &mixed_val, &dir)
        .args(["--epochs", "2", "--val-every", "1"])
        .output()
        .unwrap();
    assert_ok(&run);
    assert!(
        top1_line(&run).contains("; 2 train videos"),
        "{}",
        top1_line(&run)
    );
    assert!(dir.join("train.quarantine.parquet").exists());
    assert!(!dir.join("train.epoch-2.quarantine.parquet").exists());
    let err = String::from_utf8_lossy(&run.stderr);
    assert_eq!(
        err.matches("train videos left out of this epoch").count(),
        1,
        "{err}"
    );
    assert!(dir.join("val.quarantine.parquet").exists());
    assert!(!dir.join("val.epoch-2.quarantine.parquet").exists());
    assert_eq!(
        err.matches("validation videos left out").count(),
        1,
        "{err}"
    );
    let epochs = read_epochs(&dir);
    let val_count = std::fs::read_to_string(&val_csv).unwrap().lines().count() as u64;
    assert!(
        epochs.iter().all(|e| e.val_videos == val_count),
        "{epochs:?}"
    );
}

/// `vjepa init` writes the model a fresh run starts from (the random-init baseline of a probe):
/// a loadable step-0 checkpoint, the same bytes for the same config, other weights for another
/// seed.
#[test]
fn init_writes_a_step_zero_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    let out = tmp.path().join("out");
    let config = write_config(&tmp.path().join("c.yaml"), &videos, &out, 4);
    let init = |cfg: &std::path::Path, name: &str| {
        let path = tmp.path().join(name);
        let run = Command::new(bin())
            .args(["init", "--config"])
            .arg(cfg)
            .arg("--out")
            .arg(&path)
            .output()
            .unwrap();
        assert_ok(&run);
        std::fs::read(path).unwrap()
    };
    let a = init(&config, "a.safetensors");
    let b = init(&config, "b.safetensors");
    let model = vjepa_model::VJepa::from_safetensors(&a, &Device::Cpu).unwrap();
    let again = vjepa_model::VJepa::from_safetensors(&b, &Device::Cpu).unwrap();
    assert_eq!(model.steps_done(), 0);
    assert_eq!(
        model.params_digest().unwrap(),
        again.params_digest().unwrap(),
        "same config, same weights"
    );
    let text = std::fs::read_to_string(&config).unwrap();
    assert!(text.contains("  seed: "));
    let reseeded = tmp.path().join("seed.yaml");
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("  seed: ") {
                "  seed: 99".to_string()
            } else {
                l.to_string()
            }
        })
        .collect::<Vec<_>>()
        .join("\n");
    std::fs::write(&reseeded, text).unwrap();
    let other =
        vjepa_model::VJepa::from_safetensors(&init(&reseeded, "c.safetensors"), &Device::Cpu)
            .unwrap();
    assert_ne!(
        model.params_digest().unwrap(),
        other.params_digest().unwrap()
    );
}

/// A probe stopped between epochs (killed as soon as it has saved its state) and started again
/// with the same command continues from `resume.safetensors` to the result of a run never
/// stopped: the same top-1 line (final loss and train top-1 included), probabilities and
/// per-epoch table; the state is gone once the run is done, and a run with other settings in
/// the same directory starts afresh. Streamed with the official augmentation (generator, order
/// and per-epoch draws continue) and with the tokens held in memory.
#[test]
fn a_stopped_probe_continues_where_it_stopped() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 2);
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 6);
    for extra in [
        &["--augment", "official"][..],
        &["--augment", "none", "--token-cache", "memory"],
    ] {
        let probe = |dir: &std::path::Path, epochs: &str| {
            let mut c = eval_command("probe", &checkpoint, &train_csv, &val_csv, dir);
            c.args(["--epochs", epochs, "--batch-size", "2", "--seed", "4"])
                .args(["--segments", "2", "--val-every", "2"])
                .args(extra);
            c
        };
        let whole_dir = tmp.path().join("whole");
        // Held tokens train an epoch in milliseconds: more of them, so a stop lands mid-run.
        let epochs = if extra[1] == "official" { "8" } else { "60" };
        let whole = probe(&whole_dir, epochs).output().unwrap();
        assert_ok(&whole);
        assert!(!whole_dir.join("resume.safetensors").exists());

        let dir = tmp.path().join("stopped");
        let _ = std::fs::remove_dir_all(&dir);
        let state = dir.join("resume.safetensors");
        // `term`: SIGTERM (the run says how to continue and exits 143), else SIGKILL.
        let stop = |term: bool| {
            let mut child = probe(&dir, epochs)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
            while !state.exists() {
                assert!(
                    child.try_wait().unwrap().is_none(),
                    "{extra:?}: ended before saving a state"
                );
                assert!(std::time::Instant::now() < deadline);
                std::thread::sleep(std::time::Duration::from_millis(2));
            }
            if term {
                let sent = Command::new("kill")
                    .args(["-TERM", &child.id().to_string()])
                    .status()
                    .unwrap();
                assert!(sent.success());
                assert_eq!(child.wait().unwrap().code(), Some(143), "{extra:?}");
            } else {
                child.kill().unwrap();
                child.wait().unwrap();
            }
            assert!(state.exists(), "{extra:?}");
        };
        // SIGTERM where epochs take long enough to be caught mid-run (the held tokens' epochs
        // take milliseconds).
        stop(extra[1] == "official");

        let resumed = probe(&dir, epochs).output().unwrap();
        assert_ok(&resumed);
        let err = String::from_utf8_lossy(&resumed.stderr);
        assert!(err.contains("continuing from resume.safetensors"), "{err}");
        assert_eq!(top1_line(&resumed), top1_line(&whole), "{extra:?}");
        assert_eq!(read_probabilities(&dir), read_probabilities(&whole_dir));
        let (a, b) = (read_epochs(&dir), read_epochs(&whole_dir));
        assert_eq!(a.len().to_string(), epochs, "{a:?}");
        for (x, y) in a.iter().zip(&b) {
            assert_eq!(x.epoch, y.epoch);
            assert_eq!(
                x.train_loss.to_bits(),
                y.train_loss.to_bits(),
                "{a:?} vs {b:?}"
            );
            assert_eq!(x.train_top1, y.train_top1);
            assert_eq!(x.val_top1.is_nan(), y.val_top1.is_nan());
            if !x.val_top1.is_nan() {
                assert_eq!(x.val_top1, y.val_top1);
            }
        }
        assert!(!state.exists(), "removed once done");

        // A stopped run's state and another setting in the same directory: a fresh run
        // (the state is another run's; no stale rows kept).
        stop(false);
        let other = probe(&dir, "2").output().unwrap();
        assert_ok(&other);
        let err = String::from_utf8_lossy(&other.stderr);
        assert!(err.contains("another run's"), "{err}");
        assert_eq!(read_epochs(&dir).len(), 2);
    }
}

/// A video listed twice is read once, whatever the mode (streamed, or held in memory): the
/// run counts each video once and says so; listed twice with two labels, it is refused.
#[test]
fn repeated_index_lines_are_read_once() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 2);
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 6);
    let doubled = |csv: &std::path::Path, name: &str| {
        let text = std::fs::read_to_string(csv).unwrap();
        let first = text.lines().next().unwrap().to_string();
        let path = tmp.path().join(name);
        std::fs::write(&path, format!("{text}\n{first}\n{text}\n")).unwrap();
        path
    };
    let (train2, val2) = (
        doubled(&train_csv, "train2.csv"),
        doubled(&val_csv, "val2.csv"),
    );
    for extra in [
        &["--augment", "official"][..],
        &["--augment", "none", "--token-cache", "memory"],
        &["--augment", "none", "--token-cache", "none"],
    ] {
        let run = eval_command("probe", &checkpoint, &train2, &val2, &tmp.path().join("p"))
            .args(["--epochs", "1"])
            .args(extra)
            .output()
            .unwrap();
        assert_ok(&run);
        let line = top1_line(&run);
        assert!(
            line.contains("/ 2 validation videos; 6 train videos"),
            "{extra:?}: {line}"
        );
        let err = String::from_utf8_lossy(&run.stderr);
        assert!(err.contains("listed more than once"), "{err}");
    }
    let text = std::fs::read_to_string(&val_csv).unwrap();
    let first = text.lines().next().unwrap();
    let (path, label) = first.rsplit_once(' ').unwrap();
    let other = if label == "mp4" { "webm" } else { "mp4" };
    let conflicting = tmp.path().join("conflict.csv");
    std::fs::write(&conflicting, format!("{text}\n{path} {other}\n")).unwrap();
    let run = eval_command(
        "probe",
        &checkpoint,
        &train_csv,
        &conflicting,
        &tmp.path().join("c"),
    )
    .args(["--epochs", "1"])
    .output()
    .unwrap();
    assert!(!run.status.success());
    let err = String::from_utf8_lossy(&run.stderr);
    assert!(err.contains("different labels"), "{err}");
}
