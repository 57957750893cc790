//! The load stage: turn clip requests into clips (fetch, decode, transform) via a [`ClipLoader`].
//!
//! The loader is supplied by the job (it owns the object store and decoder); this operator only
//! drives it, one request at a time, on the worker that received the request.

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
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

/// Applies `loader` to every request, keeping the request's timestamp.
pub fn load_clips<'s, L: ClipLoader + 'static>(
    requests: StreamVec<'s, u64, ClipRequest>,
    mut loader: L,
) -> StreamVec<'s, u64, Loaded> {
    requests.unary::<CapacityContainerBuilder<Vec<Loaded>>, _, _, _>(
        Pipeline,
        "LoadClips",
        |_cap, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let mut session = output.session(&cap);
                    for container in data {
                        for request in container.drain(..) {
                            for loaded in loader.load(request) {
                                session.give(loaded);
                            }
                        }
                    }
                });
            }
        },
    )
}
