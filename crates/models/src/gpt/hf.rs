//! Hugging Face checkpoints of the GPT family: `gpt2`, `llama`, `bloom` and
//! `gpt_bigcode`, from `config.json` and `model.safetensors` (or shards listed in
//! `model.safetensors.index.json`), mapped to [`GptConfig`] and to the canonical full
//! tensors that [`GptModel::build`] splits for any tensor-parallel size.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::tensor::TensorData;
use burn::tensor::backend::Backend;
use burn_megatron::parallel::ParallelContext;
use burn_megatron::{Error, Result};
use serde_json::Value;

use super::config::{Activation, GptConfig, NormKind, PositionEmbedding};
use super::model::GptModel;
use super::weights::Weights;

/// The model families this module reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Family {
    /// `gpt2`: learned positions, LayerNorm, tanh GeLU, Conv1D weights, tied head.
    Gpt2,
    /// `llama`: rotary positions, RMSNorm, SwiGLU, grouped-query attention.
    Llama,
    /// `bloom`: ALiBi, embedding LayerNorm, per-head fused QKV.
    Bloom,
    /// `gpt_bigcode`: multi-query attention, fused QKV.
    GptBigCode,
}

/// An opened checkpoint: its configuration and the files holding each tensor.
pub struct HfCheckpoint {
    directory: PathBuf,
    config: Value,
    family: Family,
    files: Vec<memmap2::Mmap>,
    /// Tensor name to index in `files`.
    locations: HashMap<String, usize>,
}

fn invalid(directory: &Path, what: String) -> Error {
    Error::InvalidData(format!("{}: {what}", directory.display()))
}

fn map(path: &Path) -> Result<memmap2::Mmap> {
    let file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    // Safety: read-only map of a checkpoint nobody writes while we load it; safetensors
    // checks every offset against the map's length.
    unsafe { memmap2::Mmap::map(&file) }.map_err(|e| Error::io(path, e))
}

impl HfCheckpoint {
    /// Opens the checkpoint in `directory`.
    ///
    /// # Errors
    ///
    /// When `config.json` or the weights are missing or malformed, or the model type is
    /// not one of the GPT families.
    pub fn open(directory: impl AsRef<Path>) -> Result<Self> {
        let directory = directory.as_ref().to_path_buf();
        let config_path = directory.join("config.json");
        let text = std::fs::read_to_string(&config_path).map_err(|e| Error::io(&config_path, e))?;
        let config: Value = serde_json::from_str(&text)
            .map_err(|e| invalid(&config_path, format!("not JSON: {e}")))?;
        let model_type = config["model_type"].as_str();
        let Some(family) = model_type.and_then(Family::from_model_type) else {
            return Err(invalid(
                &config_path,
                format!(
                    "model_type {model_type:?} is not a GPT family burn-megatron reads (gpt2, \
                     llama, bloom, gpt_bigcode)"
                ),
            ));
        };
        let index_path = directory.join("model.safetensors.index.json");
        let shard_names: Vec<String> = if index_path.exists() {
            let text =
                std::fs::read_to_string(&index_path).map_err(|e| Error::io(&index_path, e))?;
            let index: Value = serde_json::from_str(&text)
                .map_err(|e| invalid(&index_path, format!("not JSON: {e}")))?;
            let map = index["weight_map"]
                .as_object()
                .ok_or_else(|| invalid(&index_path, "no weight_map".to_string()))?;
            let mut names: Vec<String> = map
                .values()
                .filter_map(|v| v.as_str().map(String::from))
                .collect();
            names.sort();
            names.dedup();
            names
        } else {
            vec!["model.safetensors".to_string()]
        };
        let mut files = Vec::new();
        let mut locations = HashMap::new();
        for name in shard_names {
            let path = directory.join(&name);
            let bytes = map(&path)?;
            let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes)
                .map_err(|e| invalid(&path, format!("not safetensors: {e}")))?;
            for tensor in metadata.tensors().keys() {
                locations.insert(tensor.clone(), files.len());
            }
            files.push(bytes);
        }
        Ok(Self {
            directory,
            config,
            family,
            files,
            locations,
        })
    }

    /// The model family.
    pub fn family(&self) -> Family {
        self.family
    }

    /// The checkpoint's `config.json`.
    pub fn config_json(&self) -> &Value {
        &self.config
    }

    /// The checkpoint's directory.
    pub fn directory(&self) -> &Path {
        &self.directory
    }

    /// Tensor `name` as f32 data, whatever its stored float type.
    ///
    /// # Errors
    ///
    /// When the tensor is missing or not a float tensor.
    pub fn tensor(&self, name: &str) -> Result<TensorData> {
        let file = *self.locations.get(name).ok_or_else(|| {
            invalid(
                &self.directory,
                format!("the checkpoint has no tensor `{name}`"),
            )
        })?;
        let tensors = safetensors::SafeTensors::deserialize(&self.files[file])
            .map_err(|e| invalid(&self.directory, e.to_string()))?;
        let view = tensors
            .tensor(name)
            .map_err(|e| invalid(&self.directory, e.to_string()))?;
        let bytes = view.data();
        let values: Vec<f32> = match view.dtype() {
            safetensors::Dtype::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect(),
            safetensors::Dtype::F16 => bytes
                .chunks_exact(2)
                .map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            safetensors::Dtype::BF16 => bytes
                .chunks_exact(2)
                .map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => {
                return Err(invalid(
                    &self.directory,
                    format!("tensor `{name}` is {other:?}, not a float"),
                ));
            }
        };
        Ok(TensorData::new(values, view.shape().to_vec()))
    }

    fn usize_field(&self, keys: &[&str]) -> Result<usize> {
        keys.iter()
            .find_map(|key| self.config[*key].as_u64())
            .map(|v| v as usize)
            .ok_or_else(|| {
                invalid(
                    &self.directory,
                    format!("config.json has no {}", keys.join(" or ")),
                )
            })
    }

    fn optional_usize(&self, key: &str) -> Option<usize> {
        self.config[key].as_u64().map(|v| v as usize)
    }

    fn f64_field(&self, key: &str, default: f64) -> f64 {
        self.config[key].as_f64().unwrap_or(default)
    }

    /// The [`GptConfig`] of the checkpoint.
    ///
    /// # Errors
    ///
    /// When a field the family needs is missing or a variant is not supported.
    pub fn gpt_config(&self) -> Result<GptConfig> {
        let vocab = self.usize_field(&["vocab_size"])?;
        let hidden = self.usize_field(&["n_embd", "hidden_size"])?;
        let layers = self.usize_field(&["n_layer", "num_hidden_layers"])?;
        let heads = self.usize_field(&["n_head", "num_attention_heads"])?;
        let tied = self.config["tie_word_embeddings"].as_bool().unwrap_or(true);
        let activation = |name: Option<&str>| match name {
            Some("gelu") => Ok(Activation::Gelu),
            Some("gelu_new" | "gelu_pytorch_tanh" | "gelu_fast") | None => Ok(Activation::GeluTanh),
            Some(other) => Err(invalid(
                &self.directory,
                format!("activation `{other}` is not supported"),
            )),
        };
        let config = GptConfig::new(vocab, hidden, layers, heads).with_tied_embeddings(tied);
        Ok(match self.family {
            Family::Gpt2 | Family::GptBigCode => {
                let multi_query = self.config["multi_query"].as_bool().unwrap_or(false);
                config
                    .with_query_groups(multi_query.then_some(1))
                    .with_ffn_hidden(self.optional_usize("n_inner"))
                    .with_max_seq_len(self.usize_field(&["n_positions"])?)
                    .with_norm_eps(self.f64_field("layer_norm_epsilon", 1e-5))
                    .with_activation(activation(self.config["activation_function"].as_str())?)
            }
            Family::Llama => {
                let bias = self.config["attention_bias"].as_bool().unwrap_or(false);
                if bias != self.config["mlp_bias"].as_bool().unwrap_or(false) {
                    return Err(invalid(
                        &self.directory,
                        "attention_bias and mlp_bias differ, which burn-megatron does not support"
                            .to_string(),
                    ));
                }
                if let Some(head_dim) = self.optional_usize("head_dim")
                    && head_dim * heads != hidden
                {
                    return Err(invalid(
                        &self.directory,
                        format!(
                            "head_dim {head_dim} x {heads} heads != hidden size {hidden}, which burn-megatron does not support"
                        ),
                    ));
                }
                let base = self.config["rope_theta"]
                    .as_f64()
                    .or_else(|| self.config["rope_parameters"]["rope_theta"].as_f64())
                    .unwrap_or(10_000.0);
                config
                    .with_query_groups(self.optional_usize("num_key_value_heads"))
                    .with_ffn_hidden(Some(self.usize_field(&["intermediate_size"])?))
                    .with_max_seq_len(self.usize_field(&["max_position_embeddings"])?)
                    .with_norm(NormKind::RmsNorm)
                    .with_norm_eps(self.f64_field("rms_norm_eps", 1e-6))
                    .with_activation(Activation::SwiGlu)
                    .with_bias(bias)
                    .with_position(PositionEmbedding::Rotary { base })
            }
            Family::Bloom => config
                .with_position(PositionEmbedding::Alibi)
                .with_embedding_norm(true)
                .with_max_seq_len(usize::MAX)
                .with_norm_eps(self.f64_field("layer_norm_epsilon", 1e-5)),
        })
    }

    /// The full tensor of a canonical parameter name (see [`Weights`]).
    ///
    /// # Errors
    ///
    /// When the checkpoint lacks the tensor.
    pub fn canonical(&self, config: &GptConfig, name: &str) -> Result<TensorData> {
        let parts: Vec<&str> = name.split('.').collect();
        let transposed = |hf: &str| self.tensor(hf).map(transpose);
        match (self.family, parts.as_slice()) {
            (Family::Llama, ["embedding"]) => self.tensor("model.embed_tokens.weight"),
            (Family::Bloom, ["embedding"]) => self.tensor("transformer.word_embeddings.weight"),
            (_, ["embedding"]) => self.tensor("transformer.wte.weight"),
            (_, ["positions"]) => self.tensor("transformer.wpe.weight"),
            (_, ["embedding_norm", what]) => {
                self.tensor(&format!("transformer.word_embeddings_layernorm.{what}"))
            }
            (Family::Llama, ["final_norm", what]) => self.tensor(&format!("model.norm.{what}")),
            (_, ["final_norm", what]) => self.tensor(&format!("transformer.ln_f.{what}")),
            // An untied head is `lm_head`; a tied one is the embedding table.
            (family, ["output", "weight"]) => {
                let table = match family {
                    _ if self.locations.contains_key("lm_head.weight") => "lm_head.weight",
                    Family::Llama => "model.embed_tokens.weight",
                    Family::Bloom => "transformer.word_embeddings.weight",
                    _ => "transformer.wte.weight",
                };
                transposed(table)
            }
            (family, ["layers", layer, rest @ ..]) => {
                let (gpt, llama, bloom) = (
                    format!("transformer.h.{layer}"),
                    format!("model.layers.{layer}"),
                    format!("transformer.h.{layer}"),
                );
                match (family, rest) {
                    (Family::Gpt2 | Family::GptBigCode, ["norm1", what]) => {
                        self.tensor(&format!("{gpt}.ln_1.{what}"))
                    }
                    (Family::Gpt2 | Family::GptBigCode, ["norm2", what]) => {
                        self.tensor(&format!("{gpt}.ln_2.{what}"))
                    }
                    (Family::Llama, ["norm1", what]) => {
                        self.tensor(&format!("{llama}.input_layernorm.{what}"))
                    }
                    (Family::Llama, ["norm2", what]) => {
                        self.tensor(&format!("{llama}.post_attention_layernorm.{what}"))
                    }
                    (Family::Bloom, ["norm1", what]) => {
                        self.tensor(&format!("{bloom}.input_layernorm.{what}"))
                    }
                    (Family::Bloom, ["norm2", what]) => {
                        self.tensor(&format!("{bloom}.post_attention_layernorm.{what}"))
                    }
                    (_, ["attention", projection @ ("query" | "key" | "value"), what]) => {
                        let which = ["query", "key", "value"]
                            .iter()
                            .position(|p| p == projection)
                            .expect("matched");
                        self.qkv(config, layer, which, what == &"weight")
                    }
                    (Family::Gpt2, ["attention", "output", what]) => {
                        self.tensor(&format!("{gpt}.attn.c_proj.{what}"))
                    }
                    (Family::Gpt2, ["mlp", "fc1", what]) => {
                        self.tensor(&format!("{gpt}.mlp.c_fc.{what}"))
                    }
                    (Family::Gpt2, ["mlp", "fc2", what]) => {
                        self.tensor(&format!("{gpt}.mlp.c_proj.{what}"))
                    }
                    (family, ["attention", "output", what])
                    | (family, ["mlp", "fc1" | "fc2" | "gate", what]) => {
                        let hf = match (family, rest) {
                            (Family::Llama, ["attention", ..]) => {
                                format!("{llama}.self_attn.o_proj")
                            }
                            (Family::Llama, ["mlp", "fc1", _]) => format!("{llama}.mlp.up_proj"),
                            (Family::Llama, ["mlp", "gate", _]) => format!("{llama}.mlp.gate_proj"),
                            (Family::Llama, ["mlp", "fc2", _]) => format!("{llama}.mlp.down_proj"),
                            (Family::Bloom, ["attention", ..]) => {
                                format!("{bloom}.self_attention.dense")
                            }
                            (Family::Bloom, ["mlp", "fc1", _]) => {
                                format!("{bloom}.mlp.dense_h_to_4h")
                            }
                            (Family::Bloom, ["mlp", "fc2", _]) => {
                                format!("{bloom}.mlp.dense_4h_to_h")
                            }
                            (Family::GptBigCode, ["attention", ..]) => format!("{gpt}.attn.c_proj"),
                            (Family::GptBigCode, ["mlp", "fc1", _]) => format!("{gpt}.mlp.c_fc"),
                            (Family::GptBigCode, ["mlp", "fc2", _]) => format!("{gpt}.mlp.c_proj"),
                            _ => return Err(self.unknown(name)),
                        };
                        match *what {
                            "weight" => transposed(&format!("{hf}.weight")),
                            _ => self.tensor(&format!("{hf}.{what}")),
                        }
                    }
                    _ => Err(self.unknown(name)),
                }
            }
            _ => Err(self.unknown(name)),
        }
    }

    fn unknown(&self, name: &str) -> Error {
        invalid(
            &self.directory,
            format!("no {:?} tensor maps to parameter `{name}`", self.family),
        )
    }

    /// The query (0), key (1) or value (2) projection of a layer, `[hidden, width]` for
    /// the weight, `[width]` for the bias, from the family's fused or separate layout.
    fn qkv(
        &self,
        config: &GptConfig,
        layer: &str,
        which: usize,
        weight: bool,
    ) -> Result<TensorData> {
        let (hidden, head_dim, heads, groups) = (
            config.hidden,
            config.head_dim(),
            config.heads,
            config.groups(),
        );
        let suffix = if weight { "weight" } else { "bias" };
        // Rows (output features) of the projection inside the HF tensor, in order.
        let (hf_name, rows, hf_transposed): (String, Vec<usize>, bool) = match self.family {
            Family::Llama => {
                let projection = ["q_proj", "k_proj", "v_proj"][which];
                let count = if which == 0 { heads } else { groups } * head_dim;
                (
                    format!("model.layers.{layer}.self_attn.{projection}.{suffix}"),
                    (0..count).collect(),
                    true,
                )
            }
            Family::Gpt2 => {
                // Conv1D [hidden, 3 * hidden]: columns Q | K | V.
                let start = which * hidden;
                (
                    format!("transformer.h.{layer}.attn.c_attn.{suffix}"),
                    (start..start + hidden).collect(),
                    false,
                )
            }
            Family::GptBigCode => {
                // Linear [hidden + 2 * kv, hidden]: rows Q, then K, then V.
                let kv = groups * head_dim;
                let (start, count) = [(0, hidden), (hidden, kv), (hidden + kv, kv)][which];
                (
                    format!("transformer.h.{layer}.attn.c_attn.{suffix}"),
                    (start..start + count).collect(),
                    true,
                )
            }
            Family::Bloom => {
                // Linear [3 * hidden, hidden]: for each head, its q, k, v rows.
                let rows = (0..heads)
                    .flat_map(|h| {
                        let start = (3 * h + which) * head_dim;
                        start..start + head_dim
                    })
                    .collect();
                (
                    format!("transformer.h.{layer}.self_attention.query_key_value.{suffix}"),
                    rows,
                    true,
                )
            }
        };
        let data = self.tensor(&hf_name)?;
        let values = data
            .to_vec::<f32>()
            .map_err(|e| invalid(&self.directory, format!("{e:?}")))?;
        if !weight {
            return Ok(TensorData::new(
                rows.iter().map(|&r| values[r]).collect::<Vec<f32>>(),
                [rows.len()],
            ));
        }
        let shape = data.shape.as_slice().to_vec();
        // Output features along rows (transposed HF Linear) or columns (Conv1D).
        let inputs = if hf_transposed { shape[1] } else { shape[0] };
        let mut out = Vec::with_capacity(inputs * rows.len());
        for i in 0..inputs {
            for &r in &rows {
                out.push(if hf_transposed {
                    values[r * inputs + i]
                } else {
                    values[i * shape[1] + r]
                });
            }
        }
        Ok(TensorData::new(out, [inputs, rows.len()]))
    }

    /// The model of this checkpoint, split for the rank of `ctx`.
    ///
    /// # Errors
    ///
    /// As [`gpt_config`](Self::gpt_config) and [`GptModel::build`].
    pub fn load<B: Backend>(
        &self,
        ctx: &ParallelContext,
        device: &B::Device,
    ) -> Result<(GptConfig, GptModel<B>)> {
        let config = self.gpt_config()?;
        let get = |name: &str| self.canonical(&config, name);
        let model = GptModel::build(&config, ctx, &Weights::Full(&get), device)?;
        Ok((config, model))
    }
}

/// `[rows, columns]` to `[columns, rows]`.
fn transpose(data: TensorData) -> TensorData {
    let shape = data.shape.as_slice().to_vec();
    let values = data
        .to_vec::<f32>()
        .expect("checkpoint tensors are read as f32");
    let (rows, columns) = (shape[0], shape[1]);
    let mut out = vec![0f32; values.len()];
    for r in 0..rows {
        for c in 0..columns {
            out[c * rows + r] = values[r * columns + c];
        }
    }
    TensorData::new(out, [columns, rows])
}
