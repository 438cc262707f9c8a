//! Checks of the fused operations against their plain-Burn references on one device:
//! forward outputs and every gradient on fresh random inputs, for shapes that are and are
//! not multiples of the kernels' block sizes. The wgpu tests and `burn-megatron bench
//! kernels` on a GPU both run them.

use burn::backend::Autodiff;
use burn::tensor::{Bool, Distribution, Int, Tensor, TensorData, backend::Backend};
use burn::tensor::{DType, ElementConversion, Shape};

use crate::{
    AdamWState, AdamWStep, CrossEntropy, Dropout, FusedKernels, Gelu, reference_adamw,
    reference_bias_dropout_add, reference_bias_gelu, reference_bias_gelu_backward,
    reference_column_sums, reference_cross_entropy_backward, reference_embedding_grad,
    reference_flatten_into, reference_kernels, reference_logit_statistics, reference_norm,
    reference_softmax, reference_softmax_backward, with_dtype,
};

/// One comparison: a quantity of a kernel against the reference.
#[derive(Debug, Clone)]
pub struct Check {
    /// The operation, with its variant (`layer_norm`, `bias_gelu_tanh`, ...).
    pub kernel: String,
    /// Input shape.
    pub shape: Vec<usize>,
    /// Element type of the inputs.
    pub dtype: DType,
    /// What is compared (`output`, `d_input`, `d_weight`, ...).
    pub quantity: &'static str,
    /// `max |kernel - reference| / max |reference|`.
    pub error: f64,
    /// The largest error accepted for this dtype.
    pub limit: f64,
}

impl Check {
    /// Whether the error is within the limit (a NaN error is not).
    pub fn passed(&self) -> bool {
        self.error <= self.limit
    }
}

/// The accepted error for `dtype`: 1e-5 for f32 and f64, 1e-2 for half types.
pub fn limit_for(dtype: DType) -> f64 {
    match dtype {
        DType::F32 | DType::F64 => 1e-5,
        _ => 1e-2,
    }
}

/// `max |a - b| / max |b|`, in f64 on the host.
pub fn relative_error<B: Backend, const D: usize>(a: Tensor<B, D>, b: Tensor<B, D>) -> f64 {
    let values = |t: Tensor<B, D>| -> Vec<f64> {
        with_dtype(t, DType::F32)
            .into_data()
            .convert::<f64>()
            .to_vec::<f64>()
            .expect("f64 data")
    };
    let (a, b) = (values(a), values(b));
    let scale = b
        .iter()
        .fold(0.0f64, |m, v| m.max(v.abs()))
        .max(f64::MIN_POSITIVE);
    let difference = a.iter().zip(&b).fold(0.0f64, |m, (x, y)| {
        if (x - y).is_nan() {
            f64::NAN
        } else {
            m.max((x - y).abs())
        }
    });
    difference / scale
}

/// Every kernel and gradient against its reference on `device`, inputs in `dtype`, and
/// the dropout mask's reproducibility.
///
/// # Panics
///
/// When `B` runs no kernels (or the references are forced): there would be nothing to
/// compare.
pub fn check_kernels<B: FusedKernels>(device: &B::Device, dtype: DType) -> Vec<Check> {
    assert!(
        B::has_fused_kernels() && !reference_kernels(),
        "this backend runs the references, not kernels: nothing to check (unset \
         BURN_MEGATRON_REFERENCE_OPS, use a CubeCL backend)"
    );
    let mut checks = check_dropout_seeds::<B>(device, dtype);
    // Column sums (bias gradients) with chunks of several rows and row counts that are
    // not multiples of the four rows a step, on pitched rows.
    for shape in [[3001, 40], [1030, 77], [3, 5]] {
        let input = strided::<B>(shape, device, dtype, 1.0, 0.5);
        let expected = reference_column_sums(wide(input.clone()));
        checks.push(row(
            "column_sums",
            &shape,
            dtype,
            "sums",
            B::column_sums(input),
            expected,
        ));
    }
    // A linear layer's bias add, whose bias gradient is the column sums.
    for shape in [[3001, 40], [17, 77]] {
        checks.extend(check_bias_add::<B>(device, dtype, shape));
    }
    // Rows enough that each slot of the norm's one-pass backward takes several rows (the
    // last ones past the end for some slots); rows whose mean is 30 times their spread (a
    // variance from the sums of x and x² would cancel away), for the warp-per-row forward
    // and the split one; rows wide enough that the forward splits them over a cube's units
    // and the backward takes two kernels ([3, 6000]), or that the forward loops over them
    // ([2, 20000]).
    for centered in [true, false] {
        checks.extend(check_norm::<B>(device, dtype, [3001, 40], centered, 0.0));
        checks.extend(check_norm::<B>(device, dtype, [33, 520], centered, 30.0));
        checks.extend(check_norm::<B>(device, dtype, [4, 1600], centered, 30.0));
        for shape in [[3, 6000], [2, 20000]] {
            checks.extend(check_norm::<B>(device, dtype, shape, centered, 0.0));
        }
    }
    for shape in [[4, 256], [3, 1000], [17, 77], [2, 5], [3, 1100]] {
        for centered in [true, false] {
            checks.extend(check_norm::<B>(device, dtype, shape, centered, 0.0));
        }
        for gelu in [Gelu::Exact, Gelu::Tanh] {
            for bias in [true, false] {
                checks.extend(check_bias_gelu::<B>(device, dtype, shape, gelu, bias));
            }
        }
    }
    let site = |p, seed, full, offsets| {
        Some(Dropout {
            p,
            seed,
            full,
            offsets,
        })
    };
    // (shape, dropout, whether with a bias too)
    for (shape, dropout, biased) in [
        ([2, 5, 64], None, true),
        (
            [2, 3, 100],
            site(0.1, 0x0123_4567_89AB_CDEF, [3, 6, 100], [1, 3, 0]),
            true,
        ),
        // Rows of many vectors, a column slice of the full tensor (a tensor-parallel
        // rank's part).
        ([2, 4, 256], site(0.2, 99, [2, 8, 512], [0, 2, 256]), true),
        ([3, 7, 33], site(0.5, 7, [3, 7, 33], [0, 0, 0]), true),
        // More tokens than a launch has cubes along y: units take several. No bias: its
        // gradient, a sum over 65537 rows, rounds differently in the reference beyond the
        // limit.
        (
            [1, 65_537, 8],
            site(0.1, 5, [1, 65_537, 8], [0, 0, 0]),
            false,
        ),
    ] {
        for bias in [true, false] {
            if bias && !biased {
                continue;
            }
            checks.extend(check_bias_dropout_add::<B>(
                device, dtype, shape, dropout, bias,
            ));
        }
    }
    for (shape, causal, padded) in [
        ([2, 3, 5, 5], true, false),
        ([2, 2, 7, 7], true, true),
        ([1, 2, 33, 300], false, true),
        ([2, 1, 130, 130], true, false),
        ([1, 2, 3, 1100], true, true),
    ] {
        checks.extend(check_softmax::<B>(device, dtype, shape, causal, padded));
    }
    for (shape, real_width, label_smoothing) in [
        ([4, 256], 256, 0.0),
        ([3, 1000], 997, 0.1),
        ([17, 77], 70, 0.0),
        ([33, 520], 512, 0.1),
    ] {
        checks.extend(check_cross_entropy::<B>(
            device,
            dtype,
            shape,
            real_width,
            label_smoothing,
        ));
    }
    for with_sum in [false, true] {
        checks.push(check_flatten_into::<B>(device, dtype, with_sum));
    }
    // Tables with more tokens than rows (ids repeat) and rows no token picks.
    for (tokens, rows, width) in [(3000, 1001, 40), (8, 50, 77)] {
        checks.extend(check_embedding::<B>(device, dtype, tokens, rows, width));
    }
    // The optimizer's buffers are fp32 whatever the model's type.
    if dtype == DType::F32 {
        for (len, grad_factor, step) in [(1000, 1.0, 1), (4099, 0.37, 7)] {
            checks.extend(check_adamw::<B>(device, len, grad_factor, step));
        }
        // Lengths below one unit per element, over every unit more than once (vectors of
        // one element and of four), and odd (where the kernel runs: CUDA). The check runs
        // on an fp32 backend; the limit also catches a sum read back in fp32.
        let lengths = if B::sums_squares_in_kernel(device) {
            &[
                (3, false),
                (1000, true),
                (600_001, false),
                (600_001, true),
                (600_004, true),
            ][..]
        } else {
            &[]
        };
        for &(len, masked) in lengths {
            checks.push(check_sum_of_squares::<B>(device, len, masked));
        }
    }
    checks
}

/// A micro-batch's gradients into the flat fp32 main grads: parts in `dtype` of lengths
/// that do not keep the vectors aligned (a view starting inside its buffer among them) and
/// an fp32 part, written fresh or added in place to a sum nothing else holds, against the
/// reference on copies.
fn check_flatten_into<B: FusedKernels>(device: &B::Device, dtype: DType, with_sum: bool) -> Check {
    let mut parts: Vec<Tensor<B, 1>> = [5, 8, 1001, 3, 4096]
        .into_iter()
        .map(|len| random::<B, 1>([len], device, dtype, 1.0))
        .collect();
    parts.push(random::<B, 1>([700], device, dtype, 1.0).narrow(0, 3, 613));
    parts.push(random::<B, 1>([64], device, DType::F32, 1.0));
    let total = parts.iter().map(|part| part.dims()[0]).sum();
    let sum = with_sum.then(|| random::<B, 1>([total], device, DType::F32, 1.0));
    // The reference's sum is a copy: the kernel adds in place to the only holder of its own.
    let sum_copy = sum
        .as_ref()
        .map(|sum| Tensor::<B, 1>::from_data(sum.to_data(), (device, DType::F32)));
    let expected = reference_flatten_into(parts.clone(), sum_copy);
    let fused = B::flatten_into(parts, sum);
    row(
        if with_sum {
            "flatten_into_added"
        } else {
            "flatten_into"
        },
        &[total],
        dtype,
        "flat",
        fused,
        expected,
    )
}

/// An AdamW step on fresh fp32 state (the second moment positive, half the elements
/// decayed), in place on buffers nothing else holds, against the reference on copies.
fn check_adamw<B: FusedKernels>(
    device: &B::Device,
    len: usize,
    grad_factor: f64,
    step: i32,
) -> Vec<Check> {
    let state = AdamWState {
        master: random::<B, 1>([len], device, DType::F32, 1.0),
        exp_avg: random::<B, 1>([len], device, DType::F32, 0.1),
        exp_avg_sq: random::<B, 1>([len], device, DType::F32, 0.01).abs(),
    };
    let grads = random::<B, 1>([len], device, DType::F32, 0.3);
    let decay = with_dtype(
        random::<B, 1>([len], device, DType::F32, 1.0)
            .greater_elem(0.0)
            .float(),
        DType::F32,
    );
    let hyper = AdamWStep {
        lr: 3e-4,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        grad_factor,
        step,
    };
    let expected = reference_adamw(state.clone(), grads.clone(), decay.clone(), hyper);
    let fused = B::adamw(state, grads, decay, hyper);
    let kernel = if grad_factor == 1.0 {
        "adamw"
    } else {
        "adamw_clipped"
    };
    let shape = [len];
    vec![
        row(
            kernel,
            &shape,
            DType::F32,
            "master",
            fused.master,
            expected.master,
        ),
        row(
            kernel,
            &shape,
            DType::F32,
            "exp_avg",
            fused.exp_avg,
            expected.exp_avg,
        ),
        row(
            kernel,
            &shape,
            DType::F32,
            "exp_avg_sq",
            fused.exp_avg_sq,
            expected.exp_avg_sq,
        ),
    ]
}

/// The gradient norm's sum of squares (fp32 values, fp64 sum; with a mask of counted
/// elements or without) against an fp64 sum on the host of the same values. The limit
/// allows fp64 summation in another order, nothing more: an fp32 sum is off by about 1e-7
/// to 1e-4.
fn check_sum_of_squares<B: FusedKernels>(device: &B::Device, len: usize, masked: bool) -> Check {
    let values = random::<B, 1>([len], device, DType::F32, 3.0);
    let counted = masked.then(|| {
        with_dtype(
            random::<B, 1>([len], device, DType::F32, 1.0)
                .greater_elem(0.0)
                .float(),
            DType::F32,
        )
    });
    let host = |t: &Tensor<B, 1>| t.to_data().convert::<f32>().to_vec::<f32>().unwrap();
    let mask = counted.as_ref().map_or_else(|| vec![1.0; len], host);
    let want: f64 = host(&values)
        .iter()
        .zip(&mask)
        .map(|(&value, &count)| f64::from(value * count).powi(2))
        .sum();
    let got = B::sum_of_squares(&values, counted.as_ref());
    Check {
        kernel: if masked {
            "sum_of_squares_counted"
        } else {
            "sum_of_squares"
        }
        .to_string(),
        shape: vec![len],
        dtype: DType::F32,
        quantity: "sum",
        error: (got - want).abs() / want.abs().max(f64::MIN_POSITIVE),
        limit: 1e-12,
    }
}

type Ad<B> = Autodiff<B>;

fn random<B: Backend, const D: usize>(
    shape: [usize; D],
    device: &B::Device,
    dtype: DType,
    scale: f64,
) -> Tensor<B, D> {
    let values = Tensor::<B, D>::random(
        Shape::new(shape),
        Distribution::Uniform(-scale, scale),
        (device, DType::F32),
    );
    with_dtype(values, dtype)
}

/// A `[rows, width]` view whose rows are `width + 128` apart: the layout of CUDA's pitched
/// tensors (and of column slices), which the kernels must address through the row stride.
/// (Burn slices without copying when the cut-off ends are aligned: 128 elements are.)
fn strided<B: Backend>(
    [rows, width]: [usize; 2],
    device: &B::Device,
    dtype: DType,
    scale: f64,
    offset: f64,
) -> Tensor<B, 2> {
    let values = random::<B, 2>([rows, width + 128], device, DType::F32, scale).add_scalar(offset);
    with_dtype(values, dtype).narrow(1, 0, width)
}

/// The reference's inputs: the same values in fp32, so that a half-precision kernel is
/// compared with exact arithmetic on its inputs rather than with another rounding.
fn wide<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Tensor<B, D> {
    with_dtype(tensor, DType::F32)
}

/// A check row for `quantity`.
fn row<B: Backend, const D: usize>(
    kernel: &str,
    shape: &[usize],
    dtype: DType,
    quantity: &'static str,
    fused: Tensor<B, D>,
    reference: Tensor<B, D>,
) -> Check {
    Check {
        kernel: kernel.to_string(),
        shape: shape.to_vec(),
        dtype,
        quantity,
        error: relative_error(fused, reference),
        limit: limit_for(dtype),
    }
}

/// Outputs and the gradients of `inputs` for `sum(output · upstream)`, from `forward`.
fn run<B: FusedKernels, const D: usize, const N: usize>(
    inputs: &[Tensor<B, 2>; N],
    upstream: &Tensor<B, D>,
    forward: impl Fn(&[Tensor<Ad<B>, 2>; N]) -> Tensor<Ad<B>, D>,
) -> (Tensor<B, D>, [Tensor<B, 2>; N]) {
    let tracked: [Tensor<Ad<B>, 2>; N] =
        std::array::from_fn(|i| Tensor::from_inner(inputs[i].clone()).require_grad());
    let output = forward(&tracked);
    let grads = (output.clone() * Tensor::from_inner(upstream.clone()))
        .sum()
        .backward();
    // An input the forward does not use (the bias of an RMSNorm) gets zeros.
    let gradients = std::array::from_fn(|i| {
        tracked[i]
            .grad(&grads)
            .unwrap_or_else(|| inputs[i].zeros_like())
    });
    (output.inner(), gradients)
}

fn check_norm<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    [rows, width]: [usize; 2],
    centered: bool,
    shift: f64,
) -> Vec<Check> {
    let kernel = if centered { "layer_norm" } else { "rms_norm" };
    let epsilon = 1e-5;
    // Weight and bias travel as [1, width] rows so that `run` handles them with the input.
    let input = strided::<B>([rows, width], device, dtype, 2.0, 0.5);
    let inputs = [
        // Shifted, the input is a fresh contiguous tensor: pitched rows only unshifted.
        if shift == 0.0 {
            input
        } else {
            input.add_scalar(shift)
        },
        random::<B, 2>([1, width], device, dtype, 1.0).add_scalar(1.0),
        random::<B, 2>([1, width], device, dtype, 1.0),
    ];
    let upstream = random::<B, 2>([rows, width], device, dtype, 1.0);
    let forward = |fused: bool| {
        move |t: &[Tensor<Ad<B>, 2>; 3]| {
            let weight = t[1].clone().reshape([width]);
            let bias = centered.then(|| t[2].clone().reshape([width]));
            if fused {
                Ad::<B>::norm(t[0].clone(), weight, bias, epsilon)
            } else {
                reference_norm(t[0].clone(), weight, bias, epsilon)
            }
        }
    };
    let (output, [d_input, d_weight, d_bias]) = run(&inputs, &upstream, forward(true));
    let (expected, [e_input, e_weight, e_bias]) =
        run(&inputs.map(wide), &wide(upstream), forward(false));
    let shape = [rows, width];
    let mut checks = vec![
        row(kernel, &shape, dtype, "output", output, expected),
        row(kernel, &shape, dtype, "d_input", d_input, e_input),
        row(kernel, &shape, dtype, "d_weight", d_weight, e_weight),
    ];
    if centered {
        checks.push(row(kernel, &shape, dtype, "d_bias", d_bias, e_bias));
    }
    checks
}

fn check_bias_gelu<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    [rows, width]: [usize; 2],
    gelu: Gelu,
    with_bias: bool,
) -> Vec<Check> {
    let kernel = match (gelu, with_bias) {
        (Gelu::Exact, true) => "bias_gelu",
        (Gelu::Tanh, true) => "bias_gelu_tanh",
        (Gelu::Exact, false) => "gelu",
        (Gelu::Tanh, false) => "gelu_tanh",
    };
    let inputs = [
        strided::<B>([rows, width], device, dtype, 4.0, 0.0),
        random::<B, 2>([1, width], device, dtype, 1.0),
    ];
    let upstream = random::<B, 2>([rows, width], device, dtype, 1.0);
    let forward = |fused: bool| {
        move |t: &[Tensor<Ad<B>, 2>; 2]| {
            let bias = with_bias.then(|| t[1].clone().reshape([width]));
            if fused {
                Ad::<B>::bias_gelu(t[0].clone(), bias, gelu)
            } else {
                reference_bias_gelu(t[0].clone(), bias, gelu)
            }
        }
    };
    let (output, [d_input, d_bias]) = run(&inputs, &upstream, forward(true));
    let inputs = inputs.map(wide);
    let (expected, _) = run(&inputs, &wide(upstream.clone()), forward(false));
    // The gradient's reference is the explicit derivative in plain Burn ops: Burn's own
    // `gelu` backward is the tanh approximation's derivative even for the exact GeLU.
    let bias = with_bias.then(|| inputs[1].clone().reshape([width]));
    let e_input = reference_bias_gelu_backward(wide(upstream), inputs[0].clone(), bias, gelu);
    let e_bias = with_dtype(e_input.clone(), DType::F32).sum_dim(0);
    let shape = [rows, width];
    let mut checks = vec![
        row(kernel, &shape, dtype, "output", output, expected),
        row(kernel, &shape, dtype, "d_input", d_input, e_input),
    ];
    if with_bias {
        checks.push(row(kernel, &shape, dtype, "d_bias", d_bias, e_bias));
    }
    checks
}

/// An embedding lookup's table gradient: the kernel on rows of `grad` with a pitch, and the
/// autodiff node's gradient of `Σ rows · upstream` cast to the table's type, against the
/// reference (Burn's `select_assign` in fp32) on the same values in fp32.
fn check_embedding<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    tokens: usize,
    rows: usize,
    width: usize,
) -> Vec<Check> {
    let ids: Vec<i64> = (0..tokens).map(|t| ((t * 7919) % rows) as i64).collect();
    let ids = Tensor::<B, 1, Int>::from_data(TensorData::new(ids, [tokens]), device);
    let grad = strided::<B>([tokens, width], device, dtype, 1.0, 0.0);
    let expected = reference_embedding_grad(wide(grad.clone()), ids.clone(), rows);
    let fused = B::embedding_grad(grad, ids.clone(), rows);
    let table = random::<Ad<B>, 2>([rows, width], device, dtype, 1.0).require_grad();
    let upstream = random::<B, 3>([1, tokens, width], device, dtype, 1.0);
    let ids = ids.reshape([1, tokens]);
    let gathered = Ad::<B>::embedding_lookup(
        table.clone(),
        Tensor::from_primitive(ids.clone().into_primitive()),
    );
    let grads = (gathered * Tensor::from_inner(upstream.clone()))
        .sum()
        .backward();
    let d_table = table.grad(&grads).expect("the table's gradient");
    let e_table = reference_embedding_grad(
        wide(upstream.reshape([tokens, width])),
        ids.reshape([tokens]),
        rows,
    );
    let shape = [tokens, width];
    vec![
        row("embedding_grad", &shape, dtype, "d_table", fused, expected),
        row(
            "embedding_lookup",
            &shape,
            dtype,
            "d_table",
            d_table,
            with_dtype(e_table, dtype),
        ),
    ]
}

fn check_bias_add<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    [rows, width]: [usize; 2],
) -> Vec<Check> {
    let inputs = [
        strided::<B>([rows, width], device, dtype, 2.0, 0.0),
        random::<B, 2>([1, width], device, dtype, 1.0),
    ];
    let upstream = random::<B, 2>([rows, width], device, dtype, 1.0);
    let forward = |fused: bool| {
        move |t: &[Tensor<Ad<B>, 2>; 2]| {
            let bias = t[1].clone().reshape([width]);
            if fused {
                Ad::<B>::bias_add(t[0].clone(), bias)
            } else {
                t[0].clone() + bias.unsqueeze()
            }
        }
    };
    let (output, [d_input, d_bias]) = run(&inputs, &upstream, forward(true));
    let (expected, [e_input, e_bias]) = run(&inputs.map(wide), &wide(upstream), forward(false));
    let shape = [rows, width];
    vec![
        row("linear_bias_add", &shape, dtype, "output", output, expected),
        row(
            "linear_bias_add",
            &shape,
            dtype,
            "d_input",
            d_input,
            e_input,
        ),
        row("linear_bias_add", &shape, dtype, "d_bias", d_bias, e_bias),
    ]
}

fn check_bias_dropout_add<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    [batch, seq, width]: [usize; 3],
    dropout: Option<Dropout>,
    with_bias: bool,
) -> Vec<Check> {
    let kernel = match (&dropout, with_bias) {
        (Some(_), true) => "bias_dropout_add",
        (None, true) => "bias_add",
        (Some(_), false) => "dropout_add",
        (None, false) => "add",
    };
    let rows = batch * seq;
    let inputs = [
        strided::<B>([rows, width], device, dtype, 2.0, 0.0),
        random::<B, 2>([rows, width], device, dtype, 2.0),
        random::<B, 2>([1, width], device, dtype, 1.0),
    ];
    let upstream = random::<B, 3>([batch, seq, width], device, dtype, 1.0);
    let forward = |fused: bool| {
        move |t: &[Tensor<Ad<B>, 2>; 3]| {
            let input = t[0].clone().reshape([batch, seq, width]);
            let residual = t[1].clone().reshape([batch, seq, width]);
            let bias = with_bias.then(|| t[2].clone().reshape([width]));
            if fused {
                Ad::<B>::bias_dropout_add(input, bias, residual, dropout)
            } else {
                reference_bias_dropout_add(input, bias, residual, dropout)
            }
        }
    };
    let (output, [d_input, d_residual, d_bias]) = run(&inputs, &upstream, forward(true));
    let (expected, [e_input, e_residual, e_bias]) =
        run(&inputs.map(wide), &wide(upstream), forward(false));
    let shape = [batch, seq, width];
    let mut checks = vec![
        row(kernel, &shape, dtype, "output", output, expected),
        row(kernel, &shape, dtype, "d_input", d_input, e_input),
        row(kernel, &shape, dtype, "d_residual", d_residual, e_residual),
    ];
    if with_bias {
        checks.push(row(kernel, &shape, dtype, "d_bias", d_bias, e_bias));
    }
    checks
}

/// The dropout kernel's mask: the same for the same seed (`reproducible`: the error is the
/// difference between two runs), different for another seed (`seed_changes_mask`: the
/// error is 1 when the masks are equal), and it drops about `p` of the elements
/// (`drop_rate`: the error is the distance from `p`, the limit four standard deviations).
fn check_dropout_seeds<B: FusedKernels>(device: &B::Device, dtype: DType) -> Vec<Check> {
    let shape = [4, 64, 257];
    let site = |seed| Dropout {
        p: 0.25,
        seed,
        full: shape,
        offsets: [0; 3],
    };
    let ones = || with_dtype(Tensor::<B, 3>::ones(shape, (device, DType::F32)), dtype);
    let first = B::dropout_mask_apply(ones(), site(42));
    let again = B::dropout_mask_apply(ones(), site(42));
    let other = B::dropout_mask_apply(ones(), site(43));
    let changed = relative_error(other, first.clone()) > 0.0;
    let count = shape.iter().product::<usize>() as f64;
    let dropped = with_dtype(first.clone(), DType::F32)
        .equal_elem(0.0)
        .int()
        .sum()
        .into_scalar()
        .elem::<f64>()
        / count;
    let spread = (0.25 * 0.75 / count).sqrt();
    let rows = |quantity, error, limit| Check {
        kernel: "dropout".to_string(),
        shape: shape.to_vec(),
        dtype,
        quantity,
        error,
        limit,
    };
    vec![
        rows("reproducible", relative_error(again, first), 0.0),
        rows("seed_changes_mask", if changed { 0.0 } else { 1.0 }, 0.0),
        rows("drop_rate", (dropped - 0.25).abs(), 4.0 * spread),
    ]
}

/// The softmax kernels on raw scores (probabilities) and on a gradient (the scores'
/// gradient); with padding, the last keys of every batch are padding and the second
/// batch is padding entirely (its rows come out uniform, their gradient zero).
fn check_softmax<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    shape: [usize; 4],
    causal: bool,
    padded: bool,
) -> Vec<Check> {
    let [batch, _, _, keys] = shape;
    let kernel = match (causal, padded) {
        (true, true) => "softmax_causal_pad",
        (true, false) => "softmax_causal",
        _ => "softmax_padding",
    };
    let padding = || {
        padded.then(|| {
            let flags: Vec<bool> = (0..batch * keys)
                .map(|i| i / keys == 1 || i % keys >= keys - keys / 3)
                .collect();
            Tensor::<B, 2, Bool>::from_data(TensorData::new(flags, [batch, keys]), device)
        })
    };
    let scale = 0.125;
    let scores = with_dtype(random::<B, 4>(shape, device, DType::F32, 8.0), dtype);
    let fused = B::scaled_masked_softmax(scores.clone(), scale, causal, padding());
    let expected = reference_softmax(wide(scores), scale, causal, padding());
    // The backward's inputs in `dtype`, as the attention hands them over; the reference
    // computes from the same rounded values in fp32.
    let probabilities = with_dtype(expected.clone(), dtype);
    let grad = with_dtype(random::<B, 4>(shape, device, DType::F32, 1.0), dtype);
    let d_fused = B::scaled_masked_softmax_backward(
        probabilities.clone(),
        grad.clone(),
        scale,
        causal,
        padding(),
    );
    let d_expected =
        reference_softmax_backward(wide(probabilities), wide(grad), scale, causal, padding());
    vec![
        row(kernel, &shape, dtype, "probabilities", fused, expected),
        row(kernel, &shape, dtype, "d_scores", d_fused, d_expected),
    ]
}

/// The cross-entropy kernels on a vocabulary slice whose last columns are padding: the
/// four row statistics, and the logits' gradient through the autodiff node. Targets cover
/// real columns, padding columns and ids outside the slice (negative or past its end).
fn check_cross_entropy<B: FusedKernels>(
    device: &B::Device,
    dtype: DType,
    [rows, width]: [usize; 2],
    real_width: usize,
    label_smoothing: f64,
) -> Vec<Check> {
    let kernel = if label_smoothing > 0.0 {
        "cross_entropy_smooth"
    } else {
        "cross_entropy"
    };
    let shape = [rows, width];
    let cross_entropy = CrossEntropy {
        real_width,
        vocab_size: 2 * real_width,
        label_smoothing,
    };
    let logits = strided::<B>(shape, device, dtype, 8.0, 0.0);
    let columns: Vec<i64> = (0..rows)
        .map(|row| (row * 7919 % (width + 4)) as i64 - 2)
        .collect();
    let targets =
        || Tensor::<B, 1, Int>::from_data(TensorData::new(columns.clone(), [rows]), device);

    let fused = B::logit_statistics(logits.clone(), targets(), real_width);
    let expected = reference_logit_statistics(wide(logits.clone()), targets(), real_width);
    let mut checks = vec![
        row(
            kernel,
            &shape,
            dtype,
            "max",
            fused.max,
            expected.max.clone(),
        ),
        row(
            kernel,
            &shape,
            dtype,
            "sum_exp",
            fused.sum_exp,
            expected.sum_exp.clone(),
        ),
        row(
            kernel,
            &shape,
            dtype,
            "target_logit",
            fused.target,
            expected.target.clone(),
        ),
        row(kernel, &shape, dtype, "logit_sum", fused.sum, expected.sum),
    ];

    // The gradient through the autodiff node, for the whole vocabulary's log-sum-exp
    // (here the slice's own) and a random upstream gradient.
    let log_sum_exp = expected.max + expected.sum_exp.log();
    let loss = log_sum_exp.clone() - expected.target;
    let upstream = random::<B, 1>([rows], device, DType::F32, 1.0);
    let tracked = Tensor::<Ad<B>, 2>::from_inner(logits.clone()).require_grad();
    let joined = Ad::<B>::cross_entropy_loss(
        tracked.clone(),
        Tensor::from_inner(targets()),
        Tensor::from_inner(log_sum_exp.clone()),
        Tensor::from_inner(loss.clone()),
        cross_entropy,
    );
    let grads = (joined.clone() * Tensor::from_inner(upstream.clone()))
        .sum()
        .backward();
    let d_logits = tracked.grad(&grads).expect("the logits' gradient");
    let e_logits = reference_cross_entropy_backward(
        wide(logits),
        targets(),
        log_sum_exp,
        upstream,
        cross_entropy,
    );
    checks.push(row(kernel, &shape, dtype, "loss", joined.inner(), loss));
    checks.push(row(kernel, &shape, dtype, "d_logits", d_logits, e_logits));
    checks
}
