//! # burn-megatron-kernels
//!
//! Fused CubeCL kernels with backward (scaled masked softmax, LayerNorm/RMSNorm, bias-GeLU,
//! bias-dropout-add, vocab-parallel cross-entropy), each with a reference path in plain
//! Burn ops. (The cuBLASLt GEMMs and core attention live in `burn_megatron::ops`.)
//!
//! The kernels arrive with their own issues; the reference paths they must match live in
//! [`burn_megatron`] today (for example
//! `burn_megatron::tensor_parallel::vocab_parallel_cross_entropy`).

#![warn(missing_docs)]
