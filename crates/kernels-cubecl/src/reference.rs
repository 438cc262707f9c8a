//! The plain-Burn references: the defaults of [`FusedKernels`](crate::FusedKernels), the
//! oracle of the kernel tests, and (forward only) what autodiff differentiates on backends
//! without kernels.

use burn::tensor::activation::{gelu, gelu_approximate, softmax};
use std::ops::Range;

use burn::tensor::{Bool, DType, Int, Tensor, backend::Backend};

use crate::{
    AdamWState, AdamWStep, CrossEntropy, Dropout, Gelu, LogitStatistics, NormGradients,
    NormStatistics, dropout, with_dtype,
};

/// LayerNorm (with `bias`) or RMSNorm (without) over the last dimension, statistics in
/// fp32, the normalized values cast back to the input's dtype before the weight and bias
/// apply. Any rank: the reduction runs on the tensor as given (a 2-D view of a 3-D tensor
/// would sum in another order on some backends).
pub fn reference_norm<B: Backend, const D: usize>(
    input: Tensor<B, D>,
    weight: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
    epsilon: f64,
) -> Tensor<B, D> {
    let dtype = input.dtype();
    let x = with_dtype(input, DType::F32);
    let normalized = match &bias {
        Some(_) => {
            let (variance, mean) = x.clone().var_mean_bias(D - 1);
            (x - mean) / (variance + epsilon).sqrt()
        }
        None => {
            let mean_square = x.clone().powi_scalar(2).mean_dim(D - 1);
            x / (mean_square + epsilon).sqrt()
        }
    };
    let scaled = with_dtype(normalized, dtype) * weight.unsqueeze();
    match bias {
        Some(bias) => scaled + bias.unsqueeze(),
        None => scaled,
    }
}

/// [`reference_norm`] with the row statistics its backward needs.
pub fn reference_norm_forward<B: Backend>(
    input: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    bias: Option<Tensor<B, 1>>,
    epsilon: f64,
) -> (Tensor<B, 2>, NormStatistics<B>) {
    let [rows, _] = input.dims();
    let x = with_dtype(input.clone(), DType::F32);
    let mean = match &bias {
        Some(_) => x.clone().mean_dim(1),
        None => Tensor::zeros([rows, 1], (&x.device(), DType::F32)),
    };
    let variance = (x - mean.clone()).powi_scalar(2).mean_dim(1);
    let rstd = (variance + epsilon).sqrt().recip();
    let statistics = NormStatistics {
        mean: mean.reshape([rows]),
        rstd: rstd.reshape([rows]),
    };
    (reference_norm(input, weight, bias, epsilon), statistics)
}

/// The gradients of the norm, in fp32 and cast to each tensor's dtype:
/// with `x̂ = (x - mean) · rstd` and `g = grad · weight`,
/// `dx = rstd · (g - mean(g) - x̂ · mean(g · x̂))` (no `mean(g)` term for RMSNorm),
/// `dweight = Σ_rows grad · x̂`, `dbias = Σ_rows grad`.
pub fn reference_norm_backward<B: Backend>(
    grad: Tensor<B, 2>,
    input: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    has_bias: bool,
    statistics: NormStatistics<B>,
) -> NormGradients<B> {
    let [rows, _] = input.dims();
    let (input_dtype, weight_dtype) = (input.dtype(), weight.dtype());
    let f32 = |t: Tensor<B, 2>| with_dtype(t, DType::F32);
    let grad = f32(grad);
    let mean = statistics.mean.reshape([rows, 1]);
    let rstd = statistics.rstd.reshape([rows, 1]);
    let normalized = (f32(input) - mean) * rstd.clone();
    let scaled_grad = grad.clone() * with_dtype(weight, DType::F32).unsqueeze();
    let projection = (scaled_grad.clone() * normalized.clone()).mean_dim(1);
    let mut input_grad = scaled_grad.clone() - normalized.clone() * projection;
    if has_bias {
        input_grad = input_grad - scaled_grad.mean_dim(1);
    }
    let column_sum = |t: Tensor<B, 2>| with_dtype(t.sum_dim(0).squeeze_dim::<1>(0), weight_dtype);
    NormGradients {
        input: with_dtype(input_grad * rstd, input_dtype),
        weight: column_sum(grad.clone() * normalized),
        bias: has_bias.then(|| column_sum(grad)),
    }
}

/// `gelu(input + bias)` in fp32, cast back to the input's dtype.
pub fn reference_bias_gelu<B: Backend>(
    input: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    kind: Gelu,
) -> Tensor<B, 2> {
    let dtype = input.dtype();
    let x = biased_f32(input, bias);
    let y = match kind {
        Gelu::Exact => gelu(x),
        Gelu::Tanh => gelu_approximate(x),
    };
    with_dtype(y, dtype)
}

/// `grad · gelu'(input + bias)`, in the input's dtype: `Φ(x) + x φ(x)` for the exact GeLU;
/// for tanh, with `t = tanh(c (x + a x³))`,
/// `(1 + t) / 2 + x/2 · (1 - t²) · c (1 + 3 a x²)`.
pub fn reference_bias_gelu_backward<B: Backend>(
    grad: Tensor<B, 2>,
    input: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
    kind: Gelu,
) -> Tensor<B, 2> {
    let dtype = input.dtype();
    let x = biased_f32(input, bias);
    let derivative = match kind {
        Gelu::Exact => {
            let cdf = ((x.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0) * 0.5;
            let density = (x.clone().powi_scalar(2) * -0.5).exp()
                * (0.5 * std::f64::consts::FRAC_2_SQRT_PI * std::f64::consts::FRAC_1_SQRT_2);
            cdf + x * density
        }
        Gelu::Tanh => {
            let c = (2.0 / std::f64::consts::PI).sqrt();
            let t = ((x.clone() + x.clone().powi_scalar(3) * GELU_TANH_CUBIC) * c).tanh();
            let slope = (x.clone().powi_scalar(2) * (3.0 * GELU_TANH_CUBIC) + 1.0) * c;
            (t.clone() + 1.0) * 0.5 + x * 0.5 * (-t.powi_scalar(2) + 1.0) * slope
        }
    };
    with_dtype(with_dtype(grad, DType::F32) * derivative, dtype)
}

/// The column sums of `input` (`[rows, width]`) in fp32, `[width]`.
pub fn reference_column_sums<B: Backend>(input: Tensor<B, 2>) -> Tensor<B, 1> {
    with_dtype(input, DType::F32).sum_dim(0).squeeze_dim(0)
}

/// The cubic coefficient of the tanh GeLU.
pub(crate) const GELU_TANH_CUBIC: f64 = 0.044715;

fn biased_f32<B: Backend>(input: Tensor<B, 2>, bias: Option<Tensor<B, 1>>) -> Tensor<B, 2> {
    let x = with_dtype(input, DType::F32);
    match bias {
        Some(bias) => x + with_dtype(bias, DType::F32).unsqueeze(),
        None => x,
    }
}

/// `residual + dropout(input + bias)` in plain Burn ops (the bias added in the input's
/// dtype, as the unfused layers do).
pub fn reference_bias_dropout_add<B: Backend>(
    input: Tensor<B, 3>,
    bias: Option<Tensor<B, 1>>,
    residual: Tensor<B, 3>,
    site: Option<Dropout>,
) -> Tensor<B, 3> {
    let x = match bias {
        Some(bias) => input + bias.unsqueeze(),
        None => input,
    };
    let x = match site {
        Some(site) => dropout::dropout(x, site.p, site.seed, site.full, site.offsets),
        None => x,
    };
    residual + x
}

/// The type of attention scores and probabilities: fp32 for 16-bit (and fp32) inputs,
/// fp64 kept.
pub fn softmax_dtype(dtype: DType) -> DType {
    match dtype {
        DType::F64 => DType::F64,
        _ => DType::F32,
    }
}

/// True where a query may not see a key, `[batch, heads, queries, keys]` (keys after the
/// query when `causal`, padding keys); `None` when nothing is masked.
pub fn attention_mask<B: Backend>(
    [batch, heads, queries, keys]: [usize; 4],
    causal: bool,
    padding: Option<Tensor<B, 2, Bool>>,
    device: &B::Device,
) -> Option<Tensor<B, 4, Bool>> {
    let shape = [batch, heads, queries, keys];
    let causal = causal.then(|| {
        Tensor::<B, 2, Bool>::tril_mask([queries, keys], 0, device)
            .unsqueeze::<4>()
            .expand(shape)
    });
    let padding = padding.map(|padding| {
        padding
            .unsqueeze_dim::<3>(1)
            .unsqueeze_dim::<4>(1)
            .expand(shape)
    });
    match (causal, padding) {
        (Some(causal), Some(padding)) => Some(causal.bool_or(padding)),
        (causal, padding) => causal.or(padding),
    }
}

/// `softmax(scores · scale)` over the last dimension with the masked scores set to
/// `f32::MIN` (a fully masked row comes out uniform), computed in [`softmax_dtype`],
/// returned in the scores' type.
pub fn reference_softmax<B: Backend>(
    scores: Tensor<B, 4>,
    scale: f64,
    causal: bool,
    padding: Option<Tensor<B, 2, Bool>>,
) -> Tensor<B, 4> {
    let dtype = scores.dtype();
    let device = scores.device();
    let mut scores = with_dtype(scores * scale, softmax_dtype(dtype));
    if let Some(mask) = attention_mask(scores.dims(), causal, padding, &device) {
        scores = scores.mask_fill(mask, f32::MIN);
    }
    with_dtype(softmax(scores, 3), dtype)
}

/// `scale · p · (dp - Σ p·dp)`, zero where masked (masked scores are constants),
/// computed in [`softmax_dtype`], returned in the probabilities' type.
pub fn reference_softmax_backward<B: Backend>(
    probabilities: Tensor<B, 4>,
    grad: Tensor<B, 4>,
    scale: f64,
    causal: bool,
    padding: Option<Tensor<B, 2, Bool>>,
) -> Tensor<B, 4> {
    let dtype = probabilities.dtype();
    let wide = softmax_dtype(dtype);
    let (probabilities, grad) = (with_dtype(probabilities, wide), with_dtype(grad, wide));
    let device = probabilities.device();
    let shape = probabilities.dims();
    let weighted = (grad.clone() * probabilities.clone()).sum_dim(3);
    let mut grad_scores = probabilities * (grad - weighted);
    if let Some(mask) = attention_mask(shape, causal, padding, &device) {
        grad_scores = grad_scores.mask_fill(mask, 0.0);
    }
    with_dtype(grad_scores * scale, dtype)
}

/// [`FusedKernels::adamw`](crate::FusedKernels::adamw) in plain Burn ops.
pub fn reference_adamw<B: Backend>(
    state: AdamWState<B>,
    grads: Tensor<B, 1>,
    decay: Tensor<B, 1>,
    step: AdamWStep,
) -> AdamWState<B> {
    let AdamWStep {
        lr,
        beta1,
        beta2,
        eps,
        weight_decay,
        grad_factor,
        step,
    } = step;
    let AdamWState {
        master,
        exp_avg,
        exp_avg_sq,
    } = state;
    let grads = if grad_factor == 1.0 {
        grads
    } else {
        grads * grad_factor
    };
    let exp_avg = exp_avg * beta1 + grads.clone() * (1.0 - beta1);
    let exp_avg_sq = exp_avg_sq * beta2 + grads.powi_scalar(2) * (1.0 - beta2);
    let first = exp_avg.clone() / (1.0 - beta1.powi(step));
    let second = exp_avg_sq.clone() / (1.0 - beta2.powi(step));
    let update = first / (second.sqrt() + eps) + master.clone() * decay * weight_decay;
    AdamWState {
        master: master - update * lr,
        exp_avg,
        exp_avg_sq,
    }
}

/// [`LogitStatistics`] in plain Burn ops, in fp32.
///
/// # Panics
///
/// When `real_width` exceeds the logits' width.
pub fn reference_logit_statistics<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    real_width: usize,
) -> LogitStatistics<B> {
    let [rows, width] = logits.dims();
    assert!(
        real_width <= width,
        "{real_width} real columns in logits {width} wide"
    );
    let device = logits.device();
    let filled = |value: f32| Tensor::<B, 1>::full([rows], value, (&device, DType::F32));
    if real_width == 0 {
        return LogitStatistics {
            max: filled(f32::MIN),
            sum_exp: filled(0.0),
            target: filled(0.0),
            sum: filled(0.0),
        };
    }
    let real = with_dtype(logits, DType::F32).narrow(1, 0, real_width);
    let (inside, index) = targets_in_slice(targets, real_width);
    let target = real
        .clone()
        .gather(1, index.reshape([rows, 1]))
        .reshape([rows])
        .mask_fill(inside.bool_not(), 0.0);
    let max = real.clone().max_dim(1);
    LogitStatistics {
        sum_exp: (real.clone() - max.clone())
            .exp()
            .sum_dim(1)
            .reshape([rows]),
        max: max.reshape([rows]),
        target,
        sum: real.sum_dim(1).reshape([rows]),
    }
}

/// Whether each target is a real column of the slice, and the targets with the others
/// replaced by column 0 (for gathers).
fn targets_in_slice<B: Backend>(
    targets: Tensor<B, 1, Int>,
    real_width: usize,
) -> (Tensor<B, 1, Bool>, Tensor<B, 1, Int>) {
    let inside = targets
        .clone()
        .greater_equal_elem(0)
        .bool_and(targets.clone().lower_elem(real_width as i64));
    let index = targets.mask_fill(inside.clone().bool_not(), 0);
    (inside, index)
}

/// The cross-entropy's gradient with respect to a slice's logits in plain Burn ops (see
/// [`FusedKernels::cross_entropy_backward`](crate::FusedKernels::cross_entropy_backward)).
pub fn reference_cross_entropy_backward<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    log_sum_exp: Tensor<B, 1>,
    grad: Tensor<B, 1>,
    cross_entropy: CrossEntropy,
) -> Tensor<B, 2> {
    let [rows, width] = logits.dims();
    let (dtype, device) = (logits.dtype(), logits.device());
    let CrossEntropy {
        real_width,
        vocab_size,
        label_smoothing,
    } = cross_entropy;
    let shift = with_dtype(log_sum_exp, DType::F32).reshape([rows, 1]);
    let probabilities = (with_dtype(logits, DType::F32) - shift).exp();
    let (inside, index) = targets_in_slice(targets, real_width);
    let columns = Tensor::<B, 1, Int>::arange(0..width as i64, &device)
        .reshape([1, width])
        .expand([rows, width]);
    let is_target = columns
        .clone()
        .equal(index.reshape([rows, 1]).expand([rows, width]))
        .bool_and(inside.reshape([rows, 1]).expand([rows, width]));
    let target_weight = with_dtype(is_target.float(), DType::F32) * (1.0 - label_smoothing);
    let coefficient = (probabilities - target_weight)
        .sub_scalar(label_smoothing / vocab_size.max(1) as f64)
        .mask_fill(columns.greater_equal_elem(real_width as i64), 0.0);
    with_dtype(
        coefficient * with_dtype(grad, DType::F32).reshape([rows, 1]),
        dtype,
    )
}

/// `loss` joined to the graph of `logits` in plain Burn ops: `loss + Σ_columns c · (logit -
/// logit)` with `c` the per-logit gradient of [`reference_cross_entropy_backward`], held
/// constant. Its value is `loss`, its gradient with respect to the logits is `c` times the
/// loss's gradient. (Without autodiff it is `loss`.)
pub fn reference_cross_entropy_loss<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    log_sum_exp: Tensor<B, 1>,
    loss: Tensor<B, 1>,
    cross_entropy: CrossEntropy,
) -> Tensor<B, 1> {
    let [rows, _] = logits.dims();
    let ones = Tensor::<B, 1>::ones([rows], (&logits.device(), DType::F32));
    let coefficient = reference_cross_entropy_backward(
        logits.clone().detach(),
        targets,
        log_sum_exp.detach(),
        ones,
        cross_entropy,
    );
    let zero = with_dtype(logits.clone() - logits.detach(), DType::F32);
    let attached = (zero * with_dtype(coefficient, DType::F32)).sum_dim(1);
    with_dtype(loss.detach(), DType::F32) + attached.reshape([rows])
}

/// Rows `ids` of `weight` with Burn's `embedding`; a 16-bit weight is gathered from an fp32
/// copy, so that Burn's backward adds the rows' gradients in fp32 and rounds once (in its
/// own type it rounds at every add: in bf16 a row's sum keeps 8 bits, so a frequent
/// token's later gradients are mostly rounded away).
pub fn reference_embedding<B: Backend>(
    weight: Tensor<B, 2>,
    ids: Tensor<B, 2, Int>,
) -> Tensor<B, 3> {
    let dtype = weight.dtype();
    if matches!(dtype, DType::BF16 | DType::F16) {
        crate::with_dtype(
            burn::tensor::module::embedding(crate::with_dtype(weight, DType::F32), ids),
            dtype,
        )
    } else {
        burn::tensor::module::embedding(weight, ids)
    }
}

/// Each row of `grad` added to row `ids[token]` of an fp32 `[rows, width]` table of zeros,
/// with Burn's `select_assign`.
pub fn reference_embedding_grad<B: Backend>(
    grad: Tensor<B, 2>,
    ids: Tensor<B, 1, Int>,
    rows: usize,
) -> Tensor<B, 2> {
    let [_, width] = grad.dims();
    Tensor::zeros([rows, width], (&grad.device(), DType::F32)).select_assign(
        0,
        ids,
        crate::with_dtype(grad, DType::F32),
        burn::tensor::IndexingUpdateOp::Add,
    )
}

/// `parts` concatenated in fp32 (parts of one type are concatenated first and cast once:
/// one kernel instead of one per part), added to `sum` when given.
pub fn reference_flatten_into<B: Backend>(
    parts: Vec<Tensor<B, 1>>,
    sum: Option<Tensor<B, 1>>,
) -> Tensor<B, 1> {
    let device = sum.as_ref().map(|sum| sum.device());
    let dtype = parts.first().map(|part| part.dtype());
    let flat = if parts.is_empty() {
        let device = device.expect("flatten_into: no parts and no sum");
        Tensor::zeros([0], (&device, DType::F32))
    } else if parts.iter().all(|part| Some(part.dtype()) == dtype) {
        crate::with_dtype(Tensor::cat(parts, 0), DType::F32)
    } else {
        let parts = parts.into_iter().map(|p| crate::with_dtype(p, DType::F32));
        Tensor::cat(parts.collect(), 0)
    };
    match sum {
        Some(sum) => sum + flat,
        None => flat,
    }
}

/// The sum of squares of the `counted` elements of `grads` (all without a mask; each mask
/// multiplication reads 8 bytes and writes 4 per element), accumulated in fp64 chunk by
/// chunk: an fp32 sum over millions of elements is off by about 1e-4 relative, and
/// differently for each split of the elements, which made the gradient norm (and the
/// clipping factor) depend on the parallel layout. (Summing fp32 squares over pieces of
/// 4096 before fp64 would move half the bytes, but changed a 400-step CPU run's final eval
/// loss in the third digit: the clipping factor moved by 1e-7.) All chunks' sums are
/// queued before one read (a read per chunk made the host wait for the GPU a few hundred
/// times a step).
pub fn reference_sum_of_squares<B: Backend>(
    grads: &Tensor<B, 1>,
    counted: Option<&Tensor<B, 1>>,
) -> f64 {
    sum_of_squares_in_chunks(grads, counted, 1 << 22, 1 << 12)
}

/// [`reference_sum_of_squares`] with chunks of `chunk` elements, each summed as pieces of `piece`
/// elements (whole chunks when `piece` does not divide `chunk`): the pieces are the rows
/// of one reduction over all whole chunks (a reduction needs many rows to use the GPU),
/// then the pieces' sums are summed per chunk.
fn sum_of_squares_in_chunks<B: Backend>(
    grads: &Tensor<B, 1>,
    counted: Option<&Tensor<B, 1>>,
    chunk: usize,
    piece: usize,
) -> f64 {
    let piece = if chunk.is_multiple_of(piece) {
        piece
    } else {
        chunk
    };
    // The sum of squares of each of `chunks` equal chunks of `range`, reduced as rows of
    // `piece` elements first.
    let chunk_sums = |range: Range<usize>, chunks: usize, piece: usize| {
        let pieces = range.len() / piece;
        let part = grads.clone().slice(range.clone());
        let part = match counted {
            Some(counted) => part * counted.clone().slice(range),
            None => part,
        };
        let part = part.reshape([pieces, piece]).cast(DType::F64);
        let piece_sums = (part.clone() * part).sum_dim(1);
        piece_sums
            .reshape([chunks, pieces / chunks])
            .sum_dim(1)
            .reshape([chunks])
    };
    let len = grads.dims()[0];
    let whole = len / chunk;
    // At most 16 chunks at a time: their fp64 copies are temporary memory.
    let mut sums: Vec<_> = (0..whole)
        .step_by(16)
        .map(|first| {
            let chunks = (whole - first).min(16);
            chunk_sums(first * chunk..(first + chunks) * chunk, chunks, piece)
        })
        .collect();
    let tail = whole * chunk..len;
    if !tail.is_empty() {
        let tail_len = tail.len();
        sums.push(chunk_sums(tail, 1, tail_len));
    }
    if sums.is_empty() {
        return 0.0;
    }
    let data = Tensor::cat(sums, 0).into_data().convert::<f64>();
    data.as_slice::<f64>()
        .map_or(f64::NAN, |values| values.iter().sum())
}

#[cfg(test)]
mod tests {
    use burn::backend::Autodiff;
    use burn::tensor::Distribution;

    use super::*;
    use crate::check::relative_error;

    type B = burn_ndarray::NdArray<f32>;
    type A = Autodiff<B>;

    fn random<const D: usize>(shape: [usize; D], offset: f64) -> Tensor<B, D> {
        Tensor::random(shape, Distribution::Uniform(-1.0, 1.0), &Default::default())
            .add_scalar(offset)
    }

    /// The explicit backward formulas (what the kernels implement) against Burn's autodiff
    /// of the forward references.
    #[test]
    fn norm_backward_formula_is_the_gradient_of_the_forward() {
        for (shape, centered) in [([5, 7], true), ([5, 7], false), ([3, 64], true)] {
            let [rows, width] = shape;
            let (x, weight, bias) = (
                random(shape, 0.3),
                random([width], 1.0),
                random([width], 0.0),
            );
            let upstream = random(shape, 0.0);
            let tracked = |t: Tensor<B, 2>| Tensor::<A, 2>::from_inner(t).require_grad();
            let (tx, tw, tb) = (
                tracked(x.clone()),
                tracked(weight.clone().reshape([1, width])),
                tracked(bias.clone().reshape([1, width])),
            );
            let y = reference_norm(
                tx.clone(),
                tw.clone().reshape([width]),
                centered.then(|| tb.clone().reshape([width])),
                1e-5,
            );
            let grads = (y * Tensor::from_inner(upstream.clone())).sum().backward();

            let bias = centered.then_some(bias);
            let (_, statistics) = reference_norm_forward(x.clone(), weight.clone(), bias, 1e-5);
            assert_eq!(statistics.rstd.dims(), [rows]);
            let formula = reference_norm_backward(upstream, x, weight, centered, statistics);
            let error =
                |a: Tensor<B, 2>, b: Tensor<A, 2>| relative_error(a, b.grad(&grads).unwrap());
            assert!(
                error(formula.input, tx) < 1e-5,
                "{shape:?} {centered}: input"
            );
            assert!(
                error(formula.weight.reshape([1, width]), tw) < 1e-5,
                "{shape:?} {centered}: weight"
            );
            if let Some(bias) = formula.bias {
                assert!(
                    error(bias.reshape([1, width]), tb) < 1e-5,
                    "{shape:?}: bias"
                );
            }
        }
    }

    /// For the exact GeLU, autodiff differentiates `x Φ(x)` written with `erf` (Burn's own
    /// `gelu` backward is the tanh approximation's derivative, 8e-4 off).
    #[test]
    fn gelu_backward_formulas_are_the_gradients_of_the_forward() {
        for gelu in [Gelu::Exact, Gelu::Tanh] {
            let (x, bias) = (random([6, 33], 0.0).mul_scalar(4.0), random([33], 0.0));
            let upstream = random([6, 33], 0.0);
            let tracked = Tensor::<A, 2>::from_inner(x.clone()).require_grad();
            let biased = tracked.clone() + Tensor::<A, 1>::from_inner(bias.clone()).unsqueeze();
            let y = match gelu {
                Gelu::Exact => {
                    let cdf = (biased.clone() * std::f64::consts::FRAC_1_SQRT_2).erf() + 1.0;
                    biased * cdf * 0.5
                }
                Gelu::Tanh => reference_bias_gelu(biased, None, gelu),
            };
            let grads = (y * Tensor::from_inner(upstream.clone())).sum().backward();
            let formula = reference_bias_gelu_backward(upstream, x, Some(bias), gelu);
            let error = relative_error(formula, tracked.grad(&grads).unwrap());
            assert!(error < 1e-5, "{gelu:?}: {error}");
        }
    }

    #[test]
    fn sum_of_squares_counts_each_counted_element_once_whatever_the_chunking() {
        let device = Default::default();
        let len = 29;
        let grads: Vec<f32> = (0..len).map(|i| (i as f32 - 11.5) * 0.37).collect();
        let counted: Vec<f32> = (0..len).map(|i| f32::from(u8::from(i % 5 != 2))).collect();
        let want: f64 = grads
            .iter()
            .zip(&counted)
            .map(|(&g, &c)| f64::from(g * c).powi(2))
            .sum();
        let all: f64 = grads.iter().map(|&g| f64::from(g).powi(2)).sum();
        let fp32 = |values: Vec<f32>| Tensor::<B, 1>::from_floats(values.as_slice(), &device);
        let (grads, counted) = (fp32(grads), fp32(counted));
        // More than 16 chunks; chunks of pieces and a tail; chunks that are not whole
        // pieces; one chunk; none.
        for (chunk, piece) in [(1, 1), (4, 2), (6, 3), (5, 2), (29, 29), (64, 16)] {
            for (mask, want) in [(Some(&counted), want), (None, all)] {
                let got = sum_of_squares_in_chunks(&grads, mask, chunk, piece);
                assert!(
                    (got - want).abs() <= 1e-9 * want,
                    "chunk {chunk}, piece {piece}, mask {}: {got} vs {want}",
                    mask.is_some()
                );
            }
        }
    }
}
