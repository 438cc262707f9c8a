//! Tensor and sequence parallelism: the region operations and the layers built from them.
//!
//! The layers follow Megatron-Core's `tensor_parallel` package:
//! [`ColumnParallelLinear`], [`RowParallelLinear`], [`VocabParallelEmbedding`] and
//! [`vocab_parallel_cross_entropy`]. Each is built only from the operations of
//! [`mappings`], so each computes exactly what the unsplit layer computes, forward and
//! backward, whatever the tensor-parallel size.

mod cross_entropy;
mod embedding;
mod init;
mod linear;
pub mod mappings;

pub use burn_megatron_kernels::dropout::dropout;
pub use cross_entropy::{
    vocab_parallel_cross_entropy, vocab_parallel_cross_entropy_from_statistics,
};
pub use embedding::{
    VocabParallelEmbedding, VocabParallelEmbeddingConfig, VocabPartition, padded_vocab_size,
};
pub use init::ParamInit;
pub use linear::{
    ColumnParallelLinear, ColumnParallelLinearConfig, RowParallelLinear, RowParallelLinearConfig,
};
pub use mappings::RegionOp;
