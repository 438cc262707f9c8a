//! The fused operations on autodiff: one node each, whose backward is the inner backend's
//! backward kernel. Without kernels (or with the reference forced) autodiff differentiates
//! the plain-Burn reference instead.

use burn::backend::Autodiff;
use burn::backend::autodiff::NodeId;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::{DType, Int, Tensor, TensorPrimitive};

use crate::{
    CrossEntropy, Dropout, FusedKernels, Gelu, LogitStatistics, NormStatistics, as_rows,
    reference_bias_dropout_add, reference_bias_gelu, reference_cross_entropy_loss,
    reference_embedding, reference_kernels, reference_norm, with_dtype,
};

/// Whether autodiff should build the fused node (the inner backend has kernels and the
/// references are not forced).
fn fused<B: FusedKernels>() -> bool {
    B::has_fused_kernels() && !reference_kernels()
}

fn register<B: FusedKernels, const D: usize>(
    grads: &mut Gradients,
    parent: &Option<NodeId>,
    grad: Tensor<B, D>,
) {
    if let Some(id) = parent {
        grads.register::<B>(*id, grad.into_primitive().tensor());
    }
}

fn consume<B: FusedKernels, const N: usize, const D: usize, S>(
    ops: &Ops<S, N>,
    grads: &mut Gradients,
) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(grads.consume::<B>(&ops.node)))
}

fn parent_ids<S, const N: usize>(ops: &Ops<S, N>) -> [Option<NodeId>; N] {
    std::array::from_fn(|i| ops.parents[i].as_ref().map(|parent| parent.id))
}

/// The norm node: keeps the input, the weight and the fp32 row statistics.
#[derive(Debug)]
struct NormNode;

#[derive(Debug, Clone)]
struct NormSaved<B: FusedKernels> {
    input: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    statistics: NormStatistics<B>,
    has_bias: bool,
}

/// Parents: input, weight, bias (or [`absent`]).
impl<B: FusedKernels> Backward<B, 3> for NormNode {
    type State = NormSaved<B>;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = consume::<B, 3, 2, _>(&ops, grads);
        let parents = parent_ids(&ops);
        let NormSaved {
            input,
            weight,
            statistics,
            has_bias,
        } = ops.state;
        let gradients = B::norm_backward(grad, input, weight, has_bias, statistics);
        register::<B, 2>(grads, &parents[0], gradients.input);
        register::<B, 1>(grads, &parents[1], gradients.weight);
        if let Some(bias) = gradients.bias {
            register::<B, 1>(grads, &parents[2], bias);
        }
    }
}

/// The bias-GeLU node: keeps the input and the bias.
#[derive(Debug)]
struct BiasGeluNode;

#[derive(Debug, Clone)]
struct BiasGeluSaved<B: FusedKernels> {
    input: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    gelu: Gelu,
}

/// Parents: input, bias (or [`absent`]).
impl<B: FusedKernels> Backward<B, 2> for BiasGeluNode {
    type State = BiasGeluSaved<B>;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = consume::<B, 2, 2, _>(&ops, grads);
        let parents = parent_ids(&ops);
        let BiasGeluSaved { input, bias, gelu } = ops.state;
        let bias_dtype = bias.as_ref().map(|b| b.dtype());
        let input_grad = B::bias_gelu_backward(grad, input, bias, gelu);
        if let Some(dtype) = bias_dtype {
            let bias_grad = B::column_sums(input_grad.clone());
            register::<B, 1>(grads, &parents[1], with_dtype(bias_grad, dtype));
        }
        register::<B, 2>(grads, &parents[0], input_grad);
    }
}

/// The bias-add node: keeps the bias's dtype only.
#[derive(Debug)]
struct BiasAddNode;

/// Parents: input, bias.
impl<B: FusedKernels> Backward<B, 2> for BiasAddNode {
    type State = DType;

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = consume::<B, 2, 2, _>(&ops, grads);
        let parents = parent_ids(&ops);
        if parents[1].is_some() {
            let bias_grad = B::column_sums(grad.clone());
            register::<B, 1>(grads, &parents[1], with_dtype(bias_grad, ops.state));
        }
        register::<B, 2>(grads, &parents[0], grad);
    }
}

/// The bias-dropout-add node: keeps nothing but the dropout site (the mask is regenerated).
#[derive(Debug)]
struct BiasDropoutAddNode;

#[derive(Debug, Clone)]
struct BiasDropoutAddSaved {
    dropout: Option<Dropout>,
    bias_dtype: Option<DType>,
}

/// Parents: input, residual, bias (or [`absent`]).
impl<B: FusedKernels> Backward<B, 3> for BiasDropoutAddNode {
    type State = BiasDropoutAddSaved;

    fn backward(self, ops: Ops<Self::State, 3>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = consume::<B, 3, 3, _>(&ops, grads);
        let parents = parent_ids(&ops);
        let BiasDropoutAddSaved {
            dropout,
            bias_dtype,
        } = ops.state;
        let input_grad = match dropout {
            Some(dropout) => B::dropout_mask_apply(grad.clone(), dropout),
            None => grad.clone(),
        };
        if let Some(dtype) = bias_dtype {
            let [batch, seq, hidden] = input_grad.dims();
            let bias_grad = B::column_sums(input_grad.clone().reshape([batch * seq, hidden]));
            register::<B, 1>(grads, &parents[2], with_dtype(bias_grad, dtype));
        }
        register::<B, 3>(grads, &parents[0], input_grad);
        register::<B, 3>(grads, &parents[1], grad);
    }
}

/// The cross-entropy node: keeps the logits (no copy: the graph holds them anyway), the
/// targets and the per-row `log Σ exp`.
#[derive(Debug)]
struct CrossEntropyNode;

#[derive(Debug, Clone)]
struct CrossEntropySaved<B: FusedKernels> {
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    log_sum_exp: Tensor<B, 1>,
    cross_entropy: CrossEntropy,
}

impl<B: FusedKernels> Backward<B, 1> for CrossEntropyNode {
    type State = CrossEntropySaved<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = consume::<B, 1, 1, _>(&ops, grads);
        let [parent] = parent_ids(&ops);
        let CrossEntropySaved {
            logits,
            targets,
            log_sum_exp,
            cross_entropy,
        } = ops.state;
        let logits_grad =
            B::cross_entropy_backward(logits, targets, log_sum_exp, grad, cross_entropy);
        register::<B, 2>(grads, &parent, logits_grad);
    }
}

/// The norm of `[rows, width]` rows as one node over the norm kernels.
fn fused_norm<B: FusedKernels, C: CheckpointStrategy>(
    input: Tensor<Autodiff<B, C>, 2>,
    weight: Tensor<Autodiff<B, C>, 1>,
    bias: Option<Tensor<Autodiff<B, C>, 1>>,
    epsilon: f64,
) -> Tensor<Autodiff<B, C>, 2> {
    // The kernels take the weight and bias in the input's dtype; the cast is a node of
    // its own, so their gradients come back in their own dtype.
    let dtype = input.dtype();
    let weight = with_dtype(weight, dtype);
    let has_bias = bias.is_some();
    let bias = bias.map_or_else(|| absent(&input.device()), |bias| with_dtype(bias, dtype));
    let (input, weight, bias, nodes) = crate::detach_inner!(B; input, weight, bias);
    let (output, statistics) = B::norm_forward(
        input.clone(),
        weight.clone(),
        has_bias.then_some(bias),
        epsilon,
    );
    let state = || NormSaved {
        input,
        weight,
        statistics,
        has_bias,
    };
    finish(
        NormNode.prepare::<C>(nodes).compute_bound().stateful(),
        state,
        output,
    )
}

/// The autodiff tensor in the place of an absent optional input (a bias): it does not
/// require a gradient, so the node's backward sees no parent there. Its value is never
/// read.
fn absent<B: FusedKernels, C: CheckpointStrategy>(
    device: &burn::tensor::Device<Autodiff<B, C>>,
) -> Tensor<Autodiff<B, C>, 1> {
    Tensor::empty([1], device)
}

/// The embedding node: keeps the ids, the table's rows and its type.
#[derive(Debug)]
struct EmbeddingNode;

#[derive(Debug, Clone)]
struct EmbeddingSaved<B: FusedKernels> {
    ids: Tensor<B, 2, Int>,
    rows: usize,
    dtype: DType,
}

/// Parent: the table.
impl<B: FusedKernels> Backward<B, 1> for EmbeddingNode {
    type State = EmbeddingSaved<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let grad = consume::<B, 1, 3, _>(&ops, grads);
        let parents = parent_ids(&ops);
        let EmbeddingSaved { ids, rows, dtype } = ops.state;
        let [batch, seq, width] = grad.dims();
        let tokens = batch * seq;
        let table = B::embedding_grad(grad.reshape([tokens, width]), ids.reshape([tokens]), rows);
        register::<B, 2>(grads, &parents[0], with_dtype(table, dtype));
    }
}

/// Finishes a fused node (`kind`, prepared from its parents): tracked, it keeps `state`
/// for the backward.
fn finish<BO, B, C, S, const N: usize, const D: usize>(
    kind: OpsKind<BO, B, S, C, N>,
    state: impl FnOnce() -> S,
    output: Tensor<B, D>,
) -> Tensor<Autodiff<B, C>, D>
where
    BO: Backward<B, N, State = S>,
    B: FusedKernels,
    C: CheckpointStrategy,
    S: Clone + Send + std::fmt::Debug + 'static,
{
    let output = output.into_primitive().tensor();
    let output = match kind {
        OpsKind::Tracked(prep) => prep.finish(state(), output),
        OpsKind::UnTracked(prep) => prep.finish(output),
    };
    Tensor::from_primitive(TensorPrimitive::Float(output))
}

impl<B: FusedKernels, C: CheckpointStrategy> FusedKernels for Autodiff<B, C> {
    fn has_fused_kernels() -> bool {
        B::has_fused_kernels()
    }

    fn norm<const D: usize>(
        input: Tensor<Self, D>,
        weight: Tensor<Self, 1>,
        bias: Option<Tensor<Self, 1>>,
        epsilon: f64,
    ) -> Tensor<Self, D> {
        if !fused::<B>() {
            return reference_norm(input, weight, bias, epsilon);
        }
        let (rows, shape) = as_rows(input);
        fused_norm(rows, weight, bias, epsilon).reshape(shape)
    }

    fn bias_gelu(
        input: Tensor<Self, 2>,
        bias: Option<Tensor<Self, 1>>,
        gelu: Gelu,
    ) -> Tensor<Self, 2> {
        if !fused::<B>() {
            return reference_bias_gelu(input, bias, gelu);
        }
        let has_bias = bias.is_some();
        let bias = bias.unwrap_or_else(|| absent(&input.device()));
        let (input, bias, nodes) = crate::detach_inner!(B; input, bias);
        let bias = has_bias.then_some(bias);
        let output = B::bias_gelu(input.clone(), bias.clone(), gelu);
        let state = || BiasGeluSaved { input, bias, gelu };
        finish(
            BiasGeluNode.prepare::<C>(nodes).compute_bound().stateful(),
            state,
            output,
        )
    }

    fn embedding_lookup(weight: Tensor<Self, 2>, ids: Tensor<Self, 2, Int>) -> Tensor<Self, 3> {
        if !fused::<B>() {
            return reference_embedding(weight, ids);
        }
        let (dtype, rows) = (weight.dtype(), weight.dims()[0]);
        // Ids are not differentiated: autodiff's integer tensors are the inner backend's.
        let ids = Tensor::<B, 2, Int>::from_primitive(ids.into_primitive());
        let (weight, nodes) = crate::detach_inner!(B; weight);
        // Gathered in the table's own type: the backward adds in fp32 and rounds once.
        let output = burn::tensor::module::embedding(weight, ids.clone());
        finish(
            EmbeddingNode.prepare::<C>(nodes).compute_bound().stateful(),
            || EmbeddingSaved { ids, rows, dtype },
            output,
        )
    }

    fn bias_add(input: Tensor<Self, 2>, bias: Tensor<Self, 1>) -> Tensor<Self, 2> {
        if !fused::<B>() {
            return input + bias.unsqueeze();
        }
        let bias_dtype = bias.dtype();
        let (input, bias, nodes) = crate::detach_inner!(B; input, bias);
        let output = B::bias_add(input, bias);
        finish(
            BiasAddNode.prepare::<C>(nodes).compute_bound().stateful(),
            || bias_dtype,
            output,
        )
    }

    fn logit_statistics(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        real_width: usize,
    ) -> LogitStatistics<Self> {
        // Statistics carry no gradient: computed on the inner backend.
        let inner = B::logit_statistics(logits.inner(), targets.inner(), real_width);
        LogitStatistics {
            max: Tensor::from_inner(inner.max),
            sum_exp: Tensor::from_inner(inner.sum_exp),
            target: Tensor::from_inner(inner.target),
            sum: Tensor::from_inner(inner.sum),
        }
    }

    fn cross_entropy_loss(
        logits: Tensor<Self, 2>,
        targets: Tensor<Self, 1, Int>,
        log_sum_exp: Tensor<Self, 1>,
        loss: Tensor<Self, 1>,
        cross_entropy: CrossEntropy,
    ) -> Tensor<Self, 1> {
        if !fused::<B>() {
            return reference_cross_entropy_loss(logits, targets, log_sum_exp, loss, cross_entropy);
        }
        let (logits, nodes) = crate::detach_inner!(B; logits);
        let state = || CrossEntropySaved {
            logits,
            targets: targets.inner(),
            log_sum_exp: log_sum_exp.inner(),
            cross_entropy,
        };
        finish(
            CrossEntropyNode
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful(),
            state,
            loss.inner(),
        )
    }

    fn bias_dropout_add(
        input: Tensor<Self, 3>,
        bias: Option<Tensor<Self, 1>>,
        residual: Tensor<Self, 3>,
        dropout: Option<Dropout>,
    ) -> Tensor<Self, 3> {
        if !fused::<B>() {
            return reference_bias_dropout_add(input, bias, residual, dropout);
        }
        let bias_dtype = bias.as_ref().map(|bias| bias.dtype());
        let bias = bias.unwrap_or_else(|| absent(&input.device()));
        let (input, residual, bias, nodes) = crate::detach_inner!(B; input, residual, bias);
        let bias = bias_dtype.map(|_| bias);
        let output = B::bias_dropout_add(input, bias, residual, dropout);
        let state = || BiasDropoutAddSaved {
            dropout,
            bias_dtype,
        };
        finish(
            BiasDropoutAddNode
                .prepare::<C>(nodes)
                .compute_bound()
                .stateful(),
            state,
            output,
        )
    }
}
