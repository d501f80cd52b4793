//! Where models run and in what precision: `--device`, `--dtype`, and byte sizes (`--kv-cache-memory`).
use std::str::FromStr;

use crate::models::Device;

/// A byte count from the command line: `1073741824`, `512MiB`, `8GiB`, `2GB`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl FromStr for ByteSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let mult: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" => 1 << 10,
            "MiB" => 1 << 20,
            "GiB" => 1 << 30,
            "KB" => 1_000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            other => {
                return Err(format!(
                    "unknown unit `{other}` in `{s}` (use B, KiB, MiB, GiB, KB, MB, GB)"
                ))
            }
        };
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .map(ByteSize)
            .ok_or_else(|| format!("`{s}` is not a byte count"))
    }
}

/// The `--dtype` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DtypeChoice {
    Auto,
    F32,
    Bf16,
    F16,
}

impl DtypeChoice {
    pub fn dtype(self) -> Option<candle_core::DType> {
        match self {
            DtypeChoice::Auto => None,
            DtypeChoice::F32 => Some(candle_core::DType::F32),
            DtypeChoice::Bf16 => Some(candle_core::DType::BF16),
            DtypeChoice::F16 => Some(candle_core::DType::F16),
        }
    }
}

/// The `--device` choice.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}

impl DeviceChoice {
    /// Open the device models load on.
    pub fn open(self) -> Result<Device, String> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Cuda => open_cuda(),
            DeviceChoice::Auto if cfg!(feature = "cuda") => open_cuda().or_else(|e| {
                tracing::warn!("{e}; running on the CPU (--device cuda makes this an error)");
                Ok(Device::Cpu)
            }),
            DeviceChoice::Auto => Ok(Device::Cpu),
        }
    }
}

/// Every GPU a chat model's layers are split across: `first` (from [`DeviceChoice::open`]) and, when
/// it is a GPU, every other GPU CUDA_VISIBLE_DEVICES leaves visible.
pub fn all_devices(first: &Device) -> Result<Vec<Device>, String> {
    #[cfg(feature = "cuda")]
    if first.is_cuda() {
        use candle_core::cuda_backend::cudarc::driver::CudaContext;
        let count = CudaContext::device_count()
            .map_err(|e| format!("cannot count the visible GPUs: {e}"))?;
        let mut devices = vec![first.clone()];
        for ordinal in 1..count.max(1) as usize {
            devices.push(
                Device::new_cuda(ordinal)
                    .map_err(|e| format!("cannot open CUDA device {ordinal}: {e}"))?,
            );
        }
        return Ok(devices);
    }
    Ok(vec![first.clone()])
}

/// CUDA numbers the GPUs that CUDA_VISIBLE_DEVICES leaves visible from 0 (in Kubernetes, the ones
/// the device plugin allocated), so ordinal 0 is always the first GPU this process may use.
#[cfg(feature = "cuda")]
fn open_cuda() -> Result<Device, String> {
    let visible = std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_else(|_| "<unset>".into());
    Device::new_cuda(0)
        .map_err(|e| format!("cannot open CUDA device 0 (CUDA_VISIBLE_DEVICES={visible}): {e}"))
}

#[cfg(not(feature = "cuda"))]
fn open_cuda() -> Result<Device, String> {
    Err("--device cuda needs a glm-inference built with `--features cuda`".into())
}
