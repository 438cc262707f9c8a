//! The GPT family: GPT-2, Llama-style (rotary, RMSNorm, SwiGLU, GQA), BLOOM (ALiBi) and
//! GPTBigCode (multi-query) from one configurable model.

mod config;
mod export;
pub mod hf;
mod hf_export;
mod layers;
mod model;
mod native;
mod step;
mod weights;

pub use config::{Activation, GptConfig, NormKind, PositionEmbedding, RecomputeMethod};
pub use hf_export::{hf_config_json, hf_tensors, write_hf};
pub use layers::{DropoutPass, Mlp, Norm, SelfAttention, TransformerLayer, alibi_slopes};
pub use model::{GptModel, StageInput};
pub use native::{checkpoint_tensor, hf_config_of};
pub use step::{GptStep, batch_tensors};
pub use weights::{FullTensors, Weights};
