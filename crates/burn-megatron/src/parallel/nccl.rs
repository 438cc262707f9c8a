//! NCCL process groups for CUDA ranks (one process per GPU): the collectives of
//! [`Group`] run by NCCL on the device buffers of burn-cuda tensors, through cudarc.
//!
//! Every operation follows the protocol of [`crate::cuda`]: make the input one dense
//! buffer, allocate the output, wait for Burn's stream, run NCCL on the group's own
//! stream, and wait for that stream (polling, so that a peer that never
//! arrives ends in an error naming the group, the rank and the operation instead of a
//! hang). Sends are the exception: they are queued without waiting (a pipeline stage
//! sends activations downstream while its neighbour sends gradients upstream), and their
//! buffers are kept alive until they complete.

use std::ffi::CStr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use burn::tensor::{DType, Shape, Tensor, TensorData, TensorPrimitive};
use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_cubecl::{BoolElement, CubeBackend, FloatElement, IntElement};
use cudarc::driver::{CudaContext, CudaEvent, CudaStream};
use cudarc::nccl::{result as nccl, sys};

use super::group::{OpName, Payload, ProcessGroup};
use super::{Group, ParallelContext, ReduceOp};
use crate::{CollectiveFailure, Error, Result};

/// The CUDA backends whose tensors NCCL groups move.
pub type Cuda<F, I, BT> = CubeBackend<CudaRuntime, F, I, BT>;

/// One NCCL communicator with its stream.
pub struct NcclComm {
    comm: sys::ncclComm_t,
    stream: Arc<CudaStream>,
    /// Sends queued on the stream, with their buffers, until they complete.
    pending: Mutex<Vec<(CudaEvent, CubeTensor<CudaRuntime>)>>,
}

// Safety: a communicator is used by one operation at a time (the group's operations
// are serialized by the `pending` lock or by the rank's single thread), which is all
// NCCL asks of a `ncclComm_t`.
unsafe impl Send for NcclComm {}
unsafe impl Sync for NcclComm {}

impl Drop for NcclComm {
    fn drop(&mut self) {
        // Safety: the communicator was initialized and is destroyed once.
        unsafe {
            let _ = nccl::comm_destroy(self.comm);
        }
    }
}

impl std::fmt::Debug for NcclComm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("NcclComm")
    }
}

/// NCCL's own message for a failed call.
fn nccl_message(error: nccl::NcclError) -> String {
    // Safety: NCCL returns a static string for every result code.
    let text = unsafe { CStr::from_ptr(sys::ncclGetErrorString(error.0)) };
    format!("NCCL: {}", text.to_string_lossy())
}

/// A process group whose tensor collectives run on NCCL; payloads (host data, barriers)
/// and failure handling go through the group it wraps.
#[derive(Debug)]
pub struct NcclGroup {
    inner: Group,
    comm: NcclComm,
}

impl NcclGroup {
    /// An NCCL communicator over the members of `group` on GPU `device`: group position 0
    /// makes the unique id, `group` carries it to the others. Every member must call it.
    ///
    /// # Errors
    ///
    /// When CUDA or NCCL fail (with their message) or `group` does.
    pub fn new(group: Group, device: usize) -> Result<Self> {
        let fail = |what: String| group.error("nccl_init", CollectiveFailure::BadInput(what));
        let context =
            CudaContext::new(device).map_err(|e| fail(format!("CUDA device {device}: {e:?}")))?;
        let stream = context
            .new_stream()
            .map_err(|e| fail(format!("CUDA stream: {e:?}")))?;
        let id = if group.rank() == 0 {
            let id = nccl::get_uniqueid().map_err(|e| fail(nccl_message(e)))?;
            id.internal.iter().map(|&b| b as u8).collect()
        } else {
            vec![0u8; 128]
        };
        let payload: Payload = Arc::new(TensorData::new(id, [128]));
        let ids = group
            .process_group()
            .all_gather_payloads("nccl_init", payload)?;
        let root = ids[0]
            .downcast_ref::<TensorData>()
            .and_then(|data| data.as_slice::<u8>().ok().map(<[u8]>::to_vec))
            .filter(|bytes| bytes.len() == 128)
            .ok_or_else(|| fail("the NCCL unique id did not arrive".to_string()))?;
        let mut id = sys::ncclUniqueId { internal: [0; 128] };
        for (slot, byte) in id.internal.iter_mut().zip(root) {
            *slot = byte as _;
        }
        let mut comm = std::ptr::null_mut();
        context
            .bind_to_thread()
            .map_err(|e| fail(format!("CUDA context: {e:?}")))?;
        // Safety: `comm` is written by NCCL; every member passes the same id and size.
        unsafe {
            nccl::comm_init_rank(&mut comm, group.size() as i32, id, group.rank() as i32)
                .map_err(|e| fail(nccl_message(e)))?;
        }
        Ok(Self {
            inner: group,
            comm: NcclComm {
                comm,
                stream,
                pending: Mutex::new(Vec::new()),
            },
        })
    }
}

impl ProcessGroup for NcclGroup {
    fn name(&self) -> &str {
        self.inner.name()
    }

    fn members(&self) -> &[usize] {
        self.inner.members()
    }

    fn rank(&self) -> usize {
        self.inner.rank()
    }

    fn timeout(&self) -> Duration {
        self.inner.process_group().timeout()
    }

    fn all_gather_payloads(&self, op: OpName, payload: Payload) -> Result<Vec<Payload>> {
        self.inner.process_group().all_gather_payloads(op, payload)
    }

    fn send_payload(&self, op: OpName, dst: usize, payload: Payload) -> Result<()> {
        self.inner.process_group().send_payload(op, dst, payload)
    }

    fn recv_payload(&self, op: OpName, src: usize) -> Result<Payload> {
        self.inner.process_group().recv_payload(op, src)
    }

    fn carries_host_data(&self) -> bool {
        self.inner.process_group().carries_host_data()
    }

    fn abort(&self, reason: String) {
        // Safety: aborting makes every pending NCCL call on the communicator return.
        unsafe {
            let _ = nccl::comm_abort(self.comm.comm);
        }
        self.inner.process_group().abort(reason);
    }

    fn nccl(&self) -> Option<&NcclComm> {
        Some(&self.comm)
    }
}

impl ParallelContext {
    /// This context with every group on NCCL over GPU `device` (its groups so far carry
    /// the NCCL ids): what a CUDA rank of a launched job runs on. Every rank must call
    /// it; groups are set up in the same order everywhere.
    ///
    /// # Errors
    ///
    /// When a communicator cannot be made.
    pub fn with_nccl(&self, device: usize) -> Result<Self> {
        self.map_groups(|group| Ok(Group::new(NcclGroup::new(group.clone(), device)?)))
    }
}

/// NCCL's type of a Burn dtype.
fn nccl_type(dtype: DType) -> Option<sys::ncclDataType_t> {
    use sys::ncclDataType_t as T;
    Some(match dtype {
        DType::F32 => T::ncclFloat32,
        DType::F64 => T::ncclFloat64,
        DType::F16 => T::ncclFloat16,
        DType::BF16 => T::ncclBfloat16,
        DType::I64 => T::ncclInt64,
        DType::I32 => T::ncclInt32,
        DType::U32 => T::ncclUint32,
        DType::U8 => T::ncclUint8,
        DType::I8 => T::ncclInt8,
        _ => return None,
    })
}

/// A tensor as one dense 1-D device buffer.
fn dense<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    tensor: Tensor<Cuda<F, I, BT>, D>,
) -> CubeTensor<CudaRuntime> {
    let count = tensor.shape().num_elements();
    let flat = tensor.reshape([count]).into_primitive().tensor();
    burn_cubecl::kernel::into_contiguous(flat)
}

/// A fresh dense buffer of `count` elements of `dtype` on `device`.
fn empty<F: FloatElement, I: IntElement, BT: BoolElement>(
    count: usize,
    dtype: DType,
    device: &burn::tensor::Device<Cuda<F, I, BT>>,
) -> CubeTensor<CudaRuntime> {
    Tensor::<Cuda<F, I, BT>, 1>::empty([count], (device, dtype))
        .into_primitive()
        .tensor()
}

/// A Burn tensor of `shape` over a dense buffer.
fn wrap<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    buffer: CubeTensor<CudaRuntime>,
    shape: Shape,
) -> Tensor<Cuda<F, I, BT>, D> {
    Tensor::<Cuda<F, I, BT>, 1>::from_primitive(TensorPrimitive::Float(buffer)).reshape(shape)
}

/// The device address of a dense buffer, valid while `buffer` lives.
fn address(buffer: &CubeTensor<CudaRuntime>) -> Result<*mut std::ffi::c_void> {
    crate::cuda::address(buffer).map_err(Error::InvalidData)
}

impl NcclComm {
    /// Runs `call` (which queues NCCL work on `stream`) once Burn's work on `buffers` is
    /// done; waits for it unless `wait_for` is `None`, in which case `keep` stays alive
    /// until it completes.
    fn run(
        &self,
        group: &Group,
        op: OpName,
        buffers: &[&CubeTensor<CudaRuntime>],
        keep: Option<CubeTensor<CudaRuntime>>,
        call: impl FnOnce(sys::cudaStream_t) -> std::result::Result<nccl::NcclStatus, nccl::NcclError>,
    ) -> Result<()> {
        let fail = |reason: String| group.error(op, CollectiveFailure::BadInput(reason));
        let mut pending = self.pending.lock().expect("pending sends");
        pending.retain(|(event, _)| !event.is_complete());
        if let Some(first) = buffers.first() {
            crate::cuda::wait_for_burn(first).map_err(fail)?;
        }
        self.stream
            .context()
            .bind_to_thread()
            .map_err(|e| fail(format!("CUDA: {e:?}")))?;
        call(self.stream.cu_stream() as sys::cudaStream_t).map_err(|e| fail(nccl_message(e)))?;
        let event = self
            .stream
            .record_event(None)
            .map_err(|e| fail(format!("CUDA: {e:?}")))?;
        if let Some(buffer) = keep {
            pending.push((event, buffer));
            return Ok(());
        }
        drop(pending);
        self.wait(group, op, &event)
    }

    /// Waits for `event`, failing after the group's timeout.
    fn wait(&self, group: &Group, op: OpName, event: &CudaEvent) -> Result<()> {
        let timeout = group.process_group().timeout();
        let started = Instant::now();
        let mut spins = 0u32;
        loop {
            match event.try_is_complete() {
                Ok(true) => return Ok(()),
                Ok(false) => {}
                Err(e) => {
                    return Err(
                        group.error(op, CollectiveFailure::BadInput(format!("CUDA: {e:?}")))
                    );
                }
            }
            if started.elapsed() > timeout {
                // Safety: aborting the communicator makes the stuck kernel return.
                unsafe {
                    let _ = nccl::comm_abort(self.comm);
                }
                return Err(group.error(
                    op,
                    CollectiveFailure::Timeout {
                        waited: started.elapsed(),
                        missing: Vec::new(),
                    },
                ));
            }
            spins += 1;
            if spins < 2000 {
                std::hint::spin_loop();
            } else {
                std::thread::sleep(Duration::from_micros(20));
            }
        }
    }
}

fn unsupported(group: &Group, op: OpName, dtype: DType) -> Error {
    group.error(
        op,
        CollectiveFailure::BadInput(format!("NCCL does not move {dtype:?} tensors")),
    )
}

/// The NCCL reduction of `op`.
fn reduction(op: ReduceOp) -> sys::ncclRedOp_t {
    match op {
        ReduceOp::Sum => sys::ncclRedOp_t::ncclSum,
        ReduceOp::Mean => sys::ncclRedOp_t::ncclAvg,
        ReduceOp::Max => sys::ncclRedOp_t::ncclMax,
    }
}

/// [`Group::all_reduce`] on NCCL.
pub(crate) fn all_reduce<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    comm: &NcclComm,
    group: &Group,
    tensor: Tensor<Cuda<F, I, BT>, D>,
    op: ReduceOp,
) -> Result<Tensor<Cuda<F, I, BT>, D>> {
    let (shape, device) = (tensor.shape(), tensor.device());
    let input = dense(tensor);
    let dtype =
        nccl_type(input.dtype).ok_or_else(|| unsupported(group, "all_reduce", input.dtype))?;
    let count = shape.num_elements();
    let output = empty::<F, I, BT>(count, input.dtype, &device);
    let (src, dst) = (address(&input)?, address(&output)?);
    comm.run(
        group,
        "all_reduce",
        &[&input, &output],
        None,
        |stream| unsafe {
            nccl::all_reduce(src, dst, count, dtype, reduction(op), comm.comm, stream)
        },
    )?;
    Ok(wrap(output, shape))
}

/// [`Group::all_gather`] on NCCL: the ranks' buffers one after the other, then
/// concatenated along `dim`.
pub(crate) fn all_gather<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    comm: &NcclComm,
    group: &Group,
    tensor: Tensor<Cuda<F, I, BT>, D>,
    dim: usize,
) -> Result<Tensor<Cuda<F, I, BT>, D>> {
    let (shape, device, size) = (tensor.shape(), tensor.device(), group.size());
    let input = dense(tensor);
    let dtype =
        nccl_type(input.dtype).ok_or_else(|| unsupported(group, "all_gather", input.dtype))?;
    let count = shape.num_elements();
    let output = empty::<F, I, BT>(count * size, input.dtype, &device);
    let (src, dst) = (address(&input)?, address(&output)?);
    comm.run(
        group,
        "all_gather",
        &[&input, &output],
        None,
        |stream| unsafe { nccl::all_gather(src, dst, count, dtype, comm.comm, stream) },
    )?;
    let gathered: Tensor<Cuda<F, I, BT>, 1> = wrap(output, Shape::new([count * size]));
    let parts = (0..size)
        .map(|rank| {
            gathered
                .clone()
                .narrow(0, rank * count, count)
                .reshape(shape.clone())
        })
        .collect();
    Ok(Tensor::cat(parts, dim))
}

/// [`Group::reduce_scatter`] on NCCL: the chunks along `dim` laid out one after the other,
/// reduced, and this rank's chunk kept.
pub(crate) fn reduce_scatter<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    comm: &NcclComm,
    group: &Group,
    tensor: Tensor<Cuda<F, I, BT>, D>,
    dim: usize,
    op: ReduceOp,
) -> Result<Tensor<Cuda<F, I, BT>, D>> {
    let (shape, device, size) = (tensor.shape(), tensor.device(), group.size());
    if !shape[dim].is_multiple_of(size) {
        return Err(group.error(
            "reduce_scatter",
            CollectiveFailure::BadInput(format!(
                "dimension {dim} of {:?} does not split into {size} equal chunks",
                shape.as_slice()
            )),
        ));
    }
    let chunks = tensor.chunk(size, dim);
    let mut chunk_shape = shape.clone();
    chunk_shape[dim] /= size;
    let laid_out = if dim == 0 {
        Tensor::cat(chunks, 0)
    } else {
        Tensor::cat(
            chunks
                .into_iter()
                .map(|c| c.reshape([chunk_shape.num_elements()]))
                .collect(),
            0,
        )
        .reshape(shape.clone())
    };
    let input = dense(laid_out);
    let dtype =
        nccl_type(input.dtype).ok_or_else(|| unsupported(group, "reduce_scatter", input.dtype))?;
    let count = chunk_shape.num_elements();
    let output = empty::<F, I, BT>(count, input.dtype, &device);
    let (src, dst) = (address(&input)?, address(&output)?);
    comm.run(
        group,
        "reduce_scatter",
        &[&input, &output],
        None,
        |stream| unsafe {
            nccl::reduce_scatter(src, dst, count, dtype, reduction(op), comm.comm, stream)
        },
    )?;
    Ok(wrap(output, chunk_shape))
}

/// [`Group::broadcast`] on NCCL.
pub(crate) fn broadcast<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    comm: &NcclComm,
    group: &Group,
    tensor: Tensor<Cuda<F, I, BT>, D>,
    root: usize,
) -> Result<Tensor<Cuda<F, I, BT>, D>> {
    group.check_peer("broadcast", root)?;
    let (shape, device) = (tensor.shape(), tensor.device());
    let input = dense(tensor);
    let dtype =
        nccl_type(input.dtype).ok_or_else(|| unsupported(group, "broadcast", input.dtype))?;
    let count = shape.num_elements();
    let output = empty::<F, I, BT>(count, input.dtype, &device);
    let (src, dst) = (address(&input)?, address(&output)?);
    comm.run(
        group,
        "broadcast",
        &[&input, &output],
        None,
        |stream| unsafe { nccl::broadcast(src, dst, count, dtype, root as i32, comm.comm, stream) },
    )?;
    Ok(wrap(output, shape))
}

/// [`Group::send`] on NCCL: queued, not waited for.
pub(crate) fn send<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    comm: &NcclComm,
    group: &Group,
    tensor: Tensor<Cuda<F, I, BT>, D>,
    dst: usize,
) -> Result<()> {
    group.check_peer("send", dst)?;
    let count = tensor.shape().num_elements();
    let input = dense(tensor);
    let dtype = nccl_type(input.dtype).ok_or_else(|| unsupported(group, "send", input.dtype))?;
    let src = address(&input)?;
    let keep = input.clone();
    comm.run(group, "send", &[&input], Some(keep), |stream| unsafe {
        nccl::send(src, count, dtype, dst as i32, comm.comm, stream)
    })
}

/// [`Group::recv`] on NCCL.
pub(crate) fn recv<F: FloatElement, I: IntElement, BT: BoolElement, const D: usize>(
    comm: &NcclComm,
    group: &Group,
    shape: Shape,
    src: usize,
    device: &burn::tensor::Device<Cuda<F, I, BT>>,
) -> Result<Tensor<Cuda<F, I, BT>, D>> {
    group.check_peer("recv", src)?;
    let count = shape.num_elements();
    let output = empty::<F, I, BT>(count, F::dtype(), device);
    let dtype = nccl_type(output.dtype).ok_or_else(|| unsupported(group, "recv", output.dtype))?;
    let dst = address(&output)?;
    comm.run(group, "recv", &[&output], None, |stream| unsafe {
        nccl::recv(dst, count, dtype, src as i32, comm.comm, stream)
    })?;
    Ok(wrap(output, shape))
}
