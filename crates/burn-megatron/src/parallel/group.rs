//! Process groups: sets of ranks that run collective operations on Burn tensors.

use std::any::Any;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use burn::tensor::{Shape, Tensor};

use super::ParallelBackend;
use crate::{CollectiveFailure, Error, Result};

/// How an all-reduce or reduce-scatter combines the ranks' tensors.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReduceOp {
    /// Element-wise sum.
    Sum,
    /// Element-wise mean over the group's ranks.
    Mean,
    /// Element-wise maximum.
    Max,
}

/// What one rank hands to a collective: a value of any type (usually a Burn tensor)
/// that the other ranks read.
pub type Payload = Arc<dyn Any + Send + Sync>;

/// The collective operations used in errors and to check that ranks agree.
pub type OpName = &'static str;

/// The default time a rank waits in a collective before it gives up: 300 s.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(300);

/// A transport between the ranks of one group.
///
/// An implementation moves payloads between ranks; the tensor collectives of [`Group`]
/// (all-reduce, all-gather, reduce-scatter, broadcast, send/recv, barrier) are built on
/// it, for every backend, in [`ParallelBackend`]. Every call must return within
/// [`timeout`](ProcessGroup::timeout), with an error naming the group, the rank and the
/// operation, rather than hang.
pub trait ProcessGroup: Send + Sync + fmt::Debug {
    /// The group's name, such as `tp`, `dp` or `pp`.
    fn name(&self) -> &str;

    /// The global ranks of the members, in group order.
    fn members(&self) -> &[usize];

    /// This rank's position in [`members`](ProcessGroup::members).
    fn rank(&self) -> usize;

    /// How long a rank waits for the others before it fails.
    fn timeout(&self) -> Duration;

    /// Every member contributes one payload; every member receives all of them, in group
    /// order.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout, abort, or when the members called different
    /// operations.
    fn all_gather_payloads(&self, op: OpName, payload: Payload) -> Result<Vec<Payload>>;

    /// Sends a payload to the member at group position `dst`.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] when the group was aborted.
    fn send_payload(&self, op: OpName, dst: usize, payload: Payload) -> Result<()>;

    /// Receives the next payload that the member at group position `src` sent to this rank.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout or abort.
    fn recv_payload(&self, op: OpName, src: usize) -> Result<Payload>;

    /// Whether payloads must be host data (`TensorData`, or `()` for no data) because the
    /// transport serializes them; in-process transports take tensors as they are.
    fn carries_host_data(&self) -> bool {
        false
    }

    /// Whether the members are threads of this process. Such ranks share Burn's autodiff
    /// graph registry, whose clean-up at the end of every backward locks each graph in the
    /// process in turn: a rank may then wait for another rank's backward, so ranks whose
    /// backward runs collectives must enter it together (see the training engine).
    fn threads_of_one_process(&self) -> bool {
        false
    }

    /// Marks the whole job as failed so that every rank waiting in a collective returns an
    /// error at once instead of waiting for its timeout.
    fn abort(&self, reason: String);

    /// The NCCL communicator of a group of CUDA ranks, whose tensor collectives then run
    /// on the device.
    #[cfg(feature = "cuda")]
    fn nccl(&self) -> Option<&super::NcclComm> {
        None
    }
}

/// A shared handle to a [`ProcessGroup`], with the tensor collectives.
///
/// Cloning is cheap; clones are the same group (they share its operation sequence).
#[derive(Clone)]
pub struct Group(Arc<dyn ProcessGroup>);

impl Group {
    /// Wraps a process group.
    pub fn new(group: impl ProcessGroup + 'static) -> Self {
        Self(Arc::new(group))
    }

    /// The group's name.
    pub fn name(&self) -> &str {
        self.0.name()
    }

    /// Number of ranks in the group.
    pub fn size(&self) -> usize {
        self.0.members().len()
    }

    /// This rank's position in the group.
    pub fn rank(&self) -> usize {
        self.0.rank()
    }

    /// The global ranks of the members, in group order.
    pub fn members(&self) -> &[usize] {
        self.0.members()
    }

    /// This rank's global rank.
    pub fn global_rank(&self) -> usize {
        self.members()[self.rank()]
    }

    /// The transport.
    pub fn process_group(&self) -> &dyn ProcessGroup {
        self.0.as_ref()
    }

    /// The group's NCCL communicator, if it runs on NCCL.
    #[cfg(feature = "cuda")]
    pub(crate) fn nccl(&self) -> Option<&super::NcclComm> {
        self.0.nccl()
    }

    /// Sums, averages or takes the maximum of `tensor` over the group; every rank gets the
    /// result. Ranks are combined in group order, so every rank gets the same bits.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout, abort, or when the ranks' shapes differ.
    pub fn all_reduce<B: ParallelBackend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        op: ReduceOp,
    ) -> Result<Tensor<B, D>> {
        B::all_reduce(self, tensor, op)
    }

    /// Concatenates the ranks' tensors along `dim`, in group order.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout, abort, or when the shapes differ outside `dim`.
    pub fn all_gather<B: ParallelBackend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dim: usize,
    ) -> Result<Tensor<B, D>> {
        B::all_gather(self, tensor, dim)
    }

    /// Reduces the ranks' tensors, then gives rank `i` the `i`-th of `size` equal chunks of
    /// the result along `dim`.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout, abort, differing shapes, or when the group size
    /// does not divide the size of `dim`.
    pub fn reduce_scatter<B: ParallelBackend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dim: usize,
        op: ReduceOp,
    ) -> Result<Tensor<B, D>> {
        B::reduce_scatter(self, tensor, dim, op)
    }

    /// Every rank gets the tensor of group position `root`. The others pass a tensor of the
    /// same shape, whose values are ignored.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout, abort, a `root` outside the group, or a shape
    /// that differs from the root's.
    pub fn broadcast<B: ParallelBackend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        root: usize,
    ) -> Result<Tensor<B, D>> {
        B::broadcast(self, tensor, root)
    }

    /// Sends `tensor` to group position `dst`.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on abort or a `dst` outside the group.
    pub fn send<B: ParallelBackend, const D: usize>(
        &self,
        tensor: Tensor<B, D>,
        dst: usize,
    ) -> Result<()> {
        B::send(self, tensor, dst)
    }

    /// Receives a tensor of the given shape from group position `src`.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout, abort, a `src` outside the group, or when the
    /// tensor that arrives has another shape.
    pub fn recv<B: ParallelBackend, const D: usize>(
        &self,
        shape: impl Into<Shape>,
        src: usize,
        device: &B::Device,
    ) -> Result<Tensor<B, D>> {
        B::recv(self, shape.into(), src, device)
    }

    /// Returns once every rank of the group has called it.
    ///
    /// # Errors
    ///
    /// [`Error::Collective`] on timeout or abort.
    pub fn barrier(&self) -> Result<()> {
        self.0
            .all_gather_payloads("barrier", Arc::new(()))
            .map(|_| ())
    }

    /// An error of this group for operation `op`.
    pub fn error(&self, op: OpName, reason: CollectiveFailure) -> Error {
        Error::Collective {
            group: self.to_string(),
            rank: self.global_rank(),
            op,
            reason,
        }
    }

    /// Checks that `peer` is a position in the group.
    pub(crate) fn check_peer(&self, op: OpName, peer: usize) -> Result<()> {
        if peer >= self.size() {
            return Err(self.error(
                op,
                CollectiveFailure::BadInput(format!(
                    "group position {peer} is outside a group of {} ranks",
                    self.size()
                )),
            ));
        }
        Ok(())
    }
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}{:?}", self.name(), self.members())
    }
}

impl fmt::Debug for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Group({self}, rank {})", self.rank())
    }
}
