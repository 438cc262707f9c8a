//! Writing a GPT model as a Hugging Face checkpoint: the family's tensor names, fused QKV
//! layouts and transposed weights from the canonical full tensors, `config.json`, and
//! safetensors files sharded by size with `model.safetensors.index.json`. The inverse of
//! [`HfCheckpoint::canonical`](super::hf::HfCheckpoint::canonical).

use std::path::Path;

use burn::tensor::TensorData;
use burn_megatron::{Error, Result};
use serde_json::{Value, json};

use super::config::{Activation, GptConfig, NormKind, PositionEmbedding};
use super::hf::Family;
use super::weights::FullTensors;

impl Family {
    /// The family a model is written as: the one of its original `config.json` when it
    /// came from Hugging Face, else the one its variants match.
    ///
    /// # Errors
    ///
    /// When the model's combination of variants has no Hugging Face family.
    pub fn of(config: &GptConfig, hf_config: Option<&Value>) -> Result<Self> {
        if let Some(model_type) = hf_config.and_then(|hf| hf["model_type"].as_str()) {
            return Family::from_model_type(model_type).ok_or_else(|| {
                Error::InvalidConfig(format!("model_type {model_type:?} is not a GPT family"))
            });
        }
        let learned = config.position == PositionEmbedding::Learned;
        let gelu = matches!(config.activation, Activation::Gelu | Activation::GeluTanh);
        let layer_norm = config.norm == NormKind::LayerNorm;
        match config.position {
            PositionEmbedding::Rotary { .. }
                if config.norm == NormKind::RmsNorm
                    && config.activation == Activation::SwiGlu
                    && !config.embedding_norm =>
            {
                Ok(Family::Llama)
            }
            PositionEmbedding::Alibi
                if layer_norm && gelu && config.embedding_norm && config.tied_embeddings =>
            {
                Ok(Family::Bloom)
            }
            _ if learned && layer_norm && gelu && !config.embedding_norm && config.bias => {
                match config.groups() {
                    1 if config.heads > 1 => Ok(Family::GptBigCode),
                    groups if groups == config.heads => Ok(Family::Gpt2),
                    _ => Err(no_family(config)),
                }
            }
            _ => Err(no_family(config)),
        }
    }

    /// The family of a `model_type` of `config.json`.
    pub fn from_model_type(model_type: &str) -> Option<Self> {
        match model_type {
            "gpt2" => Some(Family::Gpt2),
            "llama" => Some(Family::Llama),
            "bloom" => Some(Family::Bloom),
            "gpt_bigcode" => Some(Family::GptBigCode),
            _ => None,
        }
    }
}

fn no_family(config: &GptConfig) -> Error {
    Error::InvalidConfig(format!(
        "this model ({:?} positions, {:?}, {:?}, {} heads in {} groups, embedding norm {}, \
         biases {}) matches no Hugging Face family burn-megatron writes: gpt2 (learned, \
         LayerNorm, GeLU), gpt_bigcode (the same with one key/value group), llama (rotary, \
         RMSNorm, SwiGLU) or bloom (ALiBi, embedding LayerNorm, tied)",
        config.position,
        config.norm,
        config.activation,
        config.heads,
        config.groups(),
        config.embedding_norm,
        config.bias
    ))
}

/// A `config.json` for `config` as `family`.
pub fn hf_config_json(config: &GptConfig, family: Family) -> Value {
    let gelu = match config.activation {
        Activation::Gelu => "gelu",
        _ => "gelu_new",
    };
    match family {
        Family::Gpt2 => json!({
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": config.vocab_size,
            "n_embd": config.hidden,
            "n_layer": config.layers,
            "n_head": config.heads,
            "n_positions": config.max_seq_len,
            "n_inner": config.ffn_hidden,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": gelu,
            "tie_word_embeddings": config.tied_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }),
        Family::GptBigCode => json!({
            "architectures": ["GPTBigCodeForCausalLM"],
            "model_type": "gpt_bigcode",
            "vocab_size": config.vocab_size,
            "n_embd": config.hidden,
            "n_layer": config.layers,
            "n_head": config.heads,
            "n_positions": config.max_seq_len,
            "n_inner": config.ffn_hidden,
            "multi_query": true,
            "layer_norm_epsilon": config.norm_eps,
            "activation_function": if gelu == "gelu" { "gelu" } else { "gelu_pytorch_tanh" },
            "tie_word_embeddings": config.tied_embeddings,
            "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
        }),
        Family::Llama => {
            let base = match config.position {
                PositionEmbedding::Rotary { base } => base,
                _ => 10_000.0,
            };
            json!({
                "architectures": ["LlamaForCausalLM"],
                "model_type": "llama",
                "vocab_size": config.vocab_size,
                "hidden_size": config.hidden,
                "intermediate_size": config.ffn(),
                "num_hidden_layers": config.layers,
                "num_attention_heads": config.heads,
                "num_key_value_heads": config.groups(),
                "max_position_embeddings": config.max_seq_len,
                "rms_norm_eps": config.norm_eps,
                "rope_theta": base,
                "hidden_act": "silu",
                "attention_bias": config.bias,
                "mlp_bias": config.bias,
                "tie_word_embeddings": config.tied_embeddings,
            })
        }
        Family::Bloom => json!({
            "architectures": ["BloomForCausalLM"],
            "model_type": "bloom",
            "vocab_size": config.vocab_size,
            "hidden_size": config.hidden,
            "n_layer": config.layers,
            "n_head": config.heads,
            "layer_norm_epsilon": config.norm_eps,
            "tie_word_embeddings": true,
            "hidden_dropout": 0.0, "attention_dropout": 0.0,
        }),
    }
}

/// A row-major matrix on the host.
struct Matrix {
    rows: usize,
    columns: usize,
    values: Vec<f32>,
}

impl Matrix {
    fn of(data: TensorData) -> Result<Self> {
        let shape = data.shape.as_slice().to_vec();
        let (rows, columns) = match shape.as_slice() {
            [n] => (1, *n),
            [r, c] => (*r, *c),
            other => {
                return Err(Error::InvalidData(format!(
                    "expected a vector or matrix, got shape {other:?}"
                )));
            }
        };
        let values = data
            .convert::<f32>()
            .into_vec::<f32>()
            .map_err(|e| Error::InvalidData(format!("{e:?}")))?;
        Ok(Self {
            rows,
            columns,
            values,
        })
    }

    fn transposed(&self) -> Self {
        let mut values = vec![0f32; self.values.len()];
        for r in 0..self.rows {
            for c in 0..self.columns {
                values[c * self.rows + r] = self.values[r * self.columns + c];
            }
        }
        Self {
            rows: self.columns,
            columns: self.rows,
            values,
        }
    }

    /// The columns `blocks` lists (matrix, first column, count), side by side.
    fn columns_of(blocks: &[(&Matrix, usize, usize)]) -> Self {
        let rows = blocks.first().map_or(0, |(m, _, _)| m.rows);
        let columns = blocks.iter().map(|(_, _, n)| n).sum();
        let mut values = Vec::with_capacity(rows * columns);
        for r in 0..rows {
            for (matrix, start, count) in blocks {
                let at = r * matrix.columns + start;
                values.extend_from_slice(&matrix.values[at..at + count]);
            }
        }
        Self {
            rows,
            columns,
            values,
        }
    }

    fn matrix(self) -> TensorData {
        TensorData::new(self.values, [self.rows, self.columns])
    }

    fn vector(self) -> TensorData {
        TensorData::new(self.values, [self.columns])
    }
}

/// The Hugging Face tensors of `family` for the model `config`, from its canonical full
/// tensors, in the family's order.
///
/// # Errors
///
/// When a canonical tensor is missing.
pub fn hf_tensors(
    config: &GptConfig,
    family: Family,
    get: &FullTensors<'_>,
) -> Result<Vec<(String, TensorData)>> {
    let mut out: Vec<(String, TensorData)> = Vec::new();
    let matrix = |name: &str| get(name).and_then(Matrix::of);
    let linear = family != Family::Gpt2; // Conv1D keeps [in, out]; Linear is [out, in].
    let weight = |m: Matrix| {
        if linear {
            m.transposed().matrix()
        } else {
            m.matrix()
        }
    };

    let (embedding, positions) = match family {
        Family::Llama => ("model.embed_tokens.weight", None),
        Family::Bloom => ("transformer.word_embeddings.weight", None),
        _ => ("transformer.wte.weight", Some("transformer.wpe.weight")),
    };
    out.push((embedding.into(), get("embedding")?));
    if let Some(positions) = positions {
        out.push((positions.into(), get("positions")?));
    }
    if config.embedding_norm {
        for what in ["weight", "bias"] {
            out.push((
                format!("transformer.word_embeddings_layernorm.{what}"),
                get(&format!("embedding_norm.{what}"))?,
            ));
        }
    }
    let norm_parts: &[&str] = match config.norm {
        NormKind::LayerNorm => &["weight", "bias"],
        NormKind::RmsNorm => &["weight"],
    };
    let (head_dim, heads) = (config.head_dim(), config.heads);
    for layer in 0..config.layers {
        let canonical = |rest: &str| format!("layers.{layer}.{rest}");
        let (prefix, norm1, norm2) = match family {
            Family::Llama => (
                format!("model.layers.{layer}"),
                "input_layernorm",
                "post_attention_layernorm",
            ),
            Family::Bloom => (
                format!("transformer.h.{layer}"),
                "input_layernorm",
                "post_attention_layernorm",
            ),
            _ => (format!("transformer.h.{layer}"), "ln_1", "ln_2"),
        };
        for (hf, ours) in [(norm1, "norm1"), (norm2, "norm2")] {
            for what in norm_parts {
                out.push((
                    format!("{prefix}.{hf}.{what}"),
                    get(&canonical(&format!("{ours}.{what}")))?,
                ));
            }
        }

        // Query, key and value: separate (Llama) or fused in the family's order.
        let parts = ["query", "key", "value"];
        let mut suffixes = vec!["weight"];
        if config.bias {
            suffixes.push("bias");
        }
        for suffix in suffixes {
            let [q, k, v] = parts.map(|p| matrix(&canonical(&format!("attention.{p}.{suffix}"))));
            let (q, k, v) = (q?, k?, v?);
            let finish = |m: Matrix| match suffix {
                "weight" => weight(m),
                _ => m.vector(),
            };
            match family {
                Family::Llama => {
                    for (projection, m) in ["q_proj", "k_proj", "v_proj"].into_iter().zip([q, k, v])
                    {
                        out.push((
                            format!("{prefix}.self_attn.{projection}.{suffix}"),
                            finish(m),
                        ));
                    }
                }
                Family::Gpt2 | Family::GptBigCode => {
                    let fused = Matrix::columns_of(&[
                        (&q, 0, q.columns),
                        (&k, 0, k.columns),
                        (&v, 0, v.columns),
                    ]);
                    out.push((format!("{prefix}.attn.c_attn.{suffix}"), finish(fused)));
                }
                Family::Bloom => {
                    let blocks: Vec<(&Matrix, usize, usize)> = (0..heads)
                        .flat_map(|h| {
                            [
                                (&q, h * head_dim, head_dim),
                                (&k, h * head_dim, head_dim),
                                (&v, h * head_dim, head_dim),
                            ]
                        })
                        .collect();
                    out.push((
                        format!("{prefix}.self_attention.query_key_value.{suffix}"),
                        finish(Matrix::columns_of(&blocks)),
                    ));
                }
            }
        }

        let mut linears = vec![(
            "attention.output",
            match family {
                Family::Llama => "self_attn.o_proj",
                Family::Bloom => "self_attention.dense",
                _ => "attn.c_proj",
            },
        )];
        match family {
            Family::Llama => linears.extend([
                ("mlp.gate", "mlp.gate_proj"),
                ("mlp.fc1", "mlp.up_proj"),
                ("mlp.fc2", "mlp.down_proj"),
            ]),
            Family::Bloom => linears.extend([
                ("mlp.fc1", "mlp.dense_h_to_4h"),
                ("mlp.fc2", "mlp.dense_4h_to_h"),
            ]),
            _ => linears.extend([("mlp.fc1", "mlp.c_fc"), ("mlp.fc2", "mlp.c_proj")]),
        }
        for (ours, hf) in linears {
            out.push((
                format!("{prefix}.{hf}.weight"),
                weight(matrix(&canonical(&format!("{ours}.weight")))?),
            ));
            if config.bias {
                out.push((
                    format!("{prefix}.{hf}.bias"),
                    get(&canonical(&format!("{ours}.bias")))?,
                ));
            }
        }
    }
    let final_norm = match family {
        Family::Llama => "model.norm",
        _ => "transformer.ln_f",
    };
    for what in norm_parts {
        out.push((
            format!("{final_norm}.{what}"),
            get(&format!("final_norm.{what}"))?,
        ));
    }
    if !config.tied_embeddings {
        out.push((
            "lm_head.weight".into(),
            matrix("output.weight")?.transposed().matrix(),
        ));
    }
    Ok(out)
}

/// Bytes of a tensor's f32 data.
fn f32_bytes(data: &TensorData) -> Result<Vec<u8>> {
    let values = data
        .clone()
        .convert::<f32>()
        .into_vec::<f32>()
        .map_err(|e| Error::InvalidData(format!("{e:?}")))?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

/// Writes `tensors` as Hugging Face safetensors into `dir` with `config_json`: one
/// `model.safetensors`, or shards of at most `max_shard_bytes` (a tensor larger than
/// that gets a shard of its own) named `model-0000i-of-0000n.safetensors` with
/// `model.safetensors.index.json`. Returns the files written.
///
/// # Errors
///
/// When a file cannot be written.
pub fn write_hf(
    dir: &Path,
    config_json: &Value,
    tensors: &[(String, TensorData)],
    max_shard_bytes: u64,
) -> Result<Vec<String>> {
    std::fs::create_dir_all(dir).map_err(|e| Error::io(dir, e))?;
    let mut shards: Vec<Vec<usize>> = vec![Vec::new()];
    let mut size = 0u64;
    for (index, (_, data)) in tensors.iter().enumerate() {
        let bytes = data.num_elements() as u64 * 4;
        if size > 0 && size + bytes > max_shard_bytes {
            shards.push(Vec::new());
            size = 0;
        }
        shards.last_mut().expect("a shard").push(index);
        size += bytes;
    }
    let count = shards.len();
    let names: Vec<String> = match count {
        1 => vec!["model.safetensors".to_string()],
        _ => (1..=count)
            .map(|i| format!("model-{i:05}-of-{count:05}.safetensors"))
            .collect(),
    };
    let metadata = Some(std::collections::HashMap::from([(
        "format".to_string(),
        "pt".to_string(),
    )]));
    let mut weight_map = serde_json::Map::new();
    let mut total = 0u64;
    for (shard, name) in shards.iter().zip(&names) {
        let bytes = shard
            .iter()
            .map(|&i| f32_bytes(&tensors[i].1))
            .collect::<Result<Vec<_>>>()?;
        let views = shard
            .iter()
            .zip(&bytes)
            .map(|(&i, data)| {
                let (tensor_name, tensor) = &tensors[i];
                safetensors::tensor::TensorView::new(
                    safetensors::Dtype::F32,
                    tensor.shape.as_slice().to_vec(),
                    data,
                )
                .map(|view| (tensor_name.clone(), view))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::InvalidData(format!("{name}: {e}")))?;
        for &i in shard {
            weight_map.insert(tensors[i].0.clone(), Value::String(name.clone()));
            total += tensors[i].1.num_elements() as u64 * 4;
        }
        let path = dir.join(name);
        safetensors::serialize_to_file(views, metadata.clone(), &path)
            .map_err(|e| Error::InvalidData(format!("{}: {e}", path.display())))?;
    }
    let mut written = names.clone();
    if count > 1 {
        let index = json!({"metadata": {"total_size": total}, "weight_map": weight_map});
        let path = dir.join("model.safetensors.index.json");
        let text = serde_json::to_string_pretty(&index).expect("JSON");
        std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
        written.push("model.safetensors.index.json".to_string());
    }
    let path = dir.join("config.json");
    let text = serde_json::to_string_pretty(config_json).expect("JSON");
    std::fs::write(&path, text).map_err(|e| Error::io(&path, e))?;
    written.push("config.json".to_string());
    Ok(written)
}
