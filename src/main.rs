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
