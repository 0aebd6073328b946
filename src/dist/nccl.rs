//! NCCL for the gradients of a multi-GPU run (the `nccl` feature): cudarc's bindings, through candle-core's
//! re-export, with the communicator on candle's CUDA stream so that the all-reduce is ordered after the
//! backward kernels and before the optimiser's without any extra synchronisation.
//!
//! The unique id: rank 0 asks NCCL for one and hands its 128 bytes to the other ranks over the TCP ring that
//! the rendezvous built (the same `MASTER_ADDR:MASTER_PORT`).
//!
//! NCCL itself waits forever for a peer that died. A watchdog thread gives every NCCL wait (creating the
//! communicator, each gradient average) the run's timeout ([`super::TIMEOUT_ENV`]); past it, the process prints
//! which wait on which rank did not finish and exits with status 1, as PyTorch's NCCL watchdog does. Nothing is
//! written in between, so the last checkpoint stays the resume point.

use std::sync::Arc;
use std::time::Duration;

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::CudaStream;
use candle_core::cuda_backend::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::{CpuStorage, CudaStorage, DType, Device, InplaceOp1, Layout, Tensor};

use super::tcp::TcpRing;
use super::watchdog::Watchdog;
use crate::{Error, Result};

fn nccl_err(rank: usize, what: &str, e: impl std::fmt::Debug) -> Error {
    Error::Dist(format!("rank {rank}: NCCL failed {what}: {e:?}"))
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: Comm,
    stream: Arc<CudaStream>,
    rank: usize,
    watchdog: Watchdog,
}

impl Nccl {
    /// Creates the communicator of this rank on `device`'s stream (the ring's ranks and world size).
    pub fn new(ring: &mut TcpRing, device: &Device, timeout: Duration) -> Result<Nccl> {
        let (rank, world) = (ring.rank(), ring.world_size());
        let Device::Cuda(cuda) = device else {
            return Err(Error::Arg(format!(
                "rank {rank}: NCCL needs a CUDA device, not {device:?}"
            )));
        };
        let mut id = [0u8; 128];
        if rank == 0 {
            let made = Id::new().map_err(|e| nccl_err(rank, "to make a unique id", e))?;
            for (b, c) in id.iter_mut().zip(made.internal()) {
                *b = *c as u8;
            }
        }
        ring.broadcast_from_rank0(&mut id)?;
        let id = Id::uninit(id.map(|b| b as std::ffi::c_char));
        let stream = cuda.cuda_stream();
        let watchdog = Watchdog::start(rank, "NCCL", timeout);
        let comm = watchdog.guard(
            "creating the communicator (ncclCommInitRank: every rank must reach it)",
            || {
                Comm::from_rank(stream.clone(), rank, world, id)
                    .map_err(|e| nccl_err(rank, "to create the communicator", e))
            },
        )?;
        Ok(Nccl {
            comm,
            stream,
            rank,
            watchdog,
        })
    }

    /// Sums the contiguous f32 or bf16 tensor `t` over the ranks, in place (queued on the stream; see
    /// [`Nccl::in_flight`] for waiting on it).
    pub fn all_reduce_sum(&self, t: &Tensor) -> Result<()> {
        if !t.is_contiguous() {
            return Err(Error::Dist(format!(
                "rank {}: the NCCL all-reduce needs a contiguous buffer",
                self.rank
            )));
        }
        t.inplace_op1(&AllReduceSum { nccl: self })?;
        Ok(())
    }

    /// Runs `f` (which queues collectives) and waits for the stream, under the watchdog: a collective that a
    /// dead or stuck rank never completes ends the process after the timeout with a message naming `what`.
    pub fn in_flight<R>(&self, what: &str, f: impl FnOnce() -> Result<R>) -> Result<R> {
        self.watchdog.guard(what, || {
            let r = f()?;
            self.stream
                .synchronize()
                .map_err(|e| nccl_err(self.rank, what, e))?;
            Ok(r)
        })
    }
}

/// The in-place all-reduce as a candle op (it reaches the tensor's device buffer).
struct AllReduceSum<'a> {
    nccl: &'a Nccl,
}

impl InplaceOp1 for AllReduceSum<'_> {
    fn name(&self) -> &'static str {
        "nccl-all-reduce-sum"
    }

    fn cpu_fwd(&self, _: &mut CpuStorage, _: &Layout) -> candle_core::Result<()> {
        candle_core::bail!("the NCCL all-reduce runs on CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &mut CudaStorage, layout: &Layout) -> candle_core::Result<()> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            candle_core::bail!("the NCCL all-reduce needs a contiguous buffer")
        };
        let nccl = self.nccl;
        let status = match storage.dtype() {
            DType::F32 => {
                let slice = storage.as_cuda_slice_mut::<f32>()?;
                nccl.comm
                    .all_reduce_in_place(&mut slice.slice_mut(start..end), &ReduceOp::Sum)
            }
            DType::BF16 => {
                let slice = storage.as_cuda_slice_mut::<half::bf16>()?;
                nccl.comm
                    .all_reduce_in_place(&mut slice.slice_mut(start..end), &ReduceOp::Sum)
            }
            other => candle_core::bail!("the NCCL all-reduce takes f32 or bf16, not {other:?}"),
        };
        status.map(|_| ()).map_err(|e| {
            candle_core::Error::Msg(format!("rank {}: ncclAllReduce: {e:?}", nccl.rank))
        })
    }
}
