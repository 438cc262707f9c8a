//! # burn-megatron-kernels
//!
//! The memory-bound operations between a transformer's GEMMs, each fused into one kernel
//! with its backward, as a Burn backend extension ([`FusedKernels`]):
//!
//! - [`FusedKernels::norm`]: LayerNorm (with a bias) or RMSNorm (without) over the last
//!   dimension, statistics in fp32 whatever the input type;
//! - [`FusedKernels::bias_gelu`]: bias add and GeLU (exact or tanh);
//! - [`FusedKernels::bias_dropout_add`]: bias add, dropout with a mask computed from a
//!   seed and the element's position in the unsplit tensor (so tensor- and
//!   sequence-parallel ranks drop what the single-rank run drops, and the backward
//!   regenerates the mask instead of storing it), and the residual add;
//! - [`FusedKernels::scaled_masked_softmax`] and its backward: attention scores scaled,
//!   causal and padding masks applied, softmax in fp32, in one pass over each row;
//! - [`FusedKernels::logit_statistics`], [`FusedKernels::cross_entropy_loss`] and
//!   [`FusedKernels::cross_entropy_backward`]: cross-entropy over a vocabulary slice of
//!   logits (a tensor-parallel rank's) from per-row statistics that ranks combine, one pass
//!   over the logits forward and one backward, fp32 arithmetic on logits of any float type;
//! - [`FusedKernels::adamw`]: an AdamW step on flat fp32 master weights and moments, one
//!   pass over the buffers, written in place.
//!
//! Every operation has a reference in plain Burn ops, the default of each method, which
//! runs on every backend. CubeCL backends (CUDA, and wgpu for the tests on a CPU through
//! Mesa's software Vulkan) run the kernels in `cube`; on autodiff their backward is one
//! kernel too. [`use_reference_ops`] (or `BURN_MEGATRON_REFERENCE_OPS=1`) forces the
//! references everywhere, [`use_reference_kernels`] only those of the kernels.
//!
//! Supporting a backend is one line (`impl FusedKernels for MyBackend {}`).

#![warn(missing_docs)]

mod autodiff;
pub mod check;
#[cfg(feature = "cubecl")]
mod cube;
pub mod dropout;
#[cfg(feature = "cubecl")]
pub mod handoff;
mod reference;

use std::sync::OnceLock;
use std::sync::atomic::{AtomicBool, Ordering};

use burn::tensor::{Bool, DType, Int, Tensor, backend::Backend};

pub use reference::{
    attention_mask, reference_adamw, reference_bias_dropout_add, reference_bias_gelu,
    reference_bias_gelu_backward, reference_column_sums, reference_cross_entropy_backward,
    reference_cross_entropy_loss, reference_embedding, reference_embedding_grad,
    reference_flatten_into, reference_logit_statistics, reference_norm, reference_norm_backward,
    reference_norm_forward, reference_softmax, reference_softmax_backward,
    reference_sum_of_squares, softmax_dtype,
};

static REFERENCE_OPS: AtomicBool = AtomicBool::new(false);
static REFERENCE_KERNELS: AtomicBool = AtomicBool::new(false);

/// Forces the plain-Burn reference of every fast op and kernel (for comparisons and
/// debugging); the environment variable `BURN_MEGATRON_REFERENCE_OPS=1` sets it at
/// start-up too.
pub fn use_reference_ops(reference: bool) {
    REFERENCE_OPS.store(reference, Ordering::Relaxed);
}

/// Whether the fast paths are off ([`use_reference_ops`] or `BURN_MEGATRON_REFERENCE_OPS=1`).
/// Called on hot paths: the environment is read once, the flag is an atomic load.
pub fn reference_ops() -> bool {
    static FROM_ENVIRONMENT: OnceLock<bool> = OnceLock::new();
    REFERENCE_OPS.load(Ordering::Relaxed)
        || environment_switch(&FROM_ENVIRONMENT, "BURN_MEGATRON_REFERENCE_OPS")
}

/// Whether the environment variable `name` is `1`, read once into `cell` (the switches
/// for diagnosis and comparison, asked on hot paths).
pub fn environment_switch(cell: &'static OnceLock<bool>, name: &str) -> bool {
    *cell.get_or_init(|| std::env::var(name).is_ok_and(|value| value == "1"))
}

/// Forces the plain-Burn references of the fused kernels only (the GEMMs stay fast), to
/// measure what the kernels bring.
pub fn use_reference_kernels(reference: bool) {
    REFERENCE_KERNELS.store(reference, Ordering::Relaxed);
}

/// Whether the fused kernels are off: [`use_reference_kernels`] or [`reference_ops`].
pub fn reference_kernels() -> bool {
    REFERENCE_KERNELS.load(Ordering::Relaxed) || reference_ops()
}

/// `tensor` in `dtype` (unchanged when it already is).
pub fn with_dtype<B: Backend, const D: usize>(tensor: Tensor<B, D>, dtype: DType) -> Tensor<B, D> {
    if tensor.dtype() == dtype {
        tensor
    } else {
        tensor.cast(dtype)
    }
}

/// Which GeLU: the exact one (`x Φ(x)`) or the tanh approximation (GPT-2's `gelu_new`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gelu {
    /// `x Φ(x)` with the error function.
    Exact,
    /// `x/2 (1 + tanh(√(2/π) (x + 0.044715 x³)))`.
    Tanh,
}

/// Dropout on a `[batch, seq, hidden]` tensor that is the part at `offsets` of a `full`
/// tensor (a sequence chunk under sequence parallelism): see [`dropout::dropout`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Dropout {
    /// Probability of dropping an element, in `[0, 1)`.
    pub p: f64,
    /// Seed of this site and pass.
    pub seed: u64,
    /// Shape of the unsplit tensor.
    pub full: [usize; 3],
    /// Position of this part in it.
    pub offsets: [usize; 3],
}

/// What the norm's backward needs besides its inputs: per row, the mean (zero for
/// RMSNorm) and the reciprocal standard deviation, both fp32 `[rows]`.
#[derive(Debug, Clone)]
pub struct NormStatistics<B: Backend> {
    /// Mean of each row (zeros for RMSNorm).
    pub mean: Tensor<B, 1>,
    /// `1 / sqrt(variance + epsilon)` of each row (of the mean square for RMSNorm).
    pub rstd: Tensor<B, 1>,
}

/// The fp32 state of AdamW over flat buffers of equal length: master weights and the
/// two moments.
#[derive(Debug, Clone)]
pub struct AdamWState<B: Backend> {
    /// fp32 master weights.
    pub master: Tensor<B, 1>,
    /// First moment (running mean of the gradients).
    pub exp_avg: Tensor<B, 1>,
    /// Second moment (running mean of the squared gradients).
    pub exp_avg_sq: Tensor<B, 1>,
}

/// The numbers of one AdamW step (PyTorch's `AdamW` with decoupled weight decay).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWStep {
    /// Learning rate.
    pub lr: f64,
    /// Decay of the first moment.
    pub beta1: f64,
    /// Decay of the second moment.
    pub beta2: f64,
    /// Added to the second moment's root.
    pub eps: f64,
    /// Decoupled weight decay (times the per-element decay mask).
    pub weight_decay: f64,
    /// Factor on the gradients first (gradient clipping; 1 for none).
    pub grad_factor: f64,
    /// The step's number, from 1 (bias correction).
    pub step: i32,
}

/// Per-row statistics of a vocabulary slice of logits (`[rows, width]`) over its real
/// columns, all fp32 `[rows]`. Ranks holding other slices combine them into the statistics
/// of the whole vocabulary (maximum of the maxima, exp-shifted sum of the sums).
#[derive(Debug, Clone)]
pub struct LogitStatistics<B: Backend> {
    /// The largest real logit of each row (`f32::MIN` when the slice has no real column).
    pub max: Tensor<B, 1>,
    /// `Σ exp(logit - max)` over the real columns.
    pub sum_exp: Tensor<B, 1>,
    /// The target's logit where the target is one of this slice's real columns, else 0.
    pub target: Tensor<B, 1>,
    /// `Σ logit` over the real columns (for label smoothing).
    pub sum: Tensor<B, 1>,
}

/// The cross-entropy of a vocabulary slice, as its backward needs it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CrossEntropy {
    /// The slice's columns that are real tokens, the first ones (the rest is vocabulary
    /// padding: no probability mass, no gradient).
    pub real_width: usize,
    /// The real vocabulary over all slices (label smoothing spreads over it).
    pub vocab_size: usize,
    /// Label smoothing ε: the loss is `(1 - ε) · nll + ε · mean_k(-log p_k)`.
    pub label_smoothing: f64,
}

/// `tensor` as `[rows, last dimension]`, and its shape to restore.
pub(crate) fn as_rows<B: Backend, const D: usize>(
    tensor: Tensor<B, D>,
) -> (Tensor<B, 2>, [usize; D]) {
    let shape = tensor.dims();
    let width = shape[D - 1];
    let rows = shape[..D - 1].iter().product();
    (tensor.reshape([rows, width]), shape)
}

/// Gradients of the norm's input, weight and bias (each in its tensor's dtype).
#[derive(Debug, Clone)]
pub struct NormGradients<B: Backend> {
    /// Of the input, `[rows, width]`.
    pub input: Tensor<B, 2>,
    /// Of the weight, `[width]`.
    pub weight: Tensor<B, 1>,
    /// Of the bias (LayerNorm), `[width]`.
    pub bias: Option<Tensor<B, 1>>,
}

/// A backend with the fused kernels; see the [crate](self) docs. Every method defaults to
/// the plain-Burn reference.
pub trait FusedKernels: Backend {
    /// Whether this backend runs the kernels (so that autodiff should use their backward
    /// rather than differentiate the reference).
    fn has_fused_kernels() -> bool {
        false
    }

    /// LayerNorm over the last dimension of `input` when `bias` is given, RMSNorm when
    /// not, then `* weight (+ bias)`. Statistics in fp32; the output has the input's dtype.
    fn norm<const D: usize>(
        input: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        bias: Option<Tensor<Self, 1>>,
        epsilon: f64,
    ) -> Tensor<Self, D> {
        reference_norm(input, weight, bias, epsilon)
    }

    /// [`norm`](Self::norm) of `[rows, width]` rows and the statistics its backward needs.
    fn norm_forward(
        input: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        bias: Option<Tensor<Self, 1>>,
        epsilon: f64,
    ) -> (Tensor<Self, 2>, NormStatistics<Self>) {
        reference_norm_forward(input, weight, bias, epsilon)
    }

    /// Gradients of [`norm`](Self::norm) given the output's gradient `grad`.
    fn norm_backward(
        grad: Tensor<Self, 2>,
        input: Tensor<Self, 2>,
        weight: Tensor<Self, 1>,
        has_bias: bool,
        statistics: NormStatistics<Self>,
    ) -> NormGradients<Self> {
        reference_norm_backward(grad, input, weight, has_bias, statistics)
    }

    /// `gelu(input + bias)` with `bias` (`[width]`) added to every row of `input`
    /// (`[rows, width]`); arithmetic in fp32.
    fn bias_gelu(
        input: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        gelu: Gelu,
    ) -> Tensor<Self, 2> {
        reference_bias_gelu(input, bias, gelu)
    }

    /// The gradient of [`bias_gelu`](Self::bias_gelu) with respect to its input (the
    /// bias's gradient is its sum over the rows).
    fn bias_gelu_backward(
        grad: Tensor<Self, 2>,
        input: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        gelu: Gelu,
    ) -> Tensor<Self, 2> {
        reference_bias_gelu_backward(grad, input, bias, gelu)
    }

    /// The sums of the columns of `input` (`[rows, width]`, any float type), accumulated
    /// and returned in fp32 (`[width]`): a bias's gradient from its output's gradient.
    fn column_sums(input: Tensor<Self, 2>) -> Tensor<Self, 1> {
        reference_column_sums(input)
    }

    /// `input + bias` with `bias` (`[width]`) added to every row of `input` (`[rows,
    /// width]`): a linear layer's bias. The add is Burn's; on autodiff the bias's gradient
    /// is [`column_sums`](Self::column_sums) of the output's gradient (Burn's backward of
    /// the broadcast sums it with a generic reduction, at about a sixth of the speed on
    /// an H200).
    fn bias_add(input: Tensor<Self, 2>, bias: Tensor<Self, 1>) -> Tensor<Self, 2> {
        input + bias.unsqueeze()
    }

    /// `residual + dropout(input + bias)` for `[batch, seq, hidden]` tensors (no dropout
    /// when `dropout` is `None`). The backward of the input is the output's gradient
    /// through the same mask: [`dropout_mask_apply`](Self::dropout_mask_apply).
    fn bias_dropout_add(
        input: Tensor<Self, 3>,
        bias: Option<Tensor<Self, 1>>,
        residual: Tensor<Self, 3>,
        dropout: Option<Dropout>,
    ) -> Tensor<Self, 3> {
        reference_bias_dropout_add(input, bias, residual, dropout)
    }

    /// Attention probabilities from raw scores `[batch, heads, queries, keys]`:
    /// `softmax(scores · scale)` over the keys, with keys after the query (`causal`) and
    /// padding keys (`padding`, `[batch, keys]`, true for padding) masked. Computed in
    /// [`softmax_dtype`] (fp32 for 16-bit scores), returned in the scores' type (as
    /// Megatron's fused softmax: half the memory traffic of fp32 probabilities); a fully
    /// masked row is uniform.
    fn scaled_masked_softmax(
        scores: Tensor<Self, 4>,
        scale: f64,
        causal: bool,
        padding: Option<Tensor<Self, 2, Bool>>,
    ) -> Tensor<Self, 4> {
        reference_softmax(scores, scale, causal, padding)
    }

    /// The gradient of the raw scores given the probabilities and their gradient:
    /// `scale · p · (dp - Σ p·dp)`, zero where masked, computed in [`softmax_dtype`] and
    /// returned in the probabilities' type.
    fn scaled_masked_softmax_backward(
        probabilities: Tensor<Self, 4>,
        grad: Tensor<Self, 4>,
        scale: f64,
        causal: bool,
        padding: Option<Tensor<Self, 2, Bool>>,
    ) -> Tensor<Self, 4> {
        reference_softmax_backward(probabilities, grad, scale, causal, padding)
    }

    /// [`LogitStatistics`] of `logits` (`[rows, width]`, any float type) over their first
    /// `real_width` columns, with `targets` (`[rows]`) the target columns in this slice
    /// (any other value for a target outside it).
    fn logit_statistics(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        real_width: usize,
    ) -> LogitStatistics<Self> {
        reference_logit_statistics(logits, targets, real_width)
    }

    /// The sum of the squares of the elements of `values` (fp32, `[len]`) that `counted`
    /// (fp32, 1 or 0 per element) counts, all without it; each element is cast to fp64
    /// before squaring and the sum is fp64, so that it does not depend on how the
    /// elements are split over ranks beyond fp64 rounding. Read back to the host (waits
    /// for the device).
    fn sum_of_squares(values: &Tensor<Self, 1>, counted: Option<&Tensor<Self, 1>>) -> f64 {
        reference_sum_of_squares(values, counted)
    }

    /// Whether [`sum_of_squares`](Self::sum_of_squares) runs its kernel on `device` (fp64
    /// arithmetic on the device) rather than the reference.
    fn sums_squares_in_kernel(device: &Self::Device) -> bool {
        let _ = device;
        false
    }

    /// Rows `ids` (`[batch, seq]`) of `weight` (`[rows, width]`): `[batch, seq, width]`,
    /// an embedding lookup. On autodiff with the kernels the weight's gradient is
    /// [`embedding_grad`](Self::embedding_grad), cast once to the weight's type;
    /// elsewhere [`reference_embedding`].
    fn embedding_lookup(weight: Tensor<Self, 2>, ids: Tensor<Self, 2, Int>) -> Tensor<Self, 3> {
        reference_embedding(weight, ids)
    }

    /// The gradient of rows `ids` (`[tokens]`) of a `[rows, width]` table with respect to
    /// the table, from the rows' gradient `grad` (`[tokens, width]`): each row of `grad`
    /// added to row `ids[token]`, in fp32 (`[rows, width]`). On CUDA one kernel adds every
    /// element atomically; elsewhere Burn's `select_assign`.
    fn embedding_grad(
        grad: Tensor<Self, 2>,
        ids: Tensor<Self, 1, Int>,
        rows: usize,
    ) -> Tensor<Self, 2> {
        reference_embedding_grad(grad, ids, rows)
    }

    /// `parts` (1-D, of any float types) concatenated in fp32, or added to `sum` (fp32,
    /// their total length) when given: a micro-batch's parameter gradients into the flat
    /// main-grad buffer. With the kernels, one kernel per part writes (or adds) its fp32
    /// values in place in the buffer (a `sum` another tensor shares is copied first);
    /// elsewhere it is Burn's cast, concatenation and add.
    fn flatten_into(parts: Vec<Tensor<Self, 1>>, sum: Option<Tensor<Self, 1>>) -> Tensor<Self, 1> {
        reference_flatten_into(parts, sum)
    }

    /// One AdamW step on `state` with gradients `grads` and per-element weight-decay mask
    /// `decay` (1 where the element decays, 0 elsewhere), all fp32 and of one length:
    /// `g = grad_factor · grads`, `m = β₁m + (1-β₁)g`, `v = β₂v + (1-β₂)g²`, `master -=
    /// lr · (m̂ / (√v̂ + ε) + weight_decay · decay · master)` with the bias-corrected
    /// `m̂ = m / (1-β₁ᵗ)`, `v̂ = v / (1-β₂ᵗ)`. Returns the new state.
    fn adamw(
        state: AdamWState<Self>,
        grads: Tensor<Self, 1>,
        decay: Tensor<Self, 1>,
        step: AdamWStep,
    ) -> AdamWState<Self> {
        reference_adamw(state, grads, decay, step)
    }

    /// `loss` (`[rows]`, computed from the combined statistics, no graph of its own) joined
    /// to the graph of `logits`: its gradient with respect to them is
    /// [`cross_entropy_backward`](Self::cross_entropy_backward) with `log_sum_exp`, the
    /// whole vocabulary's `log Σ exp(logit)` per row. The logits are not stored twice:
    /// the backward reads them again.
    fn cross_entropy_loss(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        log_sum_exp: Tensor<Self, 1>,
        loss: Tensor<Self, 1>,
        cross_entropy: CrossEntropy,
    ) -> Tensor<Self, 1> {
        // Without autodiff there is no graph to join (Autodiff overrides this).
        let _ = (logits, targets, log_sum_exp, cross_entropy);
        loss
    }

    /// The gradient of the cross-entropy with respect to the slice's logits given the
    /// loss's gradient `grad` (`[rows]`): `grad · (p - (1 - ε) · onehot(target) - ε / V)`
    /// on real columns with `p = exp(logit - log_sum_exp)`, zero on padding; in the
    /// logits' dtype.
    fn cross_entropy_backward(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        log_sum_exp: Tensor<Self, 1>,
        grad: Tensor<Self, 1>,
        cross_entropy: CrossEntropy,
    ) -> Tensor<Self, 2> {
        reference_cross_entropy_backward(logits, targets, log_sum_exp, grad, cross_entropy)
    }

    /// `tensor` with the elements that `dropout` drops zeroed and the rest scaled by
    /// `1 / (1 - p)`.
    fn dropout_mask_apply(tensor: Tensor<Self, 3>, dropout: Dropout) -> Tensor<Self, 3> {
        dropout::dropout(
            tensor,
            dropout.p,
            dropout.seed,
            dropout.full,
            dropout.offsets,
        )
    }
}

#[cfg(feature = "cuda")]
impl<B: burn_fusion::FusionBackend + FusedKernels> FusedKernels for burn_fusion::Fusion<B> {}

impl_for_ndarray!(FusedKernels);

/// Implements a backend extension trait whose methods all have defaults for every NdArray
/// backend, with the bounds NdArray's element types need written once:
/// `burn_megatron_kernels::impl_for_ndarray!(MyOps);`.
#[macro_export]
macro_rules! impl_for_ndarray {
    ($extension:path) => {
        impl<E, I, Q> $extension for $crate::__ndarray::NdArray<E, I, Q>
        where
            E: $crate::__ndarray::FloatNdArrayElement,
            I: $crate::__ndarray::IntNdArrayElement,
            Q: $crate::__ndarray::QuantElement,
            $crate::__ndarray::NdArrayTensor: From<$crate::__ndarray::SharedArray<E>>,
            $crate::__ndarray::NdArrayTensor: From<$crate::__ndarray::SharedArray<I>>,
        {
        }
    };
}

#[doc(hidden)]
pub use burn_ndarray as __ndarray;

/// Splits autodiff tensors into their graph nodes and the inner backend's (`$backend`)
/// tensors for a custom autodiff op: `let (a, b, nodes) = detach_inner!(B; a, b);`. The
/// autodiff tensors are cloned, not moved: the caller's bindings, shadowed by the inner
/// tensors, stay alive until the function returns, after the op's node is registered.
/// Burn's graph cleanup, which any thread's backward runs, drops the nodes that no live
/// tensor refers to; a parent dropped before its child was registered lost its gradient
/// path (thread ranks sharing the autodiff graph store saw wrong gradients).
#[macro_export]
macro_rules! detach_inner {
    ($backend:ty; $($tensor:ident),+) => {{
        let nodes = [$($tensor.clone().into_primitive().tensor().node),+];
        ($(::burn::tensor::Tensor::<$backend, _>::from_primitive(
            ::burn::tensor::TensorPrimitive::Float($tensor.clone().into_primitive().tensor().primitive),
        )),+, nodes)
    }};
}
