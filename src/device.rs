//! `--device` and `--mixed_precision`, shared by sprint-prep, sprint-train, validation and sprint-bench.

use candle_core::{DType, Device};

use crate::{Error, Result};

/// `--mixed_precision`: the dtype models compute in ([`MixedPrecision::dtype`]). `no` is f32 everywhere. `bf16`
/// means, per binary: sprint-prep runs Gemma-2 in bf16 as the reference script does (the DC-AE encoder always
/// runs in f32, as in the reference); sprint-train runs the teacher and the student in bf16 over f32 master weights
/// and f32 AdamW state (the small discriminator heads stay f32: the teacher's features are cast to f32 for them),
/// and its validation encodes the prompts with Gemma-2 and samples the student in bf16 (the DC-AE decoder stays
/// f32); sprint-bench measures the same work in bf16.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize,
)]
#[serde(rename_all = "lowercase")]
pub enum MixedPrecision {
    No,
    Bf16,
}

impl MixedPrecision {
    pub fn name(self) -> &'static str {
        match self {
            MixedPrecision::No => "no",
            MixedPrecision::Bf16 => "bf16",
        }
    }

    /// The compute dtype: f32 for `no`, bf16 for `bf16`.
    pub fn dtype(self) -> DType {
        match self {
            MixedPrecision::No => DType::F32,
            MixedPrecision::Bf16 => DType::BF16,
        }
    }
}

/// `cuda` when built with the CUDA feature, else `cpu`.
pub fn default_device() -> &'static str {
    if cfg!(feature = "cuda") {
        "cuda"
    } else {
        "cpu"
    }
}

/// Parses `cpu`, `cuda` or `cuda:N`.
pub fn parse_device(s: &str) -> Result<Device> {
    match s {
        "cpu" => Ok(Device::Cpu),
        _ if s == "cuda" || s.starts_with("cuda:") => {
            let ordinal: usize = s
                .strip_prefix("cuda:")
                .map(|n| {
                    n.parse()
                        .map_err(|_| Error::Arg(format!("bad device {s:?}: expected cuda:N")))
                })
                .transpose()?
                .unwrap_or(0);
            if !cfg!(feature = "cuda") {
                return Err(Error::Arg(format!(
                    "--device {s}: this binary was built without CUDA; rebuild with `cargo build --release --features cuda` or use --device cpu"
                )));
            }
            let device = Device::new_cuda(ordinal)?;
            configure_memory_pool(&device)?;
            Ok(device)
        }
        _ => Err(Error::Arg(format!(
            "bad device {s:?}: expected cpu, cuda or cuda:N"
        ))),
    }
}

/// Environment variable that sets the CUDA memory pool's release threshold in bytes: `keep` (the default) keeps
/// everything the pool has reserved, `0` is the driver's own default (memory goes back to the driver at every
/// synchronisation), a number keeps that many bytes. Meant for measuring the difference (`sprint-bench`).
pub const POOL_RELEASE_ENV: &str = "SANA_SPRINT_CUDA_POOL_RELEASE";

/// The release threshold [`POOL_RELEASE_ENV`] asks for (`u64::MAX` = keep all).
pub fn pool_release_threshold() -> Result<u64> {
    match std::env::var(POOL_RELEASE_ENV) {
        Err(_) => Ok(u64::MAX),
        Ok(v) if v.is_empty() || v == "keep" => Ok(u64::MAX),
        Ok(v) => v.parse().map_err(|_| {
            Error::Arg(format!(
                "{POOL_RELEASE_ENV}={v:?}: expected `keep` or a number of bytes (0 = the driver's default)"
            ))
        }),
    }
}

/// Figures of the CUDA memory pool that candle's allocations come from (cudarc allocates with
/// `cuMemAllocAsync` on the device's default pool). `used` is what live tensors hold, `reserved` what the pool
/// holds from the driver; `*_high` are the peaks since the device was created or [`reset_pool_peaks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct PoolStats {
    pub used_bytes: u64,
    pub used_high_bytes: u64,
    pub reserved_bytes: u64,
    pub reserved_high_bytes: u64,
    pub release_threshold_bytes: u64,
}

#[cfg(feature = "cuda")]
mod pool {
    use candle_core::cuda_backend::cudarc::driver::sys;
    use candle_core::Device;

    use super::PoolStats;
    use crate::{Error, Result};

    type Attr = sys::CUmemPool_attribute;

    fn default_pool(device: &Device) -> Result<Option<sys::CUmemoryPool>> {
        let Device::Cuda(cuda) = device else {
            return Ok(None);
        };
        let dev = cuda.cuda_stream().context().cu_device();
        let mut pool: sys::CUmemoryPool = std::ptr::null_mut();
        check(
            unsafe { sys::cuDeviceGetDefaultMemPool(&mut pool, dev) },
            "cuDeviceGetDefaultMemPool",
        )?;
        Ok(Some(pool))
    }

    fn check(r: sys::CUresult, what: &str) -> Result<()> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(Error::Arg(format!(
                "CUDA memory pool: {what} failed: {r:?}"
            )))
        }
    }

    fn get(pool: sys::CUmemoryPool, attr: Attr) -> Result<u64> {
        let mut v: u64 = 0;
        check(
            unsafe { sys::cuMemPoolGetAttribute(pool, attr, (&mut v as *mut u64).cast()) },
            "cuMemPoolGetAttribute",
        )?;
        Ok(v)
    }

    fn set(pool: sys::CUmemoryPool, attr: Attr, mut v: u64) -> Result<()> {
        check(
            unsafe { sys::cuMemPoolSetAttribute(pool, attr, (&mut v as *mut u64).cast()) },
            "cuMemPoolSetAttribute",
        )
    }

    pub fn configure(device: &Device, threshold: u64) -> Result<()> {
        if let Some(pool) = default_pool(device)? {
            set(pool, Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD, threshold)?;
        }
        Ok(())
    }

    pub fn stats(device: &Device) -> Result<Option<PoolStats>> {
        let Some(pool) = default_pool(device)? else {
            return Ok(None);
        };
        Ok(Some(PoolStats {
            used_bytes: get(pool, Attr::CU_MEMPOOL_ATTR_USED_MEM_CURRENT)?,
            used_high_bytes: get(pool, Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH)?,
            reserved_bytes: get(pool, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_CURRENT)?,
            reserved_high_bytes: get(pool, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH)?,
            release_threshold_bytes: get(pool, Attr::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD)?,
        }))
    }

    pub fn reset_peaks(device: &Device) -> Result<()> {
        if let Some(pool) = default_pool(device)? {
            // the driver accepts only 0 for the high-water marks: they restart from the current value
            set(pool, Attr::CU_MEMPOOL_ATTR_USED_MEM_HIGH, 0)?;
            set(pool, Attr::CU_MEMPOOL_ATTR_RESERVED_MEM_HIGH, 0)?;
        }
        Ok(())
    }
}

/// Sets the release threshold of a CUDA device's default memory pool ([`pool_release_threshold`]; no-op
/// elsewhere). The driver's default, 0, hands all free pool memory back at every synchronisation, so each
/// training step would ask the driver again for the gigabytes it freed; `parse_device` calls this for every
/// CUDA device it opens.
/// A driver that refuses the setting (no memory-pool support) is not an error: the run goes on with the
/// driver's behaviour and a warning.
pub fn configure_memory_pool(device: &Device) -> Result<()> {
    let threshold = pool_release_threshold()?;
    #[cfg(feature = "cuda")]
    if let Err(e) = pool::configure(device, threshold) {
        tracing::warn!("{e}; the memory pool keeps the driver's release threshold");
    }
    #[cfg(not(feature = "cuda"))]
    let _ = (device, threshold);
    Ok(())
}

/// The default memory pool's figures of a CUDA device; `None` on other devices.
pub fn pool_stats(device: &Device) -> Result<Option<PoolStats>> {
    #[cfg(feature = "cuda")]
    return pool::stats(device);
    #[cfg(not(feature = "cuda"))]
    {
        let _ = device;
        Ok(None)
    }
}

/// Restarts the pool's high-water marks ([`PoolStats::used_high_bytes`], `reserved_high_bytes`) from now.
pub fn reset_pool_peaks(device: &Device) -> Result<()> {
    #[cfg(feature = "cuda")]
    pool::reset_peaks(device)?;
    #[cfg(not(feature = "cuda"))]
    let _ = device;
    Ok(())
}

#[cfg(test)]
mod pool_tests {
    use super::*;

    #[test]
    fn release_threshold_from_the_environment() {
        // one test owns the variable (tests run in threads of one process)
        std::env::remove_var(POOL_RELEASE_ENV);
        assert_eq!(pool_release_threshold().unwrap(), u64::MAX);
        std::env::set_var(POOL_RELEASE_ENV, "keep");
        assert_eq!(pool_release_threshold().unwrap(), u64::MAX);
        std::env::set_var(POOL_RELEASE_ENV, "0");
        assert_eq!(pool_release_threshold().unwrap(), 0);
        std::env::set_var(POOL_RELEASE_ENV, "1073741824");
        assert_eq!(pool_release_threshold().unwrap(), 1 << 30);
        std::env::set_var(POOL_RELEASE_ENV, "lots");
        let err = pool_release_threshold().unwrap_err().to_string();
        assert!(
            err.contains(POOL_RELEASE_ENV) && err.contains("keep"),
            "{err}"
        );
        std::env::remove_var(POOL_RELEASE_ENV);
        assert_eq!(pool_stats(&Device::Cpu).unwrap(), None);
    }
}
