//! Cross-entropy over logits whose vocabulary is split across the tensor-parallel ranks.

use burn::tensor::{Bool, Int, Tensor, TensorData};

use super::embedding::VocabPartition;
use super::mappings::reduce_from_tensor_parallel_region;
use crate::parallel::{Group, ParallelBackend, ReduceOp};

/// Per-token cross-entropy of `logits` (`[batch, seq, partition.len()]`, this rank's slice
/// of the padded vocabulary) against `targets` (`[batch, seq]`), without gathering the
/// logits: only `[batch, seq]` statistics cross the group. Returns `[batch, seq]`, the same
/// on every rank and equal to the loss over the unsplit logits.
///
/// Padding ids (`>= partition.vocab_size`) take no probability mass and get no gradient.
/// With `label_smoothing` ε > 0 the loss is `(1 - ε) * nll + ε * mean_k(-log p_k)` over
/// the real vocabulary (PyTorch's and HF's definition).
///
/// # Panics
///
/// When a collective fails (see [`mappings`](super::mappings)) or the logits' last
/// dimension is not `partition.len()`.
pub fn vocab_parallel_cross_entropy<B: ParallelBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    partition: &VocabPartition,
    group: &Group,
    label_smoothing: f64,
) -> Tensor<B, 2> {
    let [batch, seq, width] = logits.dims();
    assert_eq!(
        width,
        partition.len(),
        "logits have {width} vocabulary entries but this rank's partition has {}",
        partition.len()
    );
    let device = logits.device();
    let padding = (partition.real_len() < width).then(|| {
        let columns: Vec<bool> = (0..width).map(|c| c >= partition.real_len()).collect();
        Tensor::<B, 3, Bool>::from_data(TensorData::new(columns, [1, 1, width]), &device)
            .expand([batch, seq, width])
    });

    // The maximum over the real vocabulary, a constant for the gradient.
    let for_max = match &padding {
        Some(padding) => logits.clone().mask_fill(padding.clone(), f32::NEG_INFINITY),
        None => logits.clone(),
    };
    let local_max = for_max.detach().max_dim(2);
    let max = group
        .all_reduce(local_max, ReduceOp::Max)
        .unwrap_or_else(|error| panic!("cross-entropy maximum: {error}"));

    // Shifted logits, zero (and without gradient) on padding.
    let shifted = logits - max;
    let shifted = match &padding {
        Some(padding) => shifted.mask_fill(padding.clone(), 0.0),
        None => shifted,
    };
    let exp = shifted.clone().exp();
    let exp = match &padding {
        Some(padding) => exp.mask_fill(padding.clone(), 0.0),
        None => exp,
    };
    let sum_exp = reduce_from_tensor_parallel_region(exp.sum_dim(2), group);
    let log_sum_exp = sum_exp.log();

    // The target's shifted logit, from the rank whose slice holds it.
    let outside = targets
        .clone()
        .lower_elem(partition.start as i64)
        .bool_or(targets.clone().greater_equal_elem(partition.end as i64));
    let local_targets = (targets - partition.start as i64)
        .mask_fill(outside.clone(), 0)
        .unsqueeze_dim::<3>(2);
    let picked = shifted
        .clone()
        .gather(2, local_targets)
        .mask_fill(outside.unsqueeze_dim(2), 0.0);
    let target_logit = reduce_from_tensor_parallel_region(picked, group);

    let nll = log_sum_exp.clone() - target_logit;
    let loss = if label_smoothing > 0.0 {
        let sum_logits = reduce_from_tensor_parallel_region(shifted.sum_dim(2), group);
        let mean_neg_log_prob = log_sum_exp - sum_logits / partition.vocab_size as f64;
        nll * (1.0 - label_smoothing) + mean_neg_log_prob * label_smoothing
    } else {
        nll
    };
    loss.squeeze_dim(2)
}
