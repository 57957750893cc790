//! The videos a run draws from: every dataset's entries, in a stable order.

use std::sync::Arc;

use vjepa_storage::dataset::{self, Dataset};
use vjepa_storage::{S3Settings, Store};

use vjepa_operators::records::Quarantined;

/// One video of the catalog.
#[derive(Clone, Debug)]
pub struct VideoRef {
    pub dataset: usize,
    pub rel: String,
    pub uri: String,
}

/// The datasets of a run, flattened. Order: datasets in config order, entries as listed
/// (listings are sorted), so the same config and corpus give the same catalog anywhere.
pub struct Catalog {
    pub stores: Vec<Store>,
    pub names: Vec<String>,
    pub videos: Vec<VideoRef>,
    /// Index entries refused before any read (paths escaping their store, other schemes).
    pub rejected: Vec<Quarantined>,
}

impl Catalog {
    /// Opens every dataset (reading indexes, listing prefixes).
    pub async fn open(
        specs: &[String],
        s3: &S3Settings,
    ) -> Result<Arc<Catalog>, vjepa_storage::StorageError> {
        let mut stores = Vec::new();
        let mut names = Vec::new();
        let mut videos = Vec::new();
        let mut rejected = Vec::new();
        let now = crate::now_unix_us();
        for (i, spec) in specs.iter().enumerate() {
            let ds: Dataset = dataset::open(spec, s3).await?;
            tracing::info!(
                dataset = %spec,
                videos = ds.entries.len(),
                rejected = ds.rejected.len(),
                "dataset opened"
            );
            for r in &ds.rejected {
                rejected.push(Quarantined {
                    uri: r.entry.clone(),
                    reason: r.reason.clone(),
                    detail: format!("{} (in {spec})", r.detail),
                    time_unix_us: now,
                });
            }
            for e in &ds.entries {
                videos.push(VideoRef {
                    dataset: i,
                    rel: e.rel.clone(),
                    uri: ds.store.uri_of(&e.rel),
                });
            }
            stores.push(ds.store);
            names.push(ds.name);
        }
        Ok(Arc::new(Catalog {
            stores,
            names,
            videos,
            rejected,
        }))
    }
}
