//! `layout`: the rank map of a job, the layers of each pipeline stage, and the order in
//! which the stages run a step's micro-batches.

use burn_megatron::parallel::{Layout, ModelDims};
use burn_megatron::pipeline::{Action, LayerSplit, Schedule};
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
    /// Layers of each virtual pipeline stage, comma-separated (with --layers) [default:
    /// an even split].
    #[arg(long, value_delimiter = ',', requires = "layers")]
    pipeline_layers: Option<Vec<usize>>,
    /// Print the pipeline schedule of a step of this many micro-batches per stage: F3 is
    /// the forward of micro-batch 3, B3 its backward, and `.c1` names the model chunk.
    #[arg(long)]
    micro_batches: Option<usize>,
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
    if let Some(layers) = args.layers {
        let split = LayerSplit::new(layers, &layout, args.pipeline_layers.as_deref())?;
        for stage in 0..layout.pipeline() {
            let chunks: Vec<String> = split
                .chunks_of(stage)
                .into_iter()
                .map(|chunk| {
                    let mut text = match chunk.layers.len() {
                        0 => "no layers".to_string(),
                        1 => format!("layer {}", chunk.layers.start),
                        _ => format!("layers {}-{}", chunk.layers.start, chunk.layers.end - 1),
                    };
                    if chunk.first {
                        text.push_str(" + embeddings");
                    }
                    if chunk.last {
                        text.push_str(" + final norm, output layer and loss");
                    }
                    text
                })
                .collect();
            println!("stage {stage}: {}", chunks.join("; "));
        }
    }
    if let Some(micro_batches) = args.micro_batches {
        let schedule = Schedule::for_layout(&layout, micro_batches)?;
        println!(
            "{schedule}: bubble {:.4} of compute time",
            schedule.bubble_fraction()
        );
        for stage in 0..layout.pipeline() {
            let actions: Vec<String> = schedule
                .actions(stage)
                .into_iter()
                .map(|action| {
                    let (pass, chunk, micro) = match action {
                        Action::Forward { chunk, micro } => ("F", chunk, micro),
                        Action::Backward { chunk, micro } => ("B", chunk, micro),
                    };
                    if schedule.chunks() > 1 {
                        format!("{pass}{micro}.c{chunk}")
                    } else {
                        format!("{pass}{micro}")
                    }
                })
                .collect();
            println!("stage {stage}: {}", actions.join(" "));
        }
    }
    Ok(())
}
