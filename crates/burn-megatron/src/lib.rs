//! # burn-megatron
//!
//! Megatron-style parallel training for the [Burn](https://burn.dev) deep learning
//! framework: tensor, sequence, pipeline and data parallelism, from one CPU to many GPUs.
//!
//! - [`parallel`]: the [`Layout`](parallel::Layout) of a job in Megatron's rank order,
//!   process groups and their collectives, and [`LocalCluster`](parallel::LocalCluster)
//!   to run ranks as threads.
//! - [`tensor_parallel`]: the differentiable region operations and the layers built from
//!   them: column- and row-parallel linear layers, the vocabulary-parallel embedding and
//!   cross-entropy.
//!
//! - [`checkpoint`]: distributed checkpoints that load into any layout.
//!
//! Everything is generic over the Burn backend; a backend takes part through
//! [`ParallelBackend`](parallel::ParallelBackend), implemented for `NdArray`, the CubeCL
//! CUDA backends (feature `cuda`) and `Autodiff` over any of them.

#![warn(missing_docs)]

pub mod checkpoint;
#[cfg(feature = "cuda")]
mod cuda;
#[cfg(feature = "cuda")]
pub use cuda::check_gpu;
#[cfg(feature = "cuda")]
mod launch_gate;
#[cfg(feature = "cuda")]
pub use launch_gate::device_seconds;
pub mod data;
mod error;
pub mod launch;
pub mod ops;
pub mod parallel;
pub mod pipeline;
pub mod tensor_parallel;
pub mod train;

pub use error::{CollectiveFailure, Error, Result};
