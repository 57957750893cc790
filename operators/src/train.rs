//! The training stage: run one optimiser step per masked batch and report how long the step
//! waited for data, so "is the job input-bound?" is answered from the records.

use std::time::{Duration, Instant};

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::records::MaskedBatch;

/// Calls `step(batch, data_wait)` for every batch in arrival order and emits what it returns.
/// `data_wait` is the time between the end of the previous step and this batch being handled.
pub fn train<'s, O: 'static, F>(
    batches: StreamVec<'s, u64, MaskedBatch>,
    mut step: F,
) -> StreamVec<'s, u64, O>
where
    F: FnMut(MaskedBatch, Duration) -> Option<O> + 'static,
{
    batches.unary::<CapacityContainerBuilder<Vec<O>>, _, _, _>(Pipeline, "Train", |_cap, _info| {
        let mut last_end = Instant::now();
        move |input, output| {
            input.for_each_stamp(|cap, data| {
                let mut session = output.session(&cap);
                for container in data {
                    for batch in container.drain(..) {
                        let start = Instant::now();
                        let data_wait = start.saturating_duration_since(last_end);
                        let out = step(batch, data_wait);
                        last_end = Instant::now();
                        if let Some(out) = out {
                            session.give(out);
                        }
                    }
                }
            });
        }
    })
}
