//! Megatron's gradient-accumulation fusion: the weight gradients of the linear layers go
//! from their GEMM straight into fp32 accumulators, one per weight for the whole step,
//! instead of being made in the weights' type, then cast and added micro-batch after
//! micro-batch. On CUDA the GEMM adds into the accumulator in place (cuBLASLt with an fp32
//! output and `beta = 1`); elsewhere [`reference_gemm_accumulate`] computes the same sum.
//!
//! A training step opens this thread's accumulators ([`begin_weight_grads`]); while they
//! are open, [`linear_param`](super::linear_param) builds products whose backward adds the
//! weight gradient there (and registers none); the step then takes them
//! ([`take_weight_grads`]).

use std::any::Any;
use std::cell::RefCell;
use std::collections::HashMap;

use burn::module::ParamId;
use burn::tensor::backend::Backend;
use burn::tensor::{DType, Tensor};

use super::{MegatronOps, reference_gemm, with_dtype};

thread_local! {
    /// This thread's open accumulators: a `WeightGrads<B>` of the inner backend.
    static ACCUMULATORS: RefCell<Option<Box<dyn Any>>> = const { RefCell::new(None) };
}

/// Fused weight gradients by parameter: fp32, in the weights' shapes.
pub type WeightGrads<B> = HashMap<ParamId, Tensor<B, 2>>;

/// Opens this thread's weight-gradient accumulators (empty) for a training step on
/// backend `B` (the inner backend of the autodiff one).
pub fn begin_weight_grads<B: Backend>() {
    ACCUMULATORS.with(|open| *open.borrow_mut() = Some(Box::new(WeightGrads::<B>::new())));
}

/// Closes this thread's accumulators and gives what they hold (nothing when none were
/// open).
pub fn take_weight_grads<B: Backend>() -> WeightGrads<B> {
    ACCUMULATORS
        .with(|open| open.borrow_mut().take())
        .and_then(|grads| grads.downcast::<WeightGrads<B>>().ok())
        .map(|grads| *grads)
        .unwrap_or_default()
}

/// Whether this thread's accumulators are open.
pub fn accumulating() -> bool {
    ACCUMULATORS.with(|open| open.borrow().is_some())
}

/// Whether this thread's open accumulators (of backend `B`) hold a gradient of `id`.
pub fn holds<B: Backend>(id: ParamId) -> bool {
    ACCUMULATORS.with(|open| {
        open.borrow()
            .as_ref()
            .and_then(|grads| grads.downcast_ref::<WeightGrads<B>>())
            .is_some_and(|grads| grads.contains_key(&id))
    })
}

/// Adds `op(a) · op(b)` to the accumulator of parameter `id`; false (nothing done) when no
/// accumulators of backend `B` are open on this thread.
pub(super) fn accumulate<B: MegatronOps>(
    id: ParamId,
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    transpose_a: bool,
    transpose_b: bool,
) -> bool {
    ACCUMULATORS.with(|open| {
        let mut open = open.borrow_mut();
        let Some(grads) = open
            .as_mut()
            .and_then(|grads| grads.downcast_mut::<WeightGrads<B>>())
        else {
            return false;
        };
        let sum = grads.remove(&id);
        grads.insert(id, B::gemm_accumulate(a, b, transpose_a, transpose_b, sum));
        true
    })
}

/// `sum + op(a) · op(b)` in fp32 (the product of the fp32 values of `a` and `b`; no `sum`:
/// the product alone), with Burn's matmul.
pub fn reference_gemm_accumulate<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    transpose_a: bool,
    transpose_b: bool,
    sum: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    let product = reference_gemm(
        with_dtype(a, DType::F32),
        with_dtype(b, DType::F32),
        transpose_a,
        transpose_b,
    );
    match sum {
        Some(sum) => with_dtype(sum, DType::F32) + product,
        None => product,
    }
}
