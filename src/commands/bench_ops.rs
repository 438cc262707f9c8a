//! `bench ops`: the fast ops (cuBLASLt GEMMs, core attention with selective recompute)
//! checked against their plain-Burn references on fresh random inputs, and GEMM
//! throughput next to Burn's own matmul.

use std::io::Write;
use std::path::{Path, PathBuf};

use burn::backend::Autodiff;
use burn::tensor::{Bool, DType, Distribution, Tensor, TensorData, backend::Backend};
use burn_megatron::ops::{CoreAttention, MegatronOps, Recompute, use_reference_ops};
use burn_megatron::{Error, Result};
use clap::Args;

use super::bench::seconds_per_call;

/// Flags of `bench ops`.
#[derive(Args, Debug)]
pub struct OpsArgs {
    /// Where to run: cuda (cuBLASLt against Burn's matmul; needs a build with
    /// --features cuda) or cpu (the reference paths only: a smoke test).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Square GEMM sizes to time, comma separated.
    #[arg(long, value_delimiter = ',', default_values_t = [4096, 8192])]
    sizes: Vec<usize>,
    /// Timed repetitions per GEMM (after 3 untimed ones).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// What to run, comma separated: speed (square GEMM TFLOP/s, ours and Burn's matmul
    /// in bf16), weight-grad (TFLOP/s of a weight-gradient GEMM in its forms with and
    /// without gradient-accumulation fusion), gemm (every GEMM path, 2-D and batched,
    /// against an f64 product on the host), attention (selective recompute on the fast ops
    /// against the plain-Burn reference storing everything, in f32 on the host).
    #[arg(long, value_delimiter = ',', default_values_t = ["speed".to_string(), "weight-grad".to_string(), "gemm".to_string(), "attention".to_string()])]
    parts: Vec<String>,
    /// Element types of the speed, gemm and attention parts, comma separated: f32, tf32
    /// (f32 inputs on TF32 tensor cores), bf16, f16 (the CPU runs f32 only).
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "tf32".to_string(), "bf16".to_string(), "f16".to_string()])]
    dtypes: Vec<String>,
    /// Also write the rows as JSON lines here (each part's rows once it is done, so a run
    /// cut short keeps what it measured).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// One correctness check: the fast op's largest error relative to the reference's
/// largest magnitude.
struct Check {
    what: String,
    dtype: &'static str,
    error: f64,
    limit: f64,
}

impl Check {
    /// The check of `error()`, recorded as failed (with the message) when it panics.
    fn guarded(what: String, dtype: &'static str, limit: f64, error: impl FnOnce() -> f64) -> Self {
        let check = match std::panic::catch_unwind(std::panic::AssertUnwindSafe(error)) {
            Ok(error) => Self {
                what,
                dtype,
                error,
                limit,
            },
            Err(panic) => {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                Self {
                    what: format!("{what} ({message})"),
                    dtype,
                    error: f64::INFINITY,
                    limit,
                }
            }
        };
        check.print();
        check
    }

    /// Prints the check's row of the table (as it completes: a long run shows progress).
    fn print(&self) {
        println!(
            "{:<64} {:>6} {:>11.2e} {:>9.0e}  {}",
            self.what,
            self.dtype,
            self.error,
            self.limit,
            if self.error <= self.limit {
                "ok"
            } else {
                "FAILED"
            }
        );
    }
}

/// One timed GEMM size.
struct Speed {
    size: usize,
    dtype: &'static str,
    ours: f64,
    burn: f64,
}

/// Runs `bench ops`.
pub fn run(args: &OpsArgs) -> Result<()> {
    if let Some(path) = &args.output {
        std::fs::write(path, "").map_err(|e| Error::io(path, e))?;
    }
    let checks = match args.device.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => {
            burn_megatron::check_gpu(0)?;
            measure::<super::train::CudaBackend>(args, &Default::default(), false)?
        }
        "cpu" => measure::<burn_ndarray::NdArray<f32>>(args, &Default::default(), true)?,
        other => {
            return Err(Error::InvalidConfig(format!(
                "--device {other}: use cpu{}",
                if cfg!(feature = "cuda") {
                    " or cuda"
                } else {
                    " (cuda needs a build with --features cuda)"
                }
            )));
        }
    };
    let failed = checks.iter().filter(|c| c.error > c.limit).count();
    if failed > 0 {
        return Err(Error::InvalidData(format!(
            "{failed} of {} checks exceeded their limit",
            checks.len()
        )));
    }
    Ok(())
}

/// Appends `rows` as JSON lines to `output`, if given.
fn append(output: Option<&Path>, rows: impl IntoIterator<Item = String>) -> Result<()> {
    let Some(path) = output else {
        return Ok(());
    };
    let mut file = std::fs::OpenOptions::new()
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    for row in rows {
        writeln!(file, "{row}").map_err(|e| Error::io(path, e))?;
    }
    Ok(())
}

impl Check {
    fn json(&self) -> String {
        format!(
            "{{\"kind\": \"check\", \"op\": \"{}\", \"dtype\": \"{}\", \"error\": {:e}, \"limit\": {:e}, \"ok\": {}}}",
            self.what,
            self.dtype,
            self.error,
            self.limit,
            self.error <= self.limit
        )
    }
}

impl Speed {
    fn json(&self) -> String {
        format!(
            "{{\"kind\": \"gemm\", \"size\": {}, \"dtype\": \"{}\", \"ours_tflops\": {:.1}, \"burn_tflops\": {:.1}}}",
            self.size, self.dtype, self.ours, self.burn
        )
    }
}

/// A float type checked: name, dtype, TF32 allowed, error limit.
type DtypeCase = (&'static str, DType, bool, f64);

/// The float types checked, with their error limits (fp32 with TF32 off and on).
const DTYPES: [DtypeCase; 4] = [
    ("f32", DType::F32, false, 1e-3),
    ("tf32", DType::F32, true, 1e-3),
    ("bf16", DType::BF16, false, 1e-2),
    ("f16", DType::F16, false, 1e-2),
];

/// The parts asked for (`cpu`: f32 and small shapes only, no timing), each written to
/// `--output` once done; returns the checks.
fn measure<B: MegatronOps>(args: &OpsArgs, device: &B::Device, cpu: bool) -> Result<Vec<Check>> {
    let output = args.output.as_deref();
    let part = |name: &str| args.parts.iter().any(|p| p == name);
    for name in &args.dtypes {
        if !DTYPES.iter().any(|(known, ..)| known == name) {
            return Err(Error::InvalidConfig(format!(
                "--dtypes {name}: use f32, tf32, bf16 or f16"
            )));
        }
    }
    let dtypes: Vec<_> = DTYPES
        .into_iter()
        .filter(|(name, ..)| args.dtypes.iter().any(|d| d == name) && (!cpu || *name == "f32"))
        .collect();
    if dtypes.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "--dtypes {}: nothing to run here (the CPU runs f32 only)",
            args.dtypes.join(",")
        )));
    }
    if part("speed") && !cpu {
        let speeds = gemm_speeds::<B>(&args.sizes, &dtypes, args.iters, device);
        append(output, speeds.iter().map(Speed::json))?;
    }
    if part("weight-grad") && !cpu {
        let weight_grads = weight_grad_speeds::<B>(args.iters, device);
        append(output, weight_grads.iter().map(WeightGradSpeed::json))?;
    }
    println!(
        "{:<64} {:>6} {:>11} {:>9}  check",
        "op", "dtype", "rel. error", "limit"
    );
    let mut checks = Vec::new();
    if part("gemm") {
        let mut gemm = gemm_checks::<B>(&dtypes, cpu, device);
        gemm.extend(batched_gemm_checks::<B>(&dtypes, cpu, device));
        append(output, gemm.iter().map(Check::json))?;
        checks.extend(gemm);
    }
    if part("attention") {
        let attention = attention_checks::<B>(&dtypes, cpu, device);
        append(output, attention.iter().map(Check::json))?;
        checks.extend(attention);
    }
    Ok(checks)
}

fn random<B: Backend, const D: usize>(
    shape: [usize; D],
    dtype: DType,
    device: &B::Device,
) -> Tensor<B, D> {
    Tensor::<B, D>::random(shape, Distribution::Normal(0.0, 1.0), device).cast(dtype)
}

/// A tensor's values on the host.
fn host<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> Vec<f64> {
    tensor
        .cast(DType::F32)
        .into_data()
        .convert::<f64>()
        .into_vec()
        .expect("f64 values")
}

/// `max |got - want| / max |want|` (infinite when the sizes differ or a value is NaN).
fn relative_error(got: &[f64], want: &[f64]) -> f64 {
    let scale = want.iter().fold(0f64, |m, x| m.max(x.abs()));
    let worst = got
        .iter()
        .zip(want)
        .fold(0f64, |m, (a, b)| m.max((a - b).abs()));
    if got.len() != want.len() || worst.is_nan() {
        return f64::INFINITY;
    }
    worst / scale.max(f64::MIN_POSITIVE)
}

/// `op(a) · op(b)` in f64 on the host (`a` stored `[k, m]` when transposed, else
/// `[m, k]`; `b` likewise), rows spread over the cores: the oracle of the GEMM checks.
fn host_gemm(a: &[f64], b: &[f64], [m, k, n]: [usize; 3], ta: bool, tb: bool) -> Vec<f64> {
    let at = |i: usize, p: usize| if ta { a[p * m + i] } else { a[i * k + p] };
    let bt = |p: usize, j: usize| if tb { b[j * k + p] } else { b[p * n + j] };
    let mut out = vec![0f64; m * n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let rows_per = m.div_ceil(threads).max(1);
    std::thread::scope(|scope| {
        for (chunk, rows) in out.chunks_mut(rows_per * n).enumerate() {
            scope.spawn(move || {
                for (r, row) in rows.chunks_mut(n).enumerate() {
                    let i = chunk * rows_per + r;
                    for p in 0..k {
                        let x = at(i, p);
                        for (j, value) in row.iter_mut().enumerate() {
                            *value += x * bt(p, j);
                        }
                    }
                }
            });
        }
    });
    out
}

fn set_tf32(allow: bool) {
    #[cfg(feature = "cuda")]
    burn_megatron::ops::allow_tf32(allow);
    let _ = allow;
}

/// Every transpose combination (forward, input- and weight-gradient products), a
/// transposed view and a linear layer's two backward products as one GEMM group, at
/// square, tall, skinny and odd shapes, against the f64 product of the same (rounded)
/// inputs on the host.
fn gemm_checks<B: MegatronOps>(
    dtypes: &[DtypeCase],
    small: bool,
    device: &B::Device,
) -> Vec<Check> {
    let shapes = [
        ("square", [1024, 1024, 1024]),
        ("tall", [8192, 1280, 320]),
        ("skinny", [64, 4096, 1024]),
        ("odd", [1000, 333, 777]),
    ];
    let shapes = if small {
        &[("odd", [100, 33, 77])][..]
    } else {
        &shapes[..]
    };
    let mut checks = Vec::new();
    for &(dtype_name, dtype, tf32, limit) in dtypes {
        set_tf32(tf32);
        for &(shape_name, [m, k, n]) in shapes {
            for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
                let a = random::<B, 2>(if ta { [k, m] } else { [m, k] }, dtype, device);
                let b = random::<B, 2>(if tb { [n, k] } else { [k, n] }, dtype, device);
                let want = host_gemm(&host(a.clone()), &host(b.clone()), [m, k, n], ta, tb);
                checks.push(Check::guarded(
                    format!(
                        "gemm {shape_name} {m}x{k}x{n} {}{}",
                        if ta { "T" } else { "N" },
                        if tb { "T" } else { "N" }
                    ),
                    dtype_name,
                    limit,
                    || relative_error(&host(B::gemm(a, b, ta, tb)), &want),
                ));
            }
            // A transposed view (column-major strides) read in place.
            let a = random::<B, 2>([k, m], dtype, device).transpose();
            let b = random::<B, 2>([k, n], dtype, device);
            let want = host_gemm(&host(a.clone()), &host(b.clone()), [m, k, n], false, false);
            checks.push(Check::guarded(
                format!("gemm {shape_name} {m}x{k}x{n} view"),
                dtype_name,
                limit,
                || relative_error(&host(B::gemm(a, b, false, false)), &want),
            ));
            // A linear layer's backward as one GEMM group: the input gradient `g · wᵀ` and
            // the weight gradient `xᵀ · g` (at the odd shape their rows would be pitched in
            // cubecl's default layout, whose reshape is a copy: inside the group it would
            // run before the GEMMs, as it once did for GPT-2's LM head).
            let x = random::<B, 2>([m, k], dtype, device);
            let w = random::<B, 2>([k, n], dtype, device);
            let g = random::<B, 2>([m, n], dtype, device);
            let (host_x, host_w, host_g) = (host(x.clone()), host(w.clone()), host(g.clone()));
            let mut want = host_gemm(&host_g, &host_w, [m, n, k], false, true);
            want.extend(host_gemm(&host_x, &host_g, [k, m, n], true, false));
            checks.push(Check::guarded(
                format!("gemm group {shape_name} {m}x{k}x{n} input and weight gradients"),
                dtype_name,
                limit,
                || {
                    let (input_grad, weight_grad) = B::gemm_group(|| {
                        (
                            B::gemm(g.clone(), w, false, true),
                            B::gemm(x, g, true, false),
                        )
                    });
                    let mut got = host(input_grad);
                    got.extend(host(weight_grad));
                    relative_error(&got, &want)
                },
            ));
            checks.extend(linear_checks::<B>(
                shape_name,
                [m, k, n],
                dtype_name,
                dtype,
                limit,
                device,
            ));
            // The weight-gradient GEMM of gradient-accumulation fusion: `aᵀ · b` added in
            // fp32 to an fp32 sum (in place on CUDA), and without a sum.
            let a = random::<B, 2>([k, m], dtype, device);
            let b = random::<B, 2>([k, n], dtype, device);
            let product = host_gemm(&host(a.clone()), &host(b.clone()), [m, k, n], true, false);
            let sum = random::<B, 2>([m, n], DType::F32, device);
            let want: Vec<f64> = host(sum.clone())
                .iter()
                .zip(&product)
                .map(|(s, p)| s + p)
                .collect();
            let (a2, b2) = (a.clone(), b.clone());
            checks.push(Check::guarded(
                format!("gemm_accumulate {shape_name} {m}x{k}x{n} TN onto a sum"),
                dtype_name,
                limit,
                || {
                    relative_error(
                        &host(B::gemm_accumulate(a2, b2, true, false, Some(sum))),
                        &want,
                    )
                },
            ));
            checks.push(Check::guarded(
                format!("gemm_accumulate {shape_name} {m}x{k}x{n} TN"),
                dtype_name,
                limit,
                || relative_error(&host(B::gemm_accumulate(a, b, true, false, None)), &product),
            ));
        }
    }
    set_tf32(false);
    checks
}

/// A linear layer `x · w + bias` (`x`: `[m, k]`): the forward with the bias in the GEMM's
/// epilogue (`MegatronOps::gemm_bias`), and on autodiff the gradients of `Σ out · g` for
/// the input, the weight and the bias (`ops::linear`: the GEMM group and the bias's column
/// sums), against the f64 results of the same (rounded) inputs on the host.
fn linear_checks<B: MegatronOps>(
    shape_name: &str,
    [m, k, n]: [usize; 3],
    dtype_name: &'static str,
    dtype: DType,
    limit: f64,
    device: &B::Device,
) -> Vec<Check> {
    let x = random::<B, 2>([m, k], dtype, device);
    let w = random::<B, 2>([k, n], dtype, device);
    let bias = Tensor::<B, 1>::random([n], Distribution::Normal(0.0, 1.0), device).cast(dtype);
    let g = random::<B, 2>([m, n], dtype, device);
    let (host_x, host_w, host_bias, host_g) = (
        host(x.clone()),
        host(w.clone()),
        host(bias.clone()),
        host(g.clone()),
    );
    let mut want_output = host_gemm(&host_x, &host_w, [m, k, n], false, false);
    for row in want_output.chunks_mut(n) {
        row.iter_mut().zip(&host_bias).for_each(|(v, b)| *v += b);
    }
    let (x2, w2, bias2) = (x.clone(), w.clone(), bias.clone());
    let forward = Check::guarded(
        format!("gemm_bias {shape_name} {m}x{k}x{n}: the bias in the epilogue"),
        dtype_name,
        limit,
        || relative_error(&host(B::gemm_bias(x2, w2, bias2)), &want_output),
    );
    let want = [
        host_gemm(&host_g, &host_w, [m, n, k], false, true),
        host_gemm(&host_x, &host_g, [k, m, n], true, false),
        (0..n)
            .map(|j| (0..m).map(|i| host_g[i * n + j]).sum())
            .collect(),
    ];
    let backward = ["d input", "d weight", "d bias"]
        .into_iter()
        .zip(want)
        .map(|(name, want)| {
            let (x, w, bias, g) = (x.clone(), w.clone(), bias.clone(), g.clone());
            Check::guarded(
                format!("linear {shape_name} {m}x{k}x{n} with bias: {name}"),
                dtype_name,
                limit,
                move || {
                    type A<B> = Autodiff<B>;
                    let x = Tensor::<A<B>, 2>::from_inner(x).require_grad();
                    let w = Tensor::<A<B>, 2>::from_inner(w).require_grad();
                    let bias = Tensor::<A<B>, 1>::from_inner(bias).require_grad();
                    let out = burn_megatron::ops::linear(x.clone(), w.clone(), Some(bias.clone()));
                    let grads = (out * Tensor::from_inner(g)).sum().backward();
                    let got = match name {
                        "d input" => host(x.grad(&grads).expect("d input")),
                        "d weight" => host(w.grad(&grads).expect("d weight")),
                        _ => host(bias.grad(&grads).expect("d bias")),
                    };
                    relative_error(&got, &want)
                },
            )
        });
    std::iter::once(forward).chain(backward).collect()
}

/// Attention's batched products: `[batch, heads]` grids of matrices stored one after the
/// other and as heads inside each token's row (`[batch, seq, heads, dim]` viewed as
/// `[batch, heads, seq, dim]`), every transpose combination, against the f64 product of
/// each matrix on the host.
fn batched_gemm_checks<B: MegatronOps>(
    dtypes: &[DtypeCase],
    small: bool,
    device: &B::Device,
) -> Vec<Check> {
    let [batch, heads, m, k, n] = if small {
        [2, 3, 20, 8, 12]
    } else {
        [4, 6, 256, 64, 200]
    };
    let mut checks = Vec::new();
    for &(dtype_name, dtype, tf32, limit) in dtypes {
        set_tf32(tf32);
        for (ta, tb) in [(false, false), (false, true), (true, false), (true, true)] {
            for interleaved in [false, true] {
                let operand = |rows: usize, cols: usize| match interleaved {
                    true => {
                        random::<B, 4>([batch, rows, heads, cols], dtype, device).swap_dims(1, 2)
                    }
                    false => random::<B, 4>([batch, heads, rows, cols], dtype, device),
                };
                let a = if ta { operand(k, m) } else { operand(m, k) };
                let b = if tb { operand(n, k) } else { operand(k, n) };
                let (host_a, host_b) = (host(a.clone()), host(b.clone()));
                let want: Vec<f64> = (0..batch * heads)
                    .flat_map(|g| {
                        let a = &host_a[g * m * k..(g + 1) * m * k];
                        let b = &host_b[g * k * n..(g + 1) * k * n];
                        host_gemm(a, b, [m, k, n], ta, tb)
                    })
                    .collect();
                checks.push(Check::guarded(
                    format!(
                        "batched gemm {batch}x{heads}x{m}x{k}x{n} {}{}{}",
                        if ta { "T" } else { "N" },
                        if tb { "T" } else { "N" },
                        if interleaved { " heads in rows" } else { "" }
                    ),
                    dtype_name,
                    limit,
                    || relative_error(&host(B::batched_gemm(a, b, ta, tb)), &want),
                ));
            }
        }
    }
    set_tf32(false);
    checks
}

/// Core attention with selective recompute on the fast ops against the plain-Burn
/// reference storing everything (`use_reference_ops`) in f32 on the host (NdArray, from
/// the same input values), forward and the three input gradients, causal and causal +
/// padding, with Q, K and V stored per head and as heads inside each token's row. (The
/// reference runs on the host: Burn's own matmul on the GPU autotunes each new shape and
/// type for minutes.)
fn attention_checks<B: MegatronOps>(
    dtypes: &[DtypeCase],
    small: bool,
    device: &B::Device,
) -> Vec<Check> {
    type Host = burn_ndarray::NdArray<f32>;
    let shapes = if small {
        &[[3, 2, 30, 8]][..]
    } else {
        &[[2, 4, 256, 64], [3, 2, 100, 32]][..]
    };
    let mut checks = Vec::new();
    for &(dtype_name, dtype, _, limit) in dtypes.iter().filter(|d| !d.2) {
        for &shape in shapes {
            let [batch, heads, seq, head_dim] = shape;
            let padding: Vec<bool> = (0..batch * seq)
                .map(|i| i % seq + 7 * (i / seq) >= seq)
                .collect();
            for (padded, interleaved) in
                [(false, false), (true, false), (false, true), (true, true)]
            {
                let inputs = [0, 1, 2].map(|_| match interleaved {
                    true => {
                        random::<B, 4>([batch, seq, heads, head_dim], dtype, device).swap_dims(1, 2)
                    }
                    false => random::<B, 4>(shape, dtype, device),
                });
                let weights = random::<B, 4>(shape, dtype, device);
                let mask = padded.then(|| TensorData::new(padding.clone(), [batch, seq]));
                let on_host = |tensor: &Tensor<B, 4>| {
                    let values: Vec<f32> =
                        host(tensor.clone()).into_iter().map(|x| x as f32).collect();
                    Tensor::<Host, 4>::from_data(
                        TensorData::new(values, shape),
                        &Default::default(),
                    )
                };
                let reference = attention_results::<Host>(
                    inputs.each_ref().map(on_host),
                    on_host(&weights),
                    mask.clone(),
                    head_dim,
                    true,
                    &Default::default(),
                );
                let ours = attention_results::<B>(inputs, weights, mask, head_dim, false, device);
                for (name, (got, want)) in ["output", "d query", "d key", "d value"]
                    .iter()
                    .zip(ours.into_iter().zip(reference))
                {
                    let check = Check {
                        what: format!(
                            "attention {shape:?} {}{}: {name}",
                            if padded { "causal+padding" } else { "causal" },
                            if interleaved { ", heads in rows" } else { "" }
                        ),
                        dtype: dtype_name,
                        error: relative_error(&got, &want),
                        limit,
                    };
                    check.print();
                    checks.push(check);
                }
            }
        }
    }
    checks
}

/// Causal core attention of `q`, `k`, `v` (padding `mask`, `[batch, keys]`, true for
/// padding) on `B`, and the gradients of `Σ output · weights`: output, d query, d key and
/// d value on the host. `reference`: plain Burn storing everything, else the fast ops with
/// selective recompute.
fn attention_results<B: MegatronOps>(
    [q, k, v]: [Tensor<B, 4>; 3],
    weights: Tensor<B, 4>,
    mask: Option<TensorData>,
    head_dim: usize,
    reference: bool,
    device: &B::Device,
) -> [Vec<f64>; 4] {
    type A<B> = Autodiff<B>;
    use_reference_ops(reference);
    let [q, k, v] = [q, k, v].map(|t| Tensor::<A<B>, 4>::from_inner(t).require_grad());
    let spec = CoreAttention {
        recompute: if reference {
            Recompute::Off
        } else {
            Recompute::Selective
        },
        ..CoreAttention::causal(head_dim)
    };
    let mask = mask.map(|mask| Tensor::<A<B>, 2, Bool>::from_data(mask, device));
    let out = A::<B>::core_attention(q.clone(), k.clone(), v.clone(), mask, &spec);
    let grads = (out.clone() * Tensor::from_inner(weights)).sum().backward();
    let grad = |t: &Tensor<A<B>, 4>| host(t.grad(&grads).expect("gradient"));
    let results = [host(out.inner()), grad(&q), grad(&k), grad(&v)];
    use_reference_ops(false);
    results
}

/// One timed weight-gradient GEMM form.
struct WeightGradSpeed {
    form: &'static str,
    tflops: f64,
}

impl WeightGradSpeed {
    fn json(&self) -> String {
        format!(
            "{{\"kind\": \"weight_grad\", \"form\": \"{}\", \"tflops\": {:.1}}}",
            self.form, self.tflops
        )
    }
}

/// TFLOP/s of GPT-2 774M's largest weight gradient (`xᵀ · dy`, 8192 tokens, 1280 by
/// 5120, bf16 inputs) in the three forms training uses: a bf16 gradient (`gemm`, without
/// gradient-accumulation fusion), a fresh fp32 one (`gemm_accumulate` onto nothing: the
/// first micro-batch with fusion) and added onto an fp32 sum in place (the later ones).
fn weight_grad_speeds<B: MegatronOps>(iters: usize, device: &B::Device) -> Vec<WeightGradSpeed> {
    let [tokens, rows, columns] = [8192, 1280, 5120];
    let x = random::<B, 2>([tokens, rows], DType::BF16, device);
    let dy = random::<B, 2>([tokens, columns], DType::BF16, device);
    let flops = 2.0 * (tokens * rows * columns) as f64;
    let mut sum = Some(B::gemm_accumulate(x.clone(), dy.clone(), true, false, None));
    let time = |form: &'static str, run: &mut dyn FnMut()| {
        let tflops = flops / seconds_per_call::<B, _>(device, [3, iters], run) / 1e12;
        println!("{form:<44} {tflops:>10.1}");
        WeightGradSpeed { form, tflops }
    };
    println!(
        "\n{:<44} {:>10}",
        "weight gradient 1280 x 5120 over 8192 tokens", "TFLOP/s"
    );
    vec![
        time("bf16 gradient (gemm)", &mut || {
            drop(B::gemm(x.clone(), dy.clone(), true, false));
        }),
        time("fresh fp32 gradient (gemm_accumulate)", &mut || {
            drop(B::gemm_accumulate(x.clone(), dy.clone(), true, false, None));
        }),
        time("added onto an fp32 sum (gemm_accumulate)", &mut || {
            sum = Some(B::gemm_accumulate(
                x.clone(),
                dy.clone(),
                true,
                false,
                sum.take(),
            ));
        }),
    ]
}

/// TFLOP/s of `size`-cubed products: ours and, in bf16, Burn's matmul (each queued
/// `iters` times with one wait at the end).
fn gemm_speeds<B: MegatronOps>(
    sizes: &[usize],
    dtypes: &[DtypeCase],
    iters: usize,
    device: &B::Device,
) -> Vec<Speed> {
    println!(
        "\n{:<8} {:>6} {:>22} {:>22}",
        "gemm", "dtype", "ours (TFLOP/s)", "Burn matmul (TFLOP/s)"
    );
    let mut speeds = Vec::new();
    for &size in sizes {
        for &(dtype_name, dtype, tf32, _) in dtypes {
            set_tf32(tf32);
            let a = random::<B, 2>([size, size], dtype, device);
            let b = random::<B, 2>([size, size], dtype, device);
            let time = |reference: bool| {
                use_reference_ops(reference);
                let seconds = seconds_per_call::<B, _>(device, [3, iters], || {
                    B::gemm(a.clone(), b.clone(), false, false)
                });
                2.0 * (size as f64).powi(3) / seconds / 1e12
            };
            // Burn's matmul compiles and tunes kernels per type: time it in bf16 only.
            let burn = if dtype == DType::BF16 {
                time(true)
            } else {
                f64::NAN
            };
            let ours = time(false);
            use_reference_ops(false);
            println!(
                "{:<8} {:>6} {:>22.1} {:>22.1}",
                format!("{size}^3"),
                dtype_name,
                ours,
                burn
            );
            speeds.push(Speed {
                size,
                dtype: dtype_name,
                ours,
                burn,
            });
        }
    }
    set_tf32(false);
    speeds
}
