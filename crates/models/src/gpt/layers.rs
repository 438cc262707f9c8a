//! The blocks of a GPT: norms, self-attention, the feed-forward block, a layer.

use burn::module::{Module, Param};
use burn::tensor::activation::{gelu, gelu_approximate, silu};
use burn::tensor::{Bool, Int, Tensor, TensorData, backend::Backend};
use burn_megatron::Result;
use burn_megatron::ops::{AttentionDropout, CoreAttention, Recompute, linear, linear_param};
use burn_megatron::parallel::{Group, ParallelBackend};
use burn_megatron::tensor_parallel::mappings::{
    copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
};
use burn_megatron::tensor_parallel::{
    ColumnParallelLinear, ColumnParallelLinearConfig, ParamInit, RowParallelLinear,
    RowParallelLinearConfig,
};
use burn_megatron_kernels::{Dropout, Gelu};

use super::config::{Activation, GptConfig, NormKind, PositionEmbedding};
use super::weights::Weights;

/// The dropout of one forward pass: rates and the pass's seed (zero rates: none).
#[derive(Debug, Clone, Copy)]
pub struct DropoutPass {
    /// Rate on block outputs.
    pub hidden: f64,
    /// Rate on attention probabilities.
    pub attention: f64,
    /// Seed of this pass; each site mixes in its own number.
    pub seed: u64,
}

impl DropoutPass {
    /// No dropout.
    pub const OFF: DropoutPass = DropoutPass {
        hidden: 0.0,
        attention: 0.0,
        seed: 0,
    };

    /// The seed of dropout site `site` of this pass.
    pub fn site(&self, site: u64) -> u64 {
        Weights::seed_of(self.seed, &site.to_string())
    }
}

/// LayerNorm or RMSNorm over the last dimension, statistics in fp32.
#[derive(Module, Debug)]
pub struct Norm<B: Backend> {
    /// Scale.
    pub weight: Param<Tensor<B, 1>>,
    /// Shift (LayerNorm only).
    pub bias: Option<Param<Tensor<B, 1>>>,
    epsilon: f64,
}

impl<B: Backend> Norm<B> {
    /// The norm `name` of the configured kind.
    ///
    /// # Errors
    ///
    /// When loading and the checkpoint lacks the tensors.
    pub fn new(
        config: &GptConfig,
        weights: &Weights,
        name: &str,
        device: &B::Device,
    ) -> Result<Self> {
        let width = [config.hidden];
        let weight = weights.whole(&format!("{name}.weight"), width, ParamInit::Ones, device)?;
        let bias = match config.norm {
            NormKind::LayerNorm => {
                Some(weights.whole(&format!("{name}.bias"), width, ParamInit::Zeros, device)?)
            }
            NormKind::RmsNorm => None,
        };
        Ok(Self {
            weight: Param::from_tensor(weight),
            bias: bias.map(Param::from_tensor),
            epsilon: config.norm_eps,
        })
    }
}

impl<B: ParallelBackend> Norm<B> {
    /// Normalizes `x` over its last dimension (statistics in fp32; one fused kernel with
    /// its backward on CUDA, [`FusedKernels::norm`]).
    pub fn forward<const D: usize>(&self, x: Tensor<B, D>) -> Tensor<B, D> {
        let bias = self.bias.as_ref().map(Param::val);
        B::norm(x, self.weight.val(), bias, self.epsilon)
    }
}

/// Multi-head, grouped-query or multi-query self-attention with causal masking, split by
/// heads across the tensor-parallel ranks.
///
/// Each rank holds the query columns of its heads. Key/value groups are split the same
/// way when the tensor-parallel size divides them; otherwise (multi-query attention) every
/// rank holds all of them and their gradients are summed over the group.
#[derive(Module, Debug)]
pub struct SelfAttention<B: Backend> {
    /// Query projection of this rank's heads: `[hidden, heads / tp * head_dim]`.
    pub query: Param<Tensor<B, 2>>,
    /// Key projection of this rank's groups (or all groups when replicated).
    pub key: Param<Tensor<B, 2>>,
    /// Value projection, as the key's.
    pub value: Param<Tensor<B, 2>>,
    /// Biases of the three projections.
    pub qkv_bias: Option<[Param<Tensor<B, 1>>; 3]>,
    /// Output projection.
    pub output: RowParallelLinear<B>,
    group: Group,
    heads: usize,
    head_dim: usize,
    /// For each local head, its key/value group among the local ones.
    head_groups: Vec<i64>,
    kv_replicated: bool,
    sequence_parallel: bool,
    rotary_base: Option<f64>,
    alibi_slopes: Option<Vec<f32>>,
    recompute_attention: bool,
}

impl<B: Backend> SelfAttention<B> {
    /// The attention of layer `name`.
    ///
    /// # Errors
    ///
    /// When loading and the checkpoint lacks or mis-shapes a tensor.
    pub fn new(
        config: &GptConfig,
        weights: &Weights,
        name: &str,
        group: &Group,
        device: &B::Device,
    ) -> Result<Self> {
        let (tp, rank) = (group.size(), group.rank());
        let (hidden, head_dim, groups) = (config.hidden, config.head_dim(), config.groups());
        let heads = config.heads / tp;
        let kv_replicated = groups % tp != 0;
        let local_groups = if kv_replicated { groups } else { groups / tp };
        let group_offset = if kv_replicated {
            0
        } else {
            rank * local_groups
        };
        let heads_per_group = config.heads / groups;
        let head_groups = (0..heads)
            .map(|h| ((rank * heads + h) / heads_per_group - group_offset) as i64)
            .collect();

        let std = ParamInit::Normal { std: weights.std() };
        let projection = |what: &str, count: usize, first: usize| {
            let full = [
                hidden,
                (if what == "query" {
                    config.heads
                } else {
                    groups
                }) * head_dim,
            ];
            let range = (1, first * head_dim, count * head_dim);
            let weight = weights.shard::<B, 2>(
                &format!("{name}.{what}.weight"),
                full,
                range,
                std.clone(),
                device,
            )?;
            let bias = if config.bias {
                let range = (0, first * head_dim, count * head_dim);
                Some(weights.shard::<B, 1>(
                    &format!("{name}.{what}.bias"),
                    [full[1]],
                    range,
                    ParamInit::Zeros,
                    device,
                )?)
            } else {
                None
            };
            Ok::<_, burn_megatron::Error>((weight, bias))
        };
        let (query, query_bias) = projection("query", heads, rank * heads)?;
        let (key, key_bias) = projection("key", local_groups, group_offset)?;
        let (value, value_bias) = projection("value", local_groups, group_offset)?;
        let qkv_bias = match (query_bias, key_bias, value_bias) {
            (Some(q), Some(k), Some(v)) => Some([q, k, v].map(Param::from_tensor)),
            _ => None,
        };

        let output = row_parallel(
            config,
            weights,
            &format!("{name}.output"),
            RowParallelLinearConfig::new(hidden, hidden),
            group,
            device,
        )?;
        let alibi_slopes = (config.position == PositionEmbedding::Alibi)
            .then(|| alibi_slopes(config.heads)[rank * heads..(rank + 1) * heads].to_vec());
        let rotary_base = match config.position {
            PositionEmbedding::Rotary { base } => Some(base),
            _ => None,
        };
        Ok(Self {
            query: Param::from_tensor(query),
            key: Param::from_tensor(key),
            value: Param::from_tensor(value),
            qkv_bias,
            output,
            group: group.clone(),
            heads,
            head_dim,
            head_groups,
            kv_replicated,
            sequence_parallel: config.sequence_parallel,
            rotary_base,
            alibi_slopes,
            recompute_attention: config.recompute_attention,
        })
    }
}

impl<B: Backend> SelfAttention<B> {
    /// Whether every rank holds all key/value groups (multi-query attention with more
    /// ranks than groups); their gradients are then summed over the group.
    pub fn kv_replicated(&self) -> bool {
        self.kv_replicated
    }
}

impl<B: ParallelBackend> SelfAttention<B> {
    /// A key/value parameter as the forward uses it: when replicated, identity forward
    /// with gradients summed over the group.
    fn shared<const D: usize>(&self, tensor: Tensor<B, D>) -> Tensor<B, D> {
        if self.kv_replicated {
            copy_to_tensor_parallel_region(tensor, &self.group)
        } else {
            tensor
        }
    }
}

impl<B: ParallelBackend> SelfAttention<B> {
    /// Attends over `x` (`[batch, seq, hidden]`, or `[batch, seq / tp, hidden]` with
    /// sequence parallelism); `padding` (`[batch, seq]`, true for padding) masks keys.
    /// The output projection's bias is returned for the caller to add (fused with dropout
    /// and the residual add), as Megatron's `skip_bias_add`.
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        padding: Option<&Tensor<B, 2, Bool>>,
        dropout_pass: &DropoutPass,
        layer: usize,
    ) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let x = if self.sequence_parallel {
            gather_from_sequence_parallel_region(x, &self.group, 1, true)
        } else {
            copy_to_tensor_parallel_region(x, &self.group)
        };
        let [batch, seq, _] = x.dims();
        let device = x.device();
        // Replicated key/value weights: identity forward, gradients summed over the group.
        let bias = |i: usize| self.qkv_bias.as_ref().map(|b| b[i].val());
        let split_heads = |t: Tensor<B, 3>| {
            let [_, _, width] = t.dims();
            t.reshape([batch, seq, width / self.head_dim, self.head_dim])
                .swap_dims(1, 2)
        };
        // A replicated key/value weight reaches its product through the region op, so
        // its gradient stays in the graph.
        let key_value = |x: Tensor<B, 3>, weight: &Param<Tensor<B, 2>>, i: usize| {
            if self.kv_replicated {
                linear(
                    x,
                    self.shared(weight.val()),
                    bias(i).map(|b| self.shared(b)),
                )
            } else {
                linear_param(x, weight, bias(i))
            }
        };
        let mut query = split_heads(linear_param(x.clone(), &self.query, bias(0)));
        let mut key = split_heads(key_value(x.clone(), &self.key, 1));
        let value = split_heads(key_value(x, &self.value, 2));

        if let Some(base) = self.rotary_base {
            let (cos, sin) = rotary_tables::<B>(seq, self.head_dim, base, &device);
            query = apply_rotary(query, cos.clone(), sin.clone());
            key = apply_rotary(key, cos, sin);
        }
        let [_, groups, _, _] = key.dims();
        let (key, value) = if groups == self.heads && !self.kv_replicated {
            (key, value)
        } else {
            let index = Tensor::<B, 1, Int>::from_data(
                TensorData::new(self.head_groups.clone(), [self.heads]),
                &device,
            );
            (key.select(1, index.clone()), value.select(1, index))
        };

        let all_heads = self.heads * self.group.size();
        let spec = CoreAttention {
            alibi_slopes: self.alibi_slopes.clone(),
            dropout: (dropout_pass.attention > 0.0).then(|| AttentionDropout {
                p: dropout_pass.attention,
                seed: dropout_pass.site(3 * layer as u64 + 1),
                full: [batch, all_heads, seq, seq],
                offsets: [0, self.group.rank() * self.heads, 0, 0],
            }),
            recompute: if self.recompute_attention {
                Recompute::Selective
            } else {
                Recompute::Off
            },
            ..CoreAttention::causal(self.head_dim)
        };
        let context = B::core_attention(query, key, value, padding.cloned(), &spec);
        let context = context
            .swap_dims(1, 2)
            .reshape([batch, seq, self.heads * self.head_dim]);
        self.output.forward_skipping_bias(context)
    }
}

/// HF's rotary tables: `cos` and `sin` of `position * base^(-2i / head_dim)`, each
/// frequency twice (rotate-half convention), as `[1, 1, seq, head_dim]`.
fn rotary_tables<B: Backend>(
    seq: usize,
    head_dim: usize,
    base: f64,
    device: &B::Device,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let half = head_dim / 2;
    let inverse: Vec<f32> = (0..half)
        .map(|i| (1.0 / base.powf((2 * i) as f64 / head_dim as f64)) as f32)
        .collect();
    let (mut cos, mut sin) = (
        Vec::with_capacity(seq * head_dim),
        Vec::with_capacity(seq * head_dim),
    );
    for position in 0..seq {
        for _ in 0..2 {
            for frequency in &inverse {
                let angle = position as f32 * frequency;
                cos.push(angle.cos());
                sin.push(angle.sin());
            }
        }
    }
    let table =
        |values| Tensor::<B, 4>::from_data(TensorData::new(values, [1, 1, seq, head_dim]), device);
    (table(cos), table(sin))
}

fn apply_rotary<B: Backend>(x: Tensor<B, 4>, cos: Tensor<B, 4>, sin: Tensor<B, 4>) -> Tensor<B, 4> {
    let [_, _, _, dim] = x.dims();
    let half = dim / 2;
    let first = x.clone().narrow(3, 0, half);
    let second = x.clone().narrow(3, half, half);
    let rotated = Tensor::cat(vec![second.neg(), first], 3);
    x * cos + rotated * sin
}

/// BLOOM's ALiBi slopes for `heads` heads (HF's `build_alibi_tensor`).
pub fn alibi_slopes(heads: usize) -> Vec<f32> {
    let closest = 1usize << (usize::BITS - 1 - heads.leading_zeros());
    let base = 2f64.powf(-(2f64.powf(-((closest as f64).log2() - 3.0))));
    let mut slopes: Vec<f64> = (1..=closest).map(|p| base.powi(p as i32)).collect();
    if closest != heads {
        let extra_base = 2f64.powf(-(2f64.powf(-((2 * closest) as f64).log2() + 3.0)));
        let remaining = closest.min(heads - closest);
        slopes.extend((0..remaining).map(|i| extra_base.powi((1 + 2 * i) as i32)));
    }
    slopes.into_iter().map(|s| s as f32).collect()
}

/// The feed-forward block: column-parallel up projection (and gate), activation,
/// row-parallel down projection.
#[derive(Module, Debug)]
pub struct Mlp<B: Backend> {
    /// Up projection.
    pub fc1: ColumnParallelLinear<B>,
    /// Gate projection (SwiGLU).
    pub gate: Option<ColumnParallelLinear<B>>,
    /// Down projection.
    pub fc2: RowParallelLinear<B>,
    activation: Activation,
}

impl<B: Backend> Mlp<B> {
    /// The feed-forward block of layer `name`.
    ///
    /// # Errors
    ///
    /// When loading and the checkpoint lacks or mis-shapes a tensor.
    pub fn new(
        config: &GptConfig,
        weights: &Weights,
        name: &str,
        group: &Group,
        device: &B::Device,
    ) -> Result<Self> {
        let (hidden, ffn) = (config.hidden, config.ffn());
        let up = || ColumnParallelLinearConfig::new(hidden, ffn);
        let fc1 = column_parallel(config, weights, &format!("{name}.fc1"), up(), group, device)?;
        let gate = match config.activation {
            Activation::SwiGlu => Some(column_parallel(
                config,
                weights,
                &format!("{name}.gate"),
                up(),
                group,
                device,
            )?),
            Activation::Gelu | Activation::GeluTanh => None,
        };
        let down = RowParallelLinearConfig::new(ffn, hidden);
        let fc2 = row_parallel(config, weights, &format!("{name}.fc2"), down, group, device)?;
        Ok(Self {
            fc1,
            gate,
            fc2,
            activation: config.activation,
        })
    }
}

impl<B: ParallelBackend> Mlp<B> {
    /// Applies the block; the down projection's bias is left to the caller (to fuse it
    /// with dropout and the residual add), as Megatron's `skip_bias_add`.
    pub fn forward(&self, x: Tensor<B, 3>) -> (Tensor<B, 3>, Option<Tensor<B, 1>>) {
        let hidden = match (&self.gate, self.activation) {
            (Some(gate), _) => {
                let up = self.fc1.forward(x.clone());
                silu(gate.forward(x)) * up
            }
            // The bias add and GeLU as one kernel (and one backward kernel).
            (None, activation) if B::has_fused_kernels() => {
                let (up, bias) = self.fc1.forward_skipping_bias(x);
                let [batch, seq, width] = up.dims();
                let kind = match activation {
                    Activation::Gelu => Gelu::Exact,
                    _ => Gelu::Tanh,
                };
                B::bias_gelu(up.reshape([batch * seq, width]), bias, kind)
                    .reshape([batch, seq, width])
            }
            (None, Activation::Gelu) => gelu(self.fc1.forward(x)),
            (None, _) => gelu_approximate(self.fc1.forward(x)),
        };
        self.fc2.forward_skipping_bias(hidden)
    }
}

/// A pre-norm transformer layer.
#[derive(Module, Debug)]
pub struct TransformerLayer<B: Backend> {
    /// Norm before attention.
    pub norm1: Norm<B>,
    /// Self-attention.
    pub attention: SelfAttention<B>,
    /// Norm before the feed-forward block.
    pub norm2: Norm<B>,
    /// Feed-forward block.
    pub mlp: Mlp<B>,
}

impl<B: Backend> TransformerLayer<B> {
    /// Layer `index`.
    ///
    /// # Errors
    ///
    /// When loading and the checkpoint lacks or mis-shapes a tensor.
    pub fn new(
        config: &GptConfig,
        weights: &Weights,
        index: usize,
        group: &Group,
        device: &B::Device,
    ) -> Result<Self> {
        let name = format!("layers.{index}");
        Ok(Self {
            norm1: Norm::new(config, weights, &format!("{name}.norm1"), device)?,
            attention: SelfAttention::new(
                config,
                weights,
                &format!("{name}.attention"),
                group,
                device,
            )?,
            norm2: Norm::new(config, weights, &format!("{name}.norm2"), device)?,
            mlp: Mlp::new(config, weights, &format!("{name}.mlp"), group, device)?,
        })
    }
}

impl<B: ParallelBackend> TransformerLayer<B> {
    /// Applies layer `index` to the residual stream (`[batch, seq, hidden]`, or this
    /// rank's sequence chunk with sequence parallelism).
    pub fn forward(
        &self,
        x: Tensor<B, 3>,
        padding: Option<&Tensor<B, 2, Bool>>,
        dropout_pass: &DropoutPass,
        index: usize,
    ) -> Tensor<B, 3> {
        let (attention, bias) =
            self.attention
                .forward(self.norm1.forward(x.clone()), padding, dropout_pass, index);
        let x = self.residual_add(x, attention, bias, dropout_pass, 3 * index as u64 + 2);
        let (mlp, bias) = self.mlp.forward(self.norm2.forward(x.clone()));
        self.residual_add(x, mlp, bias, dropout_pass, 3 * index as u64 + 3)
    }

    /// `residual + dropout(output + bias)`, the dropout consistent with the unsplit
    /// sequence; one kernel (and one for its backward) on CUDA,
    /// [`FusedKernels::bias_dropout_add`].
    fn residual_add(
        &self,
        residual: Tensor<B, 3>,
        output: Tensor<B, 3>,
        bias: Option<Tensor<B, 1>>,
        dropout_pass: &DropoutPass,
        site: u64,
    ) -> Tensor<B, 3> {
        let dropout = (dropout_pass.hidden > 0.0).then(|| {
            let [batch, seq, hidden] = output.dims();
            let group = &self.attention.group;
            let (full_seq, offset) = if self.attention.sequence_parallel {
                (seq * group.size(), seq * group.rank())
            } else {
                (seq, 0)
            };
            Dropout {
                p: dropout_pass.hidden,
                seed: dropout_pass.site(site),
                full: [batch, full_seq, hidden],
                offsets: [0, offset, 0],
            }
        });
        B::bias_dropout_add(output, bias, residual, dropout)
    }
}

/// A column-parallel layer `name`, initialized or cut from the checkpoint.
pub(crate) fn column_parallel<B: Backend>(
    config: &GptConfig,
    weights: &Weights,
    name: &str,
    layer: ColumnParallelLinearConfig,
    group: &Group,
    device: &B::Device,
) -> Result<ColumnParallelLinear<B>> {
    let layer = layer
        .with_bias(config.bias)
        .with_sequence_parallel(config.sequence_parallel);
    let weight_shape = [layer.d_input, layer.d_output];
    match weights.full(&format!("{name}.weight"), &weight_shape)? {
        Some(weight) => {
            let bias = match layer.bias {
                true => weights.full(&format!("{name}.bias"), &[layer.d_output])?,
                false => None,
            };
            layer.init_from_full(group, weight, bias, device)
        }
        None => layer
            .with_init(ParamInit::Normal { std: weights.std() })
            .with_seed(weights.param_seed(name))
            .init(group, device),
    }
}

/// A row-parallel layer `name` (an output projection: initialized with the standard
/// deviation scaled by `1 / sqrt(2 * layers)`, as Megatron does).
fn row_parallel<B: Backend>(
    config: &GptConfig,
    weights: &Weights,
    name: &str,
    layer: RowParallelLinearConfig,
    group: &Group,
    device: &B::Device,
) -> Result<RowParallelLinear<B>> {
    let layer = layer
        .with_bias(config.bias)
        .with_sequence_parallel(config.sequence_parallel);
    match weights.full(&format!("{name}.weight"), &[layer.d_input, layer.d_output])? {
        Some(weight) => {
            let bias = match layer.bias {
                true => weights.full(&format!("{name}.bias"), &[layer.d_output])?,
                false => None,
            };
            layer.init_from_full(group, weight, bias, device)
        }
        None => {
            let std = weights.std() / (2.0 * config.layers as f64).sqrt();
            layer
                .with_init(ParamInit::Normal { std })
                .with_seed(weights.param_seed(name))
                .init(group, device)
        }
    }
}
