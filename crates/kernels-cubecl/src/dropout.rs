//! Dropout that agrees across tensor-parallel ranks.
//!
//! Whether an element is dropped depends only on a seed and the element's position in the
//! full (unsplit) tensor. Ranks holding copies of a tensor (the residual stream without
//! sequence parallelism) drop the same elements, and ranks holding parts of it (heads,
//! sequence chunks) drop exactly what the unsplit tensor would: the role of Megatron's
//! tensor-parallel RNG tracker, without per-rank generator state.

use burn::tensor::{Tensor, TensorData, backend::Backend};

/// Drops each element of `tensor` with probability `p` and scales the rest by
/// `1 / (1 - p)`. `tensor` is the part at `offsets` of a full tensor of shape `full`.
///
/// # Panics
///
/// When `p` is not in `[0, 1)` or the part does not fit in `full`.
pub fn dropout<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
    p: f64,
    seed: u64,
    full: [usize; D],
    offsets: [usize; D],
) -> Tensor<B, D> {
    assert!(
        (0.0..1.0).contains(&p),
        "dropout probability {p} must be in [0, 1)"
    );
    if p == 0.0 {
        return tensor;
    }
    let local = tensor.dims();
    for dim in 0..D {
        assert!(
            offsets[dim] + local[dim] <= full[dim],
            "part {local:?} at {offsets:?} is outside {full:?}"
        );
    }
    let count: usize = local.iter().product();
    let scale = (1.0 / (1.0 - p)) as f32;
    let threshold = keep_threshold(p);
    let mut mask = Vec::with_capacity(count);
    let mut index = [0usize; D];
    for _ in 0..count {
        let global = (0..D).fold(0u64, |flat, dim| {
            flat * full[dim] as u64 + (index[dim] + offsets[dim]) as u64
        });
        mask.push(if kept(seed, global, threshold) {
            scale
        } else {
            0.0
        });
        for dim in (0..D).rev() {
            index[dim] += 1;
            if index[dim] < local[dim] {
                break;
            }
            index[dim] = 0;
        }
    }
    let mask = Tensor::<B, D>::from_data(
        TensorData::new(mask, local),
        (&tensor.device(), tensor.dtype()),
    );
    tensor * mask
}

/// Whether the element at flat position `global` of the full tensor survives. Elements
/// come in groups of four consecutive positions; group `g` draws one 64-bit SplitMix64
/// value `mix(seed + g · γ)` and its element `i` takes the 16-bit field `i` of it. The
/// element is kept when its field is at least `threshold` ([`keep_threshold`]). One hash
/// per four elements keeps the GPU kernels memory-bound; they compute the same hash, so
/// masks agree bit for bit across backends.
pub fn kept(seed: u64, global: u64, threshold: u32) -> bool {
    let hash = mix(seed.wrapping_add((global / 4).wrapping_mul(GOLDEN_GAMMA)));
    ((hash >> (16 * (global % 4))) & 0xFFFF) as u32 >= threshold
}

/// The smallest 16-bit draw that survives dropout with probability `p`: a draw `d` is
/// kept when `d / 2^16 >= p`, that is when `d >= ceil(p · 2^16)`. The drop probability is
/// thus `p` rounded up to a multiple of 2^-16 (0.1 becomes 0.100006); survivors are
/// scaled by `1 / (1 - p)` as given.
pub fn keep_threshold(p: f64) -> u32 {
    (p * 65536.0).ceil() as u32
}

/// SplitMix64's increment, `2^64 / φ`.
pub const GOLDEN_GAMMA: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's output function: the increment added, then the finalizer.
pub fn mix(mut x: u64) -> u64 {
    x = x.wrapping_add(GOLDEN_GAMMA);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn_ndarray::NdArray<f32>;

    #[test]
    fn parts_drop_what_the_whole_drops_and_seeds_differ() {
        let device = Default::default();
        let ones = |shape: [usize; 3]| Tensor::<B, 3>::ones(shape, &device);
        let whole = dropout(ones([2, 4, 6]), 0.3, 7, [2, 4, 6], [0, 0, 0]);
        let part = dropout(ones([2, 2, 6]), 0.3, 7, [2, 4, 6], [0, 2, 0]);
        assert_eq!(whole.clone().narrow(1, 2, 2).into_data(), part.into_data());
        let again = dropout(ones([2, 4, 6]), 0.3, 7, [2, 4, 6], [0, 0, 0]);
        assert_eq!(
            whole.clone().into_data(),
            again.into_data(),
            "same seed, same mask"
        );
        let other = dropout(ones([2, 4, 6]), 0.3, 8, [2, 4, 6], [0, 0, 0]);
        assert_ne!(
            whole.clone().into_data(),
            other.into_data(),
            "another seed, another mask"
        );
        let kept = whole.clone().greater_elem(0.0).int().sum().into_scalar() as f64 / 48.0;
        assert!((0.45..0.9).contains(&kept), "kept share {kept}");
        let value = whole.max().into_scalar();
        assert!(
            (value - 1.0 / 0.7).abs() < 1e-6,
            "survivors are scaled: {value}"
        );
    }

    /// Attention dropout runs on `[batch, heads · seq, seq]` views of the heads' block
    /// (where the kernel works): the same elements drop as on the 4-D block.
    #[test]
    fn flattened_heads_drop_what_the_four_dimensional_block_drops() {
        let device = Default::default();
        let [batch, heads, all_heads, seq, first_head] = [2, 2, 5, 3, 1];
        let block = Tensor::<B, 4>::ones([batch, heads, seq, seq], &device);
        let four = dropout(
            block.clone(),
            0.4,
            9,
            [batch, all_heads, seq, seq],
            [0, first_head, 0, 0],
        );
        let flat = dropout(
            block.reshape([batch, heads * seq, seq]),
            0.4,
            9,
            [batch, all_heads * seq, seq],
            [0, first_head * seq, 0],
        );
        assert_eq!(
            four.into_data(),
            flat.reshape([batch, heads, seq, seq]).into_data()
        );
    }
}
