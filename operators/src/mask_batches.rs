//! The mask stage: one multi-block mask per mask config for every batch (spec §5).

use timely::container::CapacityContainerBuilder;
use timely::dataflow::StreamVec;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

use crate::masking::MaskGenerator;
use crate::records::{Batch, MaskedBatch};
use crate::seeding::{Stream, rng_for};

/// Attaches masks to each batch. Block sizes come from a generator seeded by the step (the
/// official batch counter, shared by all mask configs as in the reference, so they share the
/// aspect draw); per-sample positions from a stream seeded by (seed, step), so the masks of a
/// step do not depend on which worker or process computes them. A batch whose masks cannot be
/// drawn (a pathological config; the job checks its config up front) is dropped with an error.
pub fn mask_batches<'s>(
    batches: StreamVec<'s, u64, Batch>,
    generators: Vec<MaskGenerator>,
    seed: u64,
) -> StreamVec<'s, u64, MaskedBatch> {
    batches.unary::<CapacityContainerBuilder<Vec<MaskedBatch>>, _, _, _>(
        Pipeline,
        "MaskBatches",
        |_cap, _info| {
            move |input, output| {
                input.for_each_stamp(|cap, data| {
                    let mut session = output.session(&cap);
                    for container in data {
                        for batch in container.drain(..) {
                            let mut positions = rng_for(seed, Stream::MaskPositions, batch.step);
                            let masks: Result<Vec<_>, _> = generators
                                .iter()
                                .map(|g| {
                                    g.generate(
                                        seed,
                                        0,
                                        batch.step,
                                        batch.clips.len(),
                                        &mut positions,
                                    )
                                })
                                .collect();
                            match masks {
                                Ok(masks) => session.give(MaskedBatch { batch, masks }),
                                Err(e) => {
                                    tracing::error!(step = batch.step, "cannot draw masks: {e}")
                                }
                            }
                        }
                    }
                });
            }
        },
    )
}
