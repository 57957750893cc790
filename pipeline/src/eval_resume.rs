//! Where an interrupted `vjepa probe` / `vjepa finetune` continues: after every epoch but the
//! last, `resume.safetensors` in the output directory holds the learner's state (weights, AdamW
//! moments and step counts) and the run's place between epochs (the shuffling generator, the
//! order it shuffles, the videos left out so far). A run started again with the same settings
//! and listings continues after the last epoch saved, to the same result as one never stopped
//! (the official evaluation saves `latest.pth.tar` each epoch for the same reason); with other
//! settings it starts afresh. The file is removed once the run is done.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};
use vjepa_operators::seeding::Fnv1a;

use crate::probe::ProbeOptions;

/// The state file's name in the output directory.
pub(crate) const FILE: &str = "resume.safetensors";

/// Metadata key of the [`Progress`] JSON.
const PROGRESS_KEY: &str = "eval_progress";

/// The run's place after an epoch.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub(crate) struct Progress {
    /// [`fingerprint`] of the run that saved it.
    pub(crate) fingerprint: String,
    /// Epochs done.
    pub(crate) epochs_done: usize,
    /// Where the shuffling generator stood (its word position, as a decimal string: JSON
    /// numbers do not hold 128 bits).
    pub(crate) rng_word_pos: String,
    /// The order the next epoch's shuffle starts from.
    pub(crate) order: Vec<usize>,
    /// Train videos left out of later epochs (quarantined), by URI.
    pub(crate) left_out_train: BTreeSet<String>,
    /// Validation videos left out of later evaluations, by URI.
    pub(crate) left_out_val: BTreeSet<String>,
    /// Evaluations run so far.
    pub(crate) val_runs: usize,
}

impl Progress {
    /// Puts `rng` where the saved run's stood.
    pub(crate) fn restore_rng(&self, rng: &mut ChaCha8Rng) -> anyhow::Result<()> {
        let pos: u128 = self
            .rng_word_pos
            .parse()
            .map_err(|e| anyhow::anyhow!("{FILE}: generator position: {e}"))?;
        rng.set_word_pos(pos);
        Ok(())
    }

    /// Records where `rng` stands.
    pub(crate) fn save_rng(&mut self, rng: &ChaCha8Rng) {
        self.rng_word_pos = rng.get_word_pos().to_string();
    }
}

/// What decides a run's result: its settings (not how clips are cached, which gives the same
/// batches), the checkpoint (a local file also by its size and modification time, so one
/// rewritten in place is another), and what its listings hold (`train` and `val`: a line per
/// video with its label). `extra` adds what one command has beyond the shared options
/// (fine-tuning's backbone lr scale).
pub(crate) fn fingerprint(
    opts: &ProbeOptions,
    extra: &str,
    train: &[String],
    val: &[String],
) -> String {
    let e = &opts.extract;
    let checkpoint_file = std::fs::metadata(&e.checkpoint)
        .ok()
        .map(|m| (m.len(), m.modified().ok()));
    // A local path however it is spelt (relative, absolute, through a link).
    let place = |p: &str| -> String {
        if p.contains("://") {
            return p.to_string();
        }
        std::fs::canonicalize(p).map_or_else(|_| p.to_string(), |c| c.display().to_string())
    };
    let settings = format!(
        "{:?}|{checkpoint_file:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}|{:?}",
        place(&e.checkpoint),
        e.encoder,
        e.video_decoder,
        opts.val_every,
        place(&opts.train),
        place(&opts.val),
        e.index_root.as_deref().map(place),
        e.segments,
        opts.val_views,
        e.frame_step,
        e.size,
        opts.epochs,
        opts.batch_size,
        opts.lr,
        opts.weight_decay,
        opts.label_fraction,
        opts.seed,
        opts.augment,
        opts.num_classes,
        e.seed,
        extra,
        e.device,
    );
    let mut h = Fnv1a::default();
    h.add(settings.as_bytes());
    for (split, uris) in [("train", train), ("val", val)] {
        h.add(split.as_bytes());
        for u in uris {
            h.add(u.as_bytes());
            h.add(b"\n");
        }
    }
    format!("{:016x}", h.finish())
}

fn path(dir: &Path) -> PathBuf {
    dir.join(FILE)
}

/// The saved state in `dir` when it was saved by a run with `fingerprint`: its progress and
/// the learner's bytes. `None` (with the reason logged) when there is none, or it is another
/// run's, or it cannot be read: the run then starts afresh and replaces it.
pub(crate) fn load(dir: &Path, fingerprint: &str, what: &str) -> Option<(Progress, Vec<u8>)> {
    let file = path(dir);
    let bytes = std::fs::read(&file).ok()?;
    let progress = vjepa_model::checkpoint_metadata(&bytes)
        .ok()
        .and_then(|m| m.get(PROGRESS_KEY).cloned())
        .and_then(|p| serde_json::from_str::<Progress>(&p).ok());
    match progress {
        Some(p) if p.fingerprint == fingerprint => Some((p, bytes)),
        Some(_) => {
            tracing::warn!(
                file = %file.display(),
                "{what}: the saved state is another run's (other settings or listings): starting afresh"
            );
            None
        }
        None => {
            tracing::warn!(
                file = %file.display(),
                "{what}: the saved state cannot be read: starting afresh"
            );
            None
        }
    }
}

/// Writes the learner's state (`state` makes its bytes from the metadata it is given) with
/// `progress`, beside and renamed into place so a stop while writing keeps the previous one.
pub(crate) fn save(
    dir: &Path,
    progress: &Progress,
    state: impl FnOnce(HashMap<String, String>) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<()> {
    let meta = HashMap::from([(PROGRESS_KEY.to_string(), serde_json::to_string(progress)?)]);
    let bytes = state(meta)?;
    let file = path(dir);
    vjepa_storage::replace_local_file(&file, &bytes)
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", file.display()))
}

/// Removes the state once the run is done (a later run with the same settings starts afresh).
pub(crate) fn finish(dir: &Path) {
    let _ = std::fs::remove_file(path(dir));
}

/// Continues a stopped run when `--out` holds a state saved by a run with `fingerprint` whose
/// shuffle order `order_fits` this run (given the saved progress): restores the learner
/// through `restore`, the generator into `rng` and the epochs table into `log`, and returns the
/// progress (the caller takes the rest of its place from it). `None` is a fresh start, with
/// the epochs table started again (and the reason logged where a state was there).
pub(crate) fn resume(
    opts: &ProbeOptions,
    fingerprint: &str,
    what: &str,
    rng: &mut ChaCha8Rng,
    log: &mut crate::probe::EpochLog,
    order_fits: impl FnOnce(&Progress) -> bool,
    restore: impl FnOnce(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<Option<Progress>> {
    let mut fresh = |why: Option<String>| {
        if let Some(why) = why {
            tracing::warn!(
                "{what}: the saved state does not fit this run ({why}): starting afresh"
            );
        }
        log.fresh();
        Ok(None)
    };
    let Some((p, bytes)) = load(&opts.out_dir, fingerprint, what) else {
        return fresh(None);
    };
    if !order_fits(&p) {
        return fresh(Some("its shuffle order has another length".into()));
    }
    // The learner is checked whole before it changes: a state that does not fit leaves it
    // as it was made.
    if let Err(e) = restore(&bytes) {
        return fresh(Some(format!("{e:#}")));
    }
    p.restore_rng(rng)?;
    log.resume(p.epochs_done);
    tracing::info!(
        epochs_done = p.epochs_done,
        epochs = opts.epochs,
        "{what}: continuing from {FILE} in the output directory"
    );
    Ok(Some(p))
}

/// [`resume`] for the in-memory paths (their clips are read again at the start, so only the
/// learner, the generator, the order and the epochs table continue): the first epoch to run.
pub(crate) fn resume_held(
    opts: &ProbeOptions,
    fingerprint: &str,
    what: &str,
    rng: &mut ChaCha8Rng,
    order: &mut Vec<usize>,
    log: &mut crate::probe::EpochLog,
    restore: impl FnOnce(&[u8]) -> anyhow::Result<()>,
) -> anyhow::Result<usize> {
    let len = order.len();
    let saved = resume(
        opts,
        fingerprint,
        what,
        rng,
        log,
        |p| p.order.len() == len,
        restore,
    )?;
    Ok(saved.map_or(0, |p| {
        *order = p.order;
        p.epochs_done
    }))
}

/// Saves the in-memory paths' place after epoch `epoch` (0-based) unless it is the last.
pub(crate) fn save_held(
    opts: &ProbeOptions,
    fingerprint: &str,
    epoch: usize,
    rng: &ChaCha8Rng,
    order: &[usize],
    state: impl FnOnce(HashMap<String, String>) -> anyhow::Result<Vec<u8>>,
) -> anyhow::Result<()> {
    if epoch + 1 >= opts.epochs {
        return Ok(());
    }
    let mut progress = Progress {
        fingerprint: fingerprint.to_string(),
        epochs_done: epoch + 1,
        order: order.to_vec(),
        ..Default::default()
    };
    progress.save_rng(rng);
    save(&opts.out_dir, &progress, state)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn progress_round_trips_and_other_runs_are_not_resumed() {
        let dir = tempfile::tempdir().unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        for _ in 0..37 {
            rng.random::<u64>();
        }
        let mut p = Progress {
            fingerprint: "abc".into(),
            epochs_done: 2,
            order: vec![2, 0, 1],
            left_out_train: ["s3://b/x.mp4".to_string()].into(),
            val_runs: 1,
            ..Default::default()
        };
        p.save_rng(&rng);
        let state = |meta: HashMap<String, String>| -> anyhow::Result<Vec<u8>> {
            let trainer = vjepa_model::probe::ProbeTrainer::new(
                vjepa_model::probe::AttentiveProbe::new(
                    vjepa_model::probe::ProbeConfig {
                        embed_dim: 8,
                        num_heads: 2,
                        num_classes: 2,
                        mlp_ratio: 4.0,
                    },
                    0,
                    &vjepa_model::Device::Cpu,
                )?,
                vjepa_model::probe::ProbeOptim::video(4),
            )?;
            Ok(trainer.save_state(meta)?)
        };
        save(dir.path(), &p, state).unwrap();
        let (back, bytes) = load(dir.path(), "abc", "probe").unwrap();
        assert_eq!(back, p);
        assert!(!bytes.is_empty());
        let mut again = ChaCha8Rng::seed_from_u64(4);
        back.restore_rng(&mut again).unwrap();
        assert_eq!(again.random::<u64>(), rng.random::<u64>());
        assert!(load(dir.path(), "other", "probe").is_none());
        finish(dir.path());
        assert!(load(dir.path(), "abc", "probe").is_none());
        assert!(!dir.path().join(format!("{FILE}.partial")).exists());
    }
}
