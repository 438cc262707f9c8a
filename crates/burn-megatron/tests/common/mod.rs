//! Helpers shared by the integration tests: the test backend, seeded data and tolerant
//! comparison.

#![allow(dead_code)]

use burn::backend::Autodiff;
use burn::tensor::TensorData;
use burn_megatron::parallel::{Layout, LocalCluster};

/// The CPU backend with autodiff, in f32.
pub type TestBackend = Autodiff<burn_ndarray::NdArray<f32>>;
/// Its device.
pub type Device = burn_ndarray::NdArrayDevice;

/// A cluster of `tp` thread ranks (no pipeline or data parallelism).
pub fn tensor_parallel_cluster(tp: usize) -> LocalCluster {
    LocalCluster::new(Layout::new(tp, 1, 1).unwrap())
}

/// Values uniform in [-1, 1) from a seeded generator, as f32 data of the given shape.
pub fn random(shape: &[usize], seed: u64) -> TensorData {
    let mut state = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let count: usize = shape.iter().product();
    let values: Vec<f32> = (0..count)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    TensorData::new(values, shape.to_vec())
}

/// Values of `data` as f32.
pub fn values(data: &TensorData) -> Vec<f32> {
    data.to_vec::<f32>().expect("f32 data")
}

/// Asserts that `actual` equals `expected` within `tolerance`, relative to the largest
/// magnitude of `expected`.
pub fn assert_close(actual: &TensorData, expected: &TensorData, tolerance: f32, what: &str) {
    assert_eq!(
        actual.shape, expected.shape,
        "{what}: shape {:?} instead of {:?}",
        actual.shape, expected.shape
    );
    let (actual, expected) = (values(actual), values(expected));
    let scale = expected.iter().fold(1e-12f32, |m, v| m.max(v.abs()));
    let worst = actual
        .iter()
        .zip(&expected)
        .map(|(a, e)| (a - e).abs())
        .fold(0f32, f32::max);
    assert!(
        worst / scale <= tolerance,
        "{what}: relative error {} exceeds {tolerance} (max |diff| {worst}, scale {scale})",
        worst / scale
    );
}
