//! `launch`: starts the local ranks of a multi-process job.

use burn_megatron::Result;
use burn_megatron::launch::{LaunchConfig, launch};
use clap::Args;

/// Flags of `launch` (torchrun's names).
#[derive(Args, Debug)]
pub struct LaunchArgs {
    /// Processes to start on this node.
    #[arg(long)]
    nproc_per_node: usize,
    /// Nodes in the job.
    #[arg(long, default_value_t = 1)]
    nnodes: usize,
    /// This node's index.
    #[arg(long, default_value_t = 0)]
    node_rank: usize,
    /// Host of rank 0 (reachable from every node).
    #[arg(long, default_value = "127.0.0.1")]
    master_addr: String,
    /// Port rank 0 listens on.
    #[arg(long, default_value_t = 29500)]
    master_port: u16,
    /// The command each rank runs, after `--`.
    #[arg(last = true, required = true)]
    command: Vec<String>,
}

/// Runs the ranks.
pub fn run(args: &LaunchArgs) -> Result<()> {
    let config = LaunchConfig {
        nproc_per_node: args.nproc_per_node,
        nnodes: args.nnodes,
        node_rank: args.node_rank,
        master_addr: args.master_addr.clone(),
        master_port: args.master_port,
    };
    launch(&config, &args.command)
}
