//! The kernels on CubeCL's wgpu runtime, which runs on a CPU through Mesa's software Vulkan
//! (lavapipe: `apt-get install mesa-vulkan-drivers libvulkan1`), against the plain-Burn
//! references on the same device. `cargo test -p burn-megatron-kernels --features wgpu`.
#![cfg(feature = "wgpu")]

use burn::tensor::DType;
use burn_megatron_kernels::check::check_kernels;

type Wgpu = burn_wgpu::Wgpu<f32, i32, u32>;

#[test]
fn kernels_and_gradients_match_the_references_on_wgpu() {
    // f16 too (lavapipe has 16-bit floats): the kernels' half-precision loads, stores and
    // wider vectors, which f32 does not reach.
    let checks: Vec<_> = [DType::F32, DType::F16]
        .into_iter()
        .flat_map(|dtype| check_kernels::<Wgpu>(&Default::default(), dtype))
        .collect();
    let mut failed = Vec::new();
    for check in &checks {
        println!(
            "{:<18} {:<5} {:<14} {:<18} error {:.2e} (limit {:.0e})",
            check.kernel,
            format!("{:?}", check.dtype),
            format!("{:?}", check.shape),
            check.quantity,
            check.error,
            check.limit
        );
        if !check.passed() {
            failed.push(check);
        }
    }
    assert!(checks.len() > 50, "only {} checks ran", checks.len());
    assert!(failed.is_empty(), "failed: {failed:#?}");
}

/// The hand-off kernels on one stream: a signalled counter reads back, and waits for
/// tickets already reached (modulo 2^32) return. A wait that never returns fails after a
/// minute rather than hanging the suite.
#[test]
fn handoff_counters_signal_and_wait() {
    use burn_cubecl::cubecl::Runtime;
    use burn_megatron_kernels::handoff::{CUBECL_DONE, HandoffCounters, OTHER_DONE};
    let (done, finished) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let device = Default::default();
        let client = burn_wgpu::WgpuRuntime::client(&device);
        let counters = HandoffCounters::new(&client, &device);
        counters.signal(CUBECL_DONE, 7);
        counters.wait(CUBECL_DONE, 7);
        counters.wait(CUBECL_DONE, 3);
        counters.signal(OTHER_DONE, 2);
        // 2 is three tickets past u32::MAX - 1.
        counters.wait(OTHER_DONE, u32::MAX - 1);
        let bytes = client.read_one(counters.buffer().handle.clone()).unwrap();
        let values: Vec<u32> = bytes
            .chunks_exact(4)
            .map(|b| u32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        done.send(values).unwrap();
    });
    let values = finished
        .recv_timeout(std::time::Duration::from_secs(60))
        .expect("a hand-off wait did not return within 60 s");
    assert_eq!(values, [7, 2]);
}
