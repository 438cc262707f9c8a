//! `bench collectives`: the bus bandwidth of all-reduce, all-gather and reduce-scatter
//! through burn-megatron's groups (NCCL on CUDA ranks, TCP on CPU ranks), each result
//! checked against values computed on the host.

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Tensor;
use burn_megatron::launch::LaunchEnv;
use burn_megatron::parallel::{
    DEFAULT_TIMEOUT, Layout, ParallelBackend, ParallelContext, ReduceOp,
};
use burn_megatron::{Error, Result};
use clap::{Args, Subcommand};

/// Seconds per call of `op` over `iters` timed calls, after `warmups` untimed ones (the
/// device is synchronized around the timed ones; the last result is dropped after them).
pub(crate) fn seconds_per_call<B: burn::tensor::backend::Backend, T>(
    device: &B::Device,
    [warmups, iters]: [usize; 2],
    mut op: impl FnMut() -> T,
) -> f64 {
    for _ in 0..warmups {
        drop(op());
    }
    B::sync(device).expect("device sync");
    let started = Instant::now();
    let mut last = None;
    for _ in 0..iters {
        last = Some(op());
    }
    B::sync(device).expect("device sync");
    drop(last);
    started.elapsed().as_secs_f64() / iters as f64
}

/// What to benchmark.
#[derive(Subcommand, Debug)]
pub enum BenchCommand {
    /// Collective bandwidth over all ranks of a launched job (run under `launch`,
    /// torchrun, srun or mpirun).
    Collectives(CollectivesArgs),
    /// The fast ops (cuBLASLt GEMMs, core attention with selective recompute) checked
    /// against their plain-Burn references, and GEMM TFLOP/s next to Burn's matmul.
    Ops(super::bench_ops::OpsArgs),
    /// The fused kernels (norms, bias-GeLU, bias-dropout-add) checked against their
    /// plain-Burn references, and their bandwidth next to the unfused Burn ops.
    Kernels(super::bench_kernels::KernelsArgs),
}

/// Flags of `bench collectives`.
#[derive(Args, Debug)]
pub struct CollectivesArgs {
    /// Where the ranks compute: cpu (TCP between processes) or cuda (NCCL, one GPU per
    /// rank, its LOCAL_RANK; needs a build with --features cuda).
    #[arg(long, default_value = "cpu")]
    device: String,
    /// Smallest message, in bytes of f32 data per rank (KiB/MiB/GiB suffixes allowed).
    #[arg(long, default_value = "1MiB")]
    min_size: String,
    /// Largest message; sizes go up by 4x from the smallest.
    #[arg(long, default_value = "1GiB")]
    max_size: String,
    /// Timed repetitions per operation and size (after 3 untimed ones).
    #[arg(long, default_value_t = 20)]
    iters: usize,
    /// Also write the rows as JSON lines here (rank 0).
    #[arg(long)]
    output: Option<PathBuf>,
}

/// Runs a benchmark.
pub fn run(command: &BenchCommand) -> Result<()> {
    match command {
        BenchCommand::Collectives(args) => collectives(args),
        BenchCommand::Ops(args) => super::bench_ops::run(args),
        BenchCommand::Kernels(args) => super::bench_kernels::run(args),
    }
}

fn parse_bytes(text: &str, flag: &str) -> Result<usize> {
    let upper = text.trim().to_ascii_uppercase();
    let (number, factor) = [
        ("GIB", 1usize << 30),
        ("MIB", 1 << 20),
        ("KIB", 1 << 10),
        ("B", 1),
    ]
    .iter()
    .find_map(|(suffix, factor)| upper.strip_suffix(suffix).map(|n| (n.to_string(), *factor)))
    .unwrap_or((upper.clone(), 1));
    match number.trim().parse::<usize>() {
        Ok(value) if value > 0 => Ok(value * factor),
        _ => Err(Error::InvalidConfig(format!(
            "{flag} {text}: use a size such as 1MiB or 256MiB"
        ))),
    }
}

/// One measured operation and size.
struct Row {
    op: &'static str,
    bytes: usize,
    seconds: f64,
    bus_factor: f64,
    checked: bool,
}

impl Row {
    fn algbw(&self) -> f64 {
        self.bytes as f64 / self.seconds / 1e9
    }

    fn json(&self, ranks: usize, device: &str) -> String {
        format!(
            "{{\"op\": \"{}\", \"bytes\": {}, \"ranks\": {ranks}, \"device\": \"{device}\", \"time_us\": {:.1}, \"algbw_gbps\": {:.2}, \"busbw_gbps\": {:.2}, \"checked\": {}}}",
            self.op,
            self.bytes,
            self.seconds * 1e6,
            self.algbw(),
            self.algbw() * self.bus_factor,
            self.checked
        )
    }
}

fn collectives(args: &CollectivesArgs) -> Result<()> {
    let env = LaunchEnv::from_env()?.ok_or_else(|| {
        Error::InvalidConfig(
            "bench collectives runs on the ranks of a launched job: burn-megatron launch \
             --nproc-per-node N -- burn-megatron bench collectives"
                .to_string(),
        )
    })?;
    let (min, max) = (
        parse_bytes(&args.min_size, "--min-size")?,
        parse_bytes(&args.max_size, "--max-size")?,
    );
    let mut sizes = Vec::new();
    let mut size = min.max(4 * env.world_size);
    while size <= max {
        sizes.push(size);
        size *= 4;
    }
    let layout = Layout::new(env.world_size, 1, 1)?;
    let (ctx, world) = env.connect(layout, DEFAULT_TIMEOUT)?;
    let outcome = match args.device.as_str() {
        #[cfg(feature = "cuda")]
        "cuda" => burn_megatron::check_gpu(env.local_rank)
            .and_then(|_| ctx.with_nccl(env.local_rank))
            .and_then(|ctx| {
                let device = burn_cuda::CudaDevice::new(env.local_rank);
                measure::<super::train::CudaBackend>(&ctx, &device, &sizes, args.iters)
            }),
        "cpu" => {
            measure::<burn_ndarray::NdArray<f32>>(&ctx, &Default::default(), &sizes, args.iters)
        }
        other => Err(Error::InvalidConfig(format!(
            "--device {other}: use cpu{}",
            if cfg!(feature = "cuda") {
                " or cuda"
            } else {
                " (cuda needs a build with --features cuda)"
            }
        ))),
    };
    let rows = match outcome {
        Ok(rows) => {
            world.finish();
            rows
        }
        Err(error) => {
            world.abort(&error.to_string());
            return Err(error);
        }
    };
    if env.rank != 0 {
        return Ok(());
    }
    println!(
        "{:<15} {:>12} {:>12} {:>14} {:>14}  check ({} ranks, {})",
        "operation",
        "bytes",
        "time (us)",
        "algbw (GB/s)",
        "busbw (GB/s)",
        env.world_size,
        args.device
    );
    let mut json = String::new();
    for row in &rows {
        println!(
            "{:<15} {:>12} {:>12.1} {:>14.2} {:>14.2}  {}",
            row.op,
            row.bytes,
            row.seconds * 1e6,
            row.algbw(),
            row.algbw() * row.bus_factor,
            if row.checked { "ok" } else { "WRONG" }
        );
        json.push_str(&row.json(env.world_size, &args.device));
        json.push('\n');
    }
    if let Some(path) = &args.output {
        std::fs::write(path, json).map_err(|e| Error::io(path, e))?;
    }
    if rows.iter().any(|row| !row.checked) {
        return Err(Error::InvalidData(
            "a collective gave values that differ from the host's".to_string(),
        ));
    }
    Ok(())
}

/// Rank `rank`'s test values: small integers, so that sums are exact in f32.
fn values(count: usize, rank: usize) -> Vec<f32> {
    (0..count)
        .map(|i| ((i * 7 + rank * 13) % 251) as f32)
        .collect()
}

fn host<B: ParallelBackend>(tensor: Tensor<B, 1>) -> Vec<f32> {
    tensor
        .into_data()
        .convert::<f32>()
        .into_vec()
        .expect("f32 values")
}

/// Checks and times each collective at each size on the world group.
fn measure<B: ParallelBackend>(
    ctx: &ParallelContext,
    device: &B::Device,
    sizes: &[usize],
    iters: usize,
) -> Result<Vec<Row>> {
    let world = ctx.world();
    let (ranks, rank) = (world.size(), world.rank());
    let n = ranks as f64;
    let mut rows = Vec::new();
    for &bytes in sizes {
        // A multiple of the rank count, so that reduce-scatter splits evenly.
        let count = (bytes / 4) / ranks * ranks;
        let mine = Tensor::<B, 1>::from_floats(values(count, rank).as_slice(), device);
        let all: Vec<Vec<f32>> = (0..ranks).map(|r| values(count, r)).collect();
        let sum: Vec<f32> = (0..count).map(|i| all.iter().map(|v| v[i]).sum()).collect();
        let chunk = count / ranks;

        let reduced = host(world.all_reduce(mine.clone(), ReduceOp::Sum)?);
        let gathered = host(world.all_gather(mine.clone(), 0)?);
        let scattered = host(world.reduce_scatter(mine.clone(), 0, ReduceOp::Sum)?);
        // A check fails when it fails on any rank.
        let wrong = [
            reduced != sum,
            gathered != all.concat(),
            scattered != sum[rank * chunk..(rank + 1) * chunk],
        ]
        .map(|wrong| f32::from(u8::from(wrong)));
        let wrong =
            host(world.all_reduce(Tensor::<B, 1>::from_floats(wrong, device), ReduceOp::Max)?);
        let checks = [wrong[0] == 0.0, wrong[1] == 0.0, wrong[2] == 0.0];
        type Op<'a, B> = dyn Fn(Tensor<B, 1>) -> Result<Tensor<B, 1>> + 'a;
        let ops: [(&'static str, &Op<'_, B>, usize, f64); 3] = [
            (
                "all_reduce",
                &|t| world.all_reduce(t, ReduceOp::Sum),
                count * 4,
                2.0 * (n - 1.0) / n,
            ),
            (
                "all_gather",
                &|t| world.all_gather(t, 0),
                count * 4 * ranks,
                (n - 1.0) / n,
            ),
            (
                "reduce_scatter",
                &|t| world.reduce_scatter(t, 0, ReduceOp::Sum),
                count * 4,
                (n - 1.0) / n,
            ),
        ];
        for ((op, run, moved, bus_factor), checked) in ops.into_iter().zip(checks) {
            for _ in 0..3 {
                run(mine.clone())?;
            }
            world.barrier()?;
            let started = Instant::now();
            for _ in 0..iters.max(1) {
                run(mine.clone())?;
            }
            // The slowest rank's time is the collective's.
            let seconds = started.elapsed().as_secs_f64() / iters.max(1) as f64;
            let slowest = world.all_reduce(
                Tensor::<B, 1>::from_floats([seconds as f32], device),
                ReduceOp::Max,
            )?;
            rows.push(Row {
                op,
                bytes: moved,
                seconds: host(slowest)[0] as f64,
                bus_factor,
                checked,
            });
        }
    }
    Ok(rows)
}
