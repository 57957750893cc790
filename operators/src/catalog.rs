//! The catalog as a differential-dataflow collection of `(dataset, uri)` records, with a running
//! per-dataset video count. Timestamps are catalog versions, so a re-listing can later add and
//! retract videos as updates rather than rebuild the catalog.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::rc::Rc;

use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::operators::count::CountTotal;
use timely::dataflow::ProbeHandle;
use timely::dataflow::operators::{Exchange, Probe};

use crate::sinks::sink_local;

/// Videos per dataset as of the latest completed catalog version (kept on worker 0).
pub type DatasetCounts = Rc<RefCell<BTreeMap<usize, i64>>>;

/// Handles for feeding catalog updates and reading counts.
pub struct CatalogCounts {
    /// `(dataset index, uri)` with +1 (added) or -1 (retracted) at a catalog version.
    pub input: InputSession<u64, (usize, String), isize>,
    /// Completes a version once its counts have reached worker 0.
    pub probe: ProbeHandle<u64>,
    /// The counts, updated on worker 0.
    pub counts: DatasetCounts,
}

/// Builds the catalog-count dataflow on this worker.
pub fn catalog_counts(worker: &mut timely::worker::Worker) -> CatalogCounts {
    let counts: DatasetCounts = Rc::new(RefCell::new(BTreeMap::new()));
    let sink_counts = counts.clone();
    let probe = ProbeHandle::new();
    let input = worker.dataflow::<u64, _, _>(|scope| {
        let (input, videos) = scope.new_collection::<(usize, String), isize>();
        let changes = videos
            .map(|(dataset, _uri)| dataset)
            .count_total()
            .inner
            .exchange(|_| 0)
            .probe_with(&probe);
        sink_local(
            changes,
            "CatalogCounts",
            move |_version, ((dataset, count), _time, diff): ((usize, isize), u64, isize)| {
                let mut c = sink_counts.borrow_mut();
                let entry = c.entry(dataset).or_insert(0);
                *entry += count as i64 * diff as i64;
                if *entry == 0 {
                    c.remove(&dataset);
                }
            },
        );
        input
    });
    CatalogCounts {
        input,
        probe,
        counts,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_follow_additions_and_retractions_across_workers() {
        let results = timely::execute(timely::Config::process(2), |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let mut cat = catalog_counts(worker);
            let videos: Vec<(usize, String)> = (0..7)
                .map(|i| (i % 2, format!("s3://b/v{i}.mp4")))
                .collect();
            for (i, v) in videos.iter().enumerate() {
                if i % peers == index {
                    cat.input.insert(v.clone());
                }
            }
            cat.input.advance_to(1);
            cat.input.flush();
            while cat.probe.less_than(&1) {
                worker.step();
            }
            let first = cat.counts.borrow().clone();
            // Version 1: one video of dataset 1 is retracted, one added to dataset 2.
            if index == 0 {
                cat.input.remove((1, "s3://b/v1.mp4".into()));
                cat.input.insert((2, "s3://c/w.mp4".into()));
            }
            cat.input.advance_to(2);
            cat.input.flush();
            while cat.probe.less_than(&2) {
                worker.step();
            }
            let second = cat.counts.borrow().clone();
            (first, second)
        })
        .unwrap()
        .join();
        let (first, second) = results.into_iter().next().unwrap().unwrap();
        assert_eq!(first, BTreeMap::from([(0, 4), (1, 3)]));
        assert_eq!(second, BTreeMap::from([(0, 4), (1, 2), (2, 1)]));
    }
}
