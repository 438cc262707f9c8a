//! `burn-megatron`: the command-line front end.

mod commands;
mod tokenizer_args;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

/// Training allocates and frees large activation buffers at a high rate; mimalloc keeps
/// them mapped instead of returning them to the kernel each time (a third of the CPU
/// time went to page faults with the system allocator).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc 3's `mi_option_purge_delay` (its header's `mi_option_e`; the Rust bindings
/// name no constant for it).
const MIMALLOC_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Tells mimalloc never to give freed memory back to the kernel: by default it does so
/// after a second, and later buffers of the same sizes then fault their pages in again
/// (without it, a third of the main job's CPU time went to the kernel). Left alone when
/// `MIMALLOC_PURGE_DELAY` is set, or when the option does not read as mimalloc 3.3's
/// purge delay default (1000 ms; another version may number its options differently).
fn keep_freed_memory_mapped() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // Safety: plain reads and writes of one of mimalloc's options.
    unsafe {
        if libmimalloc_sys::mi_option_get(MIMALLOC_PURGE_DELAY) == 1000 {
            libmimalloc_sys::mi_option_set(MIMALLOC_PURGE_DELAY, -1);
        }
    }
}

/// Megatron-style parallel training for Burn.
#[derive(Parser, Debug)]
#[command(name = "burn-megatron", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Pretrain a GPT with tensor x data parallelism (thread ranks on the CPU). With no
    /// arguments: a small GPT on the embedded tinyshakespeare at tp 2 x dp 2.
    Train(Box<commands::train::TrainArgs>),
    /// Start the local ranks of a multi-process job with torchrun's environment (RANK,
    /// WORLD_SIZE, MASTER_ADDR, ...); prefixes their output and stops all when one fails.
    Launch(commands::launch::LaunchArgs),
    /// Print how a job's ranks split into tensor-, data- and pipeline-parallel groups
    /// (Megatron's rank order), and check the layout against a model's sizes.
    Layout(commands::layout::LayoutArgs),
    /// Tokenize JSON lines into Megatron `.bin/.idx` datasets (byte-compatible with
    /// Megatron-LM's `tools/preprocess_data.py`).
    Preprocess(commands::preprocess::PreprocessArgs),
    /// Run a Hugging Face GPT checkpoint (gpt2, llama, bloom, gpt_bigcode) on token ids
    /// and write its logits, split over tensor-parallel thread ranks.
    Forward(commands::forward::ForwardArgs),
    /// Benchmarks: `bench collectives` measures the bus bandwidth of the collectives over
    /// the ranks of a launched job (NCCL on CUDA), checking every result.
    #[command(subcommand)]
    Bench(commands::bench::BenchCommand),
    /// Convert checkpoints: Hugging Face GPT models (gpt2, llama, bloom, gpt_bigcode) to
    /// burn-megatron's distributed format for a tp x pp layout, and back to sharded
    /// Hugging Face safetensors.
    Convert(commands::convert::ConvertArgs),
    /// Summarize an indexed dataset, decode a few documents, and run the GPT sampler.
    Inspect(commands::inspect::InspectArgs),
}

fn main() -> ExitCode {
    keep_freed_memory_mapped();
    let cli = Cli::parse();
    let outcome = match &cli.command {
        Command::Train(args) => commands::train::run(args),
        Command::Launch(args) => commands::launch::run(args),
        Command::Layout(args) => commands::layout::run(args),
        Command::Preprocess(args) => commands::preprocess::run(args),
        Command::Inspect(args) => commands::inspect::run(args),
        Command::Forward(args) => commands::forward::run(args),
        Command::Convert(args) => commands::convert::run(args),
        Command::Bench(command) => commands::bench::run(command),
    };
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            ExitCode::FAILURE
        }
    }
}
