//! The load stage: turn clip requests into clips (fetch, decode, transform) via a [`ClipLoader`].
//!
//! The loaders are supplied by the job (each owns a decoder); this operator only drives them,
//! on threads of their own, for the requests of the worker that received them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, mpsc};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::Capability;
use timely::dataflow::operators::generic::Operator;

use crate::records::{ClipRequest, Loaded};

/// Produces the clip for a request, plus a record for every bad video met on the way.
pub trait ClipLoader {
    fn load(&mut self, request: ClipRequest) -> Vec<Loaded>;
}

impl<F: FnMut(ClipRequest) -> Vec<Loaded>> ClipLoader for F {
    fn load(&mut self, request: ClipRequest) -> Vec<Loaded> {
        self(request)
    }
}

/// Applies the `loaders` to every request, each loader on its own thread, so several clips
/// decode at once and loading overlaps whatever the worker does
/// next (training). Clips come out as they finish, each at its request's timestamp; the
/// operator holds that timestamp until every request of it is done, so downstream frontiers
/// still say when a step's clips are complete. The threads stop when the dataflow is dropped.
pub fn load_clips_parallel<'s, L: ClipLoader + Send + 'static>(
    requests: StreamVec<'s, u64, ClipRequest>,
    loaders: Vec<L>,
) -> StreamVec<'s, u64, Loaded> {
    let worker = requests.scope().worker();
    requests.unary::<CapacityContainerBuilder<Vec<Loaded>>, _, _, _>(
        Pipeline,
        "LoadClipsParallel",
        |_cap, info| {
            let activator = worker.sync_activator_for(info.address.to_vec());
            let (work_tx, work_rx) = mpsc::channel::<(u64, ClipRequest)>();
            let work_rx = Arc::new(Mutex::new(work_rx));
            let (done_tx, done_rx) = mpsc::channel::<(u64, Vec<Loaded>)>();
            for (i, mut loader) in loaders.into_iter().enumerate() {
                let work_rx = Arc::clone(&work_rx);
                let done_tx = done_tx.clone();
                let activator = activator.clone();
                let spawned = std::thread::Builder::new()
                    .name(format!("vjepa-load-{i}"))
                    .spawn(move || {
                        loop {
                            // The lock is held only while waiting for the next request.
                            let next = match work_rx.lock() {
                                Ok(rx) => rx.recv(),
                                Err(_) => break,
                            };
                            let Ok((time, request)) = next else { break };
                            let loaded = loader.load(request);
                            if done_tx.send((time, loaded)).is_err() {
                                break;
                            }
                            if activator.activate().is_err() {
                                break;
                            }
                        }
                    });
                if let Err(e) = spawned {
                    tracing::error!(error = %e, "cannot start a clip loader thread");
                }
            }
            drop(done_tx);
            // Per timestamp: its capability and how many requests are still loading.
            let mut pending: BTreeMap<u64, (Capability<u64>, usize)> = BTreeMap::new();
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let Some(&time) = cap.least() else { return };
                    for container in data {
                        for request in container.drain(..) {
                            let slot = pending
                                .entry(time)
                                .or_insert_with(|| (cap.delayed(&time, output.output_index()), 0));
                            if work_tx.send((time, request)).is_ok() {
                                slot.1 += 1;
                            } else {
                                tracing::error!("clip loader threads are gone");
                            }
                        }
                    }
                });
                while let Ok((time, loaded)) = done_rx.try_recv() {
                    let finished = match pending.get_mut(&time) {
                        Some((cap, left)) => {
                            output.session(&*cap).give_iterator(loaded.into_iter());
                            *left -= 1;
                            *left == 0
                        }
                        None => false,
                    };
                    if finished {
                        pending.remove(&time);
                    }
                }
                pending.retain(|_, (_, left)| *left > 0);
            }
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::records::{ClipRequest, Loaded, Quarantined};
    use std::collections::BTreeMap;
    use timely::dataflow::operators::capture::Event;
    use timely::dataflow::operators::{Capture, Input, Probe};

    /// A loader that takes a while and reports which request it served.
    struct Slow;

    impl ClipLoader for Slow {
        fn load(&mut self, request: ClipRequest) -> Vec<Loaded> {
            std::thread::sleep(std::time::Duration::from_millis(
                5 * (request.slot as u64 % 3),
            ));
            vec![Loaded::Bad(Quarantined {
                uri: format!("{}/{}", request.step, request.slot),
                reason: "test".into(),
                detail: String::new(),
                time_unix_us: 0,
                object_tag: None,
            })]
        }
    }

    #[test]
    fn parallel_load_delivers_every_request_at_its_time() {
        let captured = timely::execute_directly(|worker| {
            let (mut input, probe, captured) = worker.dataflow::<u64, _, _>(|scope| {
                let (input, requests) = scope.new_input::<Vec<ClipRequest>>();
                let loaded = load_clips_parallel(requests, vec![Slow, Slow, Slow]);
                let (probe, loaded) = loaded.probe();
                (input, probe, loaded.capture())
            });
            for step in 0..4u64 {
                for slot in 0..5usize {
                    input.send(ClipRequest {
                        step,
                        slot,
                        global_index: step * 5 + slot as u64,
                    });
                }
                input.advance_to(step + 1);
            }
            input.close();
            while !probe.done() {
                worker.step_or_park(Some(std::time::Duration::from_millis(1)));
            }
            captured
        });
        let mut got: BTreeMap<u64, Vec<Loaded>> = BTreeMap::new();
        for event in captured.try_iter() {
            if let Event::Messages(time, items) = event {
                let time = *time.least().expect("a stamped message");
                got.entry(time).or_default().extend(items);
            }
        }
        assert_eq!(got.len(), 4, "results at every step's time");
        for (time, items) in got {
            let mut uris: Vec<String> = items
                .iter()
                .map(|l| match l {
                    Loaded::Bad(q) => q.uri.clone(),
                    Loaded::Clip(_) => unreachable!(),
                })
                .collect();
            uris.sort();
            let want: Vec<String> = (0..5).map(|s| format!("{time}/{s}")).collect();
            assert_eq!(uris, want);
        }
    }
}
