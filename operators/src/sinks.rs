//! Sinks: hand every record of a stream to a writer on one worker.

use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::generic::Operator;

/// Routes all records to worker `at` and calls `write(step, record)` for each, in arrival order.
pub fn sink_records<'s, D, F>(stream: StreamVec<'s, u64, D>, name: &str, at: u64, mut write: F)
where
    D: timely::ExchangeData,
    F: FnMut(u64, D) + 'static,
{
    stream.sink(
        Exchange::new(move |_: &D| at),
        name,
        move |(input, _frontier)| {
            input.for_each_stamp(|cap, data| {
                let Some(&step) = cap.least() else {
                    return;
                };
                for container in data {
                    for record in container.drain(..) {
                        write(step, record);
                    }
                }
            });
        },
    );
}

/// Calls `write(step, record)` for each record on the worker that produced it (for streams that
/// already live on one worker, like the training stage's output).
pub fn sink_local<'s, D: 'static, F>(stream: StreamVec<'s, u64, D>, name: &str, mut write: F)
where
    F: FnMut(u64, D) + 'static,
{
    stream.sink(Pipeline, name, move |(input, _frontier)| {
        input.for_each_stamp(|cap, data| {
            let Some(&step) = cap.least() else {
                return;
            };
            for container in data {
                for record in container.drain(..) {
                    write(step, record);
                }
            }
        });
    });
}
