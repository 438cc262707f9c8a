//! Matrix products for the linear layers and attention: Burn's matmul as the reference,
//! and an autodiff op whose forward and both gradients go through
//! [`MegatronOps::batched_gemm`], so that on CUDA all three products run on cuBLASLt.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::module::{Param, ParamId};
use burn::tensor::{DType, Tensor, TensorPrimitive, backend::Backend};
use burn_megatron_kernels::with_dtype;

use super::MegatronOps;
use super::weight_grads::accumulate;

/// `op(a) · op(b)` with Burn's matmul.
pub fn reference_gemm<B: Backend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    transpose_a: bool,
    transpose_b: bool,
) -> Tensor<B, 2> {
    let a = if transpose_a { a.transpose() } else { a };
    let b = if transpose_b { b.transpose() } else { b };
    a.matmul(b)
}

/// `op(a) · op(b)` for each `[batch, heads]` matrix, with Burn's matmul.
pub fn reference_batched_gemm<B: Backend>(
    a: Tensor<B, 4>,
    b: Tensor<B, 4>,
    transpose_a: bool,
    transpose_b: bool,
) -> Tensor<B, 4> {
    let a = if transpose_a { a.swap_dims(2, 3) } else { a };
    let b = if transpose_b { b.swap_dims(2, 3) } else { b };
    a.matmul(b)
}

/// `op(a) · op(b)` over the last two dimensions of `D`-dimensional (2 to 4) tensors with
/// equal leading dimensions, through [`MegatronOps::batched_gemm`].
fn product<B: MegatronOps, const D: usize>(
    a: Tensor<B, D>,
    b: Tensor<B, D>,
    transpose_a: bool,
    transpose_b: bool,
) -> Tensor<B, D> {
    assert!((2..=4).contains(&D), "products of 2- to 4-D tensors");
    let mut shape = a.dims();
    let output = B::batched_gemm(a.unsqueeze(), b.unsqueeze(), transpose_a, transpose_b);
    let [_, _, m, n] = output.dims();
    [shape[D - 2], shape[D - 1]] = [m, n];
    output.reshape(shape)
}

/// `x · weight + bias` over the last dimension of `x` (`weight`: `[d_input, d_output]`, as
/// Burn's `Linear` stores it). Where the backend has a fast GEMM this is
/// [`MegatronOps::linear_product`] (the bias in the GEMM's epilogue on CUDA, the gradients
/// GEMMs of the same kind); elsewhere Burn's `linear`, unchanged.
pub fn linear<B: MegatronOps, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    if !B::has_fast_gemm() {
        return burn::tensor::module::linear(x, weight, bias);
    }
    over_rows(x, weight.dims()[1], |rows| {
        B::linear_product(rows, weight, bias, None)
    })
}

/// `product(x as rows)`, in `x`'s shape with the last dimension `d_output`.
fn over_rows<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    d_output: usize,
    product: impl FnOnce(Tensor<B, 2>) -> Tensor<B, 2>,
) -> Tensor<B, D> {
    let mut shape = x.dims();
    let d_input = shape[D - 1];
    let rows = x.shape().num_elements() / d_input.max(1);
    shape[D - 1] = d_output;
    product(x.reshape([rows, d_input])).reshape(shape)
}

/// [`linear`] of a layer's weight parameter: while this thread's weight-gradient
/// accumulators are open (a training step with gradient-accumulation fusion, see
/// [`begin_weight_grads`](super::begin_weight_grads)) the product is
/// [`MegatronOps::linear_product`] of the parameter, whose weight gradient goes to its fp32
/// accumulator; otherwise this is [`linear`].
pub fn linear_param<B: MegatronOps, const D: usize>(
    x: Tensor<B, D>,
    weight: &Param<Tensor<B, 2>>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    if !super::accumulating() {
        return linear(x, weight.val(), bias);
    }
    over_rows(x, weight.dims()[1], |rows| {
        B::linear_product(rows, weight.val(), bias, Some(weight.id))
    })
}

/// `x · w + bias` on an autodiff backend as one op ([`MegatronOps::linear_product`]): the
/// forward is the inner backend's `linear_product`; the backward makes the input gradient
/// and the weight gradient `xᵀ · d out` as one GEMM group (the weight gradient added to the
/// accumulator of parameter `id` instead while this thread's accumulators are open), and
/// the bias gradient as the column sums of `d out`.
pub(super) fn linear_op<B: MegatronOps, C: CheckpointStrategy>(
    x: Tensor<Autodiff<B, C>, 2>,
    w: Tensor<Autodiff<B, C>, 2>,
    bias: Option<Tensor<Autodiff<B, C>, 1>>,
    id: Option<ParamId>,
) -> Tensor<Autodiff<B, C>, 2> {
    let bias_dtype = bias.as_ref().map(|bias| bias.dtype());
    // Without a bias, an empty untracked tensor in its place: the op's third parent is
    // then none.
    let b = bias.unwrap_or_else(|| Tensor::empty([0], &x.device()));
    let (x, w, b, nodes) = burn_megatron_kernels::detach_inner!(B; x, w, b);
    let output = B::linear_product(x.clone(), w.clone(), bias_dtype.map(|_| b), id)
        .into_primitive()
        .tensor();
    let output = match LinearBackward
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((x, w, id, bias_dtype), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

/// The backward of [`linear_op`]. Parents: input, weight, bias.
#[derive(Debug)]
struct LinearBackward;

impl<B: MegatronOps> Backward<B, 3> for LinearBackward {
    /// The input, the weight, the weight parameter, the bias's type (none: no bias).
    type State = (Tensor<B, 2>, Tensor<B, 2>, Option<ParamId>, Option<DType>);

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, w, id, bias_dtype) = ops.state;
        let grad =
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let [x_parent, w_parent, bias_parent] = ops.parents;
        // Both products as one group (the weight gradient onto its accumulator, or into
        // the graph when there is none open); registered after it.
        let (weight_grad, input_grad) = B::gemm_group(|| {
            let weight_grad = w_parent.as_ref().and_then(|_| {
                let accumulated =
                    id.is_some_and(|id| accumulate::<B>(id, x.clone(), grad.clone(), true, false));
                (!accumulated).then(|| B::gemm(x, grad.clone(), true, false))
            });
            let input_grad = x_parent
                .as_ref()
                .map(|_| B::gemm(grad.clone(), w, false, true));
            (weight_grad, input_grad)
        });
        let bias_grad = bias_parent
            .as_ref()
            .zip(bias_dtype)
            .map(|(_, dtype)| with_dtype(B::column_sums(grad), dtype));
        register(
            grads,
            [
                (w_parent.map(|p| p.id), weight_grad),
                (x_parent.map(|p| p.id), input_grad),
            ],
        );
        if let (Some(parent), Some(grad)) = (bias_parent, bias_grad) {
            grads.register::<B>(parent.id, grad.into_primitive().tensor());
        }
    }
}

/// `a · b` (2-D, or batched over equal leading dimensions up to 4-D) on an autodiff
/// backend as one op whose backward is two more [`MegatronOps::batched_gemm`] calls:
/// `d a = d c · bᵀ`, `d b = aᵀ · d c`.
pub fn matmul_with_gemm_backward<B: MegatronOps, C: CheckpointStrategy, const D: usize>(
    a: Tensor<Autodiff<B, C>, D>,
    b: Tensor<Autodiff<B, C>, D>,
) -> Tensor<Autodiff<B, C>, D> {
    let (a, b, nodes) = burn_megatron_kernels::detach_inner!(B; a, b);
    let output = product(a.clone(), b.clone(), false, false)
        .into_primitive()
        .tensor();
    let output = match GemmBackward::<D>
        .prepare::<C>(nodes)
        .compute_bound()
        .stateful()
    {
        OpsKind::Tracked(prep) => prep.finish((a, b), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

/// The backward of a `D`-dimensional product.
#[derive(Debug)]
struct GemmBackward<const D: usize>;

impl<B: MegatronOps, const D: usize> Backward<B, 2> for GemmBackward<D> {
    type State = (Tensor<B, D>, Tensor<B, D>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (a, b) = ops.state;
        let grad =
            Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)));
        let [a_parent, b_parent] = ops.parents;
        // Both products as one group, registered after it.
        let (grad_a, grad_b) = B::gemm_group(|| {
            (
                a_parent
                    .as_ref()
                    .map(|_| product(grad.clone(), b, false, true)),
                b_parent
                    .as_ref()
                    .map(|_| product(a, grad.clone(), true, false)),
            )
        });
        register(
            grads,
            [
                (a_parent.map(|p| p.id), grad_a),
                (b_parent.map(|p| p.id), grad_b),
            ],
        );
    }
}

/// Registers the gradients computed for their parents' nodes, after the GEMM group that
/// made them (registering may add to a gradient already there, which reads the product).
fn register<B: Backend, const D: usize>(
    grads: &mut Gradients,
    computed: [(Option<NodeId>, Option<Tensor<B, D>>); 2],
) {
    for (parent, grad) in computed {
        if let (Some(parent), Some(grad)) = (parent, grad) {
            grads.register::<B>(parent, grad.into_primitive().tensor());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::{Distribution, TensorData};

    type Inner = burn_ndarray::NdArray<f32>;
    type B = Autodiff<Inner>;

    #[test]
    fn gemm_backward_matches_burn_matmul() {
        let device = Default::default();
        Inner::seed(&device, 5);
        let a = Tensor::<Inner, 2>::random([6, 4], Distribution::Normal(0.0, 1.0), &device);
        let b = Tensor::<Inner, 2>::random([4, 3], Distribution::Normal(0.0, 1.0), &device);
        let weights = Tensor::<Inner, 2>::random([6, 3], Distribution::Normal(0.0, 1.0), &device);
        let run = |ours: bool| -> [TensorData; 3] {
            let (a, b) = (
                Tensor::<B, 2>::from_inner(a.clone()).require_grad(),
                Tensor::<B, 2>::from_inner(b.clone()).require_grad(),
            );
            let c = if ours {
                matmul_with_gemm_backward(a.clone(), b.clone())
            } else {
                a.clone().matmul(b.clone())
            };
            let grads = (c.clone() * Tensor::from_inner(weights.clone()))
                .sum()
                .backward();
            [
                c.into_data(),
                a.grad(&grads).unwrap().into_data(),
                b.grad(&grads).unwrap().into_data(),
            ]
        };
        for (ours, burns) in run(true).iter().zip(run(false).iter()) {
            ours.assert_approx_eq::<f32>(burns, burn::tensor::Tolerance::absolute(1e-6));
        }
    }

    #[test]
    fn linear_op_matches_burn_linear() {
        let device = Default::default();
        Inner::seed(&device, 11);
        let normal = |shape: [usize; 2]| {
            Tensor::<Inner, 2>::random(shape, Distribution::Normal(0.0, 1.0), &device)
        };
        let (x, w, weights) = (normal([5, 4]), normal([4, 3]), normal([5, 3]));
        let bias = Tensor::<Inner, 1>::random([3], Distribution::Normal(0.0, 1.0), &device);
        for with_bias in [true, false] {
            let run = |ours: bool| -> Vec<TensorData> {
                let x = Tensor::<B, 2>::from_inner(x.clone()).require_grad();
                let w = Tensor::<B, 2>::from_inner(w.clone()).require_grad();
                let b = Tensor::<B, 1>::from_inner(bias.clone()).require_grad();
                let b_used = with_bias.then(|| b.clone());
                let out = if ours {
                    linear_op(x.clone(), w.clone(), b_used, None)
                } else {
                    burn::tensor::module::linear(x.clone(), w.clone(), b_used)
                };
                let grads = (out.clone() * Tensor::from_inner(weights.clone()))
                    .sum()
                    .backward();
                let mut results = vec![
                    out.into_data(),
                    x.grad(&grads).unwrap().into_data(),
                    w.grad(&grads).unwrap().into_data(),
                ];
                if with_bias {
                    results.push(b.grad(&grads).unwrap().into_data());
                } else {
                    assert!(b.grad(&grads).is_none(), "no gradient for an unused bias");
                }
                results
            };
            for (ours, burns) in run(true).iter().zip(run(false).iter()) {
                ours.assert_approx_eq::<f32>(burns, burn::tensor::Tolerance::absolute(1e-6));
            }
        }
    }

    /// The weight gradient summed over four micro-batches of a two-layer chain, with two
    /// micro-batches' graphs alive at once (as in 1F1B), through the GEMM op or Burn's
    /// matmul.
    fn interleaved_weight_grad(ours: bool, seed: u64) -> Vec<f32> {
        let device = Default::default();
        // Inputs from a formula: the backend's random generator is shared by threads.
        let matrix = |rows: usize, salt: u64| {
            let values = (0..rows * 8)
                .map(|i| ((i as u64 * 7919 + salt * 104_729 + seed) as f32 * 0.37).sin())
                .collect::<Vec<_>>();
            Tensor::<Inner, 2>::from_data(TensorData::new(values, [rows, 8]), &device)
        };
        let w0 = matrix(8, 0);
        let xs: Vec<_> = (1..=4).map(|salt| matrix(4, salt)).collect();
        let w = Tensor::<B, 2>::from_inner(w0).require_grad();
        let f = |x: &Tensor<Inner, 2>| {
            let x = Tensor::<B, 2>::from_inner(x.clone());
            let h = if ours {
                matmul_with_gemm_backward(x, w.clone())
            } else {
                x.matmul(w.clone())
            };
            let h = h.tanh();
            if ours {
                matmul_with_gemm_backward(h, w.clone())
            } else {
                h.matmul(w.clone())
            }
        };
        let mut total = Tensor::<Inner, 2>::zeros([8, 8], &device);
        let y0 = f(&xs[0]);
        let y1 = f(&xs[1]);
        for (i, y) in [y0, y1].into_iter().enumerate() {
            let grads = y.sum().backward();
            total = total + w.grad(&grads).unwrap();
            let y = f(&xs[i + 2]);
            let grads = y.sum().backward();
            total = total + w.grad(&grads).unwrap();
        }
        // Converted: other tests may change the device's default float type meanwhile.
        total.into_data().convert::<f32>().to_vec().unwrap()
    }

    /// Thread ranks: graphs of several threads at once (Burn's graph cleanup, run by each
    /// backward, once dropped nodes a GEMM op still needed: gradients went wrong).
    #[test]
    fn interleaved_graphs_in_threads_match_burn_matmul() {
        let handles: Vec<_> = (0..8u64)
            .map(|thread| {
                std::thread::spawn(move || {
                    (0..10)
                        .map(|round| {
                            let seed = thread * 10 + round;
                            let ours = interleaved_weight_grad(true, seed);
                            let burns = interleaved_weight_grad(false, seed);
                            ours.iter()
                                .zip(&burns)
                                .map(|(a, b)| (a - b).abs())
                                .fold(0f32, f32::max)
                        })
                        .fold(0f32, f32::max)
                })
            })
            .collect();
        for handle in handles {
            let difference = handle.join().unwrap();
            assert!(difference < 1e-4, "max difference {difference}");
        }
    }
}
