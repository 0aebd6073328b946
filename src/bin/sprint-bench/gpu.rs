//! What the device does while a measurement runs: GPU utilisation and memory sampled from `nvidia-smi` every
//! 100 ms, and (CUDA builds) the device's used memory from the driver (`cuMemGetInfo` through candle's
//! cudarc) every 50 ms. candle has no allocator statistics, so the peak is the highest device-wide used memory
//! seen, which includes the CUDA context (~0.5 GiB) and anything else running on the GPU.
//!
//! `SPRINT_BENCH_NVIDIA_SMI` names another `nvidia-smi` (tests use a script that prints fixed numbers).

use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use candle_core::Device;

/// One reading.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    pub at: Instant,
    /// `utilization.gpu`: percent of the last sample period in which a kernel was running.
    pub util_pct: Option<f64>,
    /// Device memory in use, MiB.
    pub mem_mib: Option<f64>,
}

/// The `nvidia-smi` to call.
pub fn nvidia_smi() -> String {
    std::env::var("SPRINT_BENCH_NVIDIA_SMI").unwrap_or_else(|_| "nvidia-smi".into())
}

/// `nvidia-smi --query-gpu=FIELDS --format=csv,noheader,nounits [-i N]`: the fields of the first line.
pub fn query(fields: &str, ordinal: Option<usize>) -> Option<Vec<String>> {
    let mut cmd = Command::new(nvidia_smi());
    cmd.arg(format!("--query-gpu={fields}"))
        .arg("--format=csv,noheader,nounits");
    if let Some(i) = ordinal {
        cmd.arg("-i").arg(i.to_string());
    }
    let out = cmd.output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().next()?;
    Some(line.split(',').map(|s| s.trim().to_string()).collect())
}

/// The accelerator's name: from the driver for a CUDA device, else "cpu (N threads)".
pub fn card_name(device: &Device) -> String {
    match device {
        Device::Cpu => format!("cpu ({} threads)", rayon::current_num_threads()),
        _ => cuda_name(device)
            .or_else(|| query("name", ordinal(device)).and_then(|f| f.into_iter().next()))
            .unwrap_or_else(|| "unknown GPU".into()),
    }
}

/// The CUDA ordinal of a device.
pub fn ordinal(device: &Device) -> Option<usize> {
    match device.location() {
        candle_core::DeviceLocation::Cuda { gpu_id } => Some(gpu_id),
        _ => None,
    }
}

#[cfg(feature = "cuda")]
fn cuda_name(device: &Device) -> Option<String> {
    device
        .as_cuda_device()
        .ok()?
        .cuda_stream()
        .context()
        .name()
        .ok()
}

#[cfg(not(feature = "cuda"))]
fn cuda_name(_: &Device) -> Option<String> {
    None
}

/// (free, total) device memory in bytes from the driver, for CUDA devices.
#[cfg(feature = "cuda")]
pub fn mem_info(device: &Device) -> Option<(usize, usize)> {
    device
        .as_cuda_device()
        .ok()?
        .cuda_stream()
        .context()
        .mem_get_info()
        .ok()
}

#[cfg(not(feature = "cuda"))]
pub fn mem_info(_: &Device) -> Option<(usize, usize)> {
    None
}

/// Background samplers started by [`Sampler::start`]; [`Sampler::stop`] returns what they saw.
pub struct Sampler {
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    seen: SharedSamples,
}

/// The readings so far, shared with the sampling threads.
pub type SharedSamples = Arc<Mutex<Samples>>;

/// The readings of a run.
#[derive(Debug, Default, Clone)]
pub struct Samples {
    pub smi: Vec<Sample>,
    pub driver: Vec<Sample>,
}

impl Sampler {
    /// Starts sampling `device` (nothing is sampled for the CPU unless `SPRINT_BENCH_NVIDIA_SMI` is set).
    pub fn start(device: &Device) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let seen = SharedSamples::default();
        let mut threads = Vec::new();
        if !device.is_cpu() || std::env::var_os("SPRINT_BENCH_NVIDIA_SMI").is_some() {
            let (stop, seen, gpu) = (stop.clone(), seen.clone(), ordinal(device));
            threads.push(std::thread::spawn(move || {
                poll(&stop, Duration::from_millis(100), || {
                    let s = smi_sample(gpu)?;
                    seen.lock().ok()?.smi.push(s);
                    Some(())
                })
            }));
        }
        if mem_info(device).is_some() {
            let (stop, seen, device) = (stop.clone(), seen.clone(), device.clone());
            threads.push(std::thread::spawn(move || {
                poll(&stop, Duration::from_millis(50), || {
                    let (free, total) = mem_info(&device)?;
                    seen.lock().ok()?.driver.push(Sample {
                        at: Instant::now(),
                        util_pct: None,
                        mem_mib: Some((total - free) as f64 / 1048576.0),
                    });
                    Some(())
                })
            }));
        }
        Self {
            stop,
            threads,
            seen,
        }
    }

    /// The readings so far, readable while sampling goes on.
    pub fn shared(&self) -> SharedSamples {
        self.seen.clone()
    }

    /// Stops the samplers and returns their readings.
    pub fn stop(self) -> Samples {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.threads {
            let _ = t.join();
        }
        snapshot(&self.seen)
    }
}

/// A copy of the readings so far.
pub fn snapshot(seen: &SharedSamples) -> Samples {
    seen.lock().map(|s| s.clone()).unwrap_or_default()
}

/// Calls `read` every `every` until stopped; gives up at once when the first reading fails (nvidia-smi absent).
fn poll(stop: &AtomicBool, every: Duration, mut read: impl FnMut() -> Option<()>) {
    let mut any = false;
    while !stop.load(Ordering::Relaxed) {
        let started = Instant::now();
        match read() {
            Some(()) => any = true,
            None if !any => return,
            None => {}
        }
        std::thread::sleep(every.saturating_sub(started.elapsed()));
    }
}

fn smi_sample(gpu: Option<usize>) -> Option<Sample> {
    let f = query("utilization.gpu,memory.used", gpu)?;
    let num = |i: usize| f.get(i).and_then(|v| v.parse::<f64>().ok());
    Some(Sample {
        at: Instant::now(),
        util_pct: num(0),
        mem_mib: num(1),
    })
}

impl Samples {
    /// Mean `utilization.gpu` over the readings taken in [from, to] (None without readings).
    pub fn busy_pct(&self, from: Instant, to: Instant) -> Option<f64> {
        let v: Vec<f64> = self
            .smi
            .iter()
            .filter(|s| s.at >= from && s.at <= to)
            .filter_map(|s| s.util_pct)
            .collect();
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Highest used device memory seen, GiB, and where it was read: the driver when sampled, else nvidia-smi.
    pub fn peak_mem_gib(&self) -> Option<(f64, &'static str)> {
        let peak = |v: &[Sample]| {
            v.iter()
                .filter_map(|s| s.mem_mib)
                .fold(None, |m: Option<f64>, x| Some(m.map_or(x, |m| m.max(x))))
                .map(|mib| mib / 1024.0)
        };
        peak(&self.driver)
            .map(|g| (g, "cuMemGetInfo (device-wide used)"))
            .or_else(|| peak(&self.smi).map(|g| (g, "nvidia-smi memory.used")))
    }

    /// Used device memory before the run started (the first reading), GiB.
    pub fn baseline_mem_gib(&self) -> Option<f64> {
        self.driver
            .first()
            .or(self.smi.first())
            .and_then(|s| s.mem_mib)
            .map(|m| m / 1024.0)
    }
}
