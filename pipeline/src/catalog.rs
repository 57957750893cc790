//! The videos a run draws from: every dataset's entries, re-read while the run goes, as a
//! sequence of catalog versions.
//!
//! A version is the set of `(dataset, video)` pairs of one listing, minus the videos quarantined
//! so far, sorted by (dataset, store-relative path) so that its contents alone fix its order. Version `v` is in effect for the
//! steps from its `from_step` until the next version's: the loaders look the version up by the
//! step of each clip request, so every worker draws step `s`'s clips from the same version.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::{Arc, RwLock};

use anyhow::Context;
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
    /// The object version listed ([`vjepa_storage::object_tag`], the ETag): a video replaced
    /// under the same name is another `VideoRef`. `None` for index entries and stores that list
    /// no ETags. (Always written, `null` included: records also travel between processes in
    /// bincode, which cannot skip fields; `default` reads records of older builds.)
    #[serde(default)]
    pub tag: Option<String>,
}

/// The videos quarantined so far, each as the object version found bad, so that a video
/// replaced under the same name (a fixed upload; a copy still being written when it was read)
/// comes back instead of staying out for the rest of a days-long run. It comes back once two
/// listings in a row show the same new version ([`Self::note_listing`]): a file still growing
/// changes version at every listing and stays out until it is complete. Where a version is
/// unknown on either side (a refused index entry, an index's videos, a store that lists no
/// ETags), the quarantine covers the name.
#[derive(Clone, Debug, Default)]
pub struct QuarantineSet {
    by_uri: HashMap<String, Vec<Option<String>>>,
    /// Versions not found bad of quarantined names, in the latest listing noted.
    pending: HashMap<String, Option<String>>,
    /// Those of them that the listing before showed too: back in the catalog.
    settled: HashMap<String, Option<String>>,
}

impl QuarantineSet {
    /// Records a quarantine of `uri` at version `tag`; `false` if that one was already recorded
    /// (several loaders meet the same bad video before the catalog drops it).
    pub fn insert(&mut self, uri: &str, tag: Option<&str>) -> bool {
        let tags = self.by_uri.entry(uri.to_string()).or_default();
        if tags.iter().any(|t| t.as_deref() == tag) {
            return false;
        }
        tags.push(tag.map(str::to_string));
        true
    }

    /// Whether the listed video `v` stays out: its version was found bad, or its name was and
    /// its new version has not yet been listed twice in a row.
    pub fn covers(&self, v: &VideoRef) -> bool {
        self.by_uri.get(&v.uri).is_some_and(|tags| {
            Self::bad_version(tags, v) || self.settled.get(&v.uri) != Some(&v.tag)
        })
    }

    /// Takes note of a listing, before building the catalog version from it: a quarantined
    /// name at a new version settles when the previous listing noted showed that version too.
    pub fn note_listing(&mut self, videos: &[VideoRef]) {
        let mut pending = HashMap::new();
        let mut settled = HashMap::new();
        for v in videos {
            let Some(tags) = self.by_uri.get(&v.uri) else {
                continue;
            };
            if Self::bad_version(tags, v) {
                continue;
            }
            if self.pending.get(&v.uri) == Some(&v.tag) {
                settled.insert(v.uri.clone(), v.tag.clone());
            }
            pending.insert(v.uri.clone(), v.tag.clone());
        }
        self.pending = pending;
        self.settled = settled;
    }

    /// `v`'s version is one found bad, or unknown on either side (the name is covered).
    fn bad_version(tags: &[Option<String>], v: &VideoRef) -> bool {
        v.tag.is_none() || tags.iter().any(|t| t.is_none() || *t == v.tag)
    }

    /// Whether `v`'s name was quarantined at some version (for telling a replaced video that
    /// comes back from a new one).
    pub fn has_name(&self, v: &VideoRef) -> bool {
        self.by_uri.contains_key(&v.uri)
    }

    /// The quarantines recorded so far, as (URI, object version found bad) pairs.
    pub fn entries(&self) -> impl Iterator<Item = (&str, Option<&str>)> {
        self.by_uri
            .iter()
            .flat_map(|(uri, tags)| tags.iter().map(move |t| (uri.as_str(), t.as_deref())))
    }

    /// Takes the quarantined names that `version` holds at a version not found bad as back in
    /// the catalog (settled), as the run that made `version` had them: rebuilt from quarantine
    /// records, a set knows nothing of the listings that brought them back.
    pub fn settle_held(&mut self, version: &CatalogVersion) {
        for v in &version.videos {
            if let Some(tags) = self.by_uri.get(&v.uri)
                && !Self::bad_version(tags, v)
            {
                self.pending.insert(v.uri.clone(), v.tag.clone());
                self.settled.insert(v.uri.clone(), v.tag.clone());
            }
        }
    }

    /// These quarantines without those of videos `version` still holds (found bad after it
    /// was made): what a resumed run leaves out of the listing at restart, so that its first
    /// version is the stopped run's where nothing else changed.
    fn except_held_by(&self, version: &CatalogVersion) -> QuarantineSet {
        let held: HashSet<(&str, Option<&str>)> = version
            .videos
            .iter()
            .map(|v| (v.uri.as_str(), v.tag.as_deref()))
            .collect();
        let mut by_uri = HashMap::new();
        for (uri, tags) in &self.by_uri {
            let kept: Vec<Option<String>> = tags
                .iter()
                .filter(|t| !held.contains(&(uri.as_str(), t.as_deref())))
                .cloned()
                .collect();
            if !kept.is_empty() {
                by_uri.insert(uri.clone(), kept);
            }
        }
        QuarantineSet {
            by_uri,
            pending: self.pending.clone(),
            settled: self.settled.clone(),
        }
    }
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
                object_tag: None,
            });
        }
        for e in &ds.entries {
            videos.push(VideoRef {
                dataset: i,
                rel: e.rel.clone(),
                uri: ds.store.uri_of(&e.rel),
                tag: e.tag.clone(),
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
    /// The version made of `listing` without the videos `excluded` covers (quarantined ones).
    pub fn build(
        version: u64,
        from_step: u64,
        listing: &Listing,
        excluded: &QuarantineSet,
        datasets: usize,
    ) -> CatalogVersion {
        let set: BTreeSet<&VideoRef> = listing
            .videos
            .iter()
            .filter(|v| !excluded.covers(v))
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

    /// Replays a record on top of the version before it (or on nothing, for version 0). A
    /// record in full (every video added: a run's first version) stands on its own.
    pub fn replay(prev: Option<&CatalogVersion>, record: &VersionRecord) -> CatalogVersion {
        let mut set: BTreeSet<VideoRef> = prev
            .filter(|_| !record.is_full())
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
            &QuarantineSet::default(),
            record.datasets.len(),
        )
    }

    /// The version in effect at `step` in the run that wrote `records` (in any order), rebuilt
    /// by replaying those from before it; `None` where none takes effect by `step`.
    pub fn replay_to(records: &[VersionRecord], step: u64) -> Option<CatalogVersion> {
        let mut upto: Vec<&VersionRecord> =
            records.iter().filter(|r| r.from_step <= step).collect();
        upto.sort_by_key(|r| r.from_step);
        upto.into_iter().fold(None, |prev, r| {
            Some(CatalogVersion::replay(prev.as_ref(), r))
        })
    }

    /// The first version of a run resumed at `first_step`: `replayed`, the version the stopped
    /// run had in effect there, unless the listing taken at restart differs from it (videos
    /// added, deleted or replaced while the run was down), in which case the next version,
    /// made of that listing, takes effect at once. Videos `quarantined` at versions that
    /// `replayed` still holds stay in, as they did in the stopped run until its next refresh
    /// (the loaders skip them); every other quarantine leaves its video out.
    pub fn resumed(
        replayed: &CatalogVersion,
        listing: &Listing,
        quarantined: &QuarantineSet,
        first_step: u64,
        datasets: usize,
    ) -> CatalogVersion {
        let mut excluded = quarantined.except_held_by(replayed);
        excluded.settle_held(replayed);
        let now = CatalogVersion::build(
            replayed.version + 1,
            first_step,
            listing,
            &excluded,
            datasets,
        );
        if now.videos == replayed.videos {
            replayed.clone()
        } else {
            now
        }
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

    /// The record lists the whole version (every video added): a run's first version, which
    /// replays without the one before. (A change that adds every video it holds replays to the
    /// same set on any predecessor, so the test cannot misread a change record.)
    pub fn is_full(&self) -> bool {
        self.added.len() == self.videos
    }

    /// The records under `out` of versions that take effect by `step`, in step order.
    pub async fn read_all(out: &Store, step: u64) -> anyhow::Result<Vec<VersionRecord>> {
        let mut records = Vec::new();
        for o in out.list_prefix("catalog").await? {
            if Self::step_of(&o.path).is_none_or(|s| s > step) {
                continue;
            }
            let bytes = out.get(&o.path).await?;
            let record: VersionRecord = serde_json::from_slice(&bytes)
                .with_context(|| format!("reading {}", out.uri_of(&o.path)))?;
            records.push(record);
        }
        records.sort_by_key(|r| r.from_step);
        Ok(records)
    }

    /// The step named by a record's object name (`catalog/step-NNNNNNNN.json`).
    pub fn step_of(name: &str) -> Option<u64> {
        name.strip_prefix("catalog/step-")?
            .strip_suffix(".json")?
            .parse()
            .ok()
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
            tag: None,
        }
    }

    fn tagged(dataset: usize, name: &str, tag: &str) -> VideoRef {
        VideoRef {
            tag: Some(tag.to_string()),
            ..v(dataset, name)
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
        let v0 = CatalogVersion::build(0, 0, &l0, &QuarantineSet::default(), 2);
        assert_eq!(v0.videos, vec![v(0, "a.mp4"), v(0, "b.mp4"), v(1, "z.mp4")]);
        assert_eq!(v0.counts, vec![2, 1]);
        // Same contents listed in another order: same key.
        let again = listing(vec![v(0, "b.mp4"), v(1, "z.mp4"), v(0, "a.mp4")]);
        assert_eq!(
            CatalogVersion::build(0, 0, &again, &QuarantineSet::default(), 2).key,
            v0.key
        );
        // A new video, a deleted one and a quarantined one.
        let l1 = listing(vec![v(0, "a.mp4"), v(0, "c.mp4"), v(1, "z.mp4")]);
        let mut bad = QuarantineSet::default();
        assert!(bad.insert("s3://b/z.mp4", None));
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

    /// A quarantine names the object version found bad: the same name listed at another
    /// version is back in the catalog; where either side's version is unknown (index entries,
    /// stores that list no ETags) the name stays out.
    #[test]
    fn a_video_replaced_under_its_name_comes_back_from_quarantine() {
        let mut bad = QuarantineSet::default();
        assert!(bad.insert("s3://b/a.mp4", Some("e1")));
        assert!(
            !bad.insert("s3://b/a.mp4", Some("e1")),
            "reported twice, recorded once"
        );
        assert!(bad.insert("s3://b/c.mp4", None));
        assert!(bad.covers(&tagged(0, "a.mp4", "e1")));
        assert!(bad.has_name(&tagged(0, "a.mp4", "e2")));
        // A new version comes back once two listings in a row show it: a file still being
        // written (e2, then e3) stays out.
        assert!(bad.covers(&tagged(0, "a.mp4", "e2")), "not listed yet");
        bad.note_listing(&[tagged(0, "a.mp4", "e2")]);
        assert!(bad.covers(&tagged(0, "a.mp4", "e2")), "listed once");
        bad.note_listing(&[tagged(0, "a.mp4", "e3")]);
        assert!(bad.covers(&tagged(0, "a.mp4", "e3")), "changed again");
        bad.note_listing(&[tagged(0, "a.mp4", "e3")]);
        assert!(
            !bad.covers(&tagged(0, "a.mp4", "e3")),
            "the same twice: back"
        );
        assert!(
            bad.covers(&tagged(0, "a.mp4", "e1")),
            "the broken version stays out"
        );
        bad.note_listing(&[tagged(0, "a.mp4", "e1")]);
        bad.note_listing(&[tagged(0, "a.mp4", "e1")]);
        assert!(
            bad.covers(&tagged(0, "a.mp4", "e1")),
            "the broken bytes again: out"
        );
        assert!(bad.covers(&v(0, "a.mp4")), "an index entry: by name");
        assert!(bad.covers(&tagged(0, "c.mp4", "e9")), "quarantined by name");
        assert!(!bad.covers(&tagged(0, "b.mp4", "e1")));

        let l0 = listing(vec![tagged(0, "a.mp4", "e1"), tagged(0, "b.mp4", "f1")]);
        let v0 = CatalogVersion::build(0, 0, &l0, &QuarantineSet::default(), 1);
        let v1 = CatalogVersion::build(1, 4, &l0, &bad, 1);
        assert_eq!(v1.videos, vec![tagged(0, "b.mp4", "f1")]);
        // a.mp4 fixed by a new upload: back, and the draws are keyed as for the same names.
        let l2 = listing(vec![tagged(0, "a.mp4", "e2"), tagged(0, "b.mp4", "f1")]);
        bad.note_listing(&l2.videos);
        bad.note_listing(&l2.videos);
        let v2 = CatalogVersion::build(2, 8, &l2, &bad, 1);
        assert_eq!(v2.videos, l2.videos);
        assert_eq!(v2.key, v0.key);
        // b.mp4 replaced as well: the record says so (old version out, new in), and replays.
        let l3 = listing(vec![tagged(0, "a.mp4", "e2"), tagged(0, "b.mp4", "f2")]);
        let v3 = CatalogVersion::build(3, 12, &l3, &bad, 1);
        let (added, removed) = v3.diff(&v2);
        assert_eq!(added, vec![&tagged(0, "b.mp4", "f2")]);
        assert_eq!(removed, vec![&tagged(0, "b.mp4", "f1")]);
        let names = vec!["d0".to_string()];
        let r3: VersionRecord =
            serde_json::from_str(&serde_json::to_string(&v3.record(Some(&v2), &names)).unwrap())
                .unwrap();
        let b2 = CatalogVersion::replay(None, &v2.record(None, &names));
        assert_eq!(CatalogVersion::replay(Some(&b2), &r3).videos, v3.videos);
        // A resumed run: the stopped run had a.mp4 at e1 quarantined and out since v1, and
        // found e.mp4 bad while v3 was in effect. Replaying the records up to step 12 gives v3;
        // the listing at restart (unchanged) less the quarantines, except e.mp4's, which v3
        // still holds, is v3 itself: the run continues it.
        let c = tagged(0, "e.mp4", "g1");
        let l3c = listing(vec![l3.videos[0].clone(), l3.videos[1].clone(), c.clone()]);
        let v3c = CatalogVersion::build(3, 12, &l3c, &bad, 1);
        let records = vec![
            v3c.record(Some(&v2), &names),
            v0.record(None, &names),
            v2.record(Some(&v1), &names),
            v1.record(Some(&v0), &names),
        ];
        assert!(records[1].is_full() && !records[2].is_full());
        assert!(CatalogVersion::replay_to(&records, 3).is_some_and(|v| v.key == v0.key));
        let at12 = CatalogVersion::replay_to(&records, 20).unwrap();
        assert_eq!((at12.version, at12.videos.clone()), (3, v3c.videos.clone()));
        let mut restored = QuarantineSet::default();
        restored.insert("s3://b/a.mp4", Some("e1"));
        restored.insert("s3://b/e.mp4", Some("g1"));
        let same = CatalogVersion::resumed(&at12, &l3c, &restored, 20, 1);
        assert_eq!(
            (same.version, same.from_step),
            (3, 12),
            "continued as it was"
        );
        // Fixed before the stop (a.mp4 at e2), it stays back through the next refreshes.
        restored.settle_held(&same);
        restored.note_listing(&l3c.videos);
        assert!(!restored.covers(&tagged(0, "a.mp4", "e2")));
        assert!(restored.covers(&tagged(0, "a.mp4", "e1")));
        // Fixed (e2), then found bad again at e2 while v3 still held it: it stays in the
        // continued version, as in the stopped run until its next refresh.
        let mut again = QuarantineSet::default();
        for (uri, tag) in [("a", "e1"), ("a", "e2"), ("e", "g1")] {
            again.insert(&format!("s3://b/{uri}.mp4"), Some(tag));
        }
        let held = CatalogVersion::resumed(&at12, &l3c, &again, 20, 1);
        assert_eq!((held.version, held.from_step), (3, 12));
        again.settle_held(&held);
        assert!(
            again.covers(&tagged(0, "a.mp4", "e2")),
            "out at the next refresh"
        );
        // a.mp4 at e1 again while the run was down: still out. A new video: a new version at
        // the first step; e.mp4 stays in it (the next refresh takes it out).
        let mut l = l3c.videos.clone();
        l.push(tagged(0, "d.mp4", "h1"));
        l[0] = tagged(0, "a.mp4", "e1");
        let next = CatalogVersion::resumed(&at12, &listing(l), &restored, 20, 1);
        assert_eq!((next.version, next.from_step), (4, 20));
        let names_in = |v: &CatalogVersion| -> Vec<String> {
            v.videos.iter().map(|v| v.rel.clone()).collect()
        };
        assert_eq!(names_in(&next), ["b.mp4", "d.mp4", "e.mp4"]);
        // Its record is written in full: it replays over whatever record shares its step.
        let full = next.record(None, &names);
        assert!(full.is_full());
        assert_eq!(
            CatalogVersion::replay(Some(&at12), &full).videos,
            next.videos
        );
        assert!(
            CatalogVersion::resumed(&at12, &listing(vec![]), &restored, 20, 1)
                .videos
                .is_empty()
        );
        assert_eq!(
            VersionRecord::step_of("catalog/step-00000012.json"),
            Some(12)
        );
        assert_eq!(VersionRecord::step_of("catalog/notes.txt"), None);
        // Records written before object versions existed still read (no `tag`).
        let old: VideoRef =
            serde_json::from_str(r#"{"dataset":0,"rel":"a.mp4","uri":"s3://b/a.mp4"}"#).unwrap();
        assert_eq!(old, v(0, "a.mp4"));
    }
}
