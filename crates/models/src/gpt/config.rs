//! [`GptConfig`]: every size and variant of the GPT family, validated once.

use burn::config::Config;
use burn_megatron::parallel::{Layout, ModelDims};
use burn_megatron::pipeline::LayerSplit;
use burn_megatron::{Error, Result};

/// How token positions enter the model.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum PositionEmbedding {
    /// A learned table added to the token embeddings (GPT-2).
    Learned,
    /// Rotary embeddings on queries and keys, HF's rotate-half convention (Llama).
    Rotary {
        /// The frequency base (`rope_theta`).
        base: f64,
    },
    /// Attention biases linear in the key position (BLOOM).
    Alibi,
}

/// The normalization of the residual stream.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum NormKind {
    /// LayerNorm with weight and bias.
    LayerNorm,
    /// RMSNorm with weight only.
    RmsNorm,
}

/// Which layers full activation recompute runs again (Megatron's `--recompute-method`).
#[derive(Config, Debug, PartialEq, Copy)]
pub enum RecomputeMethod {
    /// Every layer, in groups of `recompute_num_layers` (only each group's input is kept).
    Uniform,
    /// Only the first `recompute_num_layers` layers of each model chunk, one by one; the
    /// others keep their activations.
    Block,
}

/// The activation of the feed-forward block.
#[derive(Config, Debug, PartialEq, Copy)]
pub enum Activation {
    /// Exact GeLU (erf).
    Gelu,
    /// GeLU with the tanh approximation (GPT-2's `gelu_new`).
    GeluTanh,
    /// SiLU-gated linear unit: `down(silu(gate(x)) * up(x))` (Llama).
    SwiGlu,
}

/// A GPT: decoder-only transformer with pre-normalization.
#[derive(Config, Debug)]
pub struct GptConfig {
    /// Vocabulary size (before padding).
    pub vocab_size: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value head groups: `heads` for multi-head, 1 for multi-query, between for
    /// grouped-query attention. `None` means `heads`.
    #[config(default = "None")]
    pub query_groups: Option<usize>,
    /// Hidden size of the feed-forward block. `None` means `4 * hidden`.
    #[config(default = "None")]
    pub ffn_hidden: Option<usize>,
    /// Longest sequence (size of a learned position table).
    #[config(default = 1024)]
    pub max_seq_len: usize,
    /// How positions enter the model.
    #[config(default = "PositionEmbedding::Learned")]
    pub position: PositionEmbedding,
    /// Normalization.
    #[config(default = "NormKind::LayerNorm")]
    pub norm: NormKind,
    /// Epsilon of the norms.
    #[config(default = 1e-5)]
    pub norm_eps: f64,
    /// Feed-forward activation.
    #[config(default = "Activation::GeluTanh")]
    pub activation: Activation,
    /// Linear layers have biases.
    #[config(default = true)]
    pub bias: bool,
    /// The output layer shares the token embedding table.
    #[config(default = true)]
    pub tied_embeddings: bool,
    /// A norm right after the embeddings (BLOOM).
    #[config(default = false)]
    pub embedding_norm: bool,
    /// Dropout on the embeddings and on the outputs of attention and feed-forward blocks
    /// (training only).
    #[config(default = 0.0)]
    pub hidden_dropout: f64,
    /// Dropout on the attention probabilities (training only).
    #[config(default = 0.0)]
    pub attention_dropout: f64,
    /// Layers of each virtual pipeline stage, in virtual-stage order (stage 0 chunk 0,
    /// stage 1 chunk 0, ...). `None` splits them evenly.
    #[config(default = "None")]
    pub pipeline_layers: Option<Vec<usize>>,
    /// Selective activation recomputation: core attention keeps only Q, K and V and
    /// recomputes the `[batch, heads, seq, seq]` probabilities in its backward.
    #[config(default = true)]
    pub recompute_attention: bool,
    /// Full activation recomputation (Megatron's `--recompute-granularity full`): layers
    /// whose forward training runs again in the backward, keeping only their input (see
    /// `recompute_method`). 0 (the default) keeps every layer's activations.
    #[config(default = 0)]
    pub recompute_num_layers: usize,
    /// How `recompute_num_layers` chooses the recomputed layers.
    #[config(default = "RecomputeMethod::Uniform")]
    pub recompute_method: RecomputeMethod,
    /// Split the residual stream along the sequence across tensor-parallel ranks.
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// Pad the vocabulary to a multiple of this times the tensor-parallel size.
    #[config(default = 128)]
    pub make_vocab_size_divisible_by: usize,
    /// Standard deviation of the initial weights.
    #[config(default = 0.02)]
    pub init_std: f64,
    /// Seed of the initial weights (the same model whatever the parallel layout).
    #[config(default = 1234)]
    pub seed: u64,
}

impl GptConfig {
    /// GPT-2 small (124M): 12 layers, hidden 768, 12 heads.
    pub fn gpt2_124m() -> Self {
        Self::new(50257, 768, 12, 12)
    }

    /// GPT-2 medium (355M): 24 layers, hidden 1024, 16 heads.
    pub fn gpt2_355m() -> Self {
        Self::new(50257, 1024, 24, 16)
    }

    /// GPT-2 large (774M): 36 layers, hidden 1280, 20 heads.
    pub fn gpt2_774m() -> Self {
        Self::new(50257, 1280, 36, 20)
    }

    /// GPT-2 XL (1.5B): 48 layers, hidden 1600, 25 heads.
    pub fn gpt2_1_5b() -> Self {
        Self::new(50257, 1600, 48, 25)
    }

    /// The preset of a name: `gpt2-124m`, `gpt2-355m`, `gpt2-774m`, `gpt2-1.5b`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` listing the names for an unknown one.
    pub fn preset(name: &str) -> Result<Self> {
        match name {
            "gpt2-124m" => Ok(Self::gpt2_124m()),
            "gpt2-355m" => Ok(Self::gpt2_355m()),
            "gpt2-774m" => Ok(Self::gpt2_774m()),
            "gpt2-1.5b" => Ok(Self::gpt2_1_5b()),
            other => Err(Error::InvalidConfig(format!(
                "unknown model preset `{other}`; choose gpt2-124m, gpt2-355m, gpt2-774m or gpt2-1.5b"
            ))),
        }
    }

    /// The peak learning rate GPT-3's paper trained the model size of preset `name` with
    /// (Brown et al. 2020, table 2.1: 6e-4 at 125M, 3e-4 at 350M, 2.5e-4 at 760M, 2e-4 at
    /// 1.3B); `None` for an unknown name.
    pub fn preset_learning_rate(name: &str) -> Option<f64> {
        match name {
            "gpt2-124m" => Some(6e-4),
            "gpt2-355m" => Some(3e-4),
            "gpt2-774m" => Some(2.5e-4),
            "gpt2-1.5b" => Some(2e-4),
            _ => None,
        }
    }

    /// Key/value head groups.
    pub fn groups(&self) -> usize {
        self.query_groups.unwrap_or(self.heads)
    }

    /// Hidden size of the feed-forward block.
    pub fn ffn(&self) -> usize {
        self.ffn_hidden.unwrap_or(4 * self.hidden)
    }

    /// Size of one attention head.
    pub fn head_dim(&self) -> usize {
        self.hidden / self.heads
    }

    /// The sizes a parallel layout must divide.
    pub fn dims(&self) -> ModelDims {
        ModelDims {
            hidden: self.hidden,
            heads: self.heads,
            query_groups: self.groups(),
            ffn_hidden: self.ffn(),
            layers: self.layers,
            vocab: self.vocab_size,
        }
    }

    /// Checks the configuration and that `layout` can split it.
    ///
    /// # Errors
    ///
    /// `InvalidLayout` or `InvalidConfig` naming the setting and the fix.
    pub fn check(&self, layout: &Layout) -> Result<()> {
        for (size, name) in [
            (self.hidden, "hidden size"),
            (self.heads, "attention heads"),
            (self.max_seq_len, "sequence length"),
        ] {
            if size == 0 {
                return Err(Error::InvalidConfig(format!(
                    "the {name} must be at least 1"
                )));
            }
        }
        if !(self.init_std.is_finite() && self.init_std > 0.0) {
            return Err(Error::InvalidConfig(format!(
                "the initial weights' standard deviation {} must be above 0, such as 0.02",
                self.init_std
            )));
        }
        if let PositionEmbedding::Rotary { base } = self.position
            && !(base.is_finite() && base > 1.0)
        {
            return Err(Error::InvalidConfig(format!(
                "the rotary base {base} must be above 1, such as 10000"
            )));
        }
        layout.check_tensor_parallel(&self.dims())?;
        LayerSplit::new(self.layers, layout, self.pipeline_layers.as_deref())?;
        if matches!(self.position, PositionEmbedding::Rotary { .. })
            && !self.head_dim().is_multiple_of(2)
        {
            return Err(Error::InvalidConfig(format!(
                "rotary positions need an even head size, got {}",
                self.head_dim()
            )));
        }
        for (rate, name) in [
            (self.hidden_dropout, "hidden_dropout"),
            (self.attention_dropout, "attention_dropout"),
        ] {
            if !(0.0..1.0).contains(&rate) {
                return Err(Error::InvalidConfig(format!(
                    "{name} {rate} must be in [0, 1)"
                )));
            }
        }
        Ok(())
    }

    /// Parameters of the model (vocabulary unpadded), for FLOP and memory estimates.
    pub fn num_params(&self) -> usize {
        let (h, f, v) = (self.hidden, self.ffn(), self.vocab_size);
        let kv = 2 * self.groups() * self.head_dim();
        let bias = usize::from(self.bias);
        let attention = h * (h + kv) + bias * (h + kv) + h * h + bias * h;
        let mlp_in = if self.activation == Activation::SwiGlu {
            2 * f
        } else {
            f
        };
        let mlp = h * mlp_in + bias * mlp_in + f * h + bias * h;
        let norm = if self.norm == NormKind::LayerNorm {
            2 * h
        } else {
            h
        };
        let positions = if self.position == PositionEmbedding::Learned {
            self.max_seq_len * h
        } else {
            0
        };
        let output = if self.tied_embeddings { 0 } else { v * h };
        let embedding_norm = if self.embedding_norm { norm } else { 0 };
        v * h
            + positions
            + embedding_norm
            + self.layers * (attention + mlp + 2 * norm)
            + norm
            + output
    }
}
