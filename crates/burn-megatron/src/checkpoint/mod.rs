//! Distributed checkpoints: every rank writes its own shards, and a checkpoint loads into
//! any parallel layout.
//!
//! A checkpoint is a directory `iter_NNNNNNN` under the save directory:
//! - `rank-NNNNN.safetensors`: the tensors this rank wrote (its tensor-parallel shard of
//!   each parameter of its pipeline stage, and its slice of the optimizer state), f32;
//! - `rank-NNNNN.json`: a [`RankManifest`] that places each of those tensors in the full
//!   model (canonical name, global shape, tensor-parallel dimension and rank, element
//!   range of the distributed-optimizer slice) and holds the file's length and hash;
//! - `checkpoint.json`: the [`CheckpointInfo`] (iteration, consumed samples, layout,
//!   optimizer, loss-scaler and random state, the model's configuration), written last.
//!
//! Saving writes into `iter_NNNNNNN.tmp`, renames it when every rank is done, then
//! points the file `latest` at it, so a save cut off at any moment leaves the previous
//! checkpoint as the one that loads. Loading ([`Checkpoint::open`]) checks every file's
//! length and hash, and gives the full (canonical) tensor of any name, which each rank
//! then splits for its own layout.

mod manifest;
mod reshard;
mod store;

pub use manifest::{
    CheckpointInfo, FORMAT, LayoutInfo, Piece, Placement, RankManifest, ScalerState, StateKind,
};
pub use reshard::{merge_shards, split_shard};
pub use store::{
    Checkpoint, LATEST, RankWriter, commit, incomplete_saves, iteration_dir, prepare_staging,
    staging_dir,
};
