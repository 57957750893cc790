//! The videos a run draws from: every dataset's entries, re-read while the run goes, as a
//! sequence of catalog versions.
//!
//! A version is the set of `(dataset, video)` pairs of one listing, minus the videos quarantined
//! so far, sorted by (dataset, store-relative path) so that its contents alone fix its order. Version `v` is in effect for the
//! steps from its `from_step` until the next version's: the loaders look the version up by the
//! step of each clip request, so every worker draws step `s`'s clips from the same version.

use std::collections::{BTreeSet, HashSet};
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};

use vjepa_storage::dataset::{self, Dataset};
use vjepa_storage::{S3Settings, Store};

use vjepa_operators::records::Quarantined;
use vjepa_operators::seeding::{Fnv1a, mix64};

/// One video of the catalog.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct VideoRef {
    /// Index of the dataset in `data.datasets`.
    pub dataset: usize,
    /// Path relative to the dataset's store, for reading (and the sort key within a dataset).
    pub rel: String,
    /// Full URI, for records and logs.
    pub uri: String,
}

/// The result of reading every dataset once.
#[derive(Clone, Debug)]
pub struct Listing {
    /// Entries to read, datasets in config order.
    pub videos: Vec<VideoRef>,
    /// Index entries refused before any read (paths escaping their store, other schemes).
    pub rejected: Vec<Quarantined>,
    /// When the listing started, microseconds since the Unix epoch.
    pub listed_unix_us: i64,
}

/// The datasets of a run: their stores (opened once, reused for every read) and the listing
/// taken at start.
pub struct Catalog {
    pub specs: Vec<String>,
    /// `data.index_root`: where index entries resolve (unset: each index's folder).
    pub index_root: Option<String>,
    pub stores: Vec<Store>,
    pub names: Vec<String>,
    /// The listing at start.
    pub first: Listing,
}

impl Catalog {
    /// Opens every dataset (reading indexes, listing prefixes).
    pub async fn open(
        specs: &[String],
        index_root: Option<&str>,
        s3: &S3Settings,
    ) -> Result<Arc<Catalog>, vjepa_storage::StorageError> {
        let now = crate::now_unix_us();
        let mut datasets = Vec::new();
        for spec in specs {
            datasets.push(dataset::open_in(spec, index_root, s3).await?);
        }
        let first = listing_of(&datasets, now);
        Ok(Arc::new(Catalog {
            specs: specs.to_vec(),
            index_root: index_root.map(str::to_string),
            stores: datasets.iter().map(|d| d.store.clone()).collect(),
            names: datasets.iter().map(|d| d.name.clone()).collect(),
            first,
        }))
    }

    /// Reads every dataset again (for a refresh); the stores used for reading stay those
    /// opened at start.
    pub async fn relist(&self, s3: &S3Settings) -> Result<Listing, vjepa_storage::StorageError> {
        let now = crate::now_unix_us();
        let mut datasets = Vec::new();
        for spec in &self.specs {
            datasets.push(dataset::open_in(spec, self.index_root.as_deref(), s3).await?);
        }
        Ok(listing_of(&datasets, now))
    }
}

fn listing_of(datasets: &[Dataset], listed_unix_us: i64) -> Listing {
    let mut videos = Vec::new();
    let mut rejected = Vec::new();
    for (i, ds) in datasets.iter().enumerate() {
        tracing::debug!(
            dataset = %ds.name,
            videos = ds.entries.len(),
            rejected = ds.rejected.len(),
            "dataset read"
        );
        for r in &ds.rejected {
            rejected.push(Quarantined {
                uri: r.entry.clone(),
                reason: r.reason.clone(),
                detail: format!("{} (in {})", r.detail, ds.name),
                time_unix_us: listed_unix_us,
            });
        }
        for e in &ds.entries {
            videos.push(VideoRef {
                dataset: i,
                rel: e.rel.clone(),
                uri: ds.store.uri_of(&e.rel),
            });
        }
    }
    Listing {
        videos,
        rejected,
        listed_unix_us,
    }
}

/// One catalog version: what the sampler draws from for steps `from_step..` (until the next).
#[derive(Clone, Debug)]
pub struct CatalogVersion {
    /// 0 for the listing at start, then +1 per change.
    pub version: u64,
    /// First step whose clips are drawn from this version.
    pub from_step: u64,
    /// When the listing behind it was taken.
    pub listed_unix_us: i64,
    /// Sorted by (dataset, rel), no duplicates: dataset `d`'s videos are contiguous.
    pub videos: Vec<VideoRef>,
    /// Videos per dataset (one entry per configured dataset).
    pub counts: Vec<usize>,
    /// Fingerprint of the contents (dataset indexes and store-relative paths, so the same
    /// videos in a local directory and in a bucket agree): keys the sampler's draws.
    pub key: u64,
}

impl CatalogVersion {
    /// The version made of `listing` without the `excluded` URIs (quarantined videos).
    pub fn build(
        version: u64,
        from_step: u64,
        listing: &Listing,
        excluded: &HashSet<String>,
        datasets: usize,
    ) -> CatalogVersion {
        let set: BTreeSet<&VideoRef> = listing
            .videos
            .iter()
            .filter(|v| !excluded.contains(&v.uri))
            .collect();
        let videos: Vec<VideoRef> = set.into_iter().cloned().collect();
        let mut counts = vec![0usize; datasets];
        for v in &videos {
            if let Some(c) = counts.get_mut(v.dataset) {
                *c += 1;
            }
        }
        let key = fingerprint(&videos);
        CatalogVersion {
            version,
            from_step,
            listed_unix_us: listing.listed_unix_us,
            videos,
            counts,
            key,
        }
    }

    /// Videos in `self` but not in `prev` (added), and in `prev` but not in `self` (removed).
    pub fn diff<'a>(&'a self, prev: &'a CatalogVersion) -> (Vec<&'a VideoRef>, Vec<&'a VideoRef>) {
        let now: HashSet<&VideoRef> = self.videos.iter().collect();
        let before: HashSet<&VideoRef> = prev.videos.iter().collect();
        let added = self.videos.iter().filter(|v| !before.contains(v)).collect();
        let removed = prev.videos.iter().filter(|v| !now.contains(v)).collect();
        (added, removed)
    }

    /// The record written to the outputs: this version as a change of `prev` (or in full).
    pub fn record(&self, prev: Option<&CatalogVersion>, datasets: &[String]) -> VersionRecord {
        let (added, removed) = match prev {
            Some(p) => {
                let (a, r) = self.diff(p);
                (
                    a.into_iter().cloned().collect(),
                    r.into_iter().cloned().collect(),
                )
            }
            None => (self.videos.clone(), Vec::new()),
        };
        VersionRecord {
            version: self.version,
            from_step: self.from_step,
            listed_unix_us: self.listed_unix_us,
            videos: self.videos.len(),
            counts: self.counts.clone(),
            key: self.key,
            datasets: datasets.to_vec(),
            added,
            removed,
        }
    }

    /// Replays a record on top of the version before it (or on nothing, for version 0).
    pub fn replay(prev: Option<&CatalogVersion>, record: &VersionRecord) -> CatalogVersion {
        let mut set: BTreeSet<VideoRef> = prev
            .map(|p| p.videos.iter().cloned().collect())
            .unwrap_or_default();
        for r in &record.removed {
            set.remove(r);
        }
        set.extend(record.added.iter().cloned());
        let listing = Listing {
            videos: set.into_iter().collect(),
            rejected: Vec::new(),
            listed_unix_us: record.listed_unix_us,
        };
        CatalogVersion::build(
            record.version,
            record.from_step,
            &listing,
            &HashSet::new(),
            record.datasets.len(),
        )
    }
}

/// FNV-1a over the sorted `(dataset, rel)` pairs, finished with splitmix64.
fn fingerprint(videos: &[VideoRef]) -> u64 {
    let mut h = Fnv1a::default();
    for v in videos {
        h.add(&(v.dataset as u64).to_le_bytes())
            .add(v.rel.as_bytes())
            .add(&[0]);
    }
    mix64(h.finish())
}

/// A catalog version as written to `catalog/step-NNNNNNNN.json` under `outputs.dir` (named by
/// the step it takes effect at): the change from the previous version, so that replaying the
/// records in step order rebuilds every version exactly (resume).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VersionRecord {
    pub version: u64,
    pub from_step: u64,
    pub listed_unix_us: i64,
    /// Videos in the version.
    pub videos: usize,
    /// Videos per dataset.
    pub counts: Vec<usize>,
    /// Content fingerprint (keys the sampler's draws).
    pub key: u64,
    /// `data.datasets`, for reading the counts.
    pub datasets: Vec<String>,
    /// Videos added since the previous version (all of them for the first version of a run).
    pub added: Vec<VideoRef>,
    /// Videos removed since the previous version (deleted, or quarantined).
    pub removed: Vec<VideoRef>,
}

impl VersionRecord {
    /// Object name of the record under the output directory.
    pub fn object_name(&self) -> String {
        format!("catalog/step-{:08}.json", self.from_step)
    }
}

/// The versions of this run so far, shared by every worker thread and clip loader.
///
/// Only worker 0 adds versions, always with a `from_step` beyond every step any worker can have
/// requested yet, so the version a step resolves to never changes once that step is requested.
pub struct Versions {
    inner: RwLock<Vec<Arc<CatalogVersion>>>,
}

impl Versions {
    /// Starts with the first version.
    pub fn new(first: CatalogVersion) -> Self {
        Versions {
            inner: RwLock::new(vec![Arc::new(first)]),
        }
    }

    /// Starts over from `first` (a cluster process adopting process 0's version 0 before any
    /// clip is loaded).
    pub fn reset(&self, first: CatalogVersion) {
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *guard = vec![Arc::new(first)];
    }

    /// The version in effect at `step`: the latest with `from_step <= step` (the first version
    /// for earlier steps).
    pub fn at_step(&self, step: u64) -> Arc<CatalogVersion> {
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let i = guard.partition_point(|v| v.from_step <= step);
        guard[i.saturating_sub(1)].clone()
    }

    /// The newest version.
    pub fn latest(&self) -> Arc<CatalogVersion> {
        let guard = self.inner.read().unwrap_or_else(|e| e.into_inner());
        guard[guard.len() - 1].clone()
    }

    /// Forgets versions superseded before `step` (every step below it is trained, so no loader
    /// looks them up again): memory stays flat over a long run with many refreshes.
    pub fn forget_before(&self, step: u64) {
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        let in_effect = guard.partition_point(|v| v.from_step <= step);
        let drop = in_effect.saturating_sub(1);
        guard.drain(..drop);
    }

    /// Versions held.
    pub fn held(&self) -> usize {
        self.inner.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Adds a version; its `from_step` must exceed the newest one's.
    pub fn push(&self, v: CatalogVersion) {
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        debug_assert!(guard.last().is_none_or(|l| l.from_step < v.from_step));
        guard.push(Arc::new(v));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn v(dataset: usize, name: &str) -> VideoRef {
        VideoRef {
            dataset,
            uri: format!("s3://b/{name}"),
            rel: name.to_string(),
        }
    }

    fn listing(videos: Vec<VideoRef>) -> Listing {
        Listing {
            videos,
            rejected: Vec::new(),
            listed_unix_us: 1,
        }
    }

    #[test]
    fn versions_are_sorted_sets_keyed_by_contents_and_replayable() {
        let l0 = listing(vec![
            v(1, "z.mp4"),
            v(0, "b.mp4"),
            v(0, "a.mp4"),
            v(0, "a.mp4"),
        ]);
        let v0 = CatalogVersion::build(0, 0, &l0, &HashSet::new(), 2);
        assert_eq!(v0.videos, vec![v(0, "a.mp4"), v(0, "b.mp4"), v(1, "z.mp4")]);
        assert_eq!(v0.counts, vec![2, 1]);
        // Same contents listed in another order: same key.
        let again = listing(vec![v(0, "b.mp4"), v(1, "z.mp4"), v(0, "a.mp4")]);
        assert_eq!(
            CatalogVersion::build(0, 0, &again, &HashSet::new(), 2).key,
            v0.key
        );
        // A new video, a deleted one and a quarantined one.
        let l1 = listing(vec![v(0, "a.mp4"), v(0, "c.mp4"), v(1, "z.mp4")]);
        let bad = HashSet::from(["s3://b/z.mp4".to_string()]);
        let v1 = CatalogVersion::build(1, 8, &l1, &bad, 2);
        assert_ne!(v1.key, v0.key);
        assert_eq!(v1.counts, vec![2, 0]);
        let (added, removed) = v1.diff(&v0);
        assert_eq!(added, vec![&v(0, "c.mp4")]);
        assert_eq!(removed, vec![&v(0, "b.mp4"), &v(1, "z.mp4")]);

        let names = vec!["d0".to_string(), "d1".to_string()];
        let r0 = v0.record(None, &names);
        let r1 = v1.record(Some(&v0), &names);
        assert_eq!(r1.object_name(), "catalog/step-00000008.json");
        let json = serde_json::to_string(&r1).unwrap();
        let r1: VersionRecord = serde_json::from_str(&json).unwrap();
        let b0 = CatalogVersion::replay(None, &r0);
        let b1 = CatalogVersion::replay(Some(&b0), &r1);
        assert_eq!(
            (b1.videos.clone(), b1.key, b1.from_step),
            (v1.videos.clone(), v1.key, 8)
        );

        let versions = Versions::new(v0);
        versions.push(v1);
        assert_eq!(versions.at_step(0).version, 0);
        assert_eq!(versions.at_step(7).version, 0);
        assert_eq!(versions.at_step(8).version, 1);
        assert_eq!(versions.at_step(100).version, 1);
        assert_eq!(versions.latest().version, 1);
        versions.forget_before(7);
        assert_eq!(versions.held(), 2, "version 0 is still in effect at step 7");
        versions.forget_before(8);
        assert_eq!(versions.held(), 1);
        assert_eq!(versions.at_step(8).version, 1);
    }
}
