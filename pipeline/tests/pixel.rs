//! `model.objective: pixel` end to end (issue 8): the job trains the pixel-reconstruction
//! baseline through the same data-parallel path (two workers), the loss is finite and falls,
//! the V-JEPA-only metrics columns hold their documented values, a run resumed from a pixel
//! checkpoint ends bit-identical to an uninterrupted one, a V-JEPA config refuses to resume
//! it, `vjepa init` writes its step-0 model, and `vjepa extract` reads its encoder.

mod common;

use std::path::Path;
use std::process::Command;

use common::*;
use vjepa_model::{Device, Objective, Pretrainer};
use vjepa_storage::Store;
use vjepa_storage::features::read_features;

/// The small config with `objective: pixel` and a light decoder.
fn pixel_config(path: &Path, videos: &Path, out: &Path, steps: u64) -> std::path::PathBuf {
    let text = small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        steps,
    );
    let text = text.replace(
        "  model_name: vit_tiny\n",
        "  model_name: vit_tiny\n  objective: pixel\n  pixel:\n    decoder_dim: 48\n    decoder_depth: 1\n",
    );
    assert!(
        text.contains("objective: pixel"),
        "quickstart.yaml layout changed"
    );
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

fn digest(checkpoint: &Path) -> u64 {
    let m =
        Pretrainer::from_safetensors(&std::fs::read(checkpoint).unwrap(), &Device::Cpu).unwrap();
    assert_eq!(m.objective(), Objective::Pixel);
    m.params_digest().unwrap()
}

#[test]
fn pixel_objective_trains_resumes_and_extracts() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 3);
    let steps = 8;

    // Uninterrupted run.
    let out = tmp.path().join("out");
    let config = pixel_config(&tmp.path().join("c.yaml"), &videos, &out, steps);
    assert_ok(&run_train(&config, &[], &[]));
    let metrics = read_metrics(out.to_str().unwrap(), &Default::default());
    assert_eq!(metrics.len(), steps as usize);
    let losses: Vec<f64> = metrics.iter().map(|r| r.loss).collect();
    assert!(
        losses.iter().all(|l| l.is_finite() && *l > 0.0),
        "{losses:?}"
    );
    let first = (losses[0] + losses[1]) / 2.0;
    let last = (losses[6] + losses[7]) / 2.0;
    eprintln!("pixel losses: {losses:?}");
    assert!(last < first, "pixel loss did not fall: {losses:?}");
    // 16 frames / tubelet 2 × (64 / 16)²: 8 slices of 16 positions, 14 masked (90 %).
    for r in &metrics {
        assert_eq!(r.context_tokens, vec![8 * 2]);
        assert_eq!(r.target_tokens, vec![8 * 14]);
        assert_eq!(r.loss_per_mask, vec![r.loss]);
        assert_eq!(r.ema_momentum, 0.0);
        assert!(r.encoder_grad_norm > 0.0 && r.predictor_grad_norm > 0.0);
        assert!(r.target_std.is_finite() && r.target_std > 0.0);
        assert!(r.target_rank >= 1.0, "target_rank {}", r.target_rank);
    }
    let full = digest(&out.join("checkpoints/step-00000008.safetensors"));

    // Interrupted at step 4, resumed to 8: the same parameters.
    let out2 = tmp.path().join("out2");
    let half = pixel_config(&tmp.path().join("half.yaml"), &videos, &out2, 4);
    assert_ok(&run_train(&half, &[], &[]));
    let rest = pixel_config(&tmp.path().join("rest.yaml"), &videos, &out2, steps);
    let resumed = run_train(&rest, &[], &[]);
    assert_ok(&resumed);
    assert!(
        String::from_utf8_lossy(&resumed.stderr).contains("resuming"),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    let resumed_metrics = read_metrics(out2.to_str().unwrap(), &Default::default());
    assert_eq!(
        resumed_metrics.iter().map(|r| r.step).collect::<Vec<_>>(),
        (1..=steps).collect::<Vec<_>>()
    );
    assert_eq!(
        digest(&out2.join("checkpoints/step-00000008.safetensors")),
        full
    );

    // A V-JEPA config does not continue a pixel run.
    let vjepa = write_config(&tmp.path().join("v.yaml"), &videos, &out2, steps + 4);
    let refused = run_train(&vjepa, &[], &[]);
    assert!(!refused.status.success());
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(err.contains("objective pixel"), "{err}");

    // `vjepa init` writes the step-0 model of the config's objective.
    let init = tmp.path().join("init.safetensors");
    let run = Command::new(bin())
        .args(["init", "--config", config.to_str().unwrap(), "--out"])
        .arg(&init)
        .output()
        .unwrap();
    assert_ok(&run);
    let m = Pretrainer::from_safetensors(&std::fs::read(&init).unwrap(), &Device::Cpu).unwrap();
    assert_eq!((m.objective(), m.steps_done()), (Objective::Pixel, 0));

    // `vjepa extract` reads the pixel checkpoint's encoder.
    let checkpoint = out.join("checkpoints/step-00000008.safetensors");
    let mut names: Vec<String> = std::fs::read_dir(&videos)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().to_string())
        .collect();
    names.sort();
    let index = tmp.path().join("index.csv");
    let lines: Vec<String> = names
        .iter()
        .map(|n| format!("{} 0", videos.join(n).display()))
        .collect();
    std::fs::write(&index, lines.join("\n") + "\n").unwrap();
    let table = tmp.path().join("f/features.parquet");
    let run = Command::new(bin())
        .args([
            "extract",
            "--checkpoint",
            checkpoint.to_str().unwrap(),
            "--index",
            index.to_str().unwrap(),
            "--out",
            table.to_str().unwrap(),
        ])
        .output()
        .unwrap();
    assert_ok(&run);
    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(
        table.parent().unwrap().to_str().unwrap(),
        &Default::default(),
        false,
    )
    .unwrap();
    let rows = rt
        .block_on(read_features(&store, "features.parquet"))
        .unwrap();
    assert_eq!(rows.len(), 3);
    let model =
        Pretrainer::from_safetensors(&std::fs::read(&checkpoint).unwrap(), &Device::Cpu).unwrap();
    let Pretrainer::Pixel(model) = model else {
        panic!("not a pixel checkpoint")
    };
    // The first row equals the encoder's mean-pooled output on that clip, decoded on its own.
    let r = &rows[0];
    assert_eq!(r.embedding.len(), model.encoder_config().embed_dim);
    vjepa_ingest::init().unwrap();
    let mut decoder = vjepa_ingest::Decoder::new(Default::default()).unwrap();
    let size = model.encoder_config().crop_size;
    let clip = decode_row_clip(
        &mut decoder,
        &r.uri,
        &r.frames,
        RowCrop::View {
            view: r.view as usize,
            views: 1,
        },
        size,
    );
    let direct = mean_pooled(model.encoder_features(&clip).unwrap());
    let max = direct
        .iter()
        .zip(&r.embedding)
        .map(|(a, b)| (a - b).abs())
        .fold(0f32, f32::max);
    assert!(max < 1e-4, "max diff {max}");
}
