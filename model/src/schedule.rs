//! LR / weight-decay / EMA schedules (spec §7), as pure functions of the step so that resuming
//! needs no scheduler state.

use std::f64::consts::PI;

use crate::config::OptimConfig;

/// LR for the 1-based step `step1`: linear warmup from `start_lr` to `lr` over W steps, then
/// cosine from `lr` to `final_lr` over the remaining T - W steps (floored at `final_lr`).
pub fn lr(c: &OptimConfig, step1: u64) -> f64 {
    let s = step1 as f64;
    let w = c.warmup_steps;
    if step1 < w {
        c.start_lr + (s / w.max(1) as f64) * (c.lr - c.start_lr)
    } else {
        let q = (step1 - w) as f64 / c.total_steps.saturating_sub(w).max(1) as f64;
        let v = c.final_lr + (c.lr - c.final_lr) * 0.5 * (1.0 + (PI * q).cos());
        v.max(c.final_lr)
    }
}

/// Weight decay of the decayed groups for the 1-based step: cosine from `weight_decay` to
/// `final_weight_decay` over T, clamped at the final value (an increase in the official runs).
pub fn weight_decay(c: &OptimConfig, step1: u64) -> f64 {
    let q = step1 as f64 / c.total_steps.max(1) as f64;
    let (start, end) = (c.weight_decay, c.final_weight_decay);
    let v = end + (start - end) * 0.5 * (1.0 + (PI * q).cos());
    if end <= start { v.max(end) } else { v.min(end) }
}

/// EMA momentum for the 0-based iteration: linear from ema.0 to ema.1 over T (held at ema.1 after).
pub fn ema_momentum(c: &OptimConfig, iter0: u64) -> f64 {
    let k = iter0.min(c.total_steps) as f64;
    c.ema.0 + k * (c.ema.1 - c.ema.0) / c.total_steps.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    fn official() -> OptimConfig {
        OptimConfig::official(300, 300, 40, 1.25)
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn official_config_numbers() {
        let c = official();
        assert_eq!(c.warmup_steps, 12_000);
        assert_eq!(c.total_steps, 112_500);
        assert_eq!(c.clip_start_iteration, 12_300);
    }

    #[test]
    fn lr_matches_spec() {
        let c = official();
        assert!(close(lr(&c, 1), 2.0004e-4, 5e-9), "{}", lr(&c, 1));
        assert!(close(lr(&c, 12_000), 6.25e-4, 1e-12));
        assert!(close(lr(&c, 45_000), 4.73e-4, 5e-7), "{}", lr(&c, 45_000));
        assert!(close(lr(&c, 90_000), 7.50e-5, 5e-7), "{}", lr(&c, 90_000));
        assert!(close(lr(&c, 112_500), 1e-6, 1e-15));
        // monotone warmup
        assert!(lr(&c, 11_999) < lr(&c, 12_000));
    }

    #[test]
    fn wd_matches_spec() {
        let c = official();
        assert!(
            close(weight_decay(&c, 12_000), 0.050, 5e-4),
            "{}",
            weight_decay(&c, 12_000)
        );
        assert!(
            close(weight_decay(&c, 45_000), 0.164, 5e-4),
            "{}",
            weight_decay(&c, 45_000)
        );
        assert!(
            close(weight_decay(&c, 90_000), 0.366, 5e-4),
            "{}",
            weight_decay(&c, 90_000)
        );
        assert!(weight_decay(&c, 200_000) <= 0.4);
        assert!(close(weight_decay(&c, 0), 0.04, 1e-12));
    }

    #[test]
    fn ema_matches_spec() {
        let c = official();
        assert_eq!(ema_momentum(&c, 0), 0.998);
        assert!(close(ema_momentum(&c, 90_000), 0.9996, 1e-12));
        assert!(close(ema_momentum(&c, 1_000_000), 1.0, 1e-12));
    }
}
