//! `preprocess`: JSON lines to Megatron `.bin/.idx`.

use std::path::PathBuf;

use burn_megatron::data::{PreprocessOptions, preprocess};
use clap::Args;

use crate::tokenizer_args::TokenizerArgs;

/// Flags of `preprocess`, as Megatron's `tools/preprocess_data.py` names them.
#[derive(Args, Debug)]
pub struct PreprocessArgs {
    /// JSON-lines input, one document per line.
    #[arg(long)]
    input: PathBuf,
    /// Keys of the JSON objects to tokenize; one dataset per key.
    #[arg(long, num_args = 1.., default_value = "text")]
    json_keys: Vec<String>,
    /// Outputs are `{prefix}_{key}_document.{bin,idx}`.
    #[arg(long)]
    output_prefix: String,
    #[command(flatten)]
    tokenizer: TokenizerArgs,
    /// Append the end-of-document token to each document.
    #[arg(long)]
    append_eod: bool,
    /// Tokenizing threads (default: the machine's cores).
    #[arg(long)]
    workers: Option<usize>,
}

/// Runs `preprocess` and prints its summary.
pub fn run(args: &PreprocessArgs) -> burn_megatron::Result<()> {
    let tokenizer = args.tokenizer.build()?;
    let workers = args
        .workers
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let options = PreprocessOptions {
        input: args.input.clone(),
        json_keys: args.json_keys.clone(),
        output_prefix: args.output_prefix.clone(),
        append_eod: args.append_eod,
        workers,
        progress: std::io::IsTerminal::is_terminal(&std::io::stderr()),
    };
    let started = std::time::Instant::now();
    let summary = preprocess(&options, &tokenizer)?;
    println!(
        "{} documents, {} tokens, {} bytes in {:.1} s with {workers} workers",
        summary.documents,
        summary.tokens,
        summary.bytes,
        started.elapsed().as_secs_f64()
    );
    for output in &summary.outputs {
        println!("wrote {output}.bin and {output}.idx");
    }
    Ok(())
}
