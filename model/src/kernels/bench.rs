//! Timings of the kernels against the composite candle references they replaced, at the
//! STACK-NOTES shapes (vit_tiny: B 4 × 128 tokens, D 192, 3 heads; vit_small: B 4 × 392, D 384,
//! 6 heads). Not tests: run with
//! `cargo test --release -p vjepa-model kernels::bench -- --ignored --nocapture --test-threads=1`.

use std::collections::HashMap;
use std::time::Instant;

use candle_core::{DType, Tensor, Var};

use super::reference::{self, randn};
use crate::config::EncoderConfig;
use crate::params::{Init, ParamMap};
use crate::vit::{Block, Encoder};

/// Median wall time of `f` in ms over `reps` runs after one warm-up.
fn time_ms(reps: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..reps)
        .map(|_| {
            let t0 = Instant::now();
            f();
            t0.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[reps / 2]
}

fn row(op: &str, shape: &str, composite: f64, ours: f64) {
    eprintln!(
        "| {op:<28} | {shape:<10} | {composite:>9.2} | {ours:>8.2} | {:>6.1}× |",
        composite / ours
    );
}

fn var(shape: &[usize], seed: u64) -> Var {
    Var::from_tensor(&randn(shape, DType::F32, seed)).expect("var")
}

/// fwd + bwd (seeded with ones) of `f` on `x`.
fn fwd_bwd(x: &Tensor, f: &dyn Fn(&Tensor) -> Tensor) {
    let y = f(x);
    let _ = y.backward().expect("backward");
}

/// A block whose weights are Vars, with the composite (pre-kernel) forward for comparison.
struct BenchBlock {
    block: Block,
    weights: HashMap<String, Tensor>,
    heads: usize,
}

impl BenchBlock {
    fn new(dim: usize, heads: usize) -> Self {
        let mut specs = Vec::new();
        Block::specs("b", dim, 4 * dim, &mut specs);
        let mut p = ParamMap::new();
        let mut weights = HashMap::new();
        for (i, s) in specs.iter().enumerate() {
            let t = (randn(&s.shape, DType::F32, 500 + i as u64) * 0.05).expect("init");
            let t = if s.init == Init::Ones {
                (t + 1.0).expect("ones")
            } else {
                t
            };
            let t = Var::from_tensor(&t).expect("var").as_tensor().clone();
            p.insert(s.name.clone(), t.clone());
            weights.insert(s.name.clone(), t);
        }
        let block = Block::load(&p, "b", dim, 4 * dim, heads).expect("block");
        Self {
            block,
            weights,
            heads,
        }
    }

    fn w(&self, name: &str) -> Tensor {
        self.weights[&format!("b.{name}")].clone()
    }

    fn linear(&self, x: &Tensor, name: &str) -> Tensor {
        let (w, b) = (
            self.w(&format!("{name}.weight")),
            self.w(&format!("{name}.bias")),
        );
        let (bb, n, d) = x.dims3().expect("3-d");
        let y = x
            .reshape((bb * n, d))
            .and_then(|x| x.matmul(&w.t()?))
            .and_then(|y| y.broadcast_add(&b))
            .expect("linear");
        y.reshape((bb, n, w.dim(0).expect("out"))).expect("reshape")
    }

    /// The pre-kernel composite block forward.
    fn composite(&self, x: &Tensor) -> Tensor {
        let ln = |x: &Tensor, n: &str| {
            reference::layer_norm(
                x,
                &self.w(&format!("{n}.weight")),
                &self.w(&format!("{n}.bias")),
                1e-6,
            )
            .expect("ln")
        };
        let qkv = self.linear(&ln(x, "norm1"), "attn.qkv");
        let a = reference::attention(&qkv, self.heads).expect("attn");
        let x = (x + self.linear(&a, "attn.proj")).expect("res");
        let h = self
            .linear(&ln(&x, "norm2"), "mlp.fc1")
            .gelu_erf()
            .expect("gelu");
        (&x + self.linear(&h, "mlp.fc2")).expect("res")
    }
}

/// The pre-kernel AdamW update (candle tensor ops) over (var, m, v, grad).
fn composite_adamw(params: &mut [(Var, Tensor, Tensor, Tensor)], step: u64) {
    let (lr, wd, b1, b2, eps) = (1e-3, 0.04, 0.9f64, 0.999f64, 1e-8);
    for (var, m, v, g) in params.iter_mut() {
        let theta = var
            .as_detached_tensor()
            .affine(1.0 - lr * wd, 0.0)
            .expect("wd");
        *m = (&*m
            + (&*g - &*m)
                .and_then(|d| d.affine(1.0 - b1, 0.0))
                .expect("m"))
        .expect("m");
        *v = (v.affine(b2, 0.0).expect("v")
            + g.sqr().and_then(|s| s.affine(1.0 - b2, 0.0)).expect("v"))
        .expect("v");
        let bc1 = 1.0 - b1.powf(step as f64);
        let bc2 = 1.0 - b2.powf(step as f64);
        let denom = (v.sqrt().expect("sqrt") / bc2.sqrt())
            .and_then(|d| d.affine(1.0, eps))
            .expect("denom");
        let update = (&*m / denom)
            .and_then(|u| u.affine(lr / bc1, 0.0))
            .expect("update");
        var.set(&(theta - update).expect("theta")).expect("set");
    }
}

#[test]
#[ignore]
fn kernel_timings() {
    eprintln!("threads: {}", candle_core::utils::get_num_threads());
    eprintln!(
        "| op (fwd+bwd unless noted)    | shape      | composite ms | kernels ms | speedup |"
    );
    eprintln!("|---|---|---|---|---|");
    for (label, b, n, d, h, preset) in [
        ("tiny", 4usize, 128usize, 192usize, 3usize, "vit_tiny"),
        ("small", 4, 392, 384, 6, "vit_small"),
    ] {
        let reps = if label == "tiny" { 9 } else { 5 };
        let qkv = var(&[b, n, 3 * d], 1);
        let ours = time_ms(reps, || {
            fwd_bwd(&qkv, &|x| super::attention(x, h).expect("attention"))
        });
        let comp = time_ms(reps, || {
            fwd_bwd(&qkv, &|x| reference::attention(x, h).expect("attention"))
        });
        row("attention", label, comp, ours);

        let xl = var(&[b, n, d], 11);
        let (wl, bl) = (var(&[3 * d, d], 12), var(&[3 * d], 13));
        let ours = time_ms(reps, || {
            fwd_bwd(&xl, &|x| super::linear(x, &wl, Some(&bl)).expect("linear"))
        });
        let comp = time_ms(reps, || {
            fwd_bwd(&xl, &|x| {
                reference::linear(x, &wl, Some(&bl)).expect("linear")
            })
        });
        row("linear D→3D (qkv)", label, comp, ours);

        let x = var(&[b, n, d], 2);
        let (w, bias) = (var(&[d], 3), var(&[d], 4));
        let ours = time_ms(reps, || {
            fwd_bwd(&x, &|x| super::layer_norm(x, &w, &bias, 1e-6).expect("ln"))
        });
        let comp = time_ms(reps, || {
            fwd_bwd(&x, &|x| {
                reference::layer_norm(x, &w, &bias, 1e-6).expect("ln")
            })
        });
        row("layer_norm (affine)", label, comp, ours);

        let hidden = var(&[b, n, 4 * d], 5);
        let b4 = var(&[4 * d], 6);
        let ours = time_ms(reps, || {
            fwd_bwd(&hidden, &|x| super::bias_gelu(x, &b4).expect("gelu"))
        });
        let comp = time_ms(reps, || {
            fwd_bwd(&hidden, &|x| reference::bias_gelu(x, &b4).expect("gelu"))
        });
        row("bias + gelu", label, comp, ours);

        let xq = var(&[b, n, 3 * d], 7);
        let b3 = var(&[3 * d], 8);
        let ours = time_ms(reps, || {
            fwd_bwd(&xq, &|x| super::bias_add(x, &b3).expect("bias"))
        });
        let comp = time_ms(reps, || {
            fwd_bwd(&xq, &|x| reference::bias_add(x, &b3).expect("bias"))
        });
        row("bias_add (qkv width)", label, comp, ours);

        let flat = randn(&[b * n, 4 * d], DType::F32, 9);
        let ours = time_ms(reps, || {
            super::column_sum(&flat).expect("sum");
        });
        let comp = time_ms(reps, || {
            reference::column_sum(&flat).expect("sum");
        });
        row("column_sum (fwd, 4D wide)", label, comp, ours);

        let blk = BenchBlock::new(d, h);
        let xb = var(&[b, n, d], 10);
        let ours = time_ms(reps, || {
            fwd_bwd(&xb, &|x| blk.block.forward(x).expect("block"))
        });
        let comp = time_ms(reps, || fwd_bwd(&xb, &|x| blk.composite(x)));
        row("ViT block", label, comp, ours);

        // AdamW over all encoder parameters of the preset (16×224×224 clips).
        let cfg = EncoderConfig::preset(preset, 16, 224, 16, 2, true).expect("preset");
        let specs = Encoder::param_specs(&cfg);
        let mut comp_params: Vec<(Var, Tensor, Tensor, Tensor)> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| {
                let p = var(&s.shape, 1000 + i as u64);
                let g = randn(&s.shape, DType::F32, 2000 + i as u64);
                let z = p.as_tensor().zeros_like().expect("zeros");
                (p, z.clone(), z, g)
            })
            .collect();
        let ours_params: Vec<(Tensor, Tensor, Tensor)> = comp_params
            .iter()
            .map(|(p, _, _, g)| {
                let mut shape = vec![2];
                shape.extend_from_slice(p.dims());
                let st = Tensor::zeros(shape, DType::F32, p.device()).expect("state");
                (p.as_tensor().copy().expect("copy"), st, g.clone())
            })
            .collect();
        let mut step = 0u64;
        let ours = time_ms(reps, || {
            step += 1;
            for (p, st, g) in &ours_params {
                let update = super::AdamUpdate {
                    lr: 1e-3,
                    weight_decay: 0.04,
                    beta1: 0.9,
                    beta2: 0.999,
                    eps: 1e-8,
                    step,
                };
                super::adamw_step(p, st, g, &update).expect("adamw");
            }
        });
        let mut step = 0u64;
        let comp = time_ms(reps, || {
            step += 1;
            composite_adamw(&mut comp_params, step);
        });
        let count: usize = specs.iter().map(|s| s.numel()).sum();
        row(
            &format!("AdamW step ({:.1}M params)", count as f64 / 1e6),
            label,
            comp,
            ours,
        );
    }
}
