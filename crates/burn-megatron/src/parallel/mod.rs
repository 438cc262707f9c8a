//! Parallel layout, process groups and collectives.
//!
//! - [`Layout`]: tensor x data x pipeline sizes and Megatron's rank order.
//! - [`ProcessGroup`]: the transport between a group's ranks; [`Group`]: a handle to one,
//!   with the tensor collectives.
//! - [`ParallelBackend`]: the collectives and region operations as a backend extension.
//! - [`LocalCluster`]: ranks as threads of one process, on any backend.
//! - [`TcpWorld`]: ranks as processes connected over TCP (CPU tensors).
//! - `NcclGroup` (feature `cuda`): the collectives of CUDA ranks on NCCL.

mod backend;
pub mod collectives;
mod context;
mod group;
mod layout;
mod local;
#[cfg(feature = "cuda")]
mod nccl;
mod tcp;

pub use backend::ParallelBackend;
pub use context::ParallelContext;
pub use group::{DEFAULT_TIMEOUT, Group, OpName, Payload, ProcessGroup, ReduceOp};
pub use layout::{Layout, ModelDims, RankCoords};
pub use local::{LocalCluster, LocalGroup, LocalWorld};
#[cfg(feature = "cuda")]
pub use nccl::{NcclComm, NcclGroup};
pub use tcp::{TcpGroup, TcpWorld};
