//! `bench kernels`: the fused kernels checked against their plain-Burn references (every
//! output and gradient, several shapes and types), and each kernel's achieved bandwidth
//! next to the unfused Burn ops it replaces. The kernels run on CUDA only here (on a CPU
//! they are tested through wgpu), so without the `cuda` feature the command only explains.
#![cfg_attr(not(feature = "cuda"), allow(dead_code))]

use std::path::PathBuf;

use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use burn_megatron::{Error, Result};
use burn_megatron_kernels::check::{Check, check_kernels};
use burn_megatron_kernels::{
    CrossEntropy, Dropout, FusedKernels, Gelu, reference_bias_dropout_add, reference_bias_gelu,
    reference_bias_gelu_backward, reference_column_sums, reference_cross_entropy_backward,
    reference_logit_statistics, reference_norm, reference_norm_backward, reference_norm_forward,
    reference_softmax, reference_softmax_backward,
};
use clap::Args;

use super::bench::seconds_per_call;

/// Flags of `bench kernels`.
#[derive(Args, Debug)]
pub struct KernelsArgs {
    /// Where to run: cuda (needs a build with --features cuda).
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Element types, comma separated: f32, bf16, f16.
    #[arg(long, value_delimiter = ',', default_values_t = ["f32".to_string(), "bf16".to_string(), "f16".to_string()])]
    dtypes: Vec<String>,
    /// What to run, comma separated: checks (every kernel and gradient against its
    /// reference), bandwidth (GB/s of each kernel and of the unfused Burn ops, after a copy
    /// row: this machine's element-wise bandwidth).
    #[arg(long, value_delimiter = ',', default_values_t = ["checks".to_string(), "bandwidth".to_string()])]
    parts: Vec<String>,
    /// Tokens (rows) of the timed tensors.
    #[arg(long, default_value_t = 8192)]
    tokens: usize,
    /// Hidden size of the timed tensors (the GeLU runs on 4x it).
    #[arg(long, default_value_t = 1280)]
    hidden: usize,
    /// Vocabulary slice of the timed cross-entropy logits (GPT-2's padded vocabulary).
    #[arg(long, default_value_t = 50304)]
    vocab: usize,
    /// Timed repetitions per kernel, launched from the host and again while the device waits
    /// (after 3 untimed ones).
    #[arg(long, default_value_t = 50)]
    iters: usize,
    /// Timed repetitions of each unfused plain-Burn counterpart (after 1 untimed one):
    /// they run 5 to 5000 times slower than the kernels (bias-dropout-add's mask is made
    /// on the host), so a few are enough and keep the run short.
    #[arg(long, default_value_t = 5)]
    unfused_iters: usize,
    /// The copy bandwidth the figures are compared with, in GB/s (H200: 4300).
    #[arg(long, default_value_t = 4300.0)]
    copy_bandwidth: f64,
    /// Also write the rows as JSON lines here.
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs `bench kernels`.
pub fn run(args: &KernelsArgs) -> Result<()> {
    match args.device.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => burn_megatron::check_gpu(0).and_then(|_| {
            measure::<super::train::CudaBackend>(args, &Default::default(), Some(cuda_device_time))
        }),
        other => Err(Error::InvalidConfig(format!(
            "--device {other}: the kernels run on cuda{} (on a CPU they are tested through \
             wgpu: cargo test -p burn-megatron-kernels --features wgpu)",
            if cfg!(feature = "cuda") {
                ""
            } else {
                ", which needs a build with --features cuda"
            }
        ))),
    }
}

/// Seconds per call of `iters` calls of an op on the device alone, without the host's time
/// to launch them (see [`burn_megatron::device_seconds`]).
type DeviceTimer<B> =
    fn(&mut dyn FnMut() -> Tensor<B, 2>, usize) -> std::result::Result<f64, String>;

/// [`DeviceTimer`] on CUDA: the calls are queued while the stream is held.
#[cfg(feature = "cuda")]
fn cuda_device_time(
    op: &mut dyn FnMut() -> Tensor<super::train::CudaBackend, 2>,
    iters: usize,
) -> std::result::Result<f64, String> {
    let like = op().into_primitive().tensor();
    let (seconds, last) = burn_megatron::device_seconds(&like, || (0..iters).map(|_| op()).last())?;
    drop(last);
    Ok(seconds / iters.max(1) as f64)
}

/// Seconds per fused call.
#[derive(Debug, Clone, Copy)]
struct FusedTime {
    /// On the device alone, the calls launched while the device waits (`None` where they
    /// made the host wait for the device while queued).
    device: Option<f64>,
    /// Launched one after another from the host (the device idles when the host is slower
    /// than the kernel).
    host: f64,
}

impl FusedTime {
    /// The device's time where measured, the host's otherwise.
    fn seconds(self) -> f64 {
        self.device.unwrap_or(self.host)
    }
}

/// One timed kernel: seconds per call and the bytes it must move.
struct Timing {
    kernel: &'static str,
    dtype: String,
    bytes: f64,
    fused: FusedTime,
    /// The unfused plain-Burn ops, from the host.
    unfused: f64,
}

/// The element types asked for.
fn parse_dtypes(args: &KernelsArgs) -> Result<Vec<(&str, DType)>> {
    args.dtypes
        .iter()
        .map(|name| match name.as_str() {
            "f32" => Ok((name.as_str(), DType::F32)),
            "bf16" => Ok((name.as_str(), DType::BF16)),
            "f16" => Ok((name.as_str(), DType::F16)),
            other => Err(Error::InvalidConfig(format!(
                "--dtypes {other}: use f32, bf16 or f16"
            ))),
        })
        .collect()
}

fn measure<B: FusedKernels>(
    args: &KernelsArgs,
    device: &B::Device,
    timer: Option<DeviceTimer<B>>,
) -> Result<()> {
    let dtypes = parse_dtypes(args)?;
    let part = |name: &str| args.parts.iter().any(|p| p == name);
    let mut json = String::new();
    let mut failed = 0;
    if part("checks") {
        println!(
            "{:<18} {:>6} {:<14} {:<18} {:>10} {:>7}  check",
            "kernel", "dtype", "shape", "quantity", "rel. error", "limit"
        );
        for &(name, dtype) in &dtypes {
            for check in check_kernels::<B>(device, dtype) {
                print_check(name, &check);
                failed += usize::from(!check.passed());
                json.push_str(&format!(
                    "{{\"kind\": \"check\", \"kernel\": \"{}\", \"dtype\": \"{name}\", \"shape\": {:?}, \"quantity\": \"{}\", \"error\": {:e}, \"limit\": {:e}, \"ok\": {}}}\n",
                    check.kernel, check.shape, check.quantity, check.error, check.limit, check.passed()
                ));
            }
        }
    }
    if part("bandwidth") {
        println!(
            "\n{:<28} {:>6} {:>10} {:>11} {:>11} {:>7} {:>8} {:>10} {:>9}",
            "kernel",
            "dtype",
            "MB moved",
            "fused GB/s",
            "Burn GB/s",
            "% copy",
            "speed-up",
            "device µs",
            "host µs"
        );
        for &(name, dtype) in &dtypes {
            for timing in bandwidths::<B>(args, name, dtype, device, timer) {
                let rate = |seconds: f64| timing.bytes / seconds / 1e9;
                let fused = timing.fused.seconds();
                println!(
                    "{:<28} {:>6} {:>10.1} {:>11.0} {:>11.0} {:>6.0}% {:>7.1}x {:>10} {:>9.1}",
                    timing.kernel,
                    timing.dtype,
                    timing.bytes / 1e6,
                    rate(fused),
                    rate(timing.unfused),
                    100.0 * rate(fused) / args.copy_bandwidth,
                    timing.unfused / fused,
                    timing
                        .fused
                        .device
                        .map_or("-".to_string(), |device| format!("{:.1}", device * 1e6)),
                    timing.fused.host * 1e6
                );
                json.push_str(&format!(
                    "{{\"kind\": \"bandwidth\", \"kernel\": \"{}\", \"dtype\": \"{}\", \"bytes\": {}, \"fused_gbps\": {:.1}, \"unfused_gbps\": {:.1}, \"fused_us\": {:.2}, \"device_timed\": {}, \"host_us\": {:.2}}}\n",
                    timing.kernel, timing.dtype, timing.bytes, rate(fused), rate(timing.unfused), fused * 1e6, timing.fused.device.is_some(), timing.fused.host * 1e6
                ));
            }
        }
        println!(
            "(device µs: {} calls queued while the device waits, then run back to back: the \
             kernel's own time; host µs: calls launched one after another, where the host's \
             launch time shows when it exceeds the kernel's; -: the calls made the host wait \
             for the device while queued, so the GB/s come from the host's time; Burn's ops \
             timed from the host)",
            args.iters
        );
    }
    if let Some(path) = &args.output {
        std::fs::write(path, json).map_err(|e| Error::io(path, e))?;
    }
    if failed > 0 {
        return Err(Error::InvalidData(format!(
            "{failed} kernel checks exceeded their limit"
        )));
    }
    Ok(())
}

fn print_check(dtype: &str, check: &Check) {
    println!(
        "{:<18} {:>6} {:<14} {:<18} {:>10.2e} {:>7.0e}  {}",
        check.kernel,
        dtype,
        format!("{:?}", check.shape),
        check.quantity,
        check.error,
        check.limit,
        if check.passed() { "ok" } else { "FAILED" }
    );
}

/// Each kernel (forward and backward) at `[tokens, hidden]` (`[tokens, 4 hidden]` for the
/// GeLU), and the plain-Burn ops it replaces. Bytes are what the operation must read and
/// write at least (inputs once, outputs once).
fn bandwidths<B: FusedKernels>(
    args: &KernelsArgs,
    name: &str,
    dtype: DType,
    device: &B::Device,
    timer: Option<DeviceTimer<B>>,
) -> Vec<Timing> {
    let (tokens, hidden) = (args.tokens, args.hidden);
    let element = dtype.size() as f64;
    let random = |shape: Vec<usize>| {
        Tensor::<B, 1>::random(
            [shape.iter().product::<usize>()],
            Distribution::Normal(0.0, 1.0),
            device,
        )
        .cast(dtype)
    };
    let matrix = |width: usize| random(vec![tokens, width]).reshape([tokens, width]);
    let vector = |width: usize| random(vec![width]);
    // Host-timed first (which also warms the kernels up), then on the device.
    let time = |op: &mut dyn FnMut() -> Tensor<B, 2>| {
        let host = seconds_per_call::<B, _>(device, [3, args.iters], &mut *op);
        let device = timer.and_then(|timer| timer(op, args.iters).ok());
        FusedTime { device, host }
    };
    let time_unfused = |op: &mut dyn FnMut() -> Tensor<B, 2>| {
        seconds_per_call::<B, _>(device, [1, args.unfused_iters.max(1)], op)
    };
    let mut timings = Vec::new();
    let mut push = |kernel, bytes: f64, fused: FusedTime, unfused: f64| {
        timings.push(Timing {
            kernel,
            dtype: name.to_string(),
            bytes,
            fused,
            unfused,
        })
    };
    // Bytes of `tensors` tensors of `elements` elements in `dtype`.
    let moved = |elements: usize, tensors: f64| elements as f64 * element * tensors;

    // This machine's copy: an element-wise Burn kernel reading and writing a tensor, so
    // that a kernel's share of the nominal copy bandwidth can be told apart from the
    // machine's (lent H200s measured the same kernels up to 2x apart). At the GeLU's size
    // and at the norm's (a quarter of it): at a few tens of MB a kernel's start and end
    // take a share of its time that no kernel avoids.
    for (name, width) in [
        ("copy (x + 0), tokens x 4h", 4 * hidden),
        ("copy (x + 0), tokens x h", hidden),
    ] {
        let copied = matrix(width);
        let copy = time(&mut || copied.clone().add_scalar(0.0));
        push(name, moved(tokens * width, 2.0), copy, copy.seconds());
    }

    // LayerNorm: reads x, writes y; backward reads grad and x, writes dx.
    let (x, weight, bias) = (matrix(hidden), vector(hidden), vector(hidden));
    let elements = tokens * hidden;
    let fused = time(&mut || B::norm(x.clone(), weight.clone(), Some(bias.clone()), 1e-5));
    let unfused =
        time_unfused(&mut || reference_norm(x.clone(), weight.clone(), Some(bias.clone()), 1e-5));
    push("layer_norm", moved(elements, 2.0), fused, unfused);
    let (_, statistics) = B::norm_forward(x.clone(), weight.clone(), Some(bias.clone()), 1e-5);
    let grad = matrix(hidden);
    let fused = time(&mut || {
        B::norm_backward(
            grad.clone(),
            x.clone(),
            weight.clone(),
            true,
            statistics.clone(),
        )
        .input
    });
    let (_, reference_statistics) =
        reference_norm_forward(x.clone(), weight.clone(), Some(bias.clone()), 1e-5);
    let unfused = time_unfused(&mut || {
        reference_norm_backward(
            grad.clone(),
            x.clone(),
            weight.clone(),
            true,
            reference_statistics.clone(),
        )
        .input
    });
    push("layer_norm backward", moved(elements, 3.0), fused, unfused);

    // Bias-GeLU on the 4x-wide feed-forward activations.
    let (up, up_bias, up_grad) = (matrix(4 * hidden), vector(4 * hidden), matrix(4 * hidden));
    let elements = tokens * 4 * hidden;
    let fused = time(&mut || B::bias_gelu(up.clone(), Some(up_bias.clone()), Gelu::Tanh));
    let unfused =
        time_unfused(&mut || reference_bias_gelu(up.clone(), Some(up_bias.clone()), Gelu::Tanh));
    push("bias_gelu_tanh", moved(elements, 2.0), fused, unfused);
    let fused = time(&mut || {
        B::bias_gelu_backward(
            up_grad.clone(),
            up.clone(),
            Some(up_bias.clone()),
            Gelu::Tanh,
        )
    });
    let unfused = time_unfused(&mut || {
        reference_bias_gelu_backward(
            up_grad.clone(),
            up.clone(),
            Some(up_bias.clone()),
            Gelu::Tanh,
        )
    });
    push(
        "bias_gelu_tanh backward",
        moved(elements, 3.0),
        fused,
        unfused,
    );
    // The bias's gradient: the column sums of the input's gradient, read once.
    let as_row = |t: Tensor<B, 1>| t.reshape([1, 4 * hidden]);
    let fused = time(&mut || as_row(B::column_sums(up_grad.clone())));
    let unfused = time_unfused(&mut || as_row(reference_column_sums(up_grad.clone())));
    push(
        "bias gradient (column sums)",
        moved(elements, 1.0),
        fused,
        unfused,
    );

    // Bias-dropout-add on the residual stream: reads x and the residual, writes the sum;
    // the backward (the mask applied to the gradient) reads one and writes one.
    let [x3, residual] = [0, 1].map(|_| matrix(hidden).reshape([1, tokens, hidden]));
    let site = Dropout {
        p: 0.1,
        seed: 1234,
        full: [1, tokens, hidden],
        offsets: [0; 3],
    };
    let elements = tokens * hidden;
    let as_2d = |t: Tensor<B, 3>| t.reshape([tokens, hidden]);
    let fused = time(&mut || {
        as_2d(B::bias_dropout_add(
            x3.clone(),
            Some(bias.clone()),
            residual.clone(),
            Some(site),
        ))
    });
    let unfused = time_unfused(&mut || {
        as_2d(reference_bias_dropout_add(
            x3.clone(),
            Some(bias.clone()),
            residual.clone(),
            Some(site),
        ))
    });
    push("bias_dropout_add", moved(elements, 3.0), fused, unfused);
    let fused = time(&mut || as_2d(B::dropout_mask_apply(x3.clone(), site)));
    let unfused = time_unfused(&mut || {
        as_2d(burn_megatron_kernels::dropout::dropout(
            x3.clone(),
            site.p,
            site.seed,
            site.full,
            site.offsets,
        ))
    });
    push("dropout backward", moved(elements, 2.0), fused, unfused);

    // Attention softmax on [batch, heads, seq, seq] causal scores (heads of 64): reads the
    // scores a query sees (the keys past it need not be read) and writes every probability
    // in `dtype`; the backward reads the probabilities and gradients a query sees and writes
    // the scores' gradient, all in `dtype`.
    let seq = tokens.min(1024);
    let shape = [tokens / seq, (hidden / 64).max(1), seq, seq];
    let elements: usize = shape.iter().product();
    let seen = (seq + 1) as f64 / (2 * seq) as f64;
    let scores = random(shape.to_vec()).reshape(shape);
    let flat = |t: Tensor<B, 4>| t.reshape([elements / seq, seq]);
    let fused = time(&mut || flat(B::scaled_masked_softmax(scores.clone(), 0.125, true, None)));
    let unfused = time_unfused(&mut || flat(reference_softmax(scores.clone(), 0.125, true, None)));
    push(
        "softmax (causal)",
        moved(elements, 1.0 + seen),
        fused,
        unfused,
    );
    let probabilities = B::scaled_masked_softmax(scores.clone(), 0.125, true, None);
    let grad = probabilities.clone() * 0.5;
    let fused = time(&mut || {
        flat(B::scaled_masked_softmax_backward(
            probabilities.clone(),
            grad.clone(),
            0.125,
            true,
            None,
        ))
    });
    let unfused = time_unfused(&mut || {
        flat(reference_softmax_backward(
            probabilities.clone(),
            grad.clone(),
            0.125,
            true,
            None,
        ))
    });
    push(
        "softmax backward",
        moved(elements, 1.0 + 2.0 * seen),
        fused,
        unfused,
    );

    // Cross-entropy on [tokens, vocab] logits: the statistics read the logits once; the
    // backward reads them and writes their gradient.
    let vocab = args.vocab;
    let logits = matrix(vocab);
    let columns = (0..tokens)
        .map(|t| (t * 7919 % vocab) as i64)
        .collect::<Vec<_>>();
    let targets = Tensor::<B, 1, Int>::from_data(TensorData::new(columns, [tokens]), device);
    let elements = tokens * vocab;
    let as_column = |t: Tensor<B, 1>| t.reshape([tokens, 1]);
    let fused = time(&mut || {
        as_column(B::logit_statistics(logits.clone(), targets.clone(), vocab).sum_exp)
    });
    let unfused = time_unfused(&mut || {
        as_column(reference_logit_statistics(logits.clone(), targets.clone(), vocab).sum_exp)
    });
    push(
        "cross_entropy statistics",
        moved(elements, 1.0),
        fused,
        unfused,
    );
    let statistics = B::logit_statistics(logits.clone(), targets.clone(), vocab);
    let log_sum_exp = statistics.max + statistics.sum_exp.log();
    let upstream = Tensor::<B, 1>::ones([tokens], device);
    let cross_entropy = CrossEntropy {
        real_width: vocab,
        vocab_size: vocab,
        label_smoothing: 0.0,
    };
    let fused = time(&mut || {
        B::cross_entropy_backward(
            logits.clone(),
            targets.clone(),
            log_sum_exp.clone(),
            upstream.clone(),
            cross_entropy,
        )
    });
    let unfused = time_unfused(&mut || {
        reference_cross_entropy_backward(
            logits.clone(),
            targets.clone(),
            log_sum_exp.clone(),
            upstream.clone(),
            cross_entropy,
        )
    });
    push(
        "cross_entropy backward",
        moved(elements, 2.0),
        fused,
        unfused,
    );
    timings
}
