//! `layout`: the rank map of a job.

use burn_megatron::parallel::{Layout, ModelDims};
use clap::Args;

/// Flags of `layout`.
#[derive(Args, Debug)]
pub struct LayoutArgs {
    /// Total number of ranks (GPUs or processes).
    #[arg(long)]
    world_size: usize,
    /// Tensor-parallel size.
    #[arg(long, default_value_t = 1)]
    tp: usize,
    /// Pipeline-parallel size; data parallelism takes the remaining ranks.
    #[arg(long, default_value_t = 1)]
    pp: usize,
    /// Model chunks per pipeline stage (interleaved schedule).
    #[arg(long, default_value_t = 1)]
    virtual_stages: usize,
    /// Check the layout against a model with this many attention heads (with --hidden,
    /// --layers; the others default to GPT conventions).
    #[arg(long, requires_all = ["hidden", "layers"])]
    heads: Option<usize>,
    /// Hidden size of the model to check.
    #[arg(long)]
    hidden: Option<usize>,
    /// Transformer layers of the model to check.
    #[arg(long)]
    layers: Option<usize>,
    /// Key/value head groups of the model to check (default: one per head).
    #[arg(long)]
    query_groups: Option<usize>,
    /// FFN hidden size of the model to check (default: 4 x hidden).
    #[arg(long)]
    ffn_hidden: Option<usize>,
    /// Vocabulary size of the model to check.
    #[arg(long, default_value_t = 50257)]
    vocab: usize,
}

/// Prints the rank map of a layout.
pub fn run(args: &LayoutArgs) -> burn_megatron::Result<()> {
    let layout = Layout::for_world(args.world_size, args.tp, args.pp)?
        .with_virtual_pipeline(args.virtual_stages)?;
    if let (Some(heads), Some(hidden), Some(layers)) = (args.heads, args.hidden, args.layers) {
        layout.check_model(&ModelDims {
            hidden,
            heads,
            query_groups: args.query_groups.unwrap_or(heads),
            ffn_hidden: args.ffn_hidden.unwrap_or(4 * hidden),
            layers,
            vocab: args.vocab,
        })?;
    }
    println!("{layout} on {} ranks", layout.world_size());
    println!(
        "{:>5} {:>4} {:>4} {:>4}  {:<16} {:<16} {:<16} embedding",
        "rank", "tp", "dp", "pp", "tp group", "dp group", "pp group"
    );
    for rank in 0..layout.world_size() {
        let coords = layout.coords(rank);
        let groups = [
            layout.tensor_group(rank),
            layout.data_group(rank),
            layout.pipeline_group(rank),
        ]
        .map(|members| format!("{members:?}"));
        println!(
            "{rank:>5} {:>4} {:>4} {:>4}  {:<16} {:<16} {:<16} {:?}",
            coords.tp,
            coords.dp,
            coords.pp,
            groups[0],
            groups[1],
            groups[2],
            layout.embedding_group(rank),
        );
    }
    Ok(())
}
