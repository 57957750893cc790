//! Import of official `.pth.tar` checkpoints written by PyTorch (tools/reference/
//! make_pth_fixture.py): same target features as the PyTorch model that saved the file, the same
//! next training step (AdamW state carried over), and errors that name the bad tensor.

use std::collections::HashMap;
use std::path::PathBuf;

use vjepa_model::{
    Device, EncoderConfig, MaskIndices, ModelConfigs, OptimConfig, PredictorConfig, Tensor,
    TrainBatch, VJepa, encoder_from_pth,
};

fn golden(name: &str) -> Vec<u8> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/goldens")
        .join(name);
    std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// The expected values: tensors by name (f32 or i64 → u32) and metadata.
struct Expected {
    f32s: HashMap<String, Tensor>,
    indices: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

fn expected() -> Expected {
    let bytes = golden("pth_fixture_expected.safetensors");
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut f32s = HashMap::new();
    let mut indices = HashMap::new();
    for (name, view) in st.tensors() {
        let shape = view.shape().to_vec();
        match view.dtype() {
            safetensors::Dtype::F32 => {
                let v: Vec<f32> = view
                    .data()
                    .chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect();
                f32s.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
            }
            safetensors::Dtype::I64 => {
                let v: Vec<u32> = view
                    .data()
                    .chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as u32)
                    .collect();
                indices.insert(name, Tensor::from_vec(v, shape, &Device::Cpu).unwrap());
            }
            other => panic!("{name}: dtype {other:?}"),
        }
    }
    Expected {
        f32s,
        indices,
        meta: meta.metadata().clone().unwrap().into_iter().collect(),
    }
}

impl Expected {
    fn configs(&self) -> ModelConfigs {
        let json = |k: &str| self.meta[k].as_str();
        ModelConfigs {
            encoder: serde_json::from_str::<EncoderConfig>(json("encoder_config")).unwrap(),
            predictor: serde_json::from_str::<PredictorConfig>(json("predictor_config")).unwrap(),
            optim: serde_json::from_str::<OptimConfig>(json("optim_config")).unwrap(),
            seed: 0,
        }
    }

    fn stat(&self, key: &str) -> f64 {
        let stats: serde_json::Value = serde_json::from_str(&self.meta["after_stats"]).unwrap();
        stats[key].as_f64().unwrap()
    }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

/// ‖got − want‖ / ‖want‖.
fn rel_err(got: &Tensor, want: &Tensor) -> f64 {
    assert_eq!(got.dims(), want.dims());
    let (g, w) = (flat(got), flat(want));
    let num: f64 = g
        .iter()
        .zip(&w)
        .map(|(a, b)| (*a as f64 - *b as f64).powi(2))
        .sum();
    let den: f64 = w.iter().map(|b| (*b as f64).powi(2)).sum();
    (num / den).sqrt()
}

fn load() -> (VJepa, vjepa_model::PthInfo, Expected) {
    let exp = expected();
    let (model, info) = VJepa::from_pth(
        &golden("pth_fixture.pth.tar"),
        Some(&exp.configs()),
        &Device::Cpu,
    )
    .unwrap();
    (model, info, exp)
}

#[test]
fn pytorch_checkpoint_gives_the_pytorch_features() {
    let (model, info, exp) = load();
    assert_eq!(info.epoch, Some(1));
    assert_eq!(info.batch_size, Some(2));
    assert_eq!(info.lr, Some(4e-3));
    assert!(info.optimizer_state && !info.written_by_us);
    assert_eq!(model.steps_done(), 3);

    let clip = &exp.f32s["clip"];
    let want = &exp.f32s["features"];
    let got = model.target_features(clip).unwrap();
    let err = rel_err(&got, want);
    println!("target features vs PyTorch (float64): relative error {err:.2e}");
    assert!(err <= 1e-4, "relative error {err}");
    // The online encoder differs from the target (EMA), so the right section was used.
    let online = model.encoder_features(clip).unwrap();
    assert!(rel_err(&online, want) > 1e-3);

    // Evaluation-only reading takes the target encoder too.
    let (enc, section) = encoder_from_pth(
        &golden("pth_fixture.pth.tar"),
        Some(model.encoder_config()),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(section, "target_encoder");
    assert_eq!(flat(&enc.forward(clip, None).unwrap()), flat(&got));

    // Built for a larger input (the official evaluation at another resolution): the file's
    // pos_embed has another shape, so the freshly built sin-cos table is kept, as the
    // official `load_pretrained` does; the weights are the file's.
    let mut bigger = model.encoder_config().clone();
    bigger.crop_size += 2 * bigger.patch_size;
    let (big, _) =
        encoder_from_pth(&golden("pth_fixture.pth.tar"), Some(&bigger), &Device::Cpu).unwrap();
    let fresh = vjepa_model::pos_embed::sincos_table_tensor(
        bigger.embed_dim,
        bigger.grid(),
        bigger.table_layout(),
        &Device::Cpu,
    )
    .unwrap();
    assert_eq!(flat(big.pos_embed()), flat(&fresh));
    assert_ne!(big.pos_embed().dims(), enc.pos_embed().dims());
    assert_eq!(big.params().len(), enc.params().len());
    for ((name, a), (_, b)) in big.params().iter().zip(enc.params()) {
        assert_eq!(flat(a), flat(b), "{name}");
    }
}

#[test]
fn pytorch_checkpoint_continues_training_like_pytorch() {
    let (mut model, _, exp) = load();
    let batch = TrainBatch {
        clips: exp.f32s["batch.clips"].clone(),
        masks: (0..2)
            .map(|i| MaskIndices {
                context: exp.indices[&format!("batch.mask{i}.context")].clone(),
                target: exp.indices[&format!("batch.mask{i}.target")].clone(),
            })
            .collect(),
    };
    let stats = model.train_step(&batch).unwrap();
    assert_eq!(stats.step, 4);
    for (got, key) in [
        (stats.lr, "lr"),
        (stats.weight_decay, "weight_decay"),
        (stats.ema_momentum, "ema_momentum"),
    ] {
        assert!(
            (got - exp.stat(key)).abs() <= 1e-12 * got.abs(),
            "{key}: {got}"
        );
    }
    let loss_err = (stats.loss - exp.stat("loss")).abs() / exp.stat("loss");
    assert!(
        loss_err <= 1e-5,
        "loss {} vs {}",
        stats.loss,
        exp.stat("loss")
    );

    // Every weight after the step (encoder, predictor, EMA target) against PyTorch's float64
    // step from the same state: a wrong moment, step count or group would show as an O(lr)
    // error in the parameters it touched.
    let bytes = model.to_safetensors().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut worst = (0.0f64, String::new());
    let mut count = 0;
    for (name, want) in exp.f32s.iter().filter(|(k, _)| k.starts_with("after.")) {
        let name = &name["after.".len()..];
        let view = st.tensor(name).unwrap();
        let got: Vec<f32> = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect();
        let w = flat(want);
        assert_eq!(got.len(), w.len(), "{name}");
        for (a, b) in got.iter().zip(&w) {
            let d = (*a as f64 - *b as f64).abs();
            if d > worst.0 {
                worst = (d, name.to_string());
            }
        }
        count += 1;
    }
    println!(
        "{count} tensors after the continued step: max abs error {:.2e} ({}), lr {:.2e}",
        worst.0, worst.1, stats.lr
    );
    let enc = model.encoder_config();
    let tensors = 2 * vjepa_model::vit::Encoder::param_specs(enc).len()
        + vjepa_model::predictor::Predictor::param_specs(enc, model.predictor_config()).len();
    assert_eq!(count, tensors, "all weights compared");
    assert!(worst.0 <= 1e-2 * stats.lr, "{worst:?}");
}

#[test]
fn bad_pytorch_files_name_the_tensor() {
    let exp = expected();
    let cfg = exp.configs();
    let err = |file: &str| {
        VJepa::from_pth(&golden(file), Some(&cfg), &Device::Cpu)
            .err()
            .unwrap()
            .to_string()
    };
    let e = err("pth_fixture_missing.pth.tar");
    assert_eq!(
        e, "missing tensor `target_encoder.blocks.1.mlp.fc2.weight`",
        "{e}"
    );
    let e = err("pth_fixture_badshape.pth.tar");
    assert_eq!(
        e, "tensor `predictor.predictor_proj.weight` has shape [16, 24], expected [24, 16]",
        "{e}"
    );
    let e = encoder_from_pth(
        &golden("pth_fixture_missing.pth.tar"),
        Some(&cfg.encoder),
        &Device::Cpu,
    )
    .err()
    .unwrap()
    .to_string();
    assert!(
        e.contains("`target_encoder.blocks.1.mlp.fc2.weight`"),
        "{e}"
    );
    // Another shape than the file's: the first mismatch is named.
    let mut wide = cfg.clone();
    wide.encoder.embed_dim = 48;
    wide.encoder.mlp_hidden = 192;
    let e = VJepa::from_pth(&golden("pth_fixture.pth.tar"), Some(&wide), &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert_eq!(
        e, "tensor `encoder.pos_embed` has shape [1, 8, 24], expected [1, 8, 48]",
        "{e}"
    );
    // Without configs an official file is refused with a hint, not guessed.
    let e = VJepa::from_pth(&golden("pth_fixture.pth.tar"), None, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("job config"), "{e}");
}
