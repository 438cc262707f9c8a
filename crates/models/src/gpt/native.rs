//! GPT models in burn-megatron's own distributed checkpoints
//! ([`burn_megatron::checkpoint`]): the description of the model a checkpoint stores, and
//! models built from a checkpoint in any layout.

use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn_megatron::checkpoint::{Checkpoint, StateKind};
use burn_megatron::parallel::ParallelContext;
use burn_megatron::{Error, Result};
use serde_json::{Value, json};

use super::config::GptConfig;
use super::model::GptModel;
use super::weights::Weights;

/// The model family tag of GPT checkpoints.
const FAMILY: &str = "gpt";

impl GptConfig {
    /// The description of the model a checkpoint stores: this configuration and, for a
    /// model that came from Hugging Face, its original `config.json` (written back when
    /// converting to Hugging Face again).
    pub fn checkpoint_json(&self, hf_config: Option<&Value>) -> Value {
        let mut value = json!({
            "family": FAMILY,
            "config": serde_json::to_value(self).expect("a GPT configuration serializes"),
        });
        if let Some(hf) = hf_config {
            value["hf_config"] = hf.clone();
        }
        value
    }

    /// The configuration of the model in `checkpoint`.
    ///
    /// # Errors
    ///
    /// When the checkpoint does not hold a GPT model.
    pub fn of_checkpoint(checkpoint: &Checkpoint) -> Result<Self> {
        let model = &checkpoint.info().model;
        if model["family"].as_str() != Some(FAMILY) {
            return Err(Error::InvalidData(format!(
                "{}: the checkpoint holds no GPT model (model family {})",
                checkpoint.dir().display(),
                model["family"]
            )));
        }
        serde_json::from_value(model["config"].clone()).map_err(|e| {
            Error::InvalidData(format!(
                "{}: the checkpoint's GPT configuration does not parse: {e}",
                checkpoint.dir().display()
            ))
        })
    }
}

/// The original Hugging Face `config.json` of a converted model, if any.
pub fn hf_config_of(checkpoint: &Checkpoint) -> Option<&Value> {
    checkpoint.info().model.get("hf_config")
}

/// The full tensor of parameter `name` in `checkpoint`.
///
/// # Errors
///
/// When the checkpoint lacks it or its pieces do not fit together.
pub fn checkpoint_tensor(checkpoint: &Checkpoint, name: &str) -> Result<TensorData> {
    let (values, shape) = checkpoint.full(StateKind::Param, name)?.ok_or_else(|| {
        Error::InvalidData(format!(
            "{}: no parameter `{name}` in the checkpoint",
            checkpoint.dir().display()
        ))
    })?;
    Ok(TensorData::new(values, shape))
}

impl<B: Backend> GptModel<B> {
    /// This rank's model chunks with the parameters of `checkpoint`, whatever layout
    /// wrote it.
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model, or the checkpoint does not hold it.
    pub fn load_chunks(
        config: &GptConfig,
        checkpoint: &Checkpoint,
        ctx: &ParallelContext,
        device: &B::Device,
    ) -> Result<Vec<Self>> {
        let get = |name: &str| checkpoint_tensor(checkpoint, name);
        Self::build_chunks(config, ctx, &Weights::Full(&get), device)
    }
}
