//! Ordering between a CubeCL stream and work that another library (cuBLASLt, NCCL) queues
//! on a stream of its own, on the device rather than by waiting on the host.
//!
//! CubeCL does not expose its streams, so the two sides meet through two counters in device
//! memory ([`HandoffCounters`]): a kernel on CubeCL's stream writes a ticket once the work
//! queued before it is done ([`HandoffCounters::signal`]), which the other stream waits for
//! (CUDA's `cuStreamWaitValue32`); the other stream writes the ticket back after its work,
//! which a one-thread kernel on CubeCL's stream waits for ([`HandoffCounters::wait`]) before
//! anything queued after it runs. Tickets compare modulo 2^32 (a ticket is reached when the
//! counter is at most 2^31 - 1 past it), so they never need resetting.

use burn::tensor::{DType, Shape};
use burn_cubecl::CubeRuntime;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;
use cubecl::{CubeCount, CubeDim};

/// The counter that CubeCL's stream writes (the other stream waits for it).
pub const CUBECL_DONE: usize = 0;
/// The counter that the other stream writes (CubeCL's stream waits for it).
pub const OTHER_DONE: usize = 1;

/// Two `u32` counters in device memory, zero at first: [`CUBECL_DONE`] and [`OTHER_DONE`].
#[derive(Clone, Debug)]
pub struct HandoffCounters<R: CubeRuntime> {
    counters: CubeTensor<R>,
}

impl<R: CubeRuntime> HandoffCounters<R> {
    /// Allocates the counters on `device`, both zero.
    pub fn new(client: &ComputeClient<R>, device: &R::Device) -> Self {
        let handle = client.create_from_slice(&[0u8; 8]);
        Self {
            counters: CubeTensor::new_contiguous(
                client.clone(),
                device.clone(),
                Shape::new([2]),
                handle,
                DType::U32,
            ),
        }
    }

    /// The counters' buffer (its device address is what the other stream reads and
    /// writes: [`CUBECL_DONE`] at byte 0, [`OTHER_DONE`] at byte 4).
    pub fn buffer(&self) -> &CubeTensor<R> {
        &self.counters
    }

    /// Queues on the calling thread's CubeCL stream a kernel that sets counter `slot` to
    /// `ticket`; it runs once the work queued before it is done.
    pub fn signal(&self, slot: usize, ticket: u32) {
        set_counter::launch::<R>(
            &self.counters.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            self.counters.clone().into_array_arg(),
            slot as u32,
            ticket,
        );
    }

    /// Queues on the calling thread's CubeCL stream a kernel that returns once counter
    /// `slot` has reached `ticket`: the work queued after it waits for whoever writes the
    /// counter. Nothing times out on the device; the writer must be queued.
    pub fn wait(&self, slot: usize, ticket: u32) {
        await_counter::launch::<R>(
            &self.counters.client,
            CubeCount::Static(1, 1, 1),
            CubeDim::new_1d(1),
            self.counters.clone().into_array_arg(),
            slot as u32,
            ticket,
        );
    }
}

#[cube(launch)]
fn set_counter(counters: &mut Array<u32>, slot: u32, ticket: u32) {
    counters[slot as usize] = ticket;
}

#[cube(launch)]
fn await_counter(counters: &Array<Atomic<u32>>, slot: u32, ticket: u32) {
    loop {
        // Reached when the counter is at most 2^31 - 1 past the ticket (modulo 2^32).
        let past = counters[slot as usize].load() - ticket;
        if past < 0x8000_0000u32 {
            break;
        }
    }
}
