//! The tensor collectives for any backend, built on a [`ProcessGroup`](super::ProcessGroup)'s
//! payload exchange. Ranks' tensors are combined in group order, so every rank computes
//! the same bits.
//!
//! These functions see the tensors as plain values: on an autodiff backend they must be
//! given inner (non-tracked) tensors, which [`ParallelBackend`](super::ParallelBackend)
//! takes care of.

use std::sync::Arc;

use burn::tensor::{Shape, Tensor, TensorData, backend::Backend};

use super::{Group, OpName, Payload, ReduceOp};
use crate::{CollectiveFailure, Result};

/// Hands `tensor` to every member and returns all members' tensors, on this rank's device.
fn exchange<B: Backend, const D: usize>(
    group: &Group,
    op: OpName,
    tensor: Tensor<B, D>,
) -> Result<Vec<Tensor<B, D>>> {
    let device = tensor.device();
    let payloads = group
        .process_group()
        .all_gather_payloads(op, pack(group, tensor))?;
    payloads
        .iter()
        .enumerate()
        .map(|(position, payload)| unpack::<B, D>(group, op, position, payload, &device))
        .collect()
}

/// A tensor as the transport takes it: itself, or its host data.
fn pack<B: Backend, const D: usize>(group: &Group, tensor: Tensor<B, D>) -> Payload {
    if group.process_group().carries_host_data() {
        Arc::new(tensor.into_data())
    } else {
        Arc::new(tensor)
    }
}

/// A payload as a tensor on `device`.
fn unpack<B: Backend, const D: usize>(
    group: &Group,
    op: OpName,
    position: usize,
    payload: &Payload,
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    let tensor = payload.downcast_ref::<Tensor<B, D>>().cloned().or_else(|| {
        payload
            .downcast_ref::<TensorData>()
            .filter(|data| data.shape.num_dims() == D)
            .map(|data| Tensor::from_data(data.clone(), device))
    });
    tensor.map(|t| t.to_device(device)).ok_or_else(|| {
        group.error(
            op,
            CollectiveFailure::BadInput(format!(
                "rank {} sent something other than a {D}-dimensional float tensor of this \
                     backend",
                group.members()[position]
            )),
        )
    })
}

/// Checks that every rank's shape equals this rank's, except along `free_dim`.
fn check_shapes<B: Backend, const D: usize>(
    group: &Group,
    op: OpName,
    parts: &[Tensor<B, D>],
    free_dim: Option<usize>,
) -> Result<()> {
    let mine = parts[group.rank()].shape();
    for (position, part) in parts.iter().enumerate() {
        let theirs = part.shape();
        let differs = mine
            .iter()
            .zip(theirs.iter())
            .enumerate()
            .any(|(dim, (a, b))| a != b && Some(dim) != free_dim);
        if differs {
            return Err(group.error(
                op,
                CollectiveFailure::BadInput(format!(
                    "rank {} gave shape {:?} but rank {} gave {:?}",
                    group.members()[position],
                    theirs.as_slice(),
                    group.global_rank(),
                    mine.as_slice()
                )),
            ));
        }
    }
    Ok(())
}

fn check_dim<const D: usize>(group: &Group, op: OpName, dim: usize) -> Result<()> {
    if dim >= D {
        return Err(group.error(
            op,
            CollectiveFailure::BadInput(format!(
                "dimension {dim} is outside a {D}-dimensional tensor"
            )),
        ));
    }
    Ok(())
}

fn reduce<B: Backend, const D: usize>(parts: Vec<Tensor<B, D>>, op: ReduceOp) -> Tensor<B, D> {
    let count = parts.len();
    let mut parts = parts.into_iter();
    let first = parts.next().expect("a group has at least one rank");
    let combined = parts.fold(first, |acc, part| match op {
        ReduceOp::Sum | ReduceOp::Mean => acc + part,
        ReduceOp::Max => acc.max_pair(part),
    });
    match op {
        ReduceOp::Mean => combined / count as f64,
        ReduceOp::Sum | ReduceOp::Max => combined,
    }
}

/// See [`Group::all_reduce`].
pub fn all_reduce<B: Backend, const D: usize>(
    group: &Group,
    tensor: Tensor<B, D>,
    op: ReduceOp,
) -> Result<Tensor<B, D>> {
    if group.size() == 1 {
        return Ok(tensor);
    }
    let parts = exchange(group, "all_reduce", tensor)?;
    check_shapes(group, "all_reduce", &parts, None)?;
    Ok(reduce(parts, op))
}

/// See [`Group::all_gather`].
pub fn all_gather<B: Backend, const D: usize>(
    group: &Group,
    tensor: Tensor<B, D>,
    dim: usize,
) -> Result<Tensor<B, D>> {
    check_dim::<D>(group, "all_gather", dim)?;
    if group.size() == 1 {
        return Ok(tensor);
    }
    let parts = exchange(group, "all_gather", tensor)?;
    check_shapes(group, "all_gather", &parts, Some(dim))?;
    Ok(Tensor::cat(parts, dim))
}

/// See [`Group::reduce_scatter`].
pub fn reduce_scatter<B: Backend, const D: usize>(
    group: &Group,
    tensor: Tensor<B, D>,
    dim: usize,
    op: ReduceOp,
) -> Result<Tensor<B, D>> {
    const OP: OpName = "reduce_scatter";
    check_dim::<D>(group, OP, dim)?;
    let (size, rank) = (group.size(), group.rank());
    let length = tensor.dims()[dim];
    if !length.is_multiple_of(size) {
        return Err(group.error(
            OP,
            CollectiveFailure::BadInput(format!(
                "dimension {dim} has size {length}, which {size} ranks cannot split evenly"
            )),
        ));
    }
    if size == 1 {
        return Ok(tensor);
    }
    let parts = exchange(group, OP, tensor)?;
    check_shapes(group, OP, &parts, None)?;
    let chunk = length / size;
    Ok(reduce(parts, op).narrow(dim, rank * chunk, chunk))
}

/// See [`Group::broadcast`].
pub fn broadcast<B: Backend, const D: usize>(
    group: &Group,
    tensor: Tensor<B, D>,
    root: usize,
) -> Result<Tensor<B, D>> {
    const OP: OpName = "broadcast";
    group.check_peer(OP, root)?;
    if group.size() == 1 {
        return Ok(tensor);
    }
    let device = tensor.device();
    let shape = tensor.shape();
    let mine: Payload = if group.rank() == root {
        pack(group, tensor)
    } else {
        Arc::new(())
    };
    let payloads = group.process_group().all_gather_payloads(OP, mine)?;
    let received = unpack::<B, D>(group, OP, root, &payloads[root], &device)?;
    check_received(group, OP, root, &shape, &received.shape())?;
    Ok(received)
}

/// See [`Group::send`].
pub fn send<B: Backend, const D: usize>(
    group: &Group,
    tensor: Tensor<B, D>,
    dst: usize,
) -> Result<()> {
    group.check_peer("send", dst)?;
    group
        .process_group()
        .send_payload("send", dst, pack(group, tensor))
}

/// See [`Group::recv`].
pub fn recv<B: Backend, const D: usize>(
    group: &Group,
    shape: Shape,
    src: usize,
    device: &B::Device,
) -> Result<Tensor<B, D>> {
    const OP: OpName = "recv";
    group.check_peer(OP, src)?;
    let payload = group.process_group().recv_payload(OP, src)?;
    let received = unpack::<B, D>(group, OP, src, &payload, device)?;
    check_received(group, OP, src, &shape, &received.shape())?;
    Ok(received)
}

fn check_received(
    group: &Group,
    op: OpName,
    src: usize,
    expected: &Shape,
    actual: &Shape,
) -> Result<()> {
    if expected != actual {
        return Err(group.error(
            op,
            CollectiveFailure::BadInput(format!(
                "expected shape {:?} from rank {} but it sent {:?}",
                expected.as_slice(),
                group.members()[src],
                actual.as_slice()
            )),
        ));
    }
    Ok(())
}
