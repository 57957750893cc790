//! `outputs.features: true` (issue 8): while training, the target encoder's mean-pooled feature
//! of every clip trained on goes to `features.parquet` (rolled with the other tables at every
//! checkpoint). Each row must equal the target encoder of the model *before* that step (the
//! step-0 model from `vjepa init`, then each step's checkpoint) run on that clip, decoded and
//! cropped/flipped independently from the clips table's record.

mod common;

use std::collections::BTreeMap;
use std::process::Command;

use common::*;
use vjepa_model::{Device, VJepa};
use vjepa_storage::Store;
use vjepa_storage::features::read_features_all;
use vjepa_storage::tables::read_clips_all;

#[test]
fn training_writes_the_target_feature_of_every_clip() {
    let tmp = tempfile::tempdir().unwrap();
    let videos = tmp.path().join("videos");
    make_corpus(&videos, 4);
    let out = tmp.path().join("out");
    let steps = 3u64;
    let text = small_config(
        &format!("{}/", videos.display()),
        &format!("{}/", out.display()),
        steps,
    )
    .replace("  checkpoint_every: 4", "  checkpoint_every: 1")
    .replace(
        "  log_every: 10\n",
        "  log_every: 10\n  clips: true\n  features: true\n",
    );
    assert!(text.contains("features: true") && text.contains("checkpoint_every: 1"));
    let config = tmp.path().join("c.yaml");
    std::fs::write(&config, &text).unwrap();
    assert_ok(&run_train(&config, &[], &[]));

    // The model each step trained from: step 0 is the fresh model, then the checkpoints.
    let init = tmp.path().join("init.safetensors");
    let run = Command::new(bin())
        .args(["init", "--config"])
        .arg(&config)
        .arg("--out")
        .arg(&init)
        .output()
        .unwrap();
    assert_ok(&run);
    let model_before = |step: u64| {
        let path = if step == 0 {
            init.clone()
        } else {
            out.join(format!("checkpoints/step-{step:08}.safetensors"))
        };
        VJepa::from_safetensors(&std::fs::read(path).unwrap(), &Device::Cpu).unwrap()
    };

    let rt = tokio::runtime::Runtime::new().unwrap();
    let store = Store::open(out.to_str().unwrap(), &Default::default(), false).unwrap();
    let rows = rt.block_on(read_features_all(&store, "features")).unwrap();
    let clips = rt.block_on(read_clips_all(&store)).unwrap();
    // Rolled at every checkpoint: one file per step.
    assert!(out.join("features.parquet").exists());
    assert!(out.join("features-from-00000001.parquet").exists());
    let batch = 4;
    assert_eq!(
        rows.len() as u64,
        steps * batch,
        "one row per clip trained on"
    );
    assert_eq!(clips.len(), rows.len());

    // Rows of a step follow the clips table's slot order.
    let mut by_step: BTreeMap<u64, Vec<_>> = BTreeMap::new();
    for r in &rows {
        by_step.entry(r.step).or_default().push(r);
    }
    assert_eq!(by_step.keys().copied().collect::<Vec<_>>(), vec![0, 1, 2]);

    vjepa_ingest::init().unwrap();
    let mut decoder = vjepa_ingest::Decoder::new(Default::default()).unwrap();
    let mut worst = 0f32;
    for (step, step_rows) in &by_step {
        let model = model_before(*step);
        let d = model.encoder_config().embed_dim;
        let size = model.encoder_config().crop_size;
        let records: Vec<_> = clips.iter().filter(|c| c.step == *step).collect();
        assert_eq!(records.len(), step_rows.len());
        for (row, rec) in step_rows.iter().zip(&records) {
            assert_eq!(row.uri, rec.uri);
            assert_eq!(row.frames, rec.frames);
            assert_eq!(row.embedding.len(), d);
            assert!(row.tokens.is_empty());
            let clip = decode_row_clip(
                &mut decoder,
                &row.uri,
                &row.frames,
                RowCrop::Recorded {
                    crop: rec.crop,
                    flip: rec.flip,
                },
                size,
            );
            let direct = mean_pooled(model.target_features(&clip).unwrap());
            let scale = direct.iter().fold(0f32, |m, x| m.max(x.abs()));
            for (a, b) in direct.iter().zip(&row.embedding) {
                worst = worst.max((a - b).abs() / scale);
            }
        }
    }
    println!("training features vs a direct target forward: max relative error {worst:.2e}");
    assert!(worst < 1e-4, "max relative error {worst}");
}
