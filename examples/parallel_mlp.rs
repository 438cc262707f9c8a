//! A Megatron MLP (column-parallel linear, GeLU, row-parallel linear) on thread ranks,
//! printed next to the same MLP on one rank.
//!
//! ```text
//! cargo run --release --example parallel_mlp -- --tp 4 --sequence-parallel
//! ```
//!
//! Each rank holds `ffn / tp` columns of the first weight and rows of the second; the
//! forward all-reduces (or, with sequence parallelism, all-gathers and reduce-scatters)
//! once per layer pair, and the backward mirrors it. The output and every gradient must
//! match the single-rank run to float rounding.

use burn::backend::Autodiff;
use burn::tensor::{Tensor, TensorData, activation::gelu};
use burn_megatron::Error;
use burn_megatron::parallel::{Layout, LocalCluster};
use burn_megatron::tensor_parallel::{
    ColumnParallelLinearConfig, ParamInit, RowParallelLinearConfig,
};
use clap::Parser;

type Backend = Autodiff<burn_ndarray::NdArray<f32>>;

/// Runs a tensor-parallel MLP on thread ranks and compares it with one rank.
#[derive(Parser, Debug)]
struct Args {
    /// Tensor-parallel size (thread ranks).
    #[arg(long, default_value_t = 4)]
    tp: usize,
    /// Split the sequence dimension across the ranks outside the MLP.
    #[arg(long)]
    sequence_parallel: bool,
    /// Hidden size.
    #[arg(long, default_value_t = 16)]
    hidden: usize,
    /// FFN size (4 x hidden in GPT).
    #[arg(long, default_value_t = 64)]
    ffn: usize,
    /// Batch size.
    #[arg(long, default_value_t = 2)]
    batch: usize,
    /// Sequence length.
    #[arg(long, default_value_t = 8)]
    seq: usize,
    /// Seed of the weights and the input.
    #[arg(long, default_value_t = 7)]
    seed: u64,
}

/// What a run returns, gathered to full tensors: output, input gradient, weight gradients.
struct MlpRun {
    output: Tensor<burn_ndarray::NdArray<f32>, 3>,
    input_grad: Tensor<burn_ndarray::NdArray<f32>, 3>,
    fc1_grad: Tensor<burn_ndarray::NdArray<f32>, 2>,
    fc2_grad: Tensor<burn_ndarray::NdArray<f32>, 2>,
}

fn run(args: &Args, tp: usize) -> Result<MlpRun, Error> {
    let device = Default::default();
    let input = ParamInit::Normal { std: 1.0 }
        .init::<Backend, 3>([args.batch, args.seq, args.hidden], args.seed + 2, &device)
        .into_data();
    let sequence_parallel = args.sequence_parallel;
    let ranks = LocalCluster::new(Layout::new(tp, 1, 1)?).run(|ctx| {
        let group = ctx.tensor();
        let fc1 = ColumnParallelLinearConfig::new(args.hidden, args.ffn)
            .with_sequence_parallel(sequence_parallel)
            .with_seed(args.seed)
            .init::<Backend>(group, &device)?;
        let fc2 = RowParallelLinearConfig::new(args.ffn, args.hidden)
            .with_sequence_parallel(sequence_parallel)
            .with_seed(args.seed + 1)
            .init::<Backend>(group, &device)?;
        let mut x = Tensor::<Backend, 3>::from_data(input.clone(), &device);
        if sequence_parallel {
            let chunk = args.seq / tp;
            x = x.narrow(1, group.rank() * chunk, chunk);
        }
        let x = x.require_grad();
        let output = fc2.forward(gelu(fc1.forward(x.clone())));
        // The loss: sum of squares of the output (the ranks' sequence chunks with SP).
        let grads = output.clone().powi_scalar(2).sum().backward();
        Ok::<_, Error>((
            output.inner(),
            x.grad(&grads).expect("input gradient"),
            fc1.weight.grad(&grads).expect("fc1 gradient"),
            fc2.weight.grad(&grads).expect("fc2 gradient"),
        ))
    })?;
    // Put the ranks' pieces together: sequence chunks, fc1 columns, fc2 rows.
    let (mut outputs, mut input_grads, mut fc1, mut fc2) = (vec![], vec![], vec![], vec![]);
    for (output, input_grad, fc1_grad, fc2_grad) in ranks {
        outputs.push(output);
        input_grads.push(input_grad);
        fc1.push(fc1_grad);
        fc2.push(fc2_grad);
    }
    let assemble = |parts: Vec<Tensor<_, 3>>| {
        if sequence_parallel {
            Tensor::cat(parts, 1)
        } else {
            parts.into_iter().next().expect("one rank at least")
        }
    };
    Ok(MlpRun {
        output: assemble(outputs),
        input_grad: assemble(input_grads),
        fc1_grad: Tensor::cat(fc1, 1),
        fc2_grad: Tensor::cat(fc2, 0),
    })
}

fn relative_error<const D: usize>(
    parallel: &Tensor<burn_ndarray::NdArray<f32>, D>,
    single: &Tensor<burn_ndarray::NdArray<f32>, D>,
) -> f32 {
    let diff = (parallel.clone() - single.clone())
        .abs()
        .max()
        .into_scalar();
    diff / single
        .clone()
        .abs()
        .max()
        .into_scalar()
        .max(f32::MIN_POSITIVE)
}

fn first_values<const D: usize>(tensor: &Tensor<burn_ndarray::NdArray<f32>, D>) -> String {
    let data: TensorData = tensor
        .clone()
        .flatten::<1>(0, D - 1)
        .narrow(0, 0, 4)
        .into_data();
    let values = data.to_vec::<f32>().unwrap_or_default();
    values
        .iter()
        .map(|v| format!("{v:+.5}"))
        .collect::<Vec<_>>()
        .join(" ")
}

fn main() -> Result<(), Error> {
    let args = Args::parse();
    let parallel = run(&args, args.tp)?;
    let single = run(&args, 1)?;

    println!(
        "Megatron MLP {} -> {} -> {}, batch {} x seq {}, tp {} vs 1 rank{}",
        args.hidden,
        args.ffn,
        args.hidden,
        args.batch,
        args.seq,
        args.tp,
        if args.sequence_parallel {
            ", sequence parallel"
        } else {
            ""
        }
    );
    println!(
        "{:<12} {:>14}  first values (tp {} | 1 rank)",
        "tensor", "relative error", args.tp
    );
    let rows = [
        (
            "output",
            relative_error(&parallel.output, &single.output),
            first_values(&parallel.output),
            first_values(&single.output),
        ),
        (
            "input grad",
            relative_error(&parallel.input_grad, &single.input_grad),
            first_values(&parallel.input_grad),
            first_values(&single.input_grad),
        ),
        (
            "fc1 grad",
            relative_error(&parallel.fc1_grad, &single.fc1_grad),
            first_values(&parallel.fc1_grad),
            first_values(&single.fc1_grad),
        ),
        (
            "fc2 grad",
            relative_error(&parallel.fc2_grad, &single.fc2_grad),
            first_values(&parallel.fc2_grad),
            first_values(&single.fc2_grad),
        ),
    ];
    for (name, error, parallel_values, single_values) in rows {
        println!("{name:<12} {error:>14.2e}  {parallel_values} | {single_values}");
    }
    Ok(())
}
