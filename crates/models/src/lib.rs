//! # burn-megatron-models
//!
//! Model families built from the parallel layers of [`burn_megatron::tensor_parallel`],
//! with Hugging Face safetensors import per family. Today: the GPT family ([`gpt`]).

#![warn(missing_docs)]

pub mod gpt;
