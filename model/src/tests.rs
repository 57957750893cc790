//! Model-level tests on tiny configs (cheap enough for 2-core CI).

use super::*;
use crate::layers::tests::values;

fn tiny_encoder() -> EncoderConfig {
    EncoderConfig {
        embed_dim: 32,
        depth: 2,
        num_heads: 2,
        mlp_hidden: 64,
        patch_size: 16,
        tubelet_size: 2,
        num_frames: 4,
        crop_size: 32,
        uniform_power: true,
    }
}

fn tiny_predictor() -> PredictorConfig {
    PredictorConfig {
        embed_dim: 16,
        depth: 2,
        num_heads: 2,
        num_mask_tokens: 2,
    }
}

fn tiny_optim() -> OptimConfig {
    OptimConfig {
        start_lr: 1e-3,
        lr: 2e-3,
        final_lr: 1e-4,
        warmup_steps: 5,
        total_steps: 40,
        weight_decay: 0.04,
        final_weight_decay: 0.4,
        ema: (0.99, 1.0),
        clip_grad: Some(10.0),
        clip_start_iteration: 10,
        betas: (0.9, 0.999),
        eps: 1e-8,
        loss_exp: 1.0,
    }
}

fn tiny_model(seed: u64) -> VJepa {
    VJepa::new(
        tiny_encoder(),
        tiny_predictor(),
        tiny_optim(),
        seed,
        &Device::Cpu,
    )
    .unwrap()
}

/// B = 2 clips on the (2, 2, 2) grid; spatial masks repeated over time like multiblock3d.
fn tiny_batch() -> TrainBatch {
    let dev = Device::Cpu;
    let data: Vec<f32> = values(2 * 3 * 4 * 32 * 32, 42)
        .iter()
        .map(|&v| v as f32 * 1.7)
        .collect();
    let clips = Tensor::from_vec(data, (2, 3, 4, 32, 32), &dev).unwrap();
    let idx = |rows: [&[u32]; 2]| {
        let k = rows[0].len();
        Tensor::from_vec([rows[0], rows[1]].concat(), (2, k), &dev).unwrap()
    };
    let masks = vec![
        MaskIndices {
            context: idx([&[0, 1, 2, 4, 5, 6], &[1, 2, 3, 5, 6, 7]]),
            target: idx([&[3, 7], &[0, 4]]),
        },
        MaskIndices {
            context: idx([&[3, 7], &[0, 4]]),
            target: idx([&[0, 1, 2, 4, 5, 6], &[1, 2, 3, 5, 6, 7]]),
        },
    ];
    TrainBatch { clips, masks }
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn param_counts_match_spec() {
    let pred = PredictorConfig {
        embed_dim: 384,
        depth: 12,
        num_heads: 16,
        num_mask_tokens: 2,
    };
    let large = EncoderConfig::preset("vit_large", 16, 224, 16, 2, true).unwrap();
    let huge = EncoderConfig::preset("vit_huge", 16, 224, 16, 2, true).unwrap();
    assert_eq!(
        trainable_param_counts(&large, &pred),
        (303_885_312, 22_082_944)
    );
    assert_eq!(
        trainable_param_counts(&huge, &pred),
        (631_648_000, 22_279_808)
    );
    let tiny = EncoderConfig::preset("vit_tiny", 16, 224, 16, 2, true).unwrap();
    assert_eq!(trainable_param_counts(&tiny, &pred).0, 5_633_856); // 5.63M
    assert_eq!(large.grid(), (8, 14, 14));
    assert_eq!(large.num_tokens(), 1568);
    assert!(EncoderConfig::preset("vit_gigantic", 16, 224, 16, 2, true).is_none());
    // names of the official ViT-L state dict: 293 encoder tensors incl. pos_embed, 153 predictor.
    assert_eq!(vit::Encoder::param_specs(&large).len() + 1, 293);
    assert_eq!(Predictor::param_specs(&large, &pred).len() + 1, 153);
}

#[test]
fn model_param_count_and_groups() {
    let m = tiny_model(0);
    assert_eq!(
        m.num_trainable_params(),
        trainable_param_counts(&tiny_encoder(), &tiny_predictor())
    );
    let group = |name: &str| {
        m.opt
            .params()
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.group)
    };
    assert_eq!(
        group("predictor.mask_tokens.1"),
        Some(ParamGroup::PredictorDecay)
    );
    assert_eq!(
        group("encoder.patch_embed.proj.weight"),
        Some(ParamGroup::EncoderDecay)
    );
    assert_eq!(
        group("encoder.blocks.1.norm2.weight"),
        Some(ParamGroup::EncoderNoDecay)
    );
    assert_eq!(
        group("predictor.predictor_proj.bias"),
        Some(ParamGroup::PredictorNoDecay)
    );
    assert_eq!(group("encoder.pos_embed"), None); // fixed, not optimised
}

#[test]
fn unsupported_and_invalid_configs() {
    let mut e = tiny_encoder();
    e.num_frames = 1;
    let r = VJepa::new(e, tiny_predictor(), tiny_optim(), 0, &Device::Cpu);
    assert!(matches!(r, Err(ModelError::Unsupported(_))));
    let mut e = tiny_encoder();
    e.crop_size = 33;
    assert!(matches!(
        VJepa::new(e, tiny_predictor(), tiny_optim(), 0, &Device::Cpu),
        Err(ModelError::Config(_))
    ));
}

#[test]
fn every_trainable_param_gets_a_gradient() {
    let m = tiny_model(1);
    let batch = tiny_batch();
    let masks = m.mask_indices(&batch, 2).unwrap();
    let (loss, _) = m.forward_loss(&batch.clips, &masks).unwrap();
    let grads = loss.backward().unwrap();
    for p in m.opt.params() {
        let g = grads
            .get(p.var.as_tensor())
            .unwrap_or_else(|| panic!("no gradient for {}", p.name));
        let n = g
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(
            n > 0.0 && n.is_finite(),
            "zero/non-finite gradient for {}: {n}",
            p.name
        );
    }
}

#[test]
fn train_step_is_deterministic() {
    let batch = tiny_batch();
    let mut a = tiny_model(7);
    let mut b = tiny_model(7);
    for _ in 0..2 {
        let sa = a.train_step(&batch).unwrap();
        let sb = b.train_step(&batch).unwrap();
        assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
        assert_eq!(sa, sb);
    }
    let c = tiny_model(8);
    let f = |m: &VJepa| flat(m.opt.params()[0].var.as_tensor());
    assert_ne!(f(&tiny_model(7)), f(&c));
}

#[test]
fn first_step_stats_schedules_and_ema() {
    let mut m = tiny_model(3);
    let batch = tiny_batch();
    let enc_pos = flat(m.encoder.pos_embed());
    let init_target = flat(&m.target_params[2].1); // blocks.0.norm1.weight? any param works
    let s = m.train_step(&batch).unwrap();
    assert_eq!(s.step, 1);
    assert_eq!(m.steps_done(), 1);
    let c = tiny_optim();
    assert_eq!(s.lr, schedule::lr(&c, 1));
    assert_eq!(s.weight_decay, schedule::weight_decay(&c, 1));
    assert_eq!(s.ema_momentum, 0.99);
    assert_eq!(s.context_tokens, vec![6, 2]);
    assert_eq!(s.target_tokens, vec![2, 6]);
    assert_eq!(s.loss_per_mask.len(), 2);
    assert!((s.loss - (s.loss_per_mask[0] + s.loss_per_mask[1]) / 2.0).abs() < 1e-6);
    assert!(s.encoder_grad_norm > 0.0 && s.predictor_grad_norm > 0.0);
    // pos tables never change
    assert_eq!(flat(m.encoder.pos_embed()), enc_pos);
    // target = m·old + (1 - m)·new encoder weights
    let enc_new = flat(m.opt.params()[2].var.as_tensor());
    let tgt = flat(&m.target_params[2].1);
    for ((t, o), e) in tgt.iter().zip(&init_target).zip(&enc_new) {
        let want = 0.99 * o + 0.01 * e;
        assert!((t - want).abs() < 1e-6, "{t} vs {want}");
    }
    assert_ne!(tgt, init_target);
    let feats = m.target_features(&batch.clips).unwrap();
    assert_eq!(feats.dims(), &[2, 8, 32]);
}

#[test]
fn bad_batches_are_refused_without_side_effects() {
    let mut m = tiny_model(4);
    let good = tiny_batch();
    let mut one_mask = good.clone();
    one_mask.masks.truncate(1);
    assert!(matches!(m.train_step(&one_mask), Err(ModelError::Input(_))));
    let mut out_of_range = good.clone();
    out_of_range.masks[0].target = Tensor::new(&[[3u32, 8], [0, 4]], &Device::Cpu).unwrap();
    assert!(matches!(
        m.train_step(&out_of_range),
        Err(ModelError::Input(_))
    ));
    let mut wrong_size = good.clone();
    wrong_size.clips = Tensor::zeros((2, 3, 4, 48, 48), DType::F32, &Device::Cpu).unwrap();
    assert!(matches!(
        m.train_step(&wrong_size),
        Err(ModelError::Unsupported(_))
    ));
    assert_eq!(m.steps_done(), 0);
}

#[test]
fn loss_decreases_on_a_fixed_batch() {
    let mut m = tiny_model(5);
    let batch = tiny_batch();
    let losses: Vec<f64> = (0..30)
        .map(|_| m.train_step(&batch).unwrap().loss)
        .collect();
    let first = losses[..3].iter().sum::<f64>() / 3.0;
    let last = losses[27..].iter().sum::<f64>() / 3.0;
    assert!(
        last < 0.9 * first,
        "loss did not decrease enough: {losses:?}"
    );
    let decreasing = losses.windows(2).filter(|w| w[1] < w[0]).count();
    assert!(decreasing >= 25, "{losses:?}");
    assert!(losses.iter().all(|l| l.is_finite()));
}

#[test]
fn checkpoint_round_trip() {
    let batch = tiny_batch();
    let mut m = tiny_model(6);
    for _ in 0..2 {
        m.train_step(&batch).unwrap();
    }
    let bytes = m.to_safetensors().unwrap();

    // names and shapes as in spec §8
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let shape = |n: &str| {
        st.tensor(n)
            .unwrap_or_else(|_| panic!("missing {n}"))
            .shape()
            .to_vec()
    };
    assert_eq!(
        shape("encoder.patch_embed.proj.weight"),
        vec![32, 3, 2, 16, 16]
    );
    assert_eq!(
        shape("target_encoder.blocks.0.attn.qkv.weight"),
        vec![96, 32]
    );
    assert_eq!(shape("predictor.mask_tokens.0"), vec![1, 1, 16]);
    assert_eq!(shape("encoder.pos_embed"), vec![1, 8, 32]);
    assert_eq!(shape("predictor.predictor_pos_embed"), vec![1, 8, 16]);
    assert_eq!(
        shape("opt.exp_avg_sq.predictor.predictor_proj.weight"),
        vec![32, 16]
    );
    assert!(st.tensor("opt.exp_avg.encoder.pos_embed").is_err());

    let mut r = VJepa::from_safetensors(&bytes, &Device::Cpu).unwrap();
    assert_eq!(r.steps_done(), 2);
    assert_eq!(r.encoder_config(), m.encoder_config());
    assert_eq!(r.predictor_config(), m.predictor_config());
    assert_eq!(r.optim_config(), m.optim_config());
    for (a, b) in m.opt.params().iter().zip(r.opt.params()) {
        assert_eq!(a.name, b.name);
        assert_eq!(a.group, b.group);
        assert_eq!(a.step, b.step);
        assert_eq!(
            flat(a.var.as_tensor()),
            flat(b.var.as_tensor()),
            "{}",
            a.name
        );
        assert_eq!(
            flat(&a.exp_avg().unwrap()),
            flat(&b.exp_avg().unwrap()),
            "{}",
            a.name
        );
        assert_eq!(
            flat(&a.exp_avg_sq().unwrap()),
            flat(&b.exp_avg_sq().unwrap()),
            "{}",
            a.name
        );
    }
    for ((na, a), (nb, b)) in m.target_params.iter().zip(&r.target_params) {
        assert_eq!(na, nb);
        assert_eq!(flat(a), flat(b), "{na}");
    }
    let sa = m.train_step(&batch).unwrap();
    let sb = r.train_step(&batch).unwrap();
    assert_eq!(sa.loss.to_bits(), sb.loss.to_bits());
    assert_eq!(sa, sb);
}

#[test]
fn checkpoint_errors_name_the_tensor() {
    let m = tiny_model(2);
    let bytes = m.to_safetensors().unwrap();
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let meta = meta.metadata().clone();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let rebuild = |skip: &str, reshape: Option<(&str, Vec<usize>)>| {
        let mut out = Vec::new();
        for (name, view) in st.tensors() {
            if name == skip {
                continue;
            }
            let t = Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu)
                .unwrap();
            let t = match &reshape {
                Some((n, s)) if *n == name => t.reshape(s.as_slice()).unwrap(),
                _ => t,
            };
            out.push((name, checkpoint::F32View::new(&t).unwrap()));
        }
        safetensors::serialize(out, meta.clone()).unwrap()
    };
    let missing = rebuild("predictor.mask_tokens.1", None);
    let e = VJepa::from_safetensors(&missing, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("predictor.mask_tokens.1"), "{e}");
    let bad = rebuild("", Some(("target_encoder.norm.weight", vec![2, 16])));
    let e = VJepa::from_safetensors(&bad, &Device::Cpu)
        .err()
        .unwrap()
        .to_string();
    assert!(
        e.contains("target_encoder.norm.weight") && e.contains("[2, 16]"),
        "{e}"
    );
}

#[test]
fn clipping_applies_from_start_iteration() {
    // A bias (no weight decay) moves ≈ lr on Adam's first step; with its grads clipped far below
    // eps it barely moves. Norms in the stats are the pre-clip ones.
    let bias_delta = |clip: Option<f64>, start: u64| {
        let mut c = tiny_optim();
        c.clip_grad = clip;
        c.clip_start_iteration = start;
        let mut m = VJepa::new(tiny_encoder(), tiny_predictor(), c, 9, &Device::Cpu).unwrap();
        let name = "predictor.predictor_proj.bias";
        let get = |m: &VJepa| {
            flat(
                m.opt
                    .params()
                    .iter()
                    .find(|p| p.name == name)
                    .unwrap()
                    .var
                    .as_tensor(),
            )
        };
        let before = get(&m);
        let s = m.train_step(&tiny_batch()).unwrap();
        let after = get(&m);
        let delta = before
            .iter()
            .zip(&after)
            .map(|(a, b)| (a - b).abs())
            .fold(0f32, f32::max);
        (delta, s)
    };
    let (free, s_free) = bias_delta(None, 0);
    let (clipped, s_clipped) = bias_delta(Some(1e-12), 0);
    let (not_yet, _) = bias_delta(Some(1e-12), 1);
    assert!(clipped < 0.1 * free, "clipped {clipped} vs free {free}");
    assert_eq!(not_yet, free);
    assert_eq!(s_free.encoder_grad_norm, s_clipped.encoder_grad_norm);
    assert!(s_clipped.predictor_grad_norm > 1e-12);
}

/// Rough CPU timing on the STACK-NOTES reference shape (vit_tiny, 16×64×64, batch 4, predictor
/// depth 6 width 192; official torch: 0.34 s/step). Run with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_vit_tiny_step() {
    let enc = EncoderConfig::preset("vit_tiny", 16, 64, 16, 2, true).unwrap();
    let pred = PredictorConfig {
        embed_dim: 192,
        depth: 6,
        num_heads: 3,
        num_mask_tokens: 2,
    };
    let mut m = VJepa::new(enc, pred, tiny_optim(), 0, &Device::Cpu).unwrap();
    let b = 4;
    let data: Vec<f32> = values(b * 3 * 16 * 64 * 64, 1)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let clips = Tensor::from_vec(data, (b, 3, 16, 64, 64), &Device::Cpu).unwrap();
    // spatial 4×4 grid repeated over 8 time steps
    let tokens = |spatial: &[u32]| -> Vec<u32> {
        (0..8u32)
            .flat_map(|t| spatial.iter().map(move |s| t * 16 + s))
            .collect()
    };
    let mk = |tgt: &[u32]| {
        let ctx: Vec<u32> = (0..16).filter(|s| !tgt.contains(s)).collect();
        let rows = |v: Vec<u32>| {
            let k = v.len();
            Tensor::from_vec(v.repeat(b), (b, k), &Device::Cpu).unwrap()
        };
        MaskIndices {
            context: rows(tokens(&ctx)),
            target: rows(tokens(tgt)),
        }
    };
    let batch = TrainBatch {
        clips,
        masks: vec![
            mk(&[5, 6, 9, 10, 0, 15]),
            mk(&[0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14]),
        ],
    };
    m.train_step(&batch).unwrap();
    let t0 = std::time::Instant::now();
    let n = 3;
    for _ in 0..n {
        m.train_step(&batch).unwrap();
    }
    eprintln!(
        "vit_tiny 16x64x64 b4: {:.3} s/step",
        t0.elapsed().as_secs_f64() / n as f64
    );
}

/// `train_step` of the quickstart model (`configs/quickstart.yaml`: D 96, depth 4, 3 heads,
/// predictor 2×48, 16×96×96, batch 4) with masks of the spec's typical keep ratios (§5: ≈23 % and
/// ≈6 % context). Run with `-- --ignored --nocapture`.
#[test]
#[ignore]
fn timing_quickstart_step() {
    let enc = EncoderConfig {
        embed_dim: 96,
        depth: 4,
        num_heads: 3,
        mlp_hidden: 384,
        patch_size: 16,
        tubelet_size: 2,
        num_frames: 16,
        crop_size: 96,
        uniform_power: true,
    };
    let pred = PredictorConfig {
        embed_dim: 48,
        depth: 2,
        num_heads: 3,
        num_mask_tokens: 2,
    };
    let mut m = VJepa::new(enc, pred, tiny_optim(), 0, &Device::Cpu).unwrap();
    let b = 4;
    let data: Vec<f32> = values(b * 3 * 16 * 96 * 96, 1)
        .iter()
        .map(|&v| v as f32)
        .collect();
    let clips = Tensor::from_vec(data, (b, 3, 16, 96, 96), &Device::Cpu).unwrap();
    // a 6×6 spatial pattern repeated over the 8 time steps
    let tokens = |spatial: &[u32]| -> Vec<u32> {
        (0..8u32)
            .flat_map(|t| spatial.iter().map(move |s| t * 36 + s))
            .collect()
    };
    let mk = |ctx: &[u32]| {
        let tgt: Vec<u32> = (0..36).filter(|s| !ctx.contains(s)).collect();
        let rows = |v: Vec<u32>| {
            let k = v.len();
            Tensor::from_vec(v.repeat(b), (b, k), &Device::Cpu).unwrap()
        };
        MaskIndices {
            context: rows(tokens(ctx)),
            target: rows(tokens(&tgt)),
        }
    };
    let batch = TrainBatch {
        clips,
        masks: vec![mk(&[0, 1, 2, 6, 7, 8, 20, 33]), mk(&[28, 35])],
    };
    m.train_step(&batch).unwrap();
    let n = 5;
    let mut times = Vec::new();
    for _ in 0..n {
        let t0 = std::time::Instant::now();
        m.train_step(&batch).unwrap();
        times.push(t0.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    eprintln!(
        "quickstart train_step (16x96x96 b4, D96 depth 4, pred 2x48): median {:.1} ms (min {:.1})",
        times[n / 2] * 1e3,
        times[0] * 1e3
    );
}
