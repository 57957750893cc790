//! Checkpoint file naming in the output store.
//!
//! Checkpoints are `checkpoints/step-{step:08}.safetensors`; the zero padding keeps a plain
//! listing in step order, and resuming picks the highest step whose name parses.

use bytes::Bytes;

use crate::{StorageError, Store};

/// Directory of checkpoints inside the output store.
pub const DIR: &str = "checkpoints";

/// Relative path of the checkpoint for `step`.
pub fn path_for_step(step: u64) -> String {
    format!("{DIR}/step-{step:08}.safetensors")
}

/// The step of a checkpoint path (`checkpoints/step-N.safetensors`), if it is one.
pub fn parse_step(rel: &str) -> Option<u64> {
    let name = rel.strip_prefix(DIR)?.strip_prefix('/')?;
    let digits = name.strip_prefix("step-")?.strip_suffix(".safetensors")?;
    if digits.is_empty() || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

/// Writes the checkpoint for `step` (atomically replacing any previous one); returns its
/// relative path.
pub async fn write(store: &Store, step: u64, bytes: Bytes) -> Result<String, StorageError> {
    let rel = path_for_step(step);
    let len = bytes.len();
    store.put(&rel, bytes).await?;
    tracing::info!(uri = %store.uri_of(&rel), step, bytes = len, "checkpoint written");
    Ok(rel)
}

/// Every checkpoint whose name parses, highest step first: resuming tries them in this order
/// and skips one that does not load (a file cut short, say) for the one before it.
pub async fn all_newest_first(store: &Store) -> Result<Vec<(u64, String)>, StorageError> {
    let mut found: Vec<(u64, String)> = store
        .list_prefix(DIR)
        .await?
        .into_iter()
        .filter_map(|o| parse_step(&o.path).map(|s| (s, o.path)))
        .collect();
    found.sort_by(|a, b| b.cmp(a));
    Ok(found)
}

/// Deletes every checkpoint (a deliberate fresh start in a used output location: a stale
/// checkpoint of the earlier run must not be resumed later); returns how many there were.
pub async fn remove_all(store: &Store) -> Result<usize, StorageError> {
    let found = all_newest_first(store).await?;
    for (_, rel) in &found {
        store.delete(rel).await?;
    }
    Ok(found.len())
}

/// Deletes all but the newest `keep` checkpoints (`keep` ≥ 1); returns what it deleted.
pub async fn keep_newest(store: &Store, keep: usize) -> Result<Vec<String>, StorageError> {
    let found = all_newest_first(store).await?;
    let mut deleted = Vec::new();
    for (_, rel) in found.into_iter().skip(keep.max(1)) {
        store.delete(&rel).await?;
        deleted.push(rel);
    }
    Ok(deleted)
}

/// The checkpoint with the highest step whose name parses, if any.
pub async fn latest(store: &Store) -> Result<Option<(u64, String)>, StorageError> {
    let listed = store.list_prefix(DIR).await?;
    let best = listed
        .into_iter()
        .filter_map(|o| parse_step(&o.path).map(|s| (s, o.path)))
        .max_by_key(|(s, _)| *s);
    if let Some((step, rel)) = &best {
        tracing::debug!(uri = %store.uri_of(rel), step, "latest checkpoint");
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        assert_eq!(path_for_step(42), "checkpoints/step-00000042.safetensors");
        assert_eq!(parse_step(&path_for_step(42)), Some(42));
        assert_eq!(
            parse_step(&path_for_step(123_456_789_012)),
            Some(123_456_789_012)
        );
        assert_eq!(parse_step("checkpoints/step-7.safetensors"), Some(7));
        assert_eq!(parse_step("checkpoints/step-.safetensors"), None);
        assert_eq!(parse_step("checkpoints/step-+7.safetensors"), None);
        assert_eq!(parse_step("checkpoints/step-1.safetensors.tmp"), None);
        assert_eq!(parse_step("checkpoints/old/step-1.safetensors"), None);
        assert_eq!(parse_step("other/step-1.safetensors"), None);
    }

    #[test]
    fn newest_first_ignores_other_files_and_remove_all_clears() {
        let dir = tempfile::tempdir().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let store = Store::open(dir.path().to_str().unwrap(), &Default::default(), true).unwrap();
        rt.block_on(async {
            for step in [4, 12, 8] {
                write(&store, step, Bytes::from_static(b"x")).await.unwrap();
            }
            // A staging file left by a killed writer (object_store's `name#N`) and a stray file
            // are not checkpoints.
            let ckpt_dir = dir.path().join(DIR);
            std::fs::write(ckpt_dir.join("step-00000016.safetensors#1"), b"half").unwrap();
            std::fs::write(ckpt_dir.join("notes.txt"), b"").unwrap();
            let found = all_newest_first(&store).await.unwrap();
            let steps: Vec<u64> = found.iter().map(|(s, _)| *s).collect();
            assert_eq!(steps, [12, 8, 4]);
            assert_eq!(latest(&store).await.unwrap().map(|(s, _)| s), Some(12));
            assert_eq!(remove_all(&store).await.unwrap(), 3);
            assert!(all_newest_first(&store).await.unwrap().is_empty());
        });
    }
}
