//! The stages of the vjepa-stream dataflow: the pure algorithms (frame sampling, the clip
//! transform, multi-block masking, the video order, seeding) and the timely operators that run
//! them (load, batch, mask, train, sinks). Timestamps are step numbers.

pub mod erasing;
pub mod masking;
pub mod randaugment;
pub mod sampling;
pub mod seeding;
pub mod train_augment;
pub mod transform;

pub mod sampler;

pub mod records;

pub mod batching;
pub mod catalog;
pub mod collective;
pub mod load;
pub mod sinks;
