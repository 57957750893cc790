//! Targets and loss (spec §6).

use candle_core::Tensor;

use crate::kernels;
use crate::{ModelError, OptimConfig};

/// eps of the non-affine LayerNorm applied to target features (torch default, not the model's 1e-6).
pub const TARGET_LN_EPS: f64 = 1e-5;

/// Normalises target-encoder features over the last dim without affine parameters.
pub fn normalize_targets(h: &Tensor) -> Result<Tensor, ModelError> {
    kernels::layer_norm_plain(h, TARGET_LN_EPS)
}

/// mean |p - h|^e / e over all elements of one mask pair (plain L1 mean for e = 1).
pub fn mask_loss(pred: &Tensor, target: &Tensor, loss_exp: f64) -> Result<Tensor, ModelError> {
    if pred.dims() != target.dims() {
        return Err(ModelError::Input(format!(
            "prediction {:?} vs target {:?}",
            pred.dims(),
            target.dims()
        )));
    }
    if loss_exp == 1.0 {
        // The official exponent: one fused reduction and a one-launch gradient.
        return kernels::l1_mean(pred, target);
    }
    let d = (pred - target)?.abs()?;
    Ok((d.powf(loss_exp)? / loss_exp)?.mean_all()?)
}

/// Unweighted mean over mask configs of the per-mask losses (`cfg.loss_exp`), plus
/// `cfg.reg_coeff` × [`variance_regulariser`] when that is above 0; returns (total, per-mask).
pub fn jepa_loss(
    preds: &[Tensor],
    targets: &[Tensor],
    cfg: &OptimConfig,
) -> Result<(Tensor, Vec<Tensor>), ModelError> {
    if preds.is_empty() || preds.len() != targets.len() {
        return Err(ModelError::Input(format!(
            "{} predictions for {} targets",
            preds.len(),
            targets.len()
        )));
    }
    let per = preds
        .iter()
        .zip(targets)
        .map(|(p, h)| mask_loss(p, h, cfg.loss_exp))
        .collect::<Result<Vec<_>, _>>()?;
    let mut total = (Tensor::stack(&per, 0)?.sum_all()? / per.len() as f64)?;
    if cfg.reg_coeff > 0.0 {
        let reg = variance_regulariser(preds)?.to_dtype(total.dtype())?;
        total = (total + (reg * cfg.reg_coeff)?)?;
    }
    Ok((total, per))
}

/// The official variance regulariser (spec §6.4): per mask config the std over tokens of each
/// sample's predictions, `sqrt(var + 1e-4)` with the unbiased variance (`[B, D]`), averaged over
/// the mask configs; then `mean(relu(1 - σ))`. Zero once every dim of every sample's predictions
/// varies across its tokens with std ≥ 1, so it only pushes against collapsed predictions.
pub fn variance_regulariser(preds: &[Tensor]) -> Result<Tensor, ModelError> {
    if preds.is_empty() {
        return Err(ModelError::Input("no predictions".into()));
    }
    let stds = preds
        .iter()
        .map(|p| {
            let (_, n, _) = p.dims3()?;
            if n < 2 {
                return Err(ModelError::Input(format!(
                    "the variance regulariser needs ≥ 2 predicted tokens per sample, got {n}"
                )));
            }
            Ok((p.var_keepdim(1)?.squeeze(1)? + 1e-4)?.sqrt()?)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let sigma = Tensor::stack(&stds, 0)?.mean(0)?;
    Ok(sigma.affine(-1.0, 1.0)?.relu()?.mean_all()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn l1_mean_over_masks() {
        let dev = Device::Cpu;
        let p0 = Tensor::new(&[[[1f32, 2.]]], &dev).unwrap();
        let h0 = Tensor::new(&[[[0f32, 0.]]], &dev).unwrap(); // mean 1.5
        let p1 = Tensor::new(&[[[1f32], [1.]]], &dev).unwrap();
        let h1 = Tensor::new(&[[[0f32], [2.]]], &dev).unwrap(); // mean 1.0
        let cfg = OptimConfig::official(10, 1, 0, 1.0);
        let (t, per) = jepa_loss(&[p0.clone(), p1], &[h0.clone(), h1], &cfg).unwrap();
        assert_eq!(t.to_scalar::<f32>().unwrap(), 1.25);
        assert_eq!(per[0].to_scalar::<f32>().unwrap(), 1.5);
        // With the regulariser the total grows by reg_coeff × r; the per-mask losses do not.
        let q0 = Tensor::new(&[[[0f32, 1.], [2., 1.]]], &dev).unwrap(); // mean |q| 1
        let q1 = Tensor::new(&[[[1f32, 0.], [1., 3.], [1., 0.]]], &dev).unwrap(); // mean |q| 1
        let zeros = [q0.zeros_like().unwrap(), q1.zeros_like().unwrap()];
        let reg = OptimConfig {
            reg_coeff: 0.5,
            ..cfg
        };
        let preds = [q0, q1];
        let (t2, per2) = jepa_loss(&preds, &zeros, &reg).unwrap();
        let r = variance_regulariser(&preds)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(r > 0.0);
        assert!((t2.to_scalar::<f32>().unwrap() - (1.0 + 0.5 * r)).abs() < 1e-6);
        assert_eq!(per2[0].to_scalar::<f32>().unwrap(), 1.0);
        let sq = mask_loss(&p0, &h0, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((sq - 1.25).abs() < 1e-6); // (1 + 4) / 2 / 2
    }

    #[test]
    fn variance_regulariser_matches_hand_computation() {
        let dev = Device::Cpu;
        // One sample, 3 tokens, 2 dims: dim 0 has values 0, 1, 2 (unbiased var 1), dim 1 is
        // constant (var 0); a second mask with 2 tokens: dim 0 var 4.5 (0, 3), dim 1 var 0.
        let p0 = Tensor::new(&[[[0f32, 5.], [1., 5.], [2., 5.]]], &dev).unwrap();
        let p1 = Tensor::new(&[[[0f32, 1.], [3., 1.]]], &dev).unwrap();
        let r = variance_regulariser(&[p0, p1])
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        let s0 = ((1.0f64 + 1e-4).sqrt() + (4.5f64 + 1e-4).sqrt()) / 2.0;
        let s1 = (1e-4f64).sqrt(); // (0.01 + 0.01) / 2
        let want = ((1.0 - s0).max(0.0) + (1.0 - s1).max(0.0)) / 2.0;
        assert!((r as f64 - want).abs() < 1e-6, "{r} vs {want}");
        // Spread-out predictions are not penalised.
        let wide = Tensor::new(&[[[0f32, 0.], [4., -4.]]], &dev).unwrap();
        let r = variance_regulariser(&[wide]).unwrap();
        assert_eq!(r.to_scalar::<f32>().unwrap(), 0.0);
    }
}
