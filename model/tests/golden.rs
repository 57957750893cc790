//! Golden test against our PyTorch reference (`tools/reference/vjepa_ref.py`, written from the
//! spec; the goldens come from `tools/reference/make_goldens.py`, see `tools/reference/README.md`).
//!
//! A small V-JEPA (D 32, depth 2, 4 heads; predictor 20 wide, depth 2, 2 heads; 4×32×32 clips,
//! tubelet 2, patch 8 ⇒ 32 tokens; batch 2; two mask configs with different context/target sizes)
//! with fixed random weights (a target encoder apart from the encoder), clip and indices, then
//! three training steps on that batch (warmup; clipping engaged for the predictor from step 2).
//! The reference computed everything in float64 from the float32 inputs; we run in float32.
//!
//! Error measure, per tensor: max|ours − ref| / max|ref|. Bounds: forward outputs and losses
//! ≤ 1e-4; gradients and grad norms ≤ 1e-3; after three steps the parameter updates (θ₃ − θ₀),
//! the AdamW moments and the EMA target's change ≤ 1e-3 (they are built from gradients);
//! schedule values ≤ 1e-12. Torch's own float32 run of the same steps reaches 6e-7 (outputs),
//! 1.1e-6 (gradients), 1.4e-4 (updates), 4.5e-5 (EMA), 2.3e-6 (moments)
//! (`make_goldens.py --check-f32`). Run with `--nocapture` to see our worst error per category.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;

use safetensors::SafeTensors;
use safetensors::tensor::Dtype;
use vjepa_model::{
    Device, EncoderConfig, MaskIndices, OptimConfig, PredictorConfig, Tensor, TrainBatch, VJepa,
};

const OUTPUT_TOL: f64 = 1e-4;
const GRAD_TOL: f64 = 1e-3;
const STATE_TOL: f64 = 1e-3;

struct Golden {
    t: HashMap<String, Tensor>,
    meta: HashMap<String, String>,
}

impl Golden {
    fn load() -> Self {
        let path =
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/goldens/vjepa_small.safetensors");
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).expect("safetensors header");
        let meta = header.metadata().clone().expect("golden metadata");
        let st = SafeTensors::deserialize(&bytes).expect("safetensors");
        let dev = Device::Cpu;
        let mut t = HashMap::new();
        for (name, view) in st.tensors() {
            let shape = view.shape().to_vec();
            let data = view.data();
            let tensor = match view.dtype() {
                Dtype::F32 => Tensor::from_vec(
                    data.chunks_exact(4)
                        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                        .collect::<Vec<_>>(),
                    shape,
                    &dev,
                ),
                Dtype::F64 => Tensor::from_vec(
                    data.chunks_exact(8)
                        .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
                        .collect::<Vec<_>>(),
                    shape,
                    &dev,
                ),
                Dtype::I64 => Tensor::from_vec(
                    data.chunks_exact(8)
                        .map(|c| i64::from_le_bytes(c.try_into().unwrap()))
                        .collect::<Vec<_>>(),
                    shape,
                    &dev,
                ),
                other => panic!("{name}: unexpected dtype {other:?}"),
            }
            .unwrap();
            t.insert(name, tensor);
        }
        assert_eq!(
            meta.get("format").map(String::as_str),
            Some("vjepa-stream.goldens.v1")
        );
        Self { t, meta }
    }

    fn get(&self, name: &str) -> &Tensor {
        self.t
            .get(name)
            .unwrap_or_else(|| panic!("golden `{name}` missing"))
    }

    fn config<T: serde::de::DeserializeOwned>(&self, key: &str) -> T {
        serde_json::from_str(&self.meta[key]).unwrap_or_else(|e| panic!("config {key}: {e}"))
    }

    fn steps(&self) -> usize {
        self.meta["steps"].parse().unwrap()
    }

    fn model(&self) -> VJepa {
        let enc: EncoderConfig = self.config("encoder_config");
        let pred: PredictorConfig = self.config("predictor_config");
        let optim: OptimConfig = self.config("optim_config");
        VJepa::from_tensors(enc, pred, optim, &self.t, &Device::Cpu).expect("model from goldens")
    }

    fn batch(&self) -> TrainBatch {
        let masks = (0..)
            .map_while(|i| {
                let ctx = self.t.get(&format!("input.mask{i}.context"))?;
                Some(MaskIndices {
                    context: ctx.clone(),
                    target: self.get(&format!("input.mask{i}.target")).clone(),
                })
            })
            .collect();
        TrainBatch {
            clips: self.get("input.clips").clone(),
            masks,
        }
    }
}

/// max|a − b| / max|b| over the whole tensor (shapes must agree).
fn rel_err(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(a.dims(), b.dims(), "shape mismatch");
    let a = a
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    let b = b
        .to_dtype(candle_core::DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap();
    let diff = (&a - &b)
        .unwrap()
        .abs()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    let scale = b.abs().unwrap().max(0).unwrap().to_scalar::<f64>().unwrap();
    diff / scale.max(1e-30)
}

fn scalar_err(a: f64, b: f64) -> f64 {
    (a - b).abs() / b.abs().max(1e-30)
}

/// Worst error per category; failures collected so that one run reports all of them.
#[derive(Default)]
struct Report {
    worst: BTreeMap<&'static str, (f64, String, f64)>,
    failures: Vec<String>,
}

impl Report {
    fn note(&mut self, category: &'static str, name: &str, err: f64, tol: f64) {
        let entry = self
            .worst
            .entry(category)
            .or_insert((-1.0, String::new(), tol));
        if err > entry.0 || err.is_nan() {
            *entry = (err, name.to_string(), tol);
        }
        if err.is_nan() || err > tol {
            self.failures
                .push(format!("{category}: {name}: error {err:.3e} > {tol:.0e}"));
        }
    }

    fn tensor(
        &mut self,
        category: &'static str,
        name: &str,
        ours: &Tensor,
        golden: &Tensor,
        tol: f64,
    ) {
        self.note(category, name, rel_err(ours, golden), tol);
    }

    fn finish(self, what: &str) {
        for (cat, (err, name, tol)) in &self.worst {
            eprintln!("golden {what}: {cat:<22} worst {err:.3e} (bound {tol:.0e}) at {name}");
        }
        assert!(self.failures.is_empty(), "{}", self.failures.join("\n"));
    }
}

#[test]
fn golden_pos_tables_match() {
    let g = Golden::load();
    let (enc, pred) = g.model().pos_tables();
    let mut r = Report::default();
    r.tensor(
        "outputs",
        "encoder.pos_embed",
        &enc,
        g.get("encoder.pos_embed"),
        OUTPUT_TOL,
    );
    r.tensor(
        "outputs",
        "predictor.predictor_pos_embed",
        &pred,
        g.get("predictor.predictor_pos_embed"),
        OUTPUT_TOL,
    );
    r.finish("pos tables");
}

#[test]
fn golden_forward_matches() {
    let g = Golden::load();
    let model = g.model();
    let d = model.forward_detail(&g.batch()).expect("forward");
    let mut r = Report::default();
    r.tensor(
        "outputs",
        "target_features",
        &d.target_features,
        g.get("fwd.target_features"),
        OUTPUT_TOL,
    );
    assert_eq!(d.context.len(), 2);
    for i in 0..d.context.len() {
        r.tensor(
            "outputs",
            &format!("context.{i}"),
            &d.context[i],
            g.get(&format!("fwd.context.{i}")),
            OUTPUT_TOL,
        );
        r.tensor(
            "outputs",
            &format!("targets.{i}"),
            &d.targets[i],
            g.get(&format!("fwd.targets.{i}")),
            OUTPUT_TOL,
        );
        r.tensor(
            "outputs",
            &format!("preds.{i}"),
            &d.predictions[i],
            g.get(&format!("fwd.preds.{i}")),
            OUTPUT_TOL,
        );
        let want = g.get(&format!("fwd.loss.{i}")).to_vec1::<f32>().unwrap()[0] as f64;
        r.note(
            "loss",
            &format!("loss.{i}"),
            scalar_err(d.losses[i], want),
            OUTPUT_TOL,
        );
    }
    let want = g.get("fwd.loss").to_vec1::<f32>().unwrap()[0] as f64;
    r.note("loss", "loss", scalar_err(d.loss, want), OUTPUT_TOL);
    r.finish("forward");
}

#[test]
fn golden_gradients_match() {
    let g = Golden::load();
    let model = g.model();
    let (loss, grads) = model.gradients(&g.batch()).expect("gradients");
    let mut r = Report::default();
    let want = g.get("fwd.loss").to_vec1::<f32>().unwrap()[0] as f64;
    r.note(
        "loss",
        "loss (train path)",
        scalar_err(loss, want),
        OUTPUT_TOL,
    );
    let ours: HashSet<&str> = grads.iter().map(|(n, _)| n.as_str()).collect();
    let theirs: HashSet<&str> = g.t.keys().filter_map(|k| k.strip_prefix("grad.")).collect();
    assert_eq!(ours, theirs, "gradients for different parameter sets");
    assert_eq!(
        ours.len(),
        model.named_parameters().len(),
        "a parameter has no gradient"
    );
    for (name, grad) in &grads {
        r.tensor(
            "gradients",
            name,
            grad,
            g.get(&format!("grad.{name}")),
            GRAD_TOL,
        );
    }
    r.finish("gradients");
}

#[test]
fn golden_three_steps_match() {
    let g = Golden::load();
    let mut model = g.model();
    let batch = g.batch();
    let stats = g.get("steps.stats").to_vec2::<f64>().unwrap();
    assert_eq!(stats.len(), g.steps());
    let mut r = Report::default();
    for (s, want) in stats.iter().enumerate() {
        let got = model.train_step(&batch).expect("train step");
        let step = s + 1;
        assert_eq!(got.step, step as u64);
        r.note(
            "loss",
            &format!("step {step} loss"),
            scalar_err(got.loss, want[0]),
            OUTPUT_TOL,
        );
        r.note(
            "schedules",
            &format!("step {step} lr"),
            scalar_err(got.lr, want[1]),
            1e-12,
        );
        r.note(
            "schedules",
            &format!("step {step} wd"),
            scalar_err(got.weight_decay, want[2]),
            1e-12,
        );
        r.note(
            "schedules",
            &format!("step {step} ema"),
            scalar_err(got.ema_momentum, want[3]),
            1e-12,
        );
        r.note(
            "grad norms",
            &format!("step {step} encoder"),
            scalar_err(got.encoder_grad_norm, want[4]),
            GRAD_TOL,
        );
        r.note(
            "grad norms",
            &format!("step {step} predictor"),
            scalar_err(got.predictor_grad_norm, want[5]),
            GRAD_TOL,
        );
    }
    // The goldens were made so that clipping engages (predictor, steps ≥ 2) and does not (step 1,
    // and the encoder): without that the update comparison below would not test it.
    let clip = model.optim_config().clip_grad.expect("golden config clips");
    assert!(
        stats[0][6] == 0.0
            && stats[1..]
                .iter()
                .all(|s| s[6] == 1.0 && s[5] > clip && s[4] < clip)
    );

    let k = g.steps();
    let params = model.named_parameters();
    assert_eq!(
        params.len(),
        g.t.keys().filter(|n| n.starts_with("grad.")).count()
    );
    for (name, p) in &params {
        let init = g.get(name);
        let want = (g.get(&format!("step{k}.{name}")) - init).unwrap();
        r.tensor(
            "param updates",
            name,
            &(p - init).unwrap(),
            &want,
            STATE_TOL,
        );
    }
    let moments = model.moments().expect("moments");
    assert_eq!(moments.len(), params.len());
    for (name, m, v) in &moments {
        r.tensor(
            "moments",
            &format!("exp_avg.{name}"),
            m,
            g.get(&format!("step{k}.opt.exp_avg.{name}")),
            STATE_TOL,
        );
        r.tensor(
            "moments",
            &format!("exp_avg_sq.{name}"),
            v,
            g.get(&format!("step{k}.opt.exp_avg_sq.{name}")),
            STATE_TOL,
        );
    }
    let target = model.target_parameters();
    assert!(!target.is_empty());
    for (name, t) in &target {
        // The goldens' target starts apart from the encoder: its change is what the EMA did.
        let init = g.get(name);
        let want = (g.get(&format!("step{k}.{name}")) - init).unwrap();
        r.tensor(
            "EMA target updates",
            name,
            &(t - init).unwrap(),
            &want,
            STATE_TOL,
        );
    }
    r.finish("three steps");
}
