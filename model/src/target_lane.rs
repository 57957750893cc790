//! A thread of its own for the target encoder's pass, so that on a GPU it runs on a second
//! stream beside the two context passes (issue 10: "the target encoder's full-clip pass and
//! the two context passes scheduled to keep the GPU busy").
//!
//! Why a thread: candle's CUDA device launches every op on the calling thread's default stream,
//! so work queued from another host thread lands on another stream, with the same device and
//! tensors: the target pass needs no autograd state and shares nothing with the context passes
//! but the clips (read by both) and its output (read by the loss). Ordering between the streams
//! is two explicit markers, not cudarc's per-buffer events: those order a buffer's readers
//! after its writer only when the writer took it as `&mut`, and candle's kernels (and ours)
//! take their outputs as `&`, so no write event is ever recorded for them. So the lane's
//! stream first waits for everything the caller's stream had queued when the pass was handed
//! over (the clips, last step's optimiser and EMA writes), and when the caller takes the
//! result ([`Pending::wait`]) its stream waits for everything the lane queued for the job:
//! what the caller queues after that (the loss reading the targets, the EMA rewriting the
//! weights the pass read, frees) runs after the pass, while the context passes queued before
//! it still overlap it. A second host thread also queues the pass's launches beside the main
//! thread's, halving the host time per step where candle's per-op overhead is what keeps the
//! GPU waiting.
//!
//! The thread lives as long as the model: cuBLAS and cuBLASLt handles, workspaces and plans are
//! per thread, and a thread per step would rebuild them every step. On the CPU the lane runs
//! the same pass on its thread (same results to the bit, no gain: the CPU kernels already use
//! every core); the tests use that to check the hand-over.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread::JoinHandle;

use candle_core::Device;

use crate::ModelError;

type Job = Box<dyn FnOnce() + Send>;

/// The lane: one worker thread running the jobs handed to it, in order.
pub(crate) struct TargetLane {
    jobs: Option<mpsc::Sender<Job>>,
    thread: Option<JoinHandle<()>>,
    /// Jobs started so far (tests check that the pass really took the lane).
    done: Arc<AtomicUsize>,
    /// On a GPU: an extra stream kept open so that cudarc tracks events per buffer (it does
    /// only once a context has more than one stream).
    #[cfg(feature = "cuda")]
    _tracking: Option<std::sync::Arc<candle_core::cuda_backend::cudarc::driver::CudaStream>>,
}

/// What a job sends back: its result and the point in the lane's stream after its work.
type Done<T> = (Result<T, ModelError>, Result<StreamMarker, ModelError>);

/// The result of a job, to wait for. Dropped without [`Pending::wait`] (a step that failed
/// before taking it), it still joins the lane's stream, so that the caller frees nothing the
/// pass may still be reading or writing.
pub(crate) struct Pending<T> {
    rx: Option<mpsc::Receiver<Done<T>>>,
    device: Device,
}

impl<T> Pending<T> {
    /// Blocks the host until the job has been queued (on a GPU: its launches, not their
    /// completion), makes the calling thread's stream wait for that work, and returns the
    /// job's result.
    pub(crate) fn wait(mut self) -> Result<T, ModelError> {
        let rx = self.rx.take();
        Self::join(rx, &self.device)
    }

    fn join(rx: Option<mpsc::Receiver<Done<T>>>, device: &Device) -> Result<T, ModelError> {
        let (result, marker) = rx
            .ok_or_else(|| ModelError::Input("the target lane's result was taken".into()))?
            .recv()
            .map_err(|_| ModelError::Input("the target lane stopped before its result".into()))?;
        // Joined whatever the job's outcome: even a failed pass may have queued work on
        // buffers the caller frees next. Where the marker itself failed, the whole device is
        // waited for before the result (the lane's tensors) can be dropped.
        if let Err(e) = marker.and_then(|m| m.wait_here(device)) {
            sync_device(device);
            return Err(e);
        }
        result
    }
}

impl<T> Drop for Pending<T> {
    fn drop(&mut self) {
        if let Some(rx) = self.rx.take()
            && let Err(e) = Self::join(Some(rx), &self.device)
        {
            tracing::debug!("target lane result dropped: {e}");
        }
    }
}

impl TargetLane {
    /// A lane for work on `device`.
    pub(crate) fn new(device: &Device) -> Result<Self, ModelError> {
        #[cfg(feature = "cuda")]
        let tracking = match device {
            Device::Cuda(d) => Some(
                d.cuda_stream()
                    .context()
                    .new_stream()
                    .map_err(|e| ModelError::Input(format!("target lane: {e}")))?,
            ),
            _ => None,
        };
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        let (tx, rx) = mpsc::channel::<Job>();
        let done = Arc::new(AtomicUsize::new(0));
        let counter = done.clone();
        let thread = std::thread::Builder::new()
            .name("target-lane".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // Counted before it runs: its result is sent from inside it.
                    counter.fetch_add(1, Ordering::Relaxed);
                    job();
                }
            })
            .map_err(|e| ModelError::Input(format!("cannot start the target lane: {e}")))?;
        Ok(Self {
            jobs: Some(tx),
            thread: Some(thread),
            done,
            #[cfg(feature = "cuda")]
            _tracking: tracking,
        })
    }

    /// Jobs this lane has started.
    pub(crate) fn jobs_run(&self) -> usize {
        self.done.load(Ordering::Relaxed)
    }

    /// Hands `f` to the lane. On a GPU the lane's stream first waits for everything queued so
    /// far on the calling thread's stream of `device`; [`Pending::wait`] joins back.
    pub(crate) fn run<T: Send + 'static>(
        &self,
        device: &Device,
        f: impl FnOnce() -> Result<T, ModelError> + Send + 'static,
    ) -> Result<Pending<T>, ModelError> {
        let marker = StreamMarker::here(device)?;
        let device_for_wait = device.clone();
        let device = device.clone();
        let (tx, rx) = mpsc::channel();
        let job: Job = Box::new(move || {
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                marker.wait_here(&device)?;
                f()
            }))
            .unwrap_or_else(|_| Err(ModelError::Input("the target pass panicked".into())));
            // Recorded on this thread, so on the lane's stream, after everything the job queued.
            let done = StreamMarker::here(&device);
            let _ = tx.send((r, done));
        });
        self.jobs
            .as_ref()
            .ok_or_else(|| ModelError::Input("the target lane is closed".into()))?
            .send(job)
            .map_err(|_| ModelError::Input("the target lane stopped".into()))?;
        Ok(Pending {
            rx: Some(rx),
            device: device_for_wait,
        })
    }
}

impl Drop for TargetLane {
    fn drop(&mut self) {
        drop(self.jobs.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// Waits for everything queued on `device` by any thread (the fallback join; errors are only
/// logged: the caller is already failing).
fn sync_device(device: &Device) {
    #[cfg(feature = "cuda")]
    if let Device::Cuda(d) = device
        && let Err(e) = d.cuda_stream().context().synchronize()
    {
        tracing::warn!("target lane: synchronising the device failed: {e}");
    }
    #[cfg(not(feature = "cuda"))]
    let _ = device;
}

/// A point in the calling thread's stream of work on a GPU (nothing on the CPU, where every op
/// has finished when it returns).
struct StreamMarker {
    #[cfg(feature = "cuda")]
    event: Option<candle_core::cuda_backend::cudarc::driver::CudaEvent>,
}

impl StreamMarker {
    /// Marks the work queued so far on the calling thread's stream of `device`.
    fn here(device: &Device) -> Result<Self, ModelError> {
        #[cfg(feature = "cuda")]
        {
            let event = match device {
                Device::Cuda(d) => Some(
                    d.cuda_stream()
                        .record_event(None)
                        .map_err(|e| ModelError::Input(format!("target lane marker: {e}")))?,
                ),
                _ => None,
            };
            Ok(Self { event })
        }
        #[cfg(not(feature = "cuda"))]
        {
            let _ = device;
            Ok(Self {})
        }
    }

    /// Makes the calling thread's stream of `device` wait for the marked work.
    fn wait_here(&self, device: &Device) -> Result<(), ModelError> {
        #[cfg(feature = "cuda")]
        if let (Some(ev), Device::Cuda(d)) = (&self.event, device) {
            d.cuda_stream()
                .wait(ev)
                .map_err(|e| ModelError::Input(format!("target lane wait: {e}")))?;
        }
        #[cfg(not(feature = "cuda"))]
        let _ = device;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn jobs_run_in_order_on_another_thread_and_errors_come_back() {
        let lane = TargetLane::new(&Device::Cpu).unwrap();
        let main = std::thread::current().id();
        let a = lane
            .run(
                &Device::Cpu,
                move || Ok(std::thread::current().id() != main),
            )
            .unwrap();
        let b = lane
            .run(&Device::Cpu, || -> Result<u8, ModelError> {
                Err(ModelError::Input("boom".into()))
            })
            .unwrap();
        let c = lane
            .run(&Device::Cpu, || -> Result<u8, ModelError> {
                panic!("inside")
            })
            .unwrap();
        assert!(a.wait().unwrap());
        assert!(b.wait().unwrap_err().to_string().contains("boom"));
        assert!(c.wait().unwrap_err().to_string().contains("panicked"));
        // Still serving after a panic, and a result dropped unread still lets the lane go on.
        drop(lane.run(&Device::Cpu, || Ok(6)).unwrap());
        assert_eq!(lane.run(&Device::Cpu, || Ok(7)).unwrap().wait().unwrap(), 7);
        assert_eq!(lane.jobs_run(), 5);
    }
}
