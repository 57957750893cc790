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

use std::sync::{Arc, Mutex};

use candle_core::{CpuStorage, CustomOp1, Layout, Shape, Storage, Tensor, Var};

use crate::ModelError;
use crate::side_grads::SideGrads;
use crate::vit::Block;

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
        crate::side_grads::cpu_output(self.output()?, "checkpointed block")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::side_grads::cuda_output(self.output()?, "checkpointed block")
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
