//! The subcommands of `burn-megatron`.

pub mod bench;
pub mod bench_kernels;
pub mod bench_ops;
pub mod convert;
pub mod forward;
pub mod inspect;
pub mod launch;
pub mod layout;
pub mod preprocess;
pub mod train;
