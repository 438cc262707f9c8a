//! # burn-megatron-models
//!
//! GPT (GPT-2, Llama-style, ALiBi, multi-query and grouped-query attention), BERT and T5
//! model families built from the parallel layers of [`burn_megatron::tensor_parallel`],
//! with Hugging Face safetensors import and export per family.
//!
//! The models arrive with the GPT/train issue; this crate holds the workspace place for
//! them so that dependents can be wired up now.

#![warn(missing_docs)]

pub use burn_megatron;
