//! NCCL collectives for ranks on CUDA devices (feature `nccl`), through cudarc.
//!
//! The ranks first meet over the unix-socket mesh ([`SocketCollective`]); rank 0 makes NCCL's
//! unique id and hands it to the others there, then each rank joins the communicator on its
//! own device. Reductions and gathers then run on the device streams, never through the host.
//!
//! Failure: a rank that exits is seen by the launcher, which stops the set; NCCL itself does
//! not time out a rank that hangs, so [`Collective::failure`] reports only NCCL's errors.

use std::sync::Mutex;

use candle_core::cuda::cudarc::nccl::safe::{Comm, Id, ReduceOp};
use candle_core::cuda::CudaStorage;
use candle_core::{bail, CpuStorage, CustomOp1, DType, Device, Layout, Result, Shape, Tensor};

use super::{Collective, SocketCollective};

/// An NCCL communicator; one call at a time.
pub struct NcclCollective {
    comm: Mutex<SendComm>,
    device: Device,
    rank: usize,
    world_size: usize,
    failure: Mutex<Option<String>>,
}

/// `Comm` holds NCCL's raw communicator handle. NCCL allows a communicator to be used from any
/// thread as long as calls do not overlap, which the mutex above guarantees.
struct SendComm(Comm);

// SAFETY: see `SendComm`: the handle is only used under `NcclCollective::comm`'s lock.
unsafe impl Send for SendComm {}

impl NcclCollective {
    /// Joins the NCCL communicator of the ranks already meshed by `bootstrap`, on `device`.
    pub fn connect(bootstrap: &SocketCollective, device: &Device) -> Result<Self> {
        let Device::Cuda(cuda) = device else {
            bail!("NCCL needs a CUDA device");
        };
        let (rank, world_size) = (bootstrap.rank(), bootstrap.world_size());
        let id = if rank == 0 {
            Id::new().map_err(|e| candle_core::Error::Msg(format!("NCCL unique id: {e:?}")))?
        } else {
            Id::uninit([0; 128])
        };
        // The 128-byte id travels as 32 f32 bit patterns: the socket collective copies values
        // without arithmetic, so every bit arrives as sent. Rank 0's part is the id.
        let words: Vec<f32> = id
            .internal()
            .chunks_exact(4)
            .map(|b| {
                f32::from_bits(u32::from_le_bytes([
                    b[0] as u8, b[1] as u8, b[2] as u8, b[3] as u8,
                ]))
            })
            .collect();
        let gathered = bootstrap
            .all_gather(&Tensor::from_vec(words, (1, 32), &Device::Cpu)?)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut internal = [0 as std::ffi::c_char; 128];
        for (i, w) in gathered[..32].iter().enumerate() {
            for (j, b) in w.to_bits().to_le_bytes().into_iter().enumerate() {
                internal[4 * i + j] = b as std::ffi::c_char;
            }
        }
        let comm = Comm::from_rank(cuda.cuda_stream(), rank, world_size, Id::uninit(internal))
            .map_err(|e| candle_core::Error::Msg(format!("NCCL init of rank {rank}: {e:?}")))?;
        tracing::info!(rank, world_size, "NCCL communicator ready");
        Ok(Self {
            comm: Mutex::new(SendComm(comm)),
            device: device.clone(),
            rank,
            world_size,
            failure: Mutex::new(None),
        })
    }

    /// Runs `f` with the communicator; an NCCL error is kept as this collective's failure.
    fn with_comm<T>(&self, f: impl FnOnce(&Comm) -> Result<T>) -> Result<T> {
        if let Some(failure) = self.failure() {
            bail!("NCCL failed earlier: {failure}");
        }
        let comm = self
            .comm
            .lock()
            .map_err(|_| candle_core::Error::Msg("the NCCL lock is poisoned".into()))?;
        f(&comm.0).inspect_err(|e| {
            if let Ok(mut failure) = self.failure.lock() {
                *failure = Some(format!("rank {}: {e}", self.rank));
            }
        })
    }
}

/// The op a tensor goes through to reach NCCL: contiguous f32 on a CUDA device.
struct NcclOp<'a> {
    comm: &'a Comm,
    gather: bool,
}

impl CustomOp1 for NcclOp<'_> {
    fn name(&self) -> &'static str {
        if self.gather {
            "nccl-all-gather"
        } else {
            "nccl-all-reduce"
        }
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        bail!("NCCL collectives run on CUDA tensors only")
    }

    fn cuda_fwd(&self, storage: &CudaStorage, layout: &Layout) -> Result<(CudaStorage, Shape)> {
        let Some((start, end)) = layout.contiguous_offsets() else {
            bail!("{} needs a contiguous tensor", self.name());
        };
        let input = storage.as_cuda_slice::<f32>()?.slice(start..end);
        let device = storage.device.clone();
        let world = self.comm.world_size();
        let out_len = if self.gather {
            (end - start) * world
        } else {
            end - start
        };
        let mut out = device.alloc_zeros::<f32>(out_len)?;
        let result = if self.gather {
            self.comm.all_gather(&input, &mut out)
        } else {
            self.comm.all_reduce(&input, &mut out, &ReduceOp::Sum)
        };
        result.map_err(|e| candle_core::Error::Msg(format!("{}: {e:?}", self.name())))?;
        let dims = layout.shape().dims();
        let shape = if self.gather {
            // Rank-major: `[world * rows, cols]` for `[rows, cols]` parts.
            let mut d = dims.to_vec();
            d[0] *= world;
            Shape::from(d)
        } else {
            layout.shape().clone()
        };
        Ok((CudaStorage::wrap_cuda_slice(out, device), shape))
    }
}

impl Collective for NcclCollective {
    fn rank(&self) -> usize {
        self.rank
    }

    fn world_size(&self) -> usize {
        self.world_size
    }

    fn all_reduce_sum(&self, x: &Tensor) -> Result<Tensor> {
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let sum = self.with_comm(|comm| {
            x.apply_op1_no_bwd(&NcclOp {
                comm,
                gather: false,
            })
        })?;
        sum.to_dtype(dtype)
    }

    fn all_gather(&self, x: &Tensor) -> Result<Tensor> {
        let (rows, cols) = x.dims2()?;
        let dtype = x.dtype();
        let x = x.to_dtype(DType::F32)?.contiguous()?;
        let parts = self.with_comm(|comm| x.apply_op1_no_bwd(&NcclOp { comm, gather: true }))?;
        // `[world, rows, cols]` → `[rows, world * cols]`.
        parts
            .reshape((self.world_size, rows, cols))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((rows, self.world_size * cols))?
            .to_dtype(dtype)
    }

    fn barrier(&self) -> Result<()> {
        // Reading the sum back waits for the device stream, so every rank has arrived.
        let one = Tensor::ones(1, DType::F32, &self.device)?;
        self.all_reduce_sum(&one)?.to_vec1::<f32>().map(|_| ())
    }

    fn failure(&self) -> Option<String> {
        self.failure.lock().ok().and_then(|f| f.clone())
    }
}
