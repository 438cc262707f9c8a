//! The operations that carry a transformer's FLOPs and activation memory, as a backend
//! extension with fast paths and plain-Burn references.
//!
//! - [`MegatronOps::gemm`]: a 2-D matrix product with optional transposes. On CUDA it
//!   runs on cuBLASLt (bf16/fp16 with fp32 accumulation, fp32 with or without TF32);
//!   elsewhere, and whenever [`use_reference_ops`] is set, it is Burn's matmul, which is
//!   also the oracle in GPU tests. [`linear`] builds the parallel layers' products on it,
//!   with a backward whose input and weight gradients are GEMMs of the same kind.
//! - [`MegatronOps::batched_gemm`]: the same over a `[batch, heads]` grid of matrices
//!   (strided-batched cuBLASLt on CUDA): core attention's products.
//! - [`MegatronOps::core_attention`]: scaled, masked softmax attention as one op
//!   ([`CoreAttention`]); with selective recompute its backward recomputes the
//!   `[batch, heads, seq, seq]` scores from Q and K instead of storing them.
//!
//! Supporting a backend is one line (`impl MegatronOps for MyBackend {}`): every method
//! has the plain-Burn reference as its default.

mod attention;
#[cfg(feature = "cuda")]
mod cublaslt;
mod gemm;
mod weight_grads;

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::module::ParamId;
use burn::tensor::{Bool, Tensor};

pub use attention::{AttentionDropout, CoreAttention, Recompute, reference_attention};
pub use burn_megatron_kernels::{reference_ops, use_reference_ops, with_dtype};
#[cfg(feature = "cuda")]
pub use cublaslt::{allow_tf32, queue_gemms_on_device_thread};
pub use gemm::{
    linear, linear_param, matmul_with_gemm_backward, reference_batched_gemm, reference_gemm,
};
pub use weight_grads::{
    WeightGrads, accumulating, begin_weight_grads, holds, reference_gemm_accumulate,
    take_weight_grads,
};

/// A backend with the transformer's heavy operations; see the [module](self) docs. The
/// fused memory-bound kernels between them (norms, bias-GeLU, bias-dropout-add) come with
/// [`FusedKernels`](burn_megatron_kernels::FusedKernels).
pub trait MegatronOps: burn_megatron_kernels::FusedKernels {
    /// Whether [`gemm`](Self::gemm) is faster than Burn's matmul here, so that autodiff
    /// should route products through it (false: the plain Burn graph is kept, and results
    /// stay those of Burn's own ops).
    fn has_fast_gemm() -> bool {
        false
    }

    /// The error of fast-path work that was queued without waiting and failed later (on
    /// CUDA: a cuBLASLt call on cubecl's device thread), reported once; such a failure
    /// also stops the next GEMM.
    fn check_queued_ops() -> Result<(), String> {
        Ok(())
    }

    /// Bytes of device memory this thread's tensors hold on `device` now (live
    /// allocations, not the pools' reserve), where the backend tells; `None` elsewhere.
    fn memory_in_use(_device: &Self::Device) -> Option<u64> {
        None
    }

    /// Runs `products`, a few GEMMs none of which reads another's output, as one unit: on
    /// CUDA they are queued together under one hand-off between cubecl's stream and
    /// cuBLASLt's (five launches less per GEMM after the first) once `products` returns,
    /// so nothing inside may use their outputs (inputs made inside are fine): any Burn op
    /// on an output inside would be queued before the GEMM that writes it. (The outputs
    /// are contiguous, so reshapes that drop or split their dimensions only change
    /// metadata.) Elsewhere this is `products()`.
    fn gemm_group<T>(products: impl FnOnce() -> T) -> T {
        products()
    }

    /// `op(a) · op(b)` for 2-D `a` and `b`, where `op(x)` is `x` transposed when its flag
    /// is set.
    fn gemm(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 2> {
        reference_gemm(a, b, transpose_a, transpose_b)
    }

    /// `sum + op(a) · op(b)` in fp32 (`sum`: fp32 `[m, n]`; none: the product alone), the
    /// weight-gradient GEMM of gradient-accumulation fusion. On CUDA the sum is formed by
    /// cuBLASLt and written over `sum`'s buffer, which the caller must own alone.
    fn gemm_accumulate(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
        sum: Option<Tensor<Self, 2>>,
    ) -> Tensor<Self, 2> {
        reference_gemm_accumulate(a, b, transpose_a, transpose_b, sum)
    }

    /// `x · weight + bias`, `bias` (`[n]`) added to every row: a linear layer's product
    /// and bias as one operation. On CUDA the bias is added by cuBLASLt's epilogue as the
    /// product is written (no second pass over the output); elsewhere, and where the
    /// epilogue does not apply, it is [`gemm`](Self::gemm) then
    /// [`bias_add`](burn_megatron_kernels::FusedKernels::bias_add).
    fn gemm_bias(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Tensor<Self, 1>,
    ) -> Tensor<Self, 2> {
        Self::bias_add(Self::gemm(x, weight, false, false), bias)
    }

    /// A linear layer's `x · weight (+ bias)` for rows `x`, through [`gemm`](Self::gemm) or
    /// [`gemm_bias`](Self::gemm_bias). On autodiff, one op whose backward is the input- and
    /// weight-gradient GEMMs (as one [`gemm_group`](Self::gemm_group)) and the bias's
    /// column sums; with `id`, the weight parameter's, and this thread's weight-gradient
    /// accumulators open ([`begin_weight_grads`]), the weight gradient goes to the
    /// accumulator of `id` ([`gemm_accumulate`](Self::gemm_accumulate)) rather than to
    /// the graph.
    fn linear_product(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        _id: Option<ParamId>,
    ) -> Tensor<Self, 2> {
        match bias {
            Some(bias) => Self::gemm_bias(x, weight, bias),
            None => Self::gemm(x, weight, false, false),
        }
    }

    /// `op(a) · op(b)` for each of the `[batch, heads]` matrices of 4-D `a` and `b` (the
    /// product over the last two dimensions; `op` transposes those).
    fn batched_gemm(
        a: Tensor<Self, 4>,
        b: Tensor<Self, 4>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 4> {
        reference_batched_gemm(a, b, transpose_a, transpose_b)
    }

    /// [`batched_gemm`](Self::batched_gemm) for a caller that merges the heads of the
    /// product next (`[batch, heads, m, n]` to `[batch, m, heads · n]`: attention's
    /// context, the gradients of its query, key and value): where the backend can, the
    /// product is stored as `[batch, m, heads, n]` and returned as its `[batch, heads, m,
    /// n]` view, so that the merge is a view too rather than a copy.
    fn batched_gemm_heads_merged(
        a: Tensor<Self, 4>,
        b: Tensor<Self, 4>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 4> {
        Self::batched_gemm(a, b, transpose_a, transpose_b)
    }

    /// Attention of `query` over `key`/`value` (`[batch, heads, seq, head_dim]`, the key
    /// and value already expanded to the query's heads); `padding` (`[batch, seq]`, true
    /// for padding) masks keys. Returns the context, `[batch, heads, seq, head_dim]`.
    fn core_attention(
        query: Tensor<Self, 4>,
        key: Tensor<Self, 4>,
        value: Tensor<Self, 4>,
        padding: Option<Tensor<Self, 2, Bool>>,
        spec: &CoreAttention,
    ) -> Tensor<Self, 4> {
        reference_attention(query, key, value, padding, spec)
    }
}

burn_megatron_kernels::impl_for_ndarray!(MegatronOps);

#[cfg(feature = "cuda")]
impl<B: burn_fusion::FusionBackend + MegatronOps> MegatronOps for burn_fusion::Fusion<B> {}

impl<B: MegatronOps, C: CheckpointStrategy> MegatronOps for Autodiff<B, C> {
    fn has_fast_gemm() -> bool {
        B::has_fast_gemm()
    }

    fn gemm_group<T>(products: impl FnOnce() -> T) -> T {
        B::gemm_group(products)
    }

    fn memory_in_use(device: &Self::Device) -> Option<u64> {
        B::memory_in_use(device)
    }

    fn gemm(
        a: Tensor<Self, 2>,
        b: Tensor<Self, 2>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 2> {
        if B::has_fast_gemm() {
            let a = if transpose_a { a.transpose() } else { a };
            let b = if transpose_b { b.transpose() } else { b };
            matmul_with_gemm_backward(a, b)
        } else {
            reference_gemm(a, b, transpose_a, transpose_b)
        }
    }

    fn linear_product(
        x: Tensor<Self, 2>,
        weight: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        id: Option<ParamId>,
    ) -> Tensor<Self, 2> {
        gemm::linear_op(x, weight, bias, id)
    }

    fn batched_gemm(
        a: Tensor<Self, 4>,
        b: Tensor<Self, 4>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> Tensor<Self, 4> {
        if B::has_fast_gemm() {
            let a = if transpose_a { a.swap_dims(2, 3) } else { a };
            let b = if transpose_b { b.swap_dims(2, 3) } else { b };
            matmul_with_gemm_backward(a, b)
        } else {
            reference_batched_gemm(a, b, transpose_a, transpose_b)
        }
    }

    fn core_attention(
        query: Tensor<Self, 4>,
        key: Tensor<Self, 4>,
        value: Tensor<Self, 4>,
        padding: Option<Tensor<Self, 2, Bool>>,
        spec: &CoreAttention,
    ) -> Tensor<Self, 4> {
        match spec.recompute {
            Recompute::Off => reference_attention(query, key, value, padding, spec),
            Recompute::Selective => {
                attention::recomputed_attention(query, key, value, padding, spec)
            }
        }
    }
}
