//! Parameter initialization that does not depend on the parallel layout.
//!
//! Every element of a full (unsplit) parameter gets a value from its seed and its position
//! in the full tensor, so a rank computes just its own shard and the shards of any
//! tensor-parallel size put together give the same full tensor.

use burn::config::Config;
use burn::tensor::{Tensor, TensorData, backend::Backend};

/// How the values of a parameter are drawn.
#[derive(Config, Debug, PartialEq)]
pub enum ParamInit {
    /// Normal with mean 0 and the given standard deviation (Megatron's `init_method_std`,
    /// 0.02 by default).
    Normal {
        /// Standard deviation.
        std: f64,
    },
    /// All zeros (biases).
    Zeros,
    /// All ones (norm weights).
    Ones,
}

impl ParamInit {
    /// The part `[start, start + len)` along `dim` of a full parameter of shape `full`,
    /// drawn with `seed`, as a tensor on `device`.
    ///
    /// # Panics
    ///
    /// When `dim` or the range is outside `full`.
    pub fn init_shard<B: Backend, const D: usize>(
        &self,
        full: [usize; D],
        dim: usize,
        start: usize,
        len: usize,
        seed: u64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        assert!(
            dim < D && start + len <= full[dim],
            "shard {start}..{} of dimension {dim} is outside shape {full:?}",
            start + len
        );
        let mut shape = full;
        shape[dim] = len;
        let values: Vec<f32> = match self {
            ParamInit::Zeros => vec![0.0; shape.iter().product()],
            ParamInit::Ones => vec![1.0; shape.iter().product()],
            ParamInit::Normal { std } => shard_indices(full, dim, start, len)
                .map(|index| (standard_normal(seed, index) * std) as f32)
                .collect(),
        };
        Tensor::from_data(TensorData::new(values, shape), device)
    }

    /// The whole parameter of shape `full`.
    pub fn init<B: Backend, const D: usize>(
        &self,
        full: [usize; D],
        seed: u64,
        device: &B::Device,
    ) -> Tensor<B, D> {
        self.init_shard(full, 0, 0, full[0], seed, device)
    }
}

/// Flat indices into the full row-major tensor of the shard's elements, in the shard's
/// row-major order.
fn shard_indices<const D: usize>(
    full: [usize; D],
    dim: usize,
    start: usize,
    len: usize,
) -> impl Iterator<Item = u64> {
    // outer: dims before `dim`; inner: dims after it.
    let outer: usize = full[..dim].iter().product();
    let inner: usize = full[dim + 1..].iter().product();
    let full_dim = full[dim];
    (0..outer).flat_map(move |o| {
        (start..start + len).flat_map(move |d| {
            let base = (o * full_dim + d) * inner;
            (base..base + inner).map(|i| i as u64)
        })
    })
}

/// SplitMix64: a counter-based generator, so any element can be drawn on its own.
fn splitmix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A uniform draw in (0, 1].
fn uniform(seed: u64, counter: u64) -> f64 {
    let bits = splitmix64(splitmix64(seed) ^ counter) >> 11;
    (bits + 1) as f64 / (1u64 << 53) as f64
}

/// A standard normal draw for element `index` (Box-Muller).
fn standard_normal(seed: u64, index: u64) -> f64 {
    let u1 = uniform(seed, 2 * index);
    let u2 = uniform(seed, 2 * index + 1);
    (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn normal_draws_have_the_requested_moments() {
        let n = 200_000u64;
        let draws: Vec<f64> = (0..n).map(|i| standard_normal(7, i)).collect();
        let mean = draws.iter().sum::<f64>() / n as f64;
        let var = draws.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / n as f64;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var - 1.0).abs() < 0.01, "variance {var}");
    }

    #[test]
    fn shards_tile_the_full_tensor() {
        let full = [3, 4, 2];
        let all: Vec<u64> = shard_indices(full, 1, 0, 4).collect();
        assert_eq!(all, (0..24).collect::<Vec<_>>());
        let second_half: Vec<u64> = shard_indices(full, 1, 2, 2).collect();
        assert_eq!(&second_half[..4], &[4, 5, 6, 7]);
        assert_eq!(&second_half[4..8], &[12, 13, 14, 15]);
    }
}
