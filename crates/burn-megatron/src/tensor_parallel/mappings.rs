//! The communication primitives of tensor and sequence parallelism, as differentiable
//! operations: each has a forward collective and, for its backward, the conjugate one.
//! Layers compose these; nothing else in a layer talks to the group.
//!
//! | operation | forward | backward |
//! | --- | --- | --- |
//! | [`copy_to_tensor_parallel_region`] | identity | all-reduce |
//! | [`reduce_from_tensor_parallel_region`] | all-reduce | identity |
//! | [`scatter_to_tensor_parallel_region`] | keep own chunk of last dim | all-gather last dim |
//! | [`gather_from_tensor_parallel_region`] | all-gather last dim | keep own chunk of last dim |
//! | [`scatter_to_sequence_parallel_region`] | keep own chunk of `dim` | all-gather `dim` |
//! | [`gather_from_sequence_parallel_region`] | all-gather `dim` | reduce-scatter `dim` (or keep own chunk) |
//! | [`reduce_scatter_to_sequence_parallel_region`] | reduce-scatter `dim` | all-gather `dim` |
//!
//! # Panics
//!
//! Every function here panics when its collective fails (a timeout, another rank's
//! failure, shapes the group cannot split), with the message of the [`Error`](crate::Error):
//! a failed collective ends the rank, as a backward pass could not report it otherwise.

use burn::tensor::Tensor;

use crate::CollectiveFailure;
use crate::Result;
use crate::parallel::{Group, ParallelBackend, ReduceOp, collectives};

/// A tensor-parallel region operation. Its backward is [`RegionOp::backward`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionOp {
    /// Forward identity, backward all-reduce.
    CopyToTensorParallel,
    /// Forward all-reduce, backward identity.
    ReduceFromTensorParallel,
    /// Forward: this rank's chunk of the last dimension; backward: all-gather it.
    ScatterToTensorParallel,
    /// Forward: all-gather the last dimension; backward: this rank's chunk.
    GatherFromTensorParallel,
    /// Forward: this rank's chunk of dimension `dim`; backward: all-gather it.
    ScatterToSequenceParallel {
        /// The sequence dimension.
        dim: usize,
    },
    /// Forward: all-gather dimension `dim`. Backward: reduce-scatter it when the gradients
    /// of the ranks are partial sums (`reduce_scatter_grad`, the case before a
    /// column-parallel layer), else take this rank's chunk.
    GatherFromSequenceParallel {
        /// The sequence dimension.
        dim: usize,
        /// Whether the backward sums the ranks' gradients.
        reduce_scatter_grad: bool,
    },
    /// Forward: reduce-scatter dimension `dim`; backward: all-gather it.
    ReduceScatterToSequenceParallel {
        /// The sequence dimension.
        dim: usize,
    },
}

impl RegionOp {
    /// The operation whose forward is this one's backward.
    pub fn backward(self) -> RegionOp {
        use RegionOp::*;
        match self {
            CopyToTensorParallel => ReduceFromTensorParallel,
            ReduceFromTensorParallel => CopyToTensorParallel,
            ScatterToTensorParallel => GatherFromTensorParallel,
            GatherFromTensorParallel => ScatterToTensorParallel,
            ScatterToSequenceParallel { dim } => GatherFromSequenceParallel {
                dim,
                reduce_scatter_grad: false,
            },
            GatherFromSequenceParallel {
                dim,
                reduce_scatter_grad: true,
            } => ReduceScatterToSequenceParallel { dim },
            GatherFromSequenceParallel {
                dim,
                reduce_scatter_grad: false,
            } => ScatterToSequenceParallel { dim },
            ReduceScatterToSequenceParallel { dim } => GatherFromSequenceParallel {
                dim,
                reduce_scatter_grad: true,
            },
        }
    }

    /// The forward computation on plain (untracked) tensors.
    ///
    /// # Errors
    ///
    /// When the collective fails or the group cannot split the tensor evenly.
    pub fn forward<B: burn::tensor::backend::Backend, const D: usize>(
        self,
        group: &Group,
        tensor: Tensor<B, D>,
    ) -> Result<Tensor<B, D>> {
        use RegionOp::*;
        let last = D - 1;
        match self {
            CopyToTensorParallel => Ok(tensor),
            ReduceFromTensorParallel => collectives::all_reduce(group, tensor, ReduceOp::Sum),
            ScatterToTensorParallel => split(group, tensor, last),
            GatherFromTensorParallel => collectives::all_gather(group, tensor, last),
            ScatterToSequenceParallel { dim } => split(group, tensor, dim),
            GatherFromSequenceParallel { dim, .. } => collectives::all_gather(group, tensor, dim),
            ReduceScatterToSequenceParallel { dim } => {
                collectives::reduce_scatter(group, tensor, dim, ReduceOp::Sum)
            }
        }
    }
}

/// This rank's chunk of `dim`, without communication.
fn split<B: burn::tensor::backend::Backend, const D: usize>(
    group: &Group,
    tensor: Tensor<B, D>,
    dim: usize,
) -> Result<Tensor<B, D>> {
    let (size, rank) = (group.size(), group.rank());
    let length = tensor.dims().get(dim).copied().unwrap_or(0);
    if dim >= D || length % size != 0 {
        return Err(group.error(
            "split",
            CollectiveFailure::BadInput(format!(
                "cannot split dimension {dim} of shape {:?} into {size} equal chunks",
                tensor.dims()
            )),
        ));
    }
    let chunk = length / size;
    Ok(tensor.narrow(dim, rank * chunk, chunk))
}

fn apply<B: ParallelBackend, const D: usize>(
    group: &Group,
    op: RegionOp,
    tensor: Tensor<B, D>,
) -> Tensor<B, D> {
    B::region(group, op, tensor).unwrap_or_else(|error| panic!("{op:?}: {error}"))
}

/// Identity forward, all-reduce backward: the entry of a column-parallel region.
pub fn copy_to_tensor_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
) -> Tensor<B, D> {
    apply(group, RegionOp::CopyToTensorParallel, tensor)
}

/// All-reduce forward, identity backward: the exit of a row-parallel region.
pub fn reduce_from_tensor_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
) -> Tensor<B, D> {
    apply(group, RegionOp::ReduceFromTensorParallel, tensor)
}

/// Keeps this rank's chunk of the last dimension; backward all-gathers it.
pub fn scatter_to_tensor_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
) -> Tensor<B, D> {
    apply(group, RegionOp::ScatterToTensorParallel, tensor)
}

/// All-gathers the last dimension; backward keeps this rank's chunk.
pub fn gather_from_tensor_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
) -> Tensor<B, D> {
    apply(group, RegionOp::GatherFromTensorParallel, tensor)
}

/// Keeps this rank's chunk of the sequence dimension `dim`; backward all-gathers it.
pub fn scatter_to_sequence_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
    dim: usize,
) -> Tensor<B, D> {
    apply(group, RegionOp::ScatterToSequenceParallel { dim }, tensor)
}

/// All-gathers the sequence dimension `dim`. The backward reduce-scatters when
/// `reduce_scatter_grad` (the ranks' gradients are partial sums, as before a
/// column-parallel layer), else keeps this rank's chunk.
pub fn gather_from_sequence_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
    dim: usize,
    reduce_scatter_grad: bool,
) -> Tensor<B, D> {
    let op = RegionOp::GatherFromSequenceParallel {
        dim,
        reduce_scatter_grad,
    };
    apply(group, op, tensor)
}

/// Reduce-scatters the sequence dimension `dim`; backward all-gathers it.
pub fn reduce_scatter_to_sequence_parallel_region<B: ParallelBackend, const D: usize>(
    tensor: Tensor<B, D>,
    group: &Group,
    dim: usize,
) -> Tensor<B, D> {
    apply(
        group,
        RegionOp::ReduceScatterToSequenceParallel { dim },
        tensor,
    )
}
