//! The batch stage: gather every clip of a step on one worker, in slot order.

use std::collections::BTreeMap;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

use crate::records::{Batch, Clip};

/// Routes all clips to `trainer` (a worker index) and emits one [`Batch`] per step once the
/// step's frontier has passed, so a batch is complete whichever worker decoded which clip.
pub fn assemble_batches<'s>(
    clips: StreamVec<'s, u64, Clip>,
    trainer: u64,
) -> StreamVec<'s, u64, Batch> {
    clips.unary_frontier::<CapacityContainerBuilder<Vec<Batch>>, _, _, _>(
        Exchange::new(move |_: &Clip| trainer),
        "AssembleBatches",
        |_cap, _info| {
            let mut pending = BTreeMap::new();
            move |(input, frontier), output| {
                input.for_each_stamp(|cap, data| {
                    let Some(cap) = cap.retain_least(output.output_index()) else {
                        return;
                    };
                    let entry = pending
                        .entry(*cap.time())
                        .or_insert_with(|| (cap.clone(), Vec::new()));
                    for container in data {
                        entry.1.append(container);
                    }
                });
                let ready: Vec<u64> = pending
                    .keys()
                    .copied()
                    .filter(|t| !frontier.less_equal(t))
                    .collect();
                for step in ready {
                    if let Some((cap, mut clips)) = pending.remove(&step) {
                        clips.sort_by_key(|c: &Clip| c.slot);
                        output.session(&cap).give(Batch { step, clips });
                    }
                }
            }
        },
    )
}

/// Moves every record of `stream` into `into` (by timestamp) on the worker that holds it, with
/// no exchange: in data-parallel training each worker trains on the clips it loaded. The
/// returned stream carries no records, only the frontier: once a probe on it has passed step
/// `t`, `into` holds every record of `t` this worker will get.
pub fn collect_local<'s, D: 'static>(
    stream: StreamVec<'s, u64, D>,
    into: std::rc::Rc<std::cell::RefCell<BTreeMap<u64, Vec<D>>>>,
) -> StreamVec<'s, u64, ()> {
    stream.unary::<CapacityContainerBuilder<Vec<()>>, _, _, _>(
        timely::dataflow::channels::pact::Pipeline,
        "CollectLocal",
        move |_cap, _info| {
            move |input, _output| {
                input.for_each_stamp(|cap, data| {
                    let Some(&t) = cap.least() else { return };
                    let mut held = into.borrow_mut();
                    let entry = held.entry(t).or_default();
                    for container in data {
                        entry.append(container);
                    }
                });
            }
        },
    )
}
