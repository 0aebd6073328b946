//! The process group of a data-parallel run: the TCP ring ([`TcpRing`]: rendezvous, barriers, the few host
//! values such as losses and weight checksums) and, for GPU runs, an NCCL communicator on candle's CUDA stream
//! for the gradients.
//!
//! Gradients are averaged in a few large flat buckets, not one collective per tensor: the gradients of the
//! trainable variables, in their fixed order, are concatenated until a bucket holds at least
//! [`BUCKET_ENV`] MiB (default 256), the bucket is summed over the ranks in place, divided by the world size,
//! and each gradient becomes a view of its slice of the bucket.

use std::time::Duration;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};

use super::tcp::TcpRing;
use super::LaunchEnv;
use crate::{Error, Result};

/// Environment variable with the bucket size in MiB of the gradient all-reduce (default 256; 0 puts every
/// gradient in a bucket of its own).
pub const BUCKET_ENV: &str = "SANA_SPRINT_DIST_BUCKET_MIB";

/// The bucket size of [`BUCKET_ENV`], in bytes.
pub fn bucket_bytes_from_env() -> Result<usize> {
    match std::env::var(BUCKET_ENV) {
        Err(_) => Ok(256 << 20),
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|m| m.is_finite() && *m >= 0.0)
            .map(|m| (m * 1048576.0) as usize)
            .ok_or_else(|| {
                Error::Arg(format!(
                    "{BUCKET_ENV}={v:?}: expected a size in MiB (0 or more)"
                ))
            }),
    }
}

/// How the ranks of a run sum their gradients.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The CPU ring over TCP (`--device cpu`).
    Tcp,
    /// NCCL on the GPUs (`--device cuda`, the `nccl` feature).
    Nccl,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Tcp => "tcp",
            Backend::Nccl => "nccl",
        }
    }
}

/// The ranks of one data-parallel run.
pub struct ProcessGroup {
    ring: TcpRing,
    #[cfg(feature = "nccl")]
    nccl: Option<super::nccl::Nccl>,
    bucket_bytes: usize,
}

impl ProcessGroup {
    /// Meets the other ranks at the launcher's master address; on a CUDA device, also creates the NCCL
    /// communicator (rank 0 makes the unique id and hands it out over the ring). Every wait ends after
    /// `timeout` with an error naming the rank and the address waited for.
    pub fn join(env: &LaunchEnv, device: &Device, timeout: Duration) -> Result<ProcessGroup> {
        let bucket_bytes = bucket_bytes_from_env()?;
        if device.is_cpu() {
            let ring = TcpRing::rendezvous(env, timeout)?;
            return Ok(ProcessGroup {
                ring,
                #[cfg(feature = "nccl")]
                nccl: None,
                bucket_bytes,
            });
        }
        #[cfg(feature = "nccl")]
        {
            let mut ring = TcpRing::rendezvous(env, timeout)?;
            let nccl = super::nccl::Nccl::new(&mut ring, device, timeout)?;
            Ok(ProcessGroup {
                ring,
                nccl: Some(nccl),
                bucket_bytes,
            })
        }
        #[cfg(not(feature = "nccl"))]
        Err(Error::Arg(format!(
            "this is rank {} of {} ({:?} variables found) on {device:?}, but this build has no NCCL: build with \
             `--features nccl` (scripts/build-cuda.sh does) to train on several GPUs, or use --device cpu for the \
             CPU collective",
            env.rank, env.world_size, env.launcher
        )))
    }

    pub fn rank(&self) -> usize {
        self.ring.rank()
    }

    pub fn world_size(&self) -> usize {
        self.ring.world_size()
    }

    pub fn backend(&self) -> Backend {
        #[cfg(feature = "nccl")]
        if self.nccl.is_some() {
            return Backend::Nccl;
        }
        Backend::Tcp
    }

    /// The TCP ring, for barriers and host values (losses, checksums).
    pub fn ring(&mut self) -> &mut TcpRing {
        &mut self.ring
    }

    /// The bucket size in bytes ([`BUCKET_ENV`]).
    pub fn bucket_bytes(&self) -> usize {
        self.bucket_bytes
    }

    /// Replaces the gradients of `vars` in `grads` by their mean over the ranks (bucketed, summed in f32: the
    /// trainer's choice, so that W ranks × batch b train as one process × batch W·b).
    pub fn average_gradients(&mut self, grads: &mut GradStore, vars: &[Var]) -> Result<()> {
        self.average_gradients_as(grads, vars, DType::F32)
    }

    /// [`Self::average_gradients`] with the sums in `reduce_dtype` (f32 or bf16; bf16 halves the bytes sent
    /// and rounds every gradient to bf16 once).
    pub fn average_gradients_as(
        &mut self,
        grads: &mut GradStore,
        vars: &[Var],
        reduce_dtype: DType,
    ) -> Result<()> {
        let (world, bucket) = (self.world_size(), self.bucket_bytes);
        #[cfg(feature = "nccl")]
        if let Some(nccl) = self.nccl.as_ref() {
            return nccl.in_flight("averaging the gradients", || {
                average_in_buckets(grads, vars, world, bucket, reduce_dtype, |flat| {
                    nccl.all_reduce_sum(&flat)?;
                    Ok(flat)
                })
            });
        }
        let ring = &mut self.ring;
        average_in_buckets(grads, vars, world, bucket, reduce_dtype, |flat| {
            let (device, dtype) = (flat.device().clone(), flat.dtype());
            let flat = flat.to_dtype(DType::F32)?;
            let mut values = flat.to_vec1::<f32>()?;
            ring.all_reduce_sum(&mut values)?;
            Ok(Tensor::from_vec(values, flat.dims(), &device)?.to_dtype(dtype)?)
        })
    }
}

/// Replaces each gradient of `vars` found in `grads` by `sum(...)/world`: gradients are flattened, cast to
/// `reduce_dtype` and concatenated in the order of `vars` into buckets of at least `bucket_bytes` (the last
/// one smaller); `sum` receives each contiguous 1-D bucket and returns it summed over the ranks. Each gradient
/// then becomes its slice of the bucket, divided by `world`, in its own dtype. Every rank must pass the same
/// set of gradients in the same order.
pub fn average_in_buckets(
    grads: &mut GradStore,
    vars: &[Var],
    world: usize,
    bucket_bytes: usize,
    reduce_dtype: DType,
    mut sum: impl FnMut(Tensor) -> Result<Tensor>,
) -> Result<()> {
    let present: Vec<(&Var, Tensor)> = vars
        .iter()
        .filter_map(|v| grads.get(v.as_tensor()).map(|g| (v, g.clone())))
        .collect();
    let elem = reduce_dtype.size_in_bytes();
    let mut start = 0;
    while start < present.len() {
        let mut end = start;
        let mut bytes = 0;
        while end < present.len() && (end == start || bytes < bucket_bytes) {
            bytes += present[end].1.elem_count() * elem;
            end += 1;
        }
        let parts = present[start..end]
            .iter()
            .map(|(_, g)| g.to_dtype(reduce_dtype)?.flatten_all())
            .collect::<candle_core::Result<Vec<_>>>()?;
        let flat = Tensor::cat(&parts, 0)?;
        drop(parts);
        let summed = sum(flat)?;
        let mean = (summed / world as f64)?;
        let mut offset = 0;
        for (var, g) in &present[start..end] {
            let n = g.elem_count();
            let slice = mean
                .narrow(0, offset, n)?
                .reshape(g.dims())?
                .to_dtype(g.dtype())?;
            grads.insert(var.as_tensor(), slice);
            offset += n;
        }
        start = end;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars_and_grads(shapes: &[&[usize]]) -> (Vec<Var>, GradStore, Vec<Vec<f32>>) {
        let dev = Device::Cpu;
        let vars: Vec<Var> = shapes
            .iter()
            .map(|s| Var::zeros(*s, DType::F32, &dev).unwrap())
            .collect();
        // a GradStore from a real backward: d(sum_i c_i * sum(v_i))/dv_i = c_i everywhere
        let mut loss = Tensor::zeros((), DType::F32, &dev).unwrap();
        for (i, v) in vars.iter().enumerate() {
            loss = (loss + (v.as_tensor().sum_all().unwrap() * (i as f64 + 1.5)).unwrap()).unwrap();
        }
        let mut grads = loss.backward().unwrap();
        // make each gradient distinct element by element
        let mut expected = Vec::new();
        for (i, v) in vars.iter().enumerate() {
            let n = v.elem_count();
            let values: Vec<f32> = (0..n).map(|j| (i * 1000 + j) as f32 * 0.25).collect();
            grads.insert(
                v.as_tensor(),
                Tensor::from_vec(values.clone(), v.dims(), &dev).unwrap(),
            );
            expected.push(values);
        }
        (vars, grads, expected)
    }

    #[test]
    fn buckets_cover_every_gradient_once_in_order() {
        let shapes: &[&[usize]] = &[&[3, 4], &[5], &[2, 2, 2], &[7], &[1]];
        for bucket_bytes in [0, 16, 48, 60, 4096] {
            let (vars, mut grads, expected) = vars_and_grads(shapes);
            let mut sizes = Vec::new();
            // two identical ranks: the sum doubles every value, the mean gives it back
            average_in_buckets(&mut grads, &vars, 2, bucket_bytes, DType::F32, |flat| {
                assert_eq!(flat.rank(), 1);
                sizes.push(flat.elem_count());
                Ok((flat * 2.0)?)
            })
            .unwrap();
            for (i, v) in vars.iter().enumerate() {
                let g = grads.get(v.as_tensor()).unwrap();
                assert_eq!(g.dims(), v.dims(), "bucket {bucket_bytes} var {i}");
                assert_eq!(
                    g.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
                    expected[i]
                );
            }
            assert_eq!(sizes.iter().sum::<usize>(), 12 + 5 + 8 + 7 + 1);
            let want: Vec<usize> = match bucket_bytes {
                0 => vec![12, 5, 8, 7, 1],
                16 => vec![12, 5, 8, 7, 1],
                48 => vec![12, 13, 8],
                60 => vec![17, 15, 1],
                _ => vec![33],
            };
            assert_eq!(sizes, want, "bucket {bucket_bytes} bytes");
        }
    }

    #[test]
    fn the_mean_divides_the_sum_by_the_world_size_and_keeps_absent_gradients_absent() {
        let (vars, mut grads, expected) = vars_and_grads(&[&[4], &[6]]);
        let absent = Var::zeros(3, DType::F32, &Device::Cpu).unwrap();
        let mut all = vars.clone();
        all.insert(1, absent.clone());
        // three ranks whose gradients are g, 2g and 3g: the mean is 2g
        average_in_buckets(&mut grads, &all, 3, 8, DType::F32, |flat| Ok((flat * 6.0)?)).unwrap();
        assert!(grads.get(absent.as_tensor()).is_none());
        for (i, v) in vars.iter().enumerate() {
            let got = grads.get(v.as_tensor()).unwrap().to_vec1::<f32>().unwrap();
            let want: Vec<f32> = expected[i].iter().map(|x| x * 2.0).collect();
            assert_eq!(got, want);
        }
    }

    #[test]
    fn bf16_buckets_round_once_and_return_each_gradient_in_its_dtype() {
        let (vars, mut grads, expected) = vars_and_grads(&[&[5], &[3]]);
        average_in_buckets(&mut grads, &vars, 1, 1 << 20, DType::BF16, |flat| {
            assert_eq!(flat.dtype(), DType::BF16);
            Ok(flat)
        })
        .unwrap();
        for (i, v) in vars.iter().enumerate() {
            let g = grads.get(v.as_tensor()).unwrap();
            assert_eq!(g.dtype(), DType::F32);
            let want: Vec<f32> = expected[i]
                .iter()
                .map(|x| half::bf16::from_f32(*x).to_f32())
                .collect();
            assert_eq!(g.to_vec1::<f32>().unwrap(), want);
        }
    }
}
