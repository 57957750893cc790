//! The batch stage: each worker keeps the clips it loaded, by step, for its share of the batch.

use std::collections::BTreeMap;

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::operators::generic::Operator;

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
