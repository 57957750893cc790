//! Targets and loss (spec §6).

use candle_core::Tensor;

use crate::ModelError;
use crate::kernels;

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
    let d = (pred - target)?.abs()?;
    let d = if loss_exp == 1.0 {
        d
    } else {
        (d.powf(loss_exp)? / loss_exp)?
    };
    Ok(d.mean_all()?)
}

/// Unweighted mean over mask configs of the per-mask losses; returns (total, per-mask).
pub fn jepa_loss(
    preds: &[Tensor],
    targets: &[Tensor],
    loss_exp: f64,
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
        .map(|(p, h)| mask_loss(p, h, loss_exp))
        .collect::<Result<Vec<_>, _>>()?;
    let total = (Tensor::stack(&per, 0)?.sum_all()? / per.len() as f64)?;
    Ok((total, per))
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
        let (t, per) = jepa_loss(&[p0.clone(), p1], &[h0.clone(), h1], 1.0).unwrap();
        assert_eq!(t.to_scalar::<f32>().unwrap(), 1.25);
        assert_eq!(per[0].to_scalar::<f32>().unwrap(), 1.5);
        let sq = mask_loss(&p0, &h0, 2.0)
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!((sq - 1.25).abs() < 1e-6); // (1 + 4) / 2 / 2
    }
}
