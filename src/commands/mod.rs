//! The subcommands of `burn-megatron`.

pub mod inspect;
pub mod layout;
pub mod preprocess;
