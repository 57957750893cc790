//! A transformer block as one differentiable op with a hand-written backward pass.
//!
//! candle's backward pass stores each gradient by adding it into a fresh tensor of zeros
//! (`GradStore::or_insert` then `add`): every gradient edge of the graph costs a zero fill and a
//! full-size add, about four extra passes over the tensor, and two launches on a GPU. A ViT block
//! has about twenty such edges (its activations, weights and biases), so at ViT-L on 16×224×224
//! clips that is tens of gigabytes of memory traffic per step that torch's autograd does not
//! spend (it keeps the first gradient of a tensor as it is).
//!
//! Here a block is an op over its input `x`: its forward runs the block's own kernels without
//! recording a graph and keeps the activations its backward needs; its backward calls each
//! kernel's backward in reverse order — the very ops and inputs candle's graph would call them
//! with — adds the two residual gradients, and hands the parameters' gradients to a
//! [`SideGrads`] store, which the step merges into its gradients after the backward pass (as
//! activation checkpointing does). The gradients are the autograd path's to the bit (model test
//! `fused_blocks_give_the_autograd_step`): adding a gradient to zeros changes nothing, the two
//! residual sums have two terms, and a weight used by several masks sums their gradients in the
//! order the backward pass reaches its blocks, as the graph does.
//!
//! Blocks fall back to the recorded graph where the op does not apply: parameters that are not
//! leaves the store collects (e.g. weights cast inside the graph), a Linear without bias, or
//! bf16 on the CPU (whose kernels run on widened copies inside the graph).

use std::sync::{Arc, Mutex};

use candle_core::backend::BackendStorage;
use candle_core::op::Add;
use candle_core::{
    CpuStorage, CustomOp1, CustomOp2, CustomOp3, DType, Layout, Shape, Storage, Tensor,
};

use crate::ModelError;
use crate::kernels::{Attention, BiasGelu, LayerNorm, Linear, LinearNoBias};
use crate::side_grads::SideGrads;
use crate::vit::{Block, BlockTensors};

/// `block(x)` as one op whose backward pass is written out (see the module docs), or `None`
/// where the op does not apply (the caller then runs the block on the graph).
pub fn fused(
    block: &Block,
    x: &Tensor,
    side: &Arc<SideGrads>,
) -> Result<Option<Tensor>, ModelError> {
    let Some(p) = fusable(block, x, side) else {
        return Ok(None);
    };
    let x = x.contiguous()?;
    let saved = Saved::forward(&p, &x)?;
    #[cfg(test)]
    APPLIED.with(|n| n.set(n.get() + 1));
    let saved = Arc::new(Mutex::new(Some(saved)));
    let op = FusedBlock {
        p,
        saved: saved.clone(),
        side: side.clone(),
    };
    let out = x.apply_op1(op)?;
    // The two summands made the output; the backward pass reads neither (a Linear's backward
    // does not read its output), so they go now rather than live until the backward pass.
    if let Some(s) = lock(&saved)?.as_mut() {
        s.o = None;
        s.y = None;
    }
    Ok(Some(out))
}

#[cfg(test)]
thread_local! {
    /// Blocks this thread ran as fused ops (tests check the op is taken).
    static APPLIED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
    /// Checkpointed blocks this thread differentiated with the written-out backward pass.
    static RECOMPUTED: std::cell::Cell<usize> = const { std::cell::Cell::new(0) };
}

/// Checkpointed blocks this thread has differentiated with the written-out backward pass.
#[cfg(test)]
pub(crate) fn recomputed() -> usize {
    RECOMPUTED.with(std::cell::Cell::get)
}

/// Blocks this thread has run as fused ops.
#[cfg(test)]
pub(crate) fn applied() -> usize {
    APPLIED.with(std::cell::Cell::get)
}

/// The block's tensors when the written-out backward pass applies to `block` on `x` (see the
/// module docs), `None` otherwise.
pub(crate) fn fusable(block: &Block, x: &Tensor, side: &SideGrads) -> Option<BlockTensors> {
    if !side.uses_written_backward() || (x.dtype() == DType::BF16 && x.device().is_cpu()) {
        return None;
    }
    let p = block.tensors()?;
    let params = [
        &p.norm1.0, &p.norm1.1, &p.qkv.0, &p.qkv.1, &p.proj.0, &p.proj.1, &p.norm2.0, &p.norm2.1,
        &p.fc1.0, &p.fc1.1, &p.fc2.0, &p.fc2.1,
    ];
    params.iter().all(|t| side.collects(t)).then_some(p)
}

/// The backward pass of a checkpointed block (`crate::checkpointing`): the block's forward run
/// again on `x`, then the written-out backward pass, parameters' gradients to `side`; the
/// gradient of `x`.
pub(crate) fn recomputed_backward(
    p: &BlockTensors,
    x: &Tensor,
    grad: &Tensor,
    side: &SideGrads,
) -> candle_core::Result<Tensor> {
    #[cfg(test)]
    RECOMPUTED.with(|n| n.set(n.get() + 1));
    let mut s = Saved::forward(p, &x.contiguous()?)?;
    s.o = None;
    s.y = None;
    s.backward(p, grad, side)
}

/// What the backward pass reads: the block's input and intermediate activations, in forward
/// order, and the two summands of its output.
struct Saved {
    x: Tensor,
    h1: Tensor,
    qkv: Tensor,
    a: Tensor,
    /// The attention projection's output (the residual summand), until the output is made.
    o: Option<Tensor>,
    x1: Tensor,
    h2: Tensor,
    f: Tensor,
    g: Tensor,
    /// The MLP's output (the second summand), until the output is made.
    y: Option<Tensor>,
}

impl Saved {
    /// The block's forward, op by op as the graph path runs it (the same kernels, inputs and
    /// calls: `kernels::layer_norm`, `linear`, `attention`, `bias_gelu`), without a graph.
    fn forward(p: &BlockTensors, x: &Tensor) -> candle_core::Result<Self> {
        let ln = |x: &Tensor, (w, b, eps): &(Tensor, Tensor, f64)| {
            x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &LayerNorm { eps: *eps })
        };
        let linear = |x: &Tensor, (w, b): &(Tensor, Tensor)| {
            x.apply_op3_no_bwd(&w.contiguous()?, &b.contiguous()?, &Linear)
        };
        let h1 = ln(x, &p.norm1)?;
        let qkv = linear(&h1, &p.qkv)?;
        // The backward pass differentiates through it: keep what that needs (cuDNN's row
        // statistics), as a recorded call does.
        let a = qkv.apply_op1_no_bwd(&Attention {
            num_heads: p.num_heads,
            stats: true,
        })?;
        let o = linear(&a, &p.proj)?;
        let x1 = (x + &o)?;
        let h2 = ln(&x1, &p.norm2)?;
        let f = h2.apply_op2_no_bwd(&p.fc1.0.contiguous()?, &LinearNoBias)?;
        let g = f.apply_op2_no_bwd(&p.fc1.1.contiguous()?, &BiasGelu)?;
        let y = linear(&g, &p.fc2)?;
        Ok(Self {
            x: x.clone(),
            h1,
            qkv,
            a,
            o: Some(o),
            x1,
            h2,
            f,
            g,
            y: Some(y),
        })
    }

    /// The block's backward pass, op by op in reverse (each op's own `bwd` on the inputs and
    /// output the graph would give it): the parameters' gradients go to `side`; returns x's.
    fn backward(
        self,
        p: &BlockTensors,
        grad: &Tensor,
        side: &SideGrads,
    ) -> candle_core::Result<Tensor> {
        let Saved {
            x,
            h1,
            qkv,
            a,
            x1,
            h2,
            f,
            g,
            ..
        } = self;
        let ln = |eps: f64| LayerNorm { eps };
        // Each activation and gradient is dropped as soon as the last op that reads it has run,
        // and the parameters' gradients go to the store at once (which copies them out of the
        // ops' packed buffers), as the graph's backward pass frees them node by node.
        let keep = |t: &Tensor, g: Option<Tensor>| match g {
            Some(g) => side.add_one(t, &g),
            None => Ok(()),
        };
        // out = x1 + y: both summands get the output's gradient. (A Linear's backward does not
        // read its output, released after the forward: `grad` stands in for it.)
        let dg = {
            let (dg, dw2, db2) = Linear.bwd(&g, &p.fc2.0, &p.fc2.1, grad, grad)?;
            keep(&p.fc2.0, dw2)?;
            keep(&p.fc2.1, db2)?;
            some(dg, "mlp hidden")?
        };
        let df = {
            let (df, db1) = BiasGelu.bwd(&f, &p.fc1.1, &g, &dg)?;
            keep(&p.fc1.1, db1)?;
            some(df, "fc1 output")?
        };
        drop((g, dg));
        let dh2 = {
            let (dh2, dw1) = LinearNoBias.bwd(&h2, &p.fc1.0, &f, &df)?;
            keep(&p.fc1.0, dw1)?;
            some(dh2, "norm2 output")?
        };
        drop((f, df));
        let dx1_ln = {
            let (dx1, dw, db) = ln(p.norm2.2).bwd(&x1, &p.norm2.0, &p.norm2.1, &h2, &dh2)?;
            keep(&p.norm2.0, dw)?;
            keep(&p.norm2.1, db)?;
            some(dx1, "x1")?
        };
        drop((x1, h2, dh2));
        // x1 feeds the output sum and norm2.
        let dx1 = (grad + dx1_ln)?;
        let da = {
            let (da, dw, db) = Linear.bwd(&a, &p.proj.0, &p.proj.1, &dx1, &dx1)?;
            keep(&p.proj.0, dw)?;
            keep(&p.proj.1, db)?;
            some(da, "attention output")?
        };
        let dqkv = Attention {
            num_heads: p.num_heads,
            stats: true,
        }
        .bwd(&qkv, &a, &da)?;
        drop((a, da));
        let dh1 = {
            let (dh1, dw, db) = Linear.bwd(&h1, &p.qkv.0, &p.qkv.1, &qkv, &some(dqkv, "qkv")?)?;
            keep(&p.qkv.0, dw)?;
            keep(&p.qkv.1, db)?;
            some(dh1, "norm1 output")?
        };
        drop(qkv);
        let dx_ln = {
            let (dx, dw, db) = ln(p.norm1.2).bwd(&x, &p.norm1.0, &p.norm1.1, &h1, &dh1)?;
            keep(&p.norm1.0, dw)?;
            keep(&p.norm1.1, db)?;
            some(dx, "x")?
        };
        // x feeds x1 and norm1.
        let dx = (&dx1 + dx_ln)?;
        Ok(dx)
    }

    /// x1 + y, computed by the storage's own add (what `Tensor::add` runs), as the op's output.
    fn output(&self) -> candle_core::Result<(Storage, Shape)> {
        let Some(y) = &self.y else {
            candle_core::bail!("fused block: output already made");
        };
        let (s1, l1) = self.x1.storage_and_layout();
        let (s2, l2) = y.storage_and_layout();
        let out = match (&*s1, &*s2) {
            (Storage::Cpu(a), Storage::Cpu(b)) => Storage::Cpu(a.binary_impl::<Add>(b, l1, l2)?),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(a), Storage::Cuda(b)) => Storage::Cuda(a.binary_impl::<Add>(b, l1, l2)?),
            _ => candle_core::bail!("fused block: unsupported device"),
        };
        Ok((out, l1.shape().clone()))
    }
}

/// The op linking a block's output to its input (see the module docs).
struct FusedBlock {
    p: BlockTensors,
    /// Shared with [`fused`], which releases the output's summands once the output is made.
    saved: Arc<Mutex<Option<Saved>>>,
    side: Arc<SideGrads>,
}

fn lock(
    saved: &Mutex<Option<Saved>>,
) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Saved>>> {
    saved
        .lock()
        .map_err(|_| candle_core::Error::Msg("fused block: lock poisoned".into()))
}

impl FusedBlock {
    fn saved(&self) -> candle_core::Result<std::sync::MutexGuard<'_, Option<Saved>>> {
        lock(&self.saved)
    }

    fn output(&self) -> candle_core::Result<(Storage, Shape)> {
        match &*self.saved()? {
            Some(s) => s.output(),
            None => candle_core::bail!("fused block: activations already released"),
        }
    }
}

/// Unwraps a gradient an op's backward always returns.
fn some(t: Option<Tensor>, what: &str) -> candle_core::Result<Tensor> {
    t.ok_or_else(|| candle_core::Error::Msg(format!("fused block: no gradient for {what}")))
}

impl CustomOp1 for FusedBlock {
    fn name(&self) -> &'static str {
        "vjepa-fused-block"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> candle_core::Result<(CpuStorage, Shape)> {
        crate::side_grads::cpu_output(self.output()?, "fused block")
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(
        &self,
        _: &candle_core::CudaStorage,
        _: &Layout,
    ) -> candle_core::Result<(candle_core::CudaStorage, Shape)> {
        crate::side_grads::cuda_output(self.output()?, "fused block")
    }

    /// The graph's backward pass of the block, op by op in reverse (each op's own `bwd` on the
    /// inputs and output the graph would give it), releasing the activations.
    fn bwd(
        &self,
        _x: &Tensor,
        _res: &Tensor,
        grad: &Tensor,
    ) -> candle_core::Result<Option<Tensor>> {
        let s = self
            .saved()?
            .take()
            .ok_or_else(|| candle_core::Error::Msg("fused block: backward ran twice".into()))?;
        s.backward(&self.p, grad, &self.side).map(Some)
    }
}
