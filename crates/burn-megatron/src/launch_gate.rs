//! Device time of queued work without the host's launch time, for benchmarks of kernels
//! shorter than their launch (a fused kernel on 8192 tokens runs ~15 µs on an H200; the
//! host takes ~20 µs to queue one through cubecl).
//!
//! A one-thread kernel holds the calling thread's CubeCL stream while the host queues
//! the work, and is released from another stream once the work is handed to the driver:
//! from then on the device runs the work back to back, and the host measures from the
//! release to the end of the work.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use burn_cubecl::cubecl::cuda::CudaRuntime;
use burn_cubecl::tensor::CubeTensor;
use burn_megatron_kernels::handoff::{HandoffCounters, OTHER_DONE};
use cudarc::driver::sys;
use cudarc::driver::{CudaContext, CudaStream};

use crate::cuda::{address, wait_for_burn};

/// How long the gate holds the stream at most: work that synchronizes the device while
/// queued would wait for the held stream forever (a module load, a synchronous free, or
/// CubeCL's wait every 64 launches of kernels that read tensor shapes or strides, whose
/// metadata it copies to the device: see `burn_megatron_kernels`' kernels).
const GATE_TIMEOUT: Duration = Duration::from_secs(5);

/// Seconds from the moment the device may start the work `queue` queues on the calling
/// thread's CubeCL stream (of `like`'s device) to its end, and what `queue` gives. Warm the
/// work up first: a first call compiles its kernels, which synchronizes the device.
///
/// # Errors
///
/// The driver's error, or when `queue` did not return within 5 s (it waited for the
/// held stream, for example by reading a result on the host: time such work otherwise).
pub fn device_seconds<T>(
    like: &CubeTensor<CudaRuntime>,
    queue: impl FnOnce() -> T,
) -> Result<(f64, T), String> {
    let context = CudaContext::new(like.device.index)
        .map_err(|e| format!("CUDA device {}: {e:?}", like.device.index))?;
    let stream = context
        .new_stream()
        .map_err(|e| format!("CUDA stream: {e:?}"))?;
    let counters = HandoffCounters::new(&like.client, &like.device);
    let gate = address(counters.buffer())? as sys::CUdeviceptr + 4 * OTHER_DONE as u64;
    wait_for_burn(counters.buffer())?;
    counters.wait(OTHER_DONE, 1);

    let released = Arc::new(AtomicBool::new(false));
    let (queued, watchdog_wakes) = mpsc::channel::<()>();
    let watchdog = {
        let (stream, released) = (stream.clone(), released.clone());
        std::thread::spawn(move || {
            if watchdog_wakes.recv_timeout(GATE_TIMEOUT).is_err() && release(&released) {
                // The stream must go on whatever happens; the caller reports the timeout.
                let _ = open(&stream, gate);
            }
        })
    };
    let output = queue();
    // Returns once everything queued before was handed to the driver.
    let flushed = address(counters.buffer());
    let _ = queued.send(());
    let ours = release(&released);
    let started = Instant::now();
    let opened = if ours { open(&stream, gate) } else { Ok(()) };
    let done = wait_for_burn(counters.buffer());
    let seconds = started.elapsed().as_secs_f64();
    let _ = watchdog.join();
    flushed?;
    opened?;
    done?;
    if !ours {
        return Err(format!(
            "the timed work was not queued within {GATE_TIMEOUT:?} of holding the stream: it \
             waits for the device on the host"
        ));
    }
    Ok((seconds, output))
}

/// Whether the caller is the one to release the gate (first come).
fn release(released: &AtomicBool) -> bool {
    !released.swap(true, Ordering::SeqCst)
}

/// Writes the ticket the held stream waits for.
fn open(stream: &Arc<CudaStream>, gate: sys::CUdeviceptr) -> Result<(), String> {
    stream
        .context()
        .bind_to_thread()
        .map_err(|e| format!("CUDA context: {e:?}"))?;
    // Safety: one u32 of the counters, which outlive the work (the caller waits for it).
    match unsafe { sys::cuMemsetD32Async(gate, 1, 1, stream.cu_stream()) } {
        sys::CUresult::CUDA_SUCCESS => Ok(()),
        error => Err(format!("CUDA gate write: {error:?}")),
    }
}
