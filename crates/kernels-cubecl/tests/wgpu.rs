//! The kernels on CubeCL's wgpu runtime, which runs on a CPU through Mesa's software Vulkan
//! (lavapipe: `apt-get install mesa-vulkan-drivers libvulkan1`), against the plain-Burn
//! references on the same device. `cargo test -p burn-megatron-kernels --features wgpu`.
#![cfg(feature = "wgpu")]

use burn::tensor::DType;
use burn_megatron_kernels::check::check_kernels;

type Wgpu = burn_wgpu::Wgpu<f32, i32, u32>;

#[test]
fn kernels_and_gradients_match_the_references_on_wgpu() {
    let checks = check_kernels::<Wgpu>(&Default::default(), DType::F32);
    let mut failed = Vec::new();
    for check in &checks {
        println!(
            "{:<18} {:<14} {:<18} error {:.2e} (limit {:.0e})",
            check.kernel,
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
