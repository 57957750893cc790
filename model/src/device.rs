//! Where a model computes: the CPU, or a CUDA GPU in a binary built with the `cuda` feature.
//!
//! Written `cpu`, `cuda` (device 0) or `cuda:N`, as torch names devices, so the same string
//! works in a config (`workers.device`) and on the command line (`--device`). A CUDA device
//! asked of a CPU-only build is refused when the setting is parsed, before any work.

use std::fmt;
use std::str::FromStr;

use candle_core::Device;

use crate::ModelError;

/// Whether this binary has the CUDA kernels (the `cuda` cargo feature).
pub const CUDA_BUILT: bool = cfg!(feature = "cuda");

/// A compute device by name; [`ComputeDevice::open`] makes the candle device.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ComputeDevice {
    /// The CPU (candle's CPU backend and our CPU kernels).
    #[default]
    Cpu,
    /// CUDA device with this ordinal.
    Cuda(usize),
}

impl ComputeDevice {
    /// Parses `cpu`, `cuda` or `cuda:N`; refuses CUDA in a build without the `cuda` feature.
    /// The error says what is accepted.
    pub fn parse(s: &str) -> Result<Self, ModelError> {
        let dev = match s.trim() {
            "cpu" => ComputeDevice::Cpu,
            "cuda" => ComputeDevice::Cuda(0),
            other => match other.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => ComputeDevice::Cuda(n),
                _ => {
                    return Err(ModelError::Config(format!(
                        "device `{s}`: expected cpu, cuda or cuda:N"
                    )));
                }
            },
        };
        if dev.is_cuda() && !CUDA_BUILT {
            return Err(ModelError::Unsupported(format!(
                "device `{s}`: this binary was built without the `cuda` feature \
                 (cargo build --release -p vjepa-pipeline --features cuda)"
            )));
        }
        Ok(dev)
    }

    /// Whether it is a GPU.
    pub fn is_cuda(self) -> bool {
        matches!(self, ComputeDevice::Cuda(_))
    }

    /// The candle device. A CUDA device is set up for training: its memory pool keeps freed
    /// memory (see `kernels::cuda::keep_pool_memory`), so steps do not re-map their
    /// activations after every synchronisation. Each ordinal is opened once per process and
    /// shared: candle gives every `Device::new_cuda` a new identity, and tensors of two
    /// identities refuse to meet in one op even on the same GPU (e.g. a probe head opened
    /// beside its backbone), besides each bringing its own kernel modules and handles.
    pub fn open(self) -> Result<Device, ModelError> {
        match self {
            ComputeDevice::Cpu => Ok(Device::Cpu),
            ComputeDevice::Cuda(n) => open_cuda(n),
        }
    }
}

#[cfg(feature = "cuda")]
fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    use std::collections::HashMap;
    use std::sync::{Mutex, OnceLock};
    static OPEN: OnceLock<Mutex<HashMap<usize, Device>>> = OnceLock::new();
    let mut open = OPEN
        .get_or_init(Default::default)
        .lock()
        .map_err(|_| ModelError::Input("the open CUDA devices' lock is poisoned".into()))?;
    if let Some(dev) = open.get(&ordinal) {
        return Ok(dev.clone());
    }
    let dev = Device::new_cuda(ordinal)
        .map_err(|e| ModelError::Unsupported(format!("no CUDA device {ordinal}: {e}")))?;
    if let Device::Cuda(d) = &dev {
        crate::kernels::cuda::keep_pool_memory(d)?;
    }
    open.insert(ordinal, dev.clone());
    Ok(dev)
}

#[cfg(not(feature = "cuda"))]
fn open_cuda(ordinal: usize) -> Result<Device, ModelError> {
    Err(ModelError::Unsupported(format!(
        "device cuda:{ordinal}: this binary was built without the `cuda` feature"
    )))
}

impl FromStr for ComputeDevice {
    type Err = ModelError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl fmt::Display for ComputeDevice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ComputeDevice::Cpu => f.write_str("cpu"),
            ComputeDevice::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_parse_and_print() {
        assert_eq!(ComputeDevice::parse("cpu").unwrap(), ComputeDevice::Cpu);
        assert_eq!(ComputeDevice::parse(" cpu ").unwrap().to_string(), "cpu");
        assert!(
            ComputeDevice::parse("cpu")
                .unwrap()
                .open()
                .unwrap()
                .is_cpu()
        );
        for bad in ["gpu", "cuda:", "cuda:x", "cuda:-1", "CPU", "", "cuda0"] {
            let e = ComputeDevice::parse(bad).unwrap_err().to_string();
            assert!(e.contains("expected cpu, cuda or cuda:N"), "{bad}: {e}");
        }
        for (s, n) in [("cuda", 0), ("cuda:0", 0), ("cuda:3", 3)] {
            let parsed = ComputeDevice::parse(s);
            assert_eq!(parsed.is_ok(), CUDA_BUILT, "{s}: {parsed:?}");
            match parsed {
                Ok(d) => {
                    assert_eq!(d, ComputeDevice::Cuda(n));
                    assert_eq!(d.to_string(), format!("cuda:{n}"));
                }
                Err(e) => assert!(e.to_string().contains("without the `cuda` feature"), "{e}"),
            }
        }
    }
}
