//! The store for gradients that bypass candle's graph: blocks that differentiate themselves
//! (fused blocks, [`crate::fused_block`]; checkpointed blocks, [`crate::checkpointing`]) file
//! their parameters' gradients here during the backward pass, and the step merges them into its
//! gradients afterwards. [`block_forward`] runs a block the way the store says.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, Shape, Storage, Tensor, TensorId, Var};

use crate::ModelError;
use crate::vit::Block;

/// Gradients of trainable tensors found by blocks' own backward passes (checkpointed or fused,
/// [`crate::fused_block`]), summed per tensor, waiting to join the step's gradients. It also
/// says which of the two the step's blocks are.
#[derive(Default)]
pub struct SideGrads {
    /// The tensors whose gradients are kept (the trainable Vars), by id.
    wanted: HashMap<TensorId, Tensor>,
    acc: Mutex<HashMap<TensorId, Tensor>>,
    /// Blocks recompute their inside in the backward pass (checkpointing) rather than keep it
    /// (fused).
    recompute: bool,
    /// Blocks use the written-out backward pass of [`crate::fused_block`] where it applies
    /// (rather than candle's graph).
    written: bool,
}

impl SideGrads {
    /// A store keeping the gradients of `vars` (everything else a recomputation visits is
    /// dropped at once), for checkpointed blocks.
    pub fn new<'a>(vars: impl IntoIterator<Item = &'a Var>) -> Self {
        Self {
            wanted: vars
                .into_iter()
                .map(|v| (v.as_tensor().id(), v.as_tensor().clone()))
                .collect(),
            acc: Mutex::new(HashMap::new()),
            recompute: true,
            written: true,
        }
    }

    /// The store with checkpointed blocks differentiated on candle's graph (`false`) or with the
    /// written-out backward pass where it applies (`true`, the default).
    pub fn written_backward(self, on: bool) -> Self {
        Self {
            written: on,
            ..self
        }
    }

    /// Whether blocks use the written-out backward pass where it applies.
    pub fn uses_written_backward(&self) -> bool {
        self.written
    }

    /// A store keeping the gradients of `vars`, for fused blocks ([`crate::fused_block`]).
    pub fn fused<'a>(vars: impl IntoIterator<Item = &'a Var>) -> Self {
        Self {
            recompute: false,
            ..Self::new(vars)
        }
    }

    /// Whether `t` is one of the tensors whose gradients the store keeps.
    pub fn collects(&self, t: &Tensor) -> bool {
        self.wanted.contains_key(&t.id())
    }

    /// Adds `g` to the gradient kept for `t` (nothing when `t` is not kept). The first gradient
    /// is copied into its own storage: kernels' backward ops return a weight's gradient as a view
    /// into one buffer with the input's gradient, which would otherwise live as long as the store.
    pub fn add_one(&self, t: &Tensor, g: &Tensor) -> candle_core::Result<()> {
        if !self.collects(t) {
            return Ok(());
        }
        let mut acc = self
            .acc
            .lock()
            .map_err(|_| candle_core::Error::Msg("block gradients: lock poisoned".into()))?;
        let sum = match acc.remove(&t.id()) {
            Some(prev) => (prev + g)?,
            None => g.force_contiguous()?,
        };
        acc.insert(t.id(), sum);
        Ok(())
    }

    pub(crate) fn add(&self, grads: &GradStore) -> candle_core::Result<()> {
        let mut acc = self
            .acc
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpoint gradients: lock poisoned".into()))?;
        for (id, t) in &self.wanted {
            if let Some(g) = grads.get(t) {
                let sum = match acc.remove(id) {
                    Some(prev) => (prev + g)?,
                    None => g.clone(),
                };
                acc.insert(*id, sum);
            }
        }
        Ok(())
    }

    /// Adds every gathered gradient into `grads` (summing with what the main backward pass
    /// found for the same tensor) and empties the store.
    pub fn merge_into(&self, grads: &mut GradStore) -> Result<(), ModelError> {
        let gathered = std::mem::take(
            &mut *self
                .acc
                .lock()
                .map_err(|_| ModelError::Input("checkpoint gradients: lock poisoned".into()))?,
        );
        for (id, g) in gathered {
            let Some(t) = self.wanted.get(&id) else {
                continue;
            };
            let total = match grads.remove(t) {
                Some(prev) => (prev + g)?,
                None => g,
            };
            grads.insert(t, total);
        }
        Ok(())
    }
}

/// `block(x)` as `side` says: checkpointed ([`crate::checkpointing::checkpointed`]) or fused
/// ([`crate::fused_block::fused`], or on the graph where that does not apply).
pub fn block_forward(
    block: &Block,
    x: &Tensor,
    side: &Arc<SideGrads>,
) -> Result<Tensor, ModelError> {
    if side.recompute {
        return crate::checkpointing::checkpointed(block, x, side);
    }
    if !x.track_op() && !block.params_track() {
        return block.forward(x);
    }
    match crate::fused_block::fused(block, x, side)? {
        Some(y) => Ok(y),
        None => block.forward(x),
    }
}

/// The CPU storage of an output a block op computed before candle asked for it (the fused and
/// checkpointed block ops hand their precomputed output over in `cpu_fwd`).
pub(crate) fn cpu_output(
    (storage, shape): (Storage, Shape),
    op: &str,
) -> candle_core::Result<(CpuStorage, Shape)> {
    match storage {
        Storage::Cpu(y) => Ok((y, shape)),
        _ => candle_core::bail!("{op}: CPU input, non-CPU output"),
    }
}

/// [`cpu_output`] for `cuda_fwd`.
#[cfg(feature = "cuda")]
pub(crate) fn cuda_output(
    (storage, shape): (Storage, Shape),
    op: &str,
) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
    match storage {
        Storage::Cuda(y) => Ok((y, shape)),
        _ => candle_core::bail!("{op}: CUDA input, non-CUDA output"),
    }
}
