//! Collective operations between all timely workers of a job (every thread of every process):
//! rounds of point-to-point messages over a small dataflow of their own, driven by the caller
//! with `worker.step()` outside any operator, so a training loop can exchange gradients, token
//! counts and parameter digests synchronously, step after step.
//!
//! A round is complete when the round's timestamp has passed everywhere: every worker has
//! sent its messages for it (or stopped). Results come sorted by sender, so any reduction done
//! over them is in the same order on every worker: deterministic and bit-identical.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ops::Range;
use std::rc::Rc;
use std::time::Duration;

use timely::ExchangeData;
use timely::container::CapacityContainerBuilder;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::Probe;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::{InputHandle, ProbeHandle};

/// Why a round did not complete.
#[derive(Debug, thiserror::Error)]
pub enum CollectiveError {
    /// The caller's stop condition became true while waiting (e.g. a fatal error elsewhere).
    #[error("stopped while waiting for the other workers")]
    Stopped,
    /// Some workers closed the exchange without sending (they stopped or failed).
    #[error("round {round}: no message from worker(s) {missing:?} (they stopped; see their log)")]
    Missing { round: u64, missing: Vec<usize> },
}

type Envelope<M> = (usize, usize, M);
/// Messages received, by round, as `(sender, message)`.
type Inbox<M> = Rc<RefCell<BTreeMap<u64, Vec<(usize, M)>>>>;

/// One worker's end of the exchange: send messages for a round, then wait for the round.
pub struct Collective<M: ExchangeData + Clone> {
    input: InputHandle<u64, CapacityContainerBuilder<Vec<Envelope<M>>>>,
    probe: ProbeHandle<u64>,
    received: Inbox<M>,
    round: u64,
    index: usize,
    peers: usize,
}

/// Longest a waiting worker parks before checking the stop condition again.
const PARK: Duration = Duration::from_millis(20);

impl<M: ExchangeData + Clone> Collective<M> {
    /// Builds the exchange dataflow on this worker (every worker must, in the same order
    /// relative to its other dataflows).
    pub fn new(worker: &mut timely::worker::Worker) -> Self {
        let mut input = InputHandle::new();
        let probe = ProbeHandle::new();
        let received: Inbox<M> = Rc::default();
        let sink = received.clone();
        worker.dataflow::<u64, _, _>(|scope| {
            input
                .to_stream(scope)
                .unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
                    Exchange::new(|e: &Envelope<M>| e.0 as u64),
                    "CollectiveReceive",
                    move |_cap, _info| {
                        move |input, _output| {
                            input.for_each_stamp(|cap, data| {
                                let Some(&round) = cap.least() else { return };
                                let mut got = sink.borrow_mut();
                                let entry = got.entry(round).or_default();
                                for container in data {
                                    for (_to, from, m) in container.drain(..) {
                                        entry.push((from, m));
                                    }
                                }
                            });
                        }
                    },
                )
                .probe_with(&probe);
        });
        Collective {
            input,
            probe,
            received,
            round: 0,
            index: worker.index(),
            peers: worker.peers(),
        }
    }

    /// Rounds completed so far.
    pub fn rounds(&self) -> u64 {
        self.round
    }

    /// Sends `(to, message)` pairs, then steps the worker until the round is complete and
    /// returns what was sent to this worker as `(from, message)`, sorted by sender (messages
    /// of one sender in sending order). Every worker must call this the same number of times.
    pub fn round(
        &mut self,
        worker: &mut timely::worker::Worker,
        outgoing: Vec<(usize, M)>,
        stop: impl Fn() -> bool,
    ) -> Result<Vec<(usize, M)>, CollectiveError> {
        for (to, m) in outgoing {
            self.input.send((to, self.index, m));
        }
        let round = self.round;
        self.round += 1;
        self.input.advance_to(self.round);
        self.input.flush();
        while self.probe.less_equal(&round) {
            if stop() {
                return Err(CollectiveError::Stopped);
            }
            worker.step_or_park(Some(PARK));
        }
        let mut got = self
            .received
            .borrow_mut()
            .remove(&round)
            .unwrap_or_default();
        got.sort_by_key(|(from, _)| *from);
        Ok(got)
    }

    /// Whether a message already received for the next round satisfies `f`, before this
    /// worker sends its own: lets a worker that is waiting for something else (its data)
    /// notice what the others decided and join the round at once.
    pub fn next_round_has(&self, f: impl Fn(&M) -> bool) -> bool {
        self.received
            .borrow()
            .get(&self.round)
            .is_some_and(|got| got.iter().any(|(_, m)| f(m)))
    }

    /// A round in which every worker sends `message` to every worker (itself included) and
    /// gets one message from each, indexed by sender; fails naming the workers that sent none.
    pub fn all_to_all(
        &mut self,
        worker: &mut timely::worker::Worker,
        message: M,
        stop: impl Fn() -> bool,
    ) -> Result<Vec<M>, CollectiveError> {
        let outgoing = (0..self.peers).map(|to| (to, message.clone())).collect();
        let round = self.round;
        let got = self.round(worker, outgoing, stop)?;
        self.one_per_sender(round, got)
    }

    /// A round in which worker `to` gets `messages[to]`; returns one message per sender.
    pub fn scatter(
        &mut self,
        worker: &mut timely::worker::Worker,
        messages: Vec<M>,
        stop: impl Fn() -> bool,
    ) -> Result<Vec<M>, CollectiveError> {
        let outgoing = messages.into_iter().enumerate().collect();
        let round = self.round;
        let got = self.round(worker, outgoing, stop)?;
        self.one_per_sender(round, got)
    }

    fn one_per_sender(&self, round: u64, got: Vec<(usize, M)>) -> Result<Vec<M>, CollectiveError> {
        let senders: Vec<usize> = got.iter().map(|(f, _)| *f).collect();
        if senders != (0..self.peers).collect::<Vec<_>>() {
            let missing = (0..self.peers).filter(|p| !senders.contains(p)).collect();
            return Err(CollectiveError::Missing { round, missing });
        }
        Ok(got.into_iter().map(|(_, m)| m).collect())
    }
}

/// The part `k` of `parts` near-equal contiguous parts of `0..len` (shard `k` of a flat vector).
pub fn shard_range(len: usize, parts: usize, k: usize) -> Range<usize> {
    let parts = parts.max(1);
    (len * k / parts)..(len * (k + 1) / parts)
}

/// Σ_w n_w · x_w / Σ_w n_w element by element, accumulated in f64 in the order given: the
/// mean over all samples of per-worker means `x_w` over `n_w` samples each. A single
/// contributor gets its own values back exactly (n·x/n is exact in f64 for f32 x); an empty
/// total gives zeros.
pub fn weighted_mean(parts: &[(usize, &[f32])]) -> Vec<f32> {
    let len = parts.first().map_or(0, |(_, x)| x.len());
    let total: f64 = parts.iter().map(|(n, _)| *n as f64).sum();
    if total == 0.0 {
        return vec![0.0; len];
    }
    (0..len)
        .map(|i| {
            let mut acc = 0.0f64;
            for (n, x) in parts {
                if *n > 0 {
                    acc += *n as f64 * f64::from(x[i]);
                }
            }
            (acc / total) as f32
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shards_cover_the_vector_and_means_are_exact_for_one_worker() {
        let len = 10;
        let ranges: Vec<_> = (0..3).map(|k| shard_range(len, 3, k)).collect();
        assert_eq!(ranges, vec![0..3, 3..6, 6..10]);
        assert_eq!(shard_range(2, 4, 0), 0..0);
        let x = [0.1f32, -3.7e-9, 12345.678];
        assert_eq!(weighted_mean(&[(3, &x)]), x.to_vec());
        let y = [0.3f32, 1.0, 0.0];
        let m = weighted_mean(&[(1, &x), (3, &y), (0, &[f32::NAN; 3])]);
        assert!(
            (m[0] - 0.25).abs() < 1e-7 && (m[1] - 0.75).abs() < 1e-7,
            "{m:?}"
        );
        assert_eq!(weighted_mean(&[(0, &x)]), vec![0.0; 3]);
    }

    /// A worker that has not joined a round yet sees, by stepping, what the others sent for
    /// it; the round then completes as usual.
    #[test]
    fn a_waiting_worker_sees_the_next_rounds_messages() {
        let results = timely::execute(timely::Config::process(2), |worker| {
            let index = worker.index();
            let mut c: Collective<u32> = Collective::new(worker);
            if index == 1 {
                // Not in the round yet: only steps until worker 0's message is there.
                let deadline = std::time::Instant::now() + Duration::from_secs(30);
                while !c.next_round_has(|m| *m == 7) {
                    assert!(std::time::Instant::now() < deadline, "never seen");
                    assert!(!c.next_round_has(|m| *m == 8));
                    worker.step_or_park(Some(PARK));
                }
            }
            c.all_to_all(worker, 7 + index as u32, || false).unwrap()
        })
        .unwrap()
        .join();
        for r in results {
            assert_eq!(r.unwrap(), vec![7, 8]);
        }
    }

    /// Three workers all-reduce (reduce-scatter, all-gather) vectors of unequal weight and
    /// get the same bits; a worker that leaves makes the others' next round fail clearly.
    #[test]
    fn all_reduce_over_timely_is_identical_on_every_worker() {
        let results = timely::execute(timely::Config::process(3), |worker| {
            let (index, peers) = (worker.index(), worker.peers());
            let mut c: Collective<(usize, Vec<f32>)> = Collective::new(worker);
            let mine: Vec<f32> = (0..7).map(|i| (i * (index + 1)) as f32 / 3.0).collect();
            let n = index + 1;
            let shards = (0..peers)
                .map(|k| (n, mine[shard_range(mine.len(), peers, k)].to_vec()))
                .collect();
            let got = c.scatter(worker, shards, || false).unwrap();
            let parts: Vec<(usize, &[f32])> = got.iter().map(|(n, x)| (*n, &x[..])).collect();
            let reduced = weighted_mean(&parts);
            let gathered = c.all_to_all(worker, (index, reduced), || false).unwrap();
            let full: Vec<f32> = gathered.into_iter().flat_map(|(_, x)| x).collect();
            // Worker 2 leaves; the others' next round names it.
            let next = if index == 2 {
                None
            } else {
                Some(c.all_to_all(worker, (index, vec![]), || false).map(|_| ()))
            };
            (full, next.map(|r| r.map_err(|e| e.to_string())))
        })
        .unwrap()
        .join();
        let results: Vec<_> = results.into_iter().map(|r| r.unwrap()).collect();
        let expected: Vec<f32> = (0..7)
            .map(|i| {
                let s: f64 = (0..3)
                    .map(|w| (w + 1) as f64 * f64::from((i * (w + 1)) as f32 / 3.0))
                    .sum();
                (s / 6.0) as f32
            })
            .collect();
        for (full, _) in &results {
            assert_eq!(full, &expected);
        }
        for (_, next) in &results[..2] {
            let err = next.clone().unwrap().unwrap_err();
            assert!(err.contains("[2]"), "{err}");
        }
    }
}
