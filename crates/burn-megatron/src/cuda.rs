//! Raw buffers of burn-cuda tensors, for the libraries Burn does not call itself (NCCL in
//! `parallel`, cuBLASLt in `ops`).
//!
//! cubecl 0.10 exposes neither its stream nor a way to order work with another stream.
//! Two ways to run an external call on Burn's buffers:
//! - on the host: [`wait_for_burn`] (all work Burn has queued is done), resolve each
//!   buffer's [`address`], queue the call on our own stream, and wait for that stream
//!   before Burn touches the buffers again (NCCL, whose waits poll with a timeout);
//! - on the device: a [`Handoff`] queues the same order on the two streams through
//!   counters in device memory, and the host never waits (cuBLASLt).

use std::ffi::c_void;
use std::sync::{Arc, OnceLock};

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_megatron_kernels::handoff::{CUBECL_DONE, HandoffCounters, OTHER_DONE};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaFunction, CudaStream, LaunchConfig, PushKernelArg};

/// Checks that the CUDA driver loads and sees GPU `index`, so that asking for a GPU where
/// there is none fails with a message rather than a panic on cubecl's device thread, and
/// returns the GPU's memory in bytes.
///
/// # Errors
///
/// [`Error::Device`](crate::Error::Device), saying what is missing.
pub fn check_gpu(index: usize) -> crate::Result<u64> {
    let fail = |what: String| Err(crate::Error::Device(what));
    // Safety: only tries to load the library.
    if !unsafe { sys::is_culib_present() } {
        return fail(
            "the CUDA driver (libcuda.so) is not found: this machine has no NVIDIA driver, or \
             LD_LIBRARY_PATH misses its directory; use --device cpu"
                .to_string(),
        );
    }
    if let Err(error) = cudarc::driver::result::init() {
        return fail(format!(
            "the CUDA driver did not start ({error:?}); use --device cpu"
        ));
    }
    match cudarc::driver::result::device::get_count() {
        Ok(count) if index < count.max(0) as usize => {}
        Ok(count) => {
            return fail(format!(
                "GPU {index} is needed but CUDA sees {count}; use fewer ranks per node or \
                 --device cpu"
            ));
        }
        Err(error) => return fail(format!("CUDA cannot count its GPUs ({error:?})")),
    }
    let device = cudarc::driver::result::device::get(index as i32)
        .map_err(|error| crate::Error::Device(format!("GPU {index}: {error:?}")))?;
    // Safety: `device` was just returned by the driver.
    unsafe { cudarc::driver::result::device::total_mem(device) }
        .map(|bytes| bytes as u64)
        .map_err(|error| crate::Error::Device(format!("GPU {index}'s memory: {error:?}")))
}

/// The device address of a tensor's data, valid while the tensor lives.
///
/// # Errors
///
/// When cubecl cannot resolve the buffer (its message).
pub(crate) fn address(tensor: &CubeTensor<CudaRuntime>) -> Result<*mut c_void, String> {
    let resource = tensor
        .client
        .get_resource(tensor.handle.clone())
        .map_err(|e| format!("CUDA buffer: {e:?}"))?;
    Ok(resource.resource().ptr as *mut c_void)
}

/// Waits until the work Burn has queued on `tensor`'s device is done.
///
/// # Errors
///
/// When the device reports an error (its message).
pub(crate) fn wait_for_burn(tensor: &CubeTensor<CudaRuntime>) -> Result<(), String> {
    burn_cubecl::cubecl::future::block_on(tensor.client.sync()).map_err(|e| format!("CUDA: {e:?}"))
}

/// Whether [`Handoff::run`] waits on the host instead (`BURN_MEGATRON_HOST_SYNC=1`: for
/// diagnosing a suspected ordering problem, and to measure what the hand-off saves).
pub(crate) fn host_sync() -> bool {
    static HOST_SYNC: OnceLock<bool> = OnceLock::new();
    burn_megatron_kernels::environment_switch(&HOST_SYNC, "BURN_MEGATRON_HOST_SYNC")
}

/// A kernel of our stream that returns once the counter at `counter` has reached `ticket`
/// (modulo 2^32, as in [`burn_megatron_kernels::handoff`]). `cuStreamWaitValue32` would do
/// without a kernel, but refuses cubecl's stream-ordered (pool) allocations.
const AWAIT_COUNTER: &str = r#"
extern "C" __global__ void await_counter(const volatile unsigned int* counter, unsigned int ticket) {
    while (*counter - ticket >= 0x80000000u) {}
}
"#;

/// Compiles (NVRTC) and loads [`AWAIT_COUNTER`] into `context`: once per device, for all
/// its [`Handoff`]s.
///
/// # Errors
///
/// When the kernel does not compile or load (the driver's or NVRTC's message).
pub(crate) fn load_await_counter(context: &Arc<CudaContext>) -> Result<CudaFunction, String> {
    let ptx = cudarc::nvrtc::compile_ptx(AWAIT_COUNTER)
        .map_err(|e| format!("NVRTC (hand-off kernel): {e:?}"))?;
    context
        .load_module(ptx)
        .and_then(|module| module.load_function("await_counter"))
        .map_err(|e| format!("CUDA module (hand-off kernel): {e:?}"))
}

/// Orders work queued on one of our streams between the work Burn queues before and after
/// it, on the device ([`burn_megatron_kernels::handoff`]): Burn's stream signals a ticket,
/// our stream waits for it (a one-thread kernel of ours), runs, and writes the ticket back
/// (a memset, which runs once the work before it is done), which Burn's stream waits for
/// before its next kernel. The two streams thus run one after the other in the order the
/// host queued their work, so a buffer Burn frees after the call is reused only once the
/// call is done. One per cubecl stream (each thread queues on its own).
///
/// The waiting kernel on Burn's stream stays resident while our stream's work runs, on
/// one multiprocessor: cuBLASLt's GEMMs are planned to leave it some (see
/// `ops::cublaslt`).
///
/// A kernel that spins may only wait for work already handed to the driver: a call that
/// synchronizes the whole device (a module load, a synchronous free) would otherwise wait
/// for the spinning kernel while the work it waits for is still held in cubecl's queue.
pub(crate) struct Handoff {
    counters: HandoffCounters<CudaRuntime>,
    /// Device address of the counters.
    address: sys::CUdeviceptr,
    ticket: u32,
    await_counter: CudaFunction,
}

impl Handoff {
    /// Counters on the device of `like` (and on its client); `await_counter` is the
    /// device's [`load_await_counter`].
    ///
    /// # Errors
    ///
    /// When cubecl cannot resolve the counters' buffer.
    pub(crate) fn new(
        like: &CubeTensor<CudaRuntime>,
        await_counter: CudaFunction,
    ) -> Result<Self, String> {
        let counters = HandoffCounters::new(&like.client, &like.device);
        let address = address(counters.buffer())? as sys::CUdeviceptr;
        Ok(Self {
            counters,
            address,
            ticket: 0,
            await_counter,
        })
    }

    /// Runs `queue`, which queues work on `stream`, after all the work Burn has queued on
    /// the calling stream, and has Burn's later work wait for it; `on_device_thread`: called
    /// from cubecl's device thread (then the host never waits, except with
    /// `BURN_MEGATRON_HOST_SYNC=1`, which is for the calling thread only).
    ///
    /// # Errors
    ///
    /// `queue`'s error, or the driver's when it refuses our wait or write (Burn's stream
    /// is released in every case).
    pub(crate) fn run<T>(
        &mut self,
        stream: &CudaStream,
        on_device_thread: bool,
        queue: impl FnOnce() -> Result<T, String>,
    ) -> Result<T, String> {
        if host_sync() {
            wait_for_burn(self.counters.buffer())?;
            let output = queue()?;
            stream
                .synchronize()
                .map_err(|e| format!("CUDA stream: {e:?}"))?;
            return Ok(output);
        }
        self.ticket = self.ticket.wrapping_add(1);
        let ticket = self.ticket;
        self.counters.signal(CUBECL_DONE, ticket);
        if !on_device_thread {
            // Elsewhere, cubecl hands the signal to its device thread, which may hold it in a
            // queue; a blocking request to that thread returns once everything queued before
            // it was launched. (On the device thread, cubecl launches at once.)
            address(self.counters.buffer())?;
        }
        let burn_done = self.address + 4 * CUBECL_DONE as sys::CUdeviceptr;
        let mut launch = stream.launch_builder(&self.await_counter);
        launch.arg(&burn_done).arg(&ticket);
        // Safety: the kernel reads one u32 of the counters, which live as long as `self`.
        let waited = unsafe {
            launch.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (1, 1, 1),
                shared_mem_bytes: 0,
            })
        }
        .map(drop)
        .map_err(|e| format!("CUDA hand-off wait on Burn's work: {e:?}"));
        let output = waited.and_then(|()| queue());
        let other_done = self.address + 4 * OTHER_DONE as sys::CUdeviceptr;
        // Safety: as above, one u32 of the counters.
        let written =
            match unsafe { sys::cuMemsetD32Async(other_done, ticket, 1, stream.cu_stream()) } {
                sys::CUresult::CUDA_SUCCESS => {
                    self.counters.wait(OTHER_DONE, ticket);
                    Ok(())
                }
                error => {
                    // Burn's stream cannot wait for a refused write: order on the host.
                    let _ = stream.synchronize();
                    Err(format!("CUDA hand-off write for Burn: {error:?}"))
                }
            };
        let output = output?;
        written?;
        Ok(output)
    }
}
