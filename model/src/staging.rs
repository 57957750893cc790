//! Host→device upload of a training batch: per-clip f32 values packed once into one
//! `[B, 3, T, S, S]` tensor in the compute dtype, on the model's device.
//!
//! Why: a ViT-L/16 batch (24 × 3 × 16 × 224 × 224) is 231 MB of f32. Packed into a pageable
//! `Vec` and copied with `to_device`, it crosses PCIe at pageable speed and blocks the host
//! meanwhile. On a CUDA device the stager instead packs straight into a reused page-locked
//! buffer, in bf16 when the step computes in bf16 (half the bytes; the step's first op casts
//! the clips to bf16 anyway, so the values are the same), and queues one asynchronous copy on
//! a copy stream of its own: the host returns at once, and the copy runs at DMA speed beside
//! whatever the device is computing (staged during the previous step, see
//! [`crate::VJepa::compute_gradients_overlapping`], it overlaps that step). The device buffer is
//! allocated on the copy stream, which writes it (stream-ordered memory is only safe in its
//! stream's order); then the compute stream waits for the copy, behind whatever it already has
//! queued, and takes the buffer over, so its readers and its free are ordered there. The
//! packing is split across threads by clip. On the CPU it is the plain stacking it always was.

use candle_core::{DType, Device, Tensor};

use crate::ModelError;

/// Packs batches of clips for one device (see the module docs).
pub struct ClipStager {
    device: Device,
    #[cfg(feature = "cuda")]
    pinned: pinned::Buffers,
}

impl ClipStager {
    /// A stager for `device`. Page-locked memory is allocated on first use, sized to the batch.
    pub fn new(device: &Device) -> Self {
        Self {
            device: device.clone(),
            #[cfg(feature = "cuda")]
            pinned: pinned::Buffers::default(),
        }
    }

    /// `clips` (each the `c·t·h·w` values of one `[c, t, h, w]` clip) as one
    /// `[B, c, t, h, w]` tensor of `dtype` on the stager's device. On a CUDA device the copy
    /// is queued on the stager's copy stream and may still be running when this returns (the
    /// kernels that read the tensor wait for it).
    pub fn stage(
        &self,
        clips: &[&[f32]],
        (c, t, h, w): (usize, usize, usize, usize),
        dtype: DType,
    ) -> Result<Tensor, ModelError> {
        let per_clip = c * t * h * w;
        if clips.is_empty() || per_clip == 0 {
            return Err(ModelError::Input(format!(
                "no clip values to stage ({} clips of {c}×{t}×{h}×{w})",
                clips.len()
            )));
        }
        if let Some(bad) = clips.iter().position(|x| x.len() != per_clip) {
            return Err(ModelError::Input(format!(
                "clip {bad} has {} values, expected {per_clip} ({c}×{t}×{h}×{w})",
                clips[bad].len()
            )));
        }
        let shape = (clips.len(), c, t, h, w);
        #[cfg(feature = "cuda")]
        if let Device::Cuda(dev) = &self.device {
            match dtype {
                DType::F32 => {
                    return self.pinned.stage(
                        dev,
                        &self.pinned.f32,
                        clips,
                        per_clip,
                        shape,
                        |d, s| d.copy_from_slice(s),
                    );
                }
                DType::BF16 => {
                    use half::slice::HalfFloatSliceExt;
                    return self.pinned.stage(
                        dev,
                        &self.pinned.bf16,
                        clips,
                        per_clip,
                        shape,
                        |d, s| d.convert_from_f32_slice(s),
                    );
                }
                _ => {}
            }
        }
        let mut data = Vec::with_capacity(per_clip * clips.len());
        for x in clips {
            data.extend_from_slice(x);
        }
        let t = Tensor::from_vec(data, shape, &Device::Cpu)?;
        Ok(t.to_dtype(dtype)?.to_device(&self.device)?)
    }
}

#[cfg(feature = "cuda")]
mod pinned {
    use std::sync::{Arc, Mutex};

    use candle_core::cuda_backend::CudaDType;
    use candle_core::cuda_backend::cudarc::driver::{
        CudaStream, DeviceRepr, PinnedHostSlice, ValidAsZeroBits,
    };
    use candle_core::op::BackpropOp;
    use candle_core::{CudaDevice, CudaStorage, Shape, Storage, Tensor, WithDType};
    use half::bf16;

    use crate::ModelError;

    /// One reused page-locked buffer per dtype, reallocated when the batch size changes, and
    /// the stream the uploads run on.
    #[derive(Default)]
    pub(super) struct Buffers {
        pub f32: Mutex<Option<PinnedHostSlice<f32>>>,
        pub bf16: Mutex<Option<PinnedHostSlice<bf16>>>,
        copy: Mutex<Option<Arc<CudaStream>>>,
    }

    impl Buffers {
        pub(super) fn stage<T>(
            &self,
            dev: &CudaDevice,
            slot: &Mutex<Option<PinnedHostSlice<T>>>,
            clips: &[&[f32]],
            per_clip: usize,
            shape: impl Into<Shape>,
            fill: impl Fn(&mut [T], &[f32]) + Sync,
        ) -> Result<Tensor, ModelError>
        where
            T: DeviceRepr + ValidAsZeroBits + CudaDType + WithDType + Send,
        {
            let err = |what: &str, e: &dyn std::fmt::Display| {
                ModelError::Input(format!("staging the batch ({what}): {e}"))
            };
            let total = per_clip * clips.len();
            let copy = {
                let mut copy = self
                    .copy
                    .lock()
                    .map_err(|_| err("lock", &"poisoned by a panic"))?;
                match copy.as_ref() {
                    Some(s) => s.clone(),
                    None => {
                        let s = dev
                            .cuda_stream()
                            .context()
                            .new_stream()
                            .map_err(|e| err("copy stream", &e))?;
                        *copy = Some(s.clone());
                        s
                    }
                }
            };
            let mut slot = slot
                .lock()
                .map_err(|_| err("lock", &"poisoned by a panic"))?;
            if slot.as_ref().is_none_or(|b| b.len() != total) {
                // Drop (and so free, after its last copy) the old buffer first.
                *slot = None;
                // SAFETY: every element is written below before the copy reads it.
                let buf = unsafe { copy.context().alloc_pinned::<T>(total) }
                    .map_err(|e| err("page-locked allocation", &e))?;
                *slot = Some(buf);
            }
            let Some(buf) = slot.as_mut() else {
                return Err(err("buffer", &"missing"));
            };
            // Waits for the previous copy out of this buffer, then fills it by clip in
            // parallel (the packing is host time the device may be waiting for).
            let host = buf
                .as_mut_slice()
                .map_err(|e| err("waiting for the last copy", &e))?;
            let threads = std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .clamp(1, 8)
                .min(clips.len().max(1));
            let per_thread = clips.len().div_ceil(threads).max(1);
            std::thread::scope(|scope| {
                for (dst, src) in host
                    .chunks_mut(per_thread * per_clip)
                    .zip(clips.chunks(per_thread))
                {
                    let fill = &fill;
                    scope.spawn(move || {
                        for (d, s) in dst.chunks_exact_mut(per_clip).zip(src) {
                            fill(d, s);
                        }
                    });
                }
            });
            // Allocated on the copy stream, which writes it: stream-ordered memory may only be
            // touched in its stream's order, and on the compute stream the pool could hand out
            // memory that step's queued kernels still use (freed in stream order, not yet run)
            // while the copy would write it at once.
            // SAFETY: the copy below writes all `total` elements.
            let mut out = unsafe { copy.alloc::<T>(total) }.map_err(|e| err("device", &e))?;
            copy.memcpy_htod(&*buf, &mut out)
                .map_err(|e| err("host-to-device copy", &e))?;
            // Then handed to the compute stream: it waits for the copy (queued after the work
            // already on it, so the copy still overlaps that), and the slice becomes its own.
            // candle's raw-pointer paths (casts, `cat`'s copies, ...) order and record through
            // the slice's stream, and the buffer is freed there after its last reader.
            let compute = dev.cuda_stream();
            let copied = copy.record_event(None).map_err(|e| err("copy event", &e))?;
            compute
                .wait(&copied)
                .map_err(|e| err("waiting for the copy", &e))?;
            let ptr = out.leak();
            // SAFETY: `ptr` holds the `total` elements of `T` the copy writes, which the compute
            // stream now waits for; the leaked slice gave up ownership, which this one takes
            // (and frees on the compute stream).
            let out = unsafe { compute.upgrade_device_ptr::<T>(ptr, total) };
            let storage = CudaStorage::wrap_cuda_slice(out, dev.clone());
            Ok(Tensor::from_storage(
                Storage::Cuda(storage),
                shape,
                BackpropOp::none(),
                false,
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stacks_clips_in_order_and_dtype() {
        let a: Vec<f32> = (0..24).map(|i| i as f32 * 0.5).collect();
        let b: Vec<f32> = (0..24).map(|i| -(i as f32) - 0.25).collect();
        let s = ClipStager::new(&Device::Cpu);
        let t = s.stage(&[&a, &b], (3, 2, 2, 2), DType::F32).unwrap();
        assert_eq!(t.dims(), &[2, 3, 2, 2, 2]);
        let flat = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert_eq!(&flat[..24], &a[..]);
        assert_eq!(&flat[24..], &b[..]);
        let h = s.stage(&[&a, &b], (3, 2, 2, 2), DType::BF16).unwrap();
        assert_eq!(h.dtype(), DType::BF16);
        let back = h.to_dtype(DType::F32).unwrap().flatten_all().unwrap();
        // These values are exact in bf16.
        assert_eq!(back.to_vec1::<f32>().unwrap(), flat);
    }

    #[test]
    fn refuses_an_empty_batch() {
        let e = ClipStager::new(&Device::Cpu)
            .stage(&[], (3, 2, 2, 2), DType::F32)
            .unwrap_err();
        assert!(e.to_string().contains("no clip values"), "{e}");
    }

    #[test]
    fn refuses_a_clip_of_the_wrong_size() {
        let a = vec![0f32; 24];
        let short = vec![0f32; 23];
        let e = ClipStager::new(&Device::Cpu)
            .stage(&[&a, &short], (3, 2, 2, 2), DType::F32)
            .unwrap_err();
        assert!(e.to_string().contains("clip 1 has 23 values"), "{e}");
    }
}
