//! Pretrain → fine-tune end to end at the smallest size (issue 8): a short V-JEPA run, then
//! `vjepa finetune` on labelled indexes; checks the artifacts (the predictions table against
//! the printed top-1, the head under the official names, the fine-tuned encoder: it loads,
//! moved away from the pretrained one, and `vjepa extract` reads it), and that with the
//! backbone frozen it predicts what `vjepa probe` predicts.

mod common;

use std::process::Command;

use arrow::array::{Array, BooleanArray, Float32Array, ListArray, StringArray};
use common::*;
use vjepa_model::Device;
use vjepa_model::probe::{AttentiveProbe, ProbeConfig};
use vjepa_model::vit::Encoder;

#[test]
fn pretrain_then_finetune_writes_its_artifacts() {
    let tmp = tempfile::tempdir().unwrap();
    let (videos, checkpoint) = pretrained_corpus(tmp.path(), 8, 2);

    // Label = container (mp4 vs webm); 5 train videos, 3 validation videos.
    let (train_csv, val_csv) = labelled_indexes(&videos, tmp.path(), 5);

    let dir = tmp.path().join("ft");
    let run = eval_command("finetune", &checkpoint, &train_csv, &val_csv, &dir)
        .args(["--views", "2", "--epochs", "2", "--batch-size", "3"])
        .args(["--lr", "1e-3", "--backbone-lr-scale", "0.5"])
        .output()
        .unwrap();
    assert_ok(&run);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        stdout.contains("validation videos; 5 train videos, 2 classes"),
        "{stdout}"
    );
    // "top-1 X % (C / 3 validation videos; …)"
    let correct: usize = stdout
        .split(" % (")
        .nth(1)
        .and_then(|r| r.split(" / 3 validation").next())
        .and_then(|c| c.trim().parse().ok())
        .unwrap_or_else(|| panic!("no top-1 line: {stdout}"));

    // Predictions: one row per validation video; `correct` agrees with the labels and the
    // printed top-1.
    let rows = read_predictions(&dir);
    assert_eq!(rows.len(), 3);
    for r in &rows {
        assert_eq!(r.correct, r.label == r.predicted);
        assert!((r.probabilities.iter().sum::<f32>() - 1.0).abs() < 1e-4);
    }
    let right = rows.iter().filter(|r| r.correct).count();
    assert_eq!(right, correct, "{stdout}");

    // The head: official names, loads with the encoder's width and heads.
    let model =
        vjepa_model::VJepa::from_safetensors(&std::fs::read(&checkpoint).unwrap(), &Device::Cpu)
            .unwrap();
    let enc = model.encoder_config().clone();
    let bytes = std::fs::read(dir.join("probe.safetensors")).unwrap();
    let tensors = candle_core::safetensors::load_buffer(&bytes, &candle_core::Device::Cpu).unwrap();
    let cfg = ProbeConfig {
        embed_dim: enc.embed_dim,
        num_heads: enc.num_heads,
        num_classes: 2,
        mlp_ratio: 4.0,
    };
    AttentiveProbe::from_tensors(cfg, &tensors, &Device::Cpu).unwrap();

    // The encoder: loads, same shape, every tensor moved from the pretrained target encoder.
    let tuned_path = dir.join("encoder.safetensors");
    let tuned =
        Encoder::from_safetensors(&std::fs::read(&tuned_path).unwrap(), &Device::Cpu).unwrap();
    assert_eq!(tuned.config(), &enc);
    let values = |t: &vjepa_model::Tensor| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    for ((name, a), (_, b)) in tuned.params().iter().zip(model.target_encoder().params()) {
        assert_ne!(values(a), values(b), "{name} did not change");
    }

    // `vjepa extract` reads the fine-tuned encoder.
    let features = tmp.path().join("features.parquet");
    let extract = Command::new(bin())
        .args(["extract", "--checkpoint"])
        .arg(&tuned_path)
        .arg("--index")
        .arg(&val_csv)
        .arg("--out")
        .arg(&features)
        .output()
        .unwrap();
    assert_ok(&extract);
    assert!(
        String::from_utf8_lossy(&extract.stdout)
            .contains("extracted 3 rows (one per segment and view) from 3 videos"),
        "{}",
        String::from_utf8_lossy(&extract.stdout)
    );

    // With the backbone frozen (scale 0), fine-tuning is the probe: same clips, segments
    // concatenated the same way, same init and order, so the same predictions; with the
    // fixed view and with the official training transform (the same draws on both sides).
    let common = |cmd: &str, dir: &std::path::Path| {
        let mut c = eval_command(cmd, &checkpoint, &train_csv, &val_csv, dir);
        c.args(["--segments", "2", "--views", "2", "--epochs", "2"])
            .args(["--batch-size", "2", "--lr", "3e-3", "--seed", "5"]);
        c
    };
    for augment in ["none", "official"] {
        let probe_dir = tmp.path().join(format!("probe-{augment}"));
        assert_ok(
            &common("probe", &probe_dir)
                .args(["--augment", augment])
                .output()
                .unwrap(),
        );
        let frozen_dir = tmp.path().join(format!("frozen-{augment}"));
        assert_ok(
            &common("finetune", &frozen_dir)
                .args(["--backbone-lr-scale", "0", "--augment", augment])
                .output()
                .unwrap(),
        );
        let (p, f) = (read_predictions(&probe_dir), read_predictions(&frozen_dir));
        assert_eq!(p.len(), 3);
        for (p, f) in p.iter().zip(&f) {
            assert_eq!((&p.uri, &p.predicted), (&f.uri, &f.predicted), "{augment}");
            for (a, b) in p.probabilities.iter().zip(&f.probabilities) {
                assert!((a - b).abs() < 1e-3, "{augment}: {:?} vs {:?}", p, f);
            }
        }
    }

    // Decoding the clips again every epoch (`--clip-cache none`) trains on the same batches
    // as holding them (`memory`): the same fine-tuned model, top-1 line and probabilities,
    // and the same validation after each epoch (`--val-every 1`). A broken video in the
    // validation index is quarantined by both, and its record kept.
    let broken = tmp.path().join("broken.mp4");
    std::fs::write(&broken, b"not a video").unwrap();
    let val_text = std::fs::read_to_string(&val_csv).unwrap();
    std::fs::write(&val_csv, format!("{val_text}\n{} mp4\n", broken.display())).unwrap();
    let (held_dir, streamed_dir) = (tmp.path().join("held"), tmp.path().join("streamed"));
    let held = common("finetune", &held_dir)
        .args(["--clip-cache", "memory", "--val-every", "1"])
        .output()
        .unwrap();
    let streamed = common("finetune", &streamed_dir)
        .args(["--clip-cache", "none", "--val-every", "1"])
        .output()
        .unwrap();
    for dir in [&held_dir, &streamed_dir] {
        assert!(
            dir.join("val.quarantine.parquet").exists(),
            "{}",
            dir.display()
        );
    }
    assert_ok(&held);
    assert_ok(&streamed);
    assert!(
        top1_line(&held).contains("3 validation videos"),
        "{}",
        top1_line(&held)
    );
    assert_eq!(top1_line(&streamed), top1_line(&held));
    let (h, s) = (read_predictions(&held_dir), read_predictions(&streamed_dir));
    assert_eq!(h.len(), s.len());
    for (h, s) in h.iter().zip(&s) {
        assert_eq!((&h.uri, &h.predicted), (&s.uri, &s.predicted));
        for (a, b) in h.probabilities.iter().zip(&s.probabilities) {
            assert!((a - b).abs() < 1e-4, "{:?} vs {:?}", h, s);
        }
    }
    assert!(streamed_dir.join("encoder.safetensors").exists());
    let (h, s) = (read_epochs(&held_dir), read_epochs(&streamed_dir));
    assert_eq!(h.len(), 2);
    assert!(h.iter().all(|e| e.val_videos == 3), "{h:?}");
    assert!((h[1].val_top1 - top1_of(&top1_line(&held))).abs() < 0.006);
    for (a, b) in h.iter().zip(&s) {
        assert_eq!(
            (a.epoch, a.val_top1, a.train_top1),
            (b.epoch, b.val_top1, b.train_top1)
        );
        assert!((a.train_loss - b.train_loss).abs() < 1e-4, "{h:?} vs {s:?}");
    }
}

#[derive(Debug)]
struct Row {
    uri: String,
    label: String,
    predicted: String,
    correct: bool,
    probabilities: Vec<f32>,
}

fn read_predictions(dir: &std::path::Path) -> Vec<Row> {
    let file = std::fs::File::open(dir.join("predictions.parquet")).unwrap();
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder::try_new(file)
        .unwrap()
        .build()
        .unwrap();
    let mut rows = Vec::new();
    for batch in reader {
        let batch = batch.unwrap();
        let col = |name: &str| batch.column_by_name(name).unwrap().clone();
        let (uri, label, predicted) = (col("uri"), col("label"), col("predicted"));
        let strings =
            |a: &arrow::array::ArrayRef| a.as_any().downcast_ref::<StringArray>().unwrap().clone();
        let (uri, label, predicted) = (strings(&uri), strings(&label), strings(&predicted));
        let ok = col("correct");
        let ok = ok.as_any().downcast_ref::<BooleanArray>().unwrap();
        let probs = col("probabilities");
        let probs = probs.as_any().downcast_ref::<ListArray>().unwrap();
        for i in 0..batch.num_rows() {
            let p = probs.value(i);
            let p = p.as_any().downcast_ref::<Float32Array>().unwrap();
            rows.push(Row {
                uri: uri.value(i).to_string(),
                label: label.value(i).to_string(),
                predicted: predicted.value(i).to_string(),
                correct: ok.value(i),
                probabilities: p.values().to_vec(),
            });
        }
    }
    rows
}
