//! [`ParallelBackend`]: the collectives and tensor-parallel region operations as a Burn
//! backend extension, so that an autodiff backend can give each region operation its own
//! backward.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::tensor::{Shape, Tensor, TensorPrimitive};

use super::{Group, ReduceOp, collectives};
use crate::Result;
use crate::tensor_parallel::RegionOp;

/// A backend whose tensors can take part in collectives and tensor-parallel regions.
///
/// Every method has a default for plain (non-autodiff) backends, so supporting a backend
/// is one line: `impl ParallelBackend for MyBackend {}`. On [`Autodiff`] the collectives
/// run on the inner tensors and return untracked tensors (they are not differentiable),
/// and [`region`](ParallelBackend::region) records a backward that applies the region
/// operation's conjugate ([`RegionOp::backward`]).
pub trait ParallelBackend: crate::ops::MegatronOps {
    /// See [`Group::all_reduce`].
    fn all_reduce<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        op: ReduceOp,
    ) -> Result<Tensor<Self, D>> {
        collectives::all_reduce(group, tensor, op)
    }

    /// See [`Group::all_gather`].
    fn all_gather<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        dim: usize,
    ) -> Result<Tensor<Self, D>> {
        collectives::all_gather(group, tensor, dim)
    }

    /// See [`Group::reduce_scatter`].
    fn reduce_scatter<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<Self, D>> {
        collectives::reduce_scatter(group, tensor, dim, op)
    }

    /// See [`Group::broadcast`].
    fn broadcast<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        root: usize,
    ) -> Result<Tensor<Self, D>> {
        collectives::broadcast(group, tensor, root)
    }

    /// See [`Group::send`].
    fn send<const D: usize>(group: &Group, tensor: Tensor<Self, D>, dst: usize) -> Result<()> {
        collectives::send(group, tensor, dst)
    }

    /// See [`Group::recv`].
    fn recv<const D: usize>(
        group: &Group,
        shape: Shape,
        src: usize,
        device: &Self::Device,
    ) -> Result<Tensor<Self, D>> {
        collectives::recv(group, shape, src, device)
    }

    /// Applies a tensor-parallel region operation; on an autodiff backend its backward is
    /// the conjugate operation.
    fn region<const D: usize>(
        group: &Group,
        op: RegionOp,
        tensor: Tensor<Self, D>,
    ) -> Result<Tensor<Self, D>> {
        op.forward(group, tensor)
    }
}

burn_megatron_kernels::impl_for_ndarray!(ParallelBackend);

/// CUDA tensors: on NCCL when the group has a communicator (processes of a launched
/// job), else through the group's transport.
#[cfg(feature = "cuda")]
impl<F, I, BT> ParallelBackend
    for burn_cubecl::CubeBackend<burn_cubecl::cubecl::cuda::CudaRuntime, F, I, BT>
where
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
    fn all_reduce<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        op: ReduceOp,
    ) -> Result<Tensor<Self, D>> {
        match group.nccl() {
            Some(comm) if group.size() > 1 => super::nccl::all_reduce(comm, group, tensor, op),
            _ => collectives::all_reduce(group, tensor, op),
        }
    }

    fn all_gather<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        dim: usize,
    ) -> Result<Tensor<Self, D>> {
        match group.nccl() {
            Some(comm) if group.size() > 1 => super::nccl::all_gather(comm, group, tensor, dim),
            _ => collectives::all_gather(group, tensor, dim),
        }
    }

    fn reduce_scatter<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<Self, D>> {
        match group.nccl() {
            Some(comm) if group.size() > 1 => {
                super::nccl::reduce_scatter(comm, group, tensor, dim, op)
            }
            _ => collectives::reduce_scatter(group, tensor, dim, op),
        }
    }

    fn broadcast<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        root: usize,
    ) -> Result<Tensor<Self, D>> {
        match group.nccl() {
            Some(comm) if group.size() > 1 => super::nccl::broadcast(comm, group, tensor, root),
            _ => collectives::broadcast(group, tensor, root),
        }
    }

    fn send<const D: usize>(group: &Group, tensor: Tensor<Self, D>, dst: usize) -> Result<()> {
        match group.nccl() {
            Some(comm) => super::nccl::send(comm, group, tensor, dst),
            None => collectives::send(group, tensor, dst),
        }
    }

    fn recv<const D: usize>(
        group: &Group,
        shape: Shape,
        src: usize,
        device: &Self::Device,
    ) -> Result<Tensor<Self, D>> {
        match group.nccl() {
            Some(comm) => super::nccl::recv(comm, group, shape, src, device),
            None => collectives::recv(group, shape, src, device),
        }
    }
}

#[cfg(feature = "cuda")]
impl<B: burn_fusion::FusionBackend + ParallelBackend> ParallelBackend for burn_fusion::Fusion<B> {}

impl<B: ParallelBackend, C: CheckpointStrategy> ParallelBackend for Autodiff<B, C> {
    fn all_reduce<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        op: ReduceOp,
    ) -> Result<Tensor<Self, D>> {
        B::all_reduce(group, tensor.inner(), op).map(Tensor::from_inner)
    }

    fn all_gather<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        dim: usize,
    ) -> Result<Tensor<Self, D>> {
        B::all_gather(group, tensor.inner(), dim).map(Tensor::from_inner)
    }

    fn reduce_scatter<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<Self, D>> {
        B::reduce_scatter(group, tensor.inner(), dim, op).map(Tensor::from_inner)
    }

    fn broadcast<const D: usize>(
        group: &Group,
        tensor: Tensor<Self, D>,
        root: usize,
    ) -> Result<Tensor<Self, D>> {
        B::broadcast(group, tensor.inner(), root).map(Tensor::from_inner)
    }

    fn send<const D: usize>(group: &Group, tensor: Tensor<Self, D>, dst: usize) -> Result<()> {
        B::send(group, tensor.inner(), dst)
    }

    fn recv<const D: usize>(
        group: &Group,
        shape: Shape,
        src: usize,
        device: &Self::Device,
    ) -> Result<Tensor<Self, D>> {
        B::recv(group, shape, src, device).map(Tensor::from_inner)
    }

    fn region<const D: usize>(
        group: &Group,
        op: RegionOp,
        tensor: Tensor<Self, D>,
    ) -> Result<Tensor<Self, D>> {
        let (input, nodes) = burn_megatron_kernels::detach_inner!(B; tensor);
        let output = B::region::<D>(group, op, input)?.into_primitive().tensor();
        let output = match RegionBackward::<D>
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((op, group.clone()), output),
            OpsKind::UnTracked(prep) => prep.finish(output),
        };
        Ok(Tensor::from_primitive(TensorPrimitive::Float(output)))
    }
}

/// The backward of a region operation: its conjugate, on the inner backend.
#[derive(Debug)]
struct RegionBackward<const D: usize>;

impl<B: ParallelBackend, const D: usize> Backward<B, 1> for RegionBackward<D> {
    type State = (RegionOp, Group);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let (op, group) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            let grad = Tensor::<B, D>::from_primitive(TensorPrimitive::Float(grad));
            // A backward cannot return an error: a failed collective ends the rank.
            B::region(&group, op.backward(), grad)
                .unwrap_or_else(|error| panic!("backward of {op:?}: {error}"))
                .into_primitive()
                .tensor()
        });
    }
}
