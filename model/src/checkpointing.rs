//! Activation checkpointing: a checkpointed transformer block keeps only its input for the
//! backward pass and recomputes its inside when the gradient arrives, trading about one more
//! forward of the encoder per step for most of its activation memory (issue 10's option for
//! large models and batches).
//!
//! candle's custom ops return gradients for their tensor inputs only, so a checkpointed block is
//! an op over its input `x` whose output is the block run on detached parameters and input
//! (nothing inside is recorded); its backward re-runs the block on a fresh leaf copy of `x` with the real,
//! differentiable parameters, back-propagates the output gradient through that small graph,
//! returns `x`'s gradient, and adds the trainable tensors' gradients to a [`SideGrads`] store —
//! they reach the same Vars as without checkpointing (through the bf16 casts, in mixed
//! precision). The step adds the store into its gradients after its backward pass
//! ([`SideGrads::merge_into`]). The recomputation is deterministic (our kernels are), so the
//! gradients equal the plain path's. Where the fused block op applies ([`crate::fused_block`]),
//! the recomputation and its backward pass are that op's own, with no graph at all.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::backprop::GradStore;
use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, TensorId, Var};

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

    fn add(&self, grads: &GradStore) -> candle_core::Result<()> {
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

/// `block(x)` as `side` says: checkpointed ([`checkpointed`]) or fused
/// ([`crate::fused_block::fused`], or on the graph where that does not apply).
pub fn block_forward(
    block: &Block,
    x: &Tensor,
    side: &Arc<SideGrads>,
) -> Result<Tensor, ModelError> {
    if side.recompute {
        return checkpointed(block, x, side);
    }
    if !x.track_op() && !block.params_track() {
        return block.forward(x);
    }
    match crate::fused_block::fused(block, x, side)? {
        Some(y) => Ok(y),
        None => block.forward(x),
    }
}

/// `block(x)` keeping only `x` for the backward pass (see the module docs); the parameters'
/// gradients go to `side`.
pub fn checkpointed(
    block: &Block,
    x: &Tensor,
    side: &Arc<SideGrads>,
) -> Result<Tensor, ModelError> {
    if !x.track_op() && !block.params_track() {
        // Nothing to differentiate: a plain forward.
        return block.forward(x);
    }
    // The output on detached parameters and input: nothing of the inside is recorded.
    let y = block.detached().forward(&x.detach())?;
    let op = Checkpoint {
        block: block.clone(),
        y: Mutex::new(Some(y)),
        side: side.clone(),
    };
    Ok(x.apply_op1(op)?)
}

/// The op linking a checkpointed block's output to its input; holds the output computed
/// without a graph until its forward hands it over.
struct Checkpoint {
    block: Block,
    y: Mutex<Option<Tensor>>,
    side: Arc<SideGrads>,
}

impl Checkpoint {
    /// The precomputed output's storage (a fresh, compact tensor: its storage is exactly it).
    fn output(&self) -> candle_core::Result<(Storage, Shape)> {
        let y = self
            .y
            .lock()
            .map_err(|_| candle_core::Error::Msg("checkpointed block: lock poisoned".into()))?
            .take()
            .ok_or_else(|| {
                candle_core::Error::Msg("checkpointed block: forward ran twice".into())
            })?;
        let (storage, layout) = y.storage_and_layout();
        if !layout.is_contiguous() || layout.start_offset() != 0 {
            candle_core::bail!("checkpointed block: output is not compact");
        }
        use candle_core::backend::BackendStorage;
        let copy = match &*storage {
            Storage::Cpu(s) => Storage::Cpu(s.try_clone(layout)?),
            #[cfg(feature = "cuda")]
            Storage::Cuda(s) => Storage::Cuda(s.try_clone(layout)?),
            _ => candle_core::bail!("checkpointed block: unsupported device"),
        };
        Ok((copy, layout.shape().clone()))
    }
}

impl CustomOp1 for Checkpoint {
    fn name(&self) -> &'static str {
        "vjepa-checkpointed-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        match self.output()? {
            (Storage::Cpu(y), shape) => Ok((y, shape)),
            _ => candle_core::bail!("checkpointed block: CPU input, non-CPU output"),
        }
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        match self.output()? {
            (Storage::Cuda(y), shape) => Ok((y, shape)),
            _ => candle_core::bail!("checkpointed block: CUDA input, non-CUDA output"),
        }
    }

    fn bwd(&self, x: &Tensor, _res: &Tensor, grad: &Tensor) -> candle_core::Result<Option<Tensor>> {
        // The written-out backward pass where it applies (no graph for the recomputation).
        if let Some(p) = crate::fused_block::fusable(&self.block, x, &self.side) {
            return crate::fused_block::recomputed_backward(&p, &x.detach(), grad, &self.side)
                .map(Some);
        }
        let leaf = Var::from_tensor(&x.detach())?;
        let out = self
            .block
            .forward(leaf.as_tensor())
            .map_err(|e| candle_core::Error::Msg(format!("checkpointed block (recompute): {e}")))?;
        let grads = (out * grad)?.sum_all()?.backward()?;
        self.side.add(&grads)?;
        Ok(grads.get(leaf.as_tensor()).cloned())
    }
}
