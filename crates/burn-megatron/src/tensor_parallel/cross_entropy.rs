//! Cross-entropy over logits whose vocabulary is split across the tensor-parallel ranks.

use burn::tensor::{Bool, DType, Int, Tensor, TensorData};
use burn_megatron_kernels::{CrossEntropy, reference_kernels, with_dtype};

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
/// Arithmetic is fp32 whatever the logits' type. On backends with the fused kernels
/// ([`vocab_parallel_cross_entropy_from_statistics`]) the logits are read once forward and
/// once backward and never copied; elsewhere plain Burn ops on an fp32 copy.
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
    if B::has_fused_kernels() && !reference_kernels() {
        return vocab_parallel_cross_entropy_from_statistics(
            logits,
            targets,
            partition,
            group,
            label_smoothing,
        );
    }
    check_width(&logits, partition);
    let logits = with_dtype(logits, DType::F32);
    let [batch, seq, width] = logits.dims();
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

fn check_width<B: ParallelBackend>(logits: &Tensor<B, 3>, partition: &VocabPartition) {
    let [_, _, width] = logits.dims();
    assert_eq!(
        width,
        partition.len(),
        "logits have {width} vocabulary entries but this rank's partition has {}",
        partition.len()
    );
}

/// [`vocab_parallel_cross_entropy`] from per-row statistics of each rank's slice
/// ([`FusedKernels::logit_statistics`](burn_megatron_kernels::FusedKernels::logit_statistics):
/// maximum, `Σ exp(x - max)`, target logit, `Σ x`), combined across the group in two
/// all-reduces of `[batch · seq]` values; the gradient is one pass over the logits
/// ([`FusedKernels::cross_entropy_backward`](burn_megatron_kernels::FusedKernels::cross_entropy_backward)).
/// What runs with the fused kernels; on other backends the statistics come from plain
/// Burn ops (for tests: the same loss as the unsplit logits).
///
/// # Panics
///
/// As [`vocab_parallel_cross_entropy`].
pub fn vocab_parallel_cross_entropy_from_statistics<B: ParallelBackend>(
    logits: Tensor<B, 3>,
    targets: Tensor<B, 2, Int>,
    partition: &VocabPartition,
    group: &Group,
    label_smoothing: f64,
) -> Tensor<B, 2> {
    check_width(&logits, partition);
    let [batch, seq, width] = logits.dims();
    let rows = batch * seq;
    let logits = logits.reshape([rows, width]);
    let targets = targets.reshape([rows]);
    // Target columns in this slice; -1 where the target is another rank's.
    let outside = targets
        .clone()
        .lower_elem(partition.start as i64)
        .bool_or(targets.clone().greater_equal_elem(partition.end as i64));
    let local_targets = (targets - partition.start as i64).mask_fill(outside, -1);
    let statistics = B::logit_statistics(
        logits.clone().detach(),
        local_targets.clone(),
        partition.real_len(),
    );

    let all_reduce = |tensor: Tensor<B, 1>, op: ReduceOp, what: &str| {
        group
            .all_reduce(tensor, op)
            .unwrap_or_else(|error| panic!("cross-entropy {what}: {error}"))
    };
    let max = all_reduce(statistics.max.clone(), ReduceOp::Max, "maximum");
    // Each slice's sum of exponentials rescaled to the global maximum, the target's logit
    // (from the one slice holding it) and the sum of logits, in one all-reduce.
    let rescaled = statistics.sum_exp * (statistics.max - max.clone()).exp();
    let sums = all_reduce(
        Tensor::cat(vec![rescaled, statistics.target, statistics.sum], 0),
        ReduceOp::Sum,
        "sums",
    );
    let [sum_exp, target, logit_sum] =
        [0, 1, 2].map(|part| sums.clone().narrow(0, part * rows, rows));
    let log_sum_exp = max + sum_exp.log();
    let nll = log_sum_exp.clone() - target;
    let loss = if label_smoothing > 0.0 {
        let mean_neg_log_prob = log_sum_exp.clone() - logit_sum / partition.vocab_size as f64;
        nll * (1.0 - label_smoothing) + mean_neg_log_prob * label_smoothing
    } else {
        nll
    };
    let cross_entropy = CrossEntropy {
        real_width: partition.real_len(),
        vocab_size: partition.vocab_size,
        label_smoothing,
    };
    B::cross_entropy_loss(logits, local_targets, log_sum_exp, loss, cross_entropy)
        .reshape([batch, seq])
}
