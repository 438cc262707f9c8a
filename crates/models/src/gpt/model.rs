//! [`GptModel`]: embeddings, transformer layers, final norm and output layer, split
//! across the tensor-parallel group.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Bool, Int, Tensor, backend::Backend, module::linear};
use burn_megatron::Result;
use burn_megatron::parallel::{Group, ParallelBackend, ParallelContext};
use burn_megatron::tensor_parallel::mappings::{
    copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
};
use burn_megatron::tensor_parallel::{
    ColumnParallelLinear, ColumnParallelLinearConfig, ParamInit, VocabParallelEmbedding,
    VocabParallelEmbeddingConfig, VocabPartition, dropout, vocab_parallel_cross_entropy,
};

use super::config::{GptConfig, PositionEmbedding};
use super::layers::{DropoutPass, Norm, TransformerLayer};
use super::weights::Weights;

/// A GPT whose layers are split across the tensor-parallel group of a rank.
#[derive(Module, Debug)]
pub struct GptModel<B: Backend> {
    /// Token embeddings (this rank's slice of the padded vocabulary).
    pub embedding: VocabParallelEmbedding<B>,
    /// Learned position embeddings, `[max_seq_len, hidden]`, on every rank.
    pub positions: Option<Param<Tensor<B, 2>>>,
    /// Norm after the embeddings (BLOOM).
    pub embedding_norm: Option<Norm<B>>,
    /// Transformer layers.
    pub layers: Vec<TransformerLayer<B>>,
    /// Final norm.
    pub final_norm: Norm<B>,
    /// Output layer when it is not tied to the embeddings.
    pub output: Option<ColumnParallelLinear<B>>,
    group: Group,
    sequence_parallel: bool,
    max_seq_len: usize,
    dropout: DropoutState,
}

/// Dropout rates and the count of forward passes that seeds each pass's masks. Ranks of
/// a tensor-parallel group run the same passes in the same order, so they draw the same
/// masks. Shared by clones of the model.
#[derive(Debug, Clone)]
struct DropoutState {
    hidden: f64,
    attention: f64,
    seed: u64,
    passes: Arc<AtomicU64>,
    training: Arc<AtomicBool>,
}

impl DropoutState {
    fn next_pass(&self) -> DropoutPass {
        if !self.training.load(Ordering::Relaxed) || (self.hidden == 0.0 && self.attention == 0.0) {
            return DropoutPass::OFF;
        }
        let pass = self.passes.fetch_add(1, Ordering::Relaxed);
        DropoutPass {
            hidden: self.hidden,
            attention: self.attention,
            seed: Weights::seed_of(self.seed, &format!("dropout pass {pass}")),
        }
    }
}

impl<B: Backend> GptModel<B> {
    /// A freshly initialized model: the same full weights for the same seed, whatever the
    /// parallel layout.
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model.
    pub fn init(config: &GptConfig, ctx: &ParallelContext, device: &B::Device) -> Result<Self> {
        let weights = Weights::Init {
            seed: config.seed,
            std: config.init_std,
        };
        Self::build(config, ctx, &weights, device)
    }

    /// A model from full tensors by canonical name (see [`Weights`]).
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model, or a tensor is missing or mis-shaped.
    pub fn build(
        config: &GptConfig,
        ctx: &ParallelContext,
        weights: &Weights,
        device: &B::Device,
    ) -> Result<Self> {
        config.check(ctx.layout())?;
        let group = ctx.tensor();
        let embedding_config = VocabParallelEmbeddingConfig::new(config.vocab_size, config.hidden)
            .with_make_vocab_size_divisible_by(config.make_vocab_size_divisible_by)
            .with_init(ParamInit::Normal { std: weights.std() })
            .with_seed(weights.param_seed("embedding"));
        let embedding = match weights.full("embedding", &[config.vocab_size, config.hidden])? {
            Some(table) => embedding_config.init_from_full(group, table, device)?,
            None => embedding_config.init(group, device)?,
        };
        let positions = match config.position {
            PositionEmbedding::Learned => Some(Param::from_tensor(weights.whole(
                "positions",
                [config.max_seq_len, config.hidden],
                ParamInit::Normal { std: weights.std() },
                device,
            )?)),
            _ => None,
        };
        let embedding_norm = config
            .embedding_norm
            .then(|| Norm::new(config, weights, "embedding_norm", device))
            .transpose()?;
        let layers = (0..config.layers)
            .map(|index| TransformerLayer::new(config, weights, index, group, device))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = Norm::new(config, weights, "final_norm", device)?;
        let padded = embedding.partition().padded_size;
        let output = if config.tied_embeddings {
            None
        } else {
            let layer = ColumnParallelLinearConfig::new(config.hidden, padded);
            let layer = match weights.full("output.weight", &[config.hidden, config.vocab_size])? {
                // Pad the checkpoint's columns with zeros to the padded vocabulary.
                Some(weight) => {
                    let weight = Tensor::<B, 2>::from_data(weight, device);
                    let padding =
                        Tensor::zeros([config.hidden, padded - config.vocab_size], device);
                    let full = Tensor::cat(vec![weight, padding], 1).into_data();
                    let layer = layer
                        .with_bias(false)
                        .with_sequence_parallel(config.sequence_parallel);
                    layer.init_from_full(group, full, None, device)?
                }
                // Fresh: the columns of real tokens drawn from the unpadded shape, so the
                // weights do not depend on the padding (which grows with tp); padding zero.
                None => {
                    let partition = embedding.partition();
                    let real = partition.real_len();
                    let mut columns = Vec::new();
                    if real > 0 {
                        columns.push(weights.shard::<B, 2>(
                            "output.weight",
                            [config.hidden, config.vocab_size],
                            (1, partition.start, real),
                            ParamInit::Normal { std: weights.std() },
                            device,
                        )?);
                    }
                    if real < partition.len() {
                        columns.push(Tensor::zeros(
                            [config.hidden, partition.len() - real],
                            device,
                        ));
                    }
                    let shard = Tensor::cat(columns, 1).into_data();
                    layer
                        .with_bias(false)
                        .with_sequence_parallel(config.sequence_parallel)
                        .init_from_shard(group, shard, None, device)?
                }
            };
            Some(layer)
        };
        Ok(Self {
            embedding,
            positions,
            embedding_norm,
            layers,
            final_norm,
            output,
            group: group.clone(),
            sequence_parallel: config.sequence_parallel,
            max_seq_len: config.max_seq_len,
            dropout: DropoutState {
                hidden: config.hidden_dropout,
                attention: config.attention_dropout,
                seed: config.seed,
                passes: Arc::new(AtomicU64::new(0)),
                training: Arc::new(AtomicBool::new(false)),
            },
        })
    }

    /// Turns dropout on (training) or off (evaluation, inference; the default).
    pub fn set_training(&self, training: bool) {
        self.dropout.training.store(training, Ordering::Relaxed);
    }

    /// The tensor-parallel group the model is split over.
    pub fn tensor_group(&self) -> Group {
        self.group.clone()
    }

    /// This rank's slice of the padded vocabulary.
    pub fn vocab_partition(&self) -> VocabPartition {
        self.embedding.partition()
    }

    /// Parameters whose gradients each rank computes only for its sequence chunk (norms
    /// under sequence parallelism): sum their gradients over the tensor-parallel group.
    pub fn sequence_parallel_params(&self) -> HashSet<ParamId> {
        if !self.sequence_parallel || self.group.size() == 1 {
            return HashSet::new();
        }
        let norms = self
            .layers
            .iter()
            .flat_map(|layer| [&layer.norm1, &layer.norm2])
            .chain(std::iter::once(&self.final_norm));
        let mut ids = HashSet::new();
        for norm in norms {
            ids.insert(norm.weight.id);
            if let Some(bias) = &norm.bias {
                ids.insert(bias.id);
            }
        }
        for layer in &self.layers {
            if let Some(bias) = &layer.attention.output.bias {
                ids.insert(bias.id);
            }
            if let Some(bias) = &layer.mlp.fc2.bias {
                ids.insert(bias.id);
            }
        }
        ids
    }

    /// Parameters split across the tensor-parallel group (each rank holds a different
    /// part); all others are replicated, with the same value and gradient on every rank.
    pub fn tensor_parallel_params(&self) -> HashSet<ParamId> {
        let mut ids = HashSet::new();
        if self.group.size() == 1 {
            return ids;
        }
        ids.insert(self.embedding.weight.id);
        if let Some(output) = &self.output {
            ids.insert(output.weight.id);
        }
        for layer in &self.layers {
            let attention = &layer.attention;
            ids.insert(attention.query.id);
            if let Some([query_bias, ..]) = &attention.qkv_bias {
                ids.insert(query_bias.id);
            }
            if !attention.kv_replicated() {
                ids.insert(attention.key.id);
                ids.insert(attention.value.id);
                if let Some([_, key_bias, value_bias]) = &attention.qkv_bias {
                    ids.insert(key_bias.id);
                    ids.insert(value_bias.id);
                }
            }
            ids.insert(attention.output.weight.id);
            for column in std::iter::once(&layer.mlp.fc1).chain(layer.mlp.gate.as_ref()) {
                ids.insert(column.weight.id);
                if let Some(bias) = &column.bias {
                    ids.insert(bias.id);
                }
            }
            ids.insert(layer.mlp.fc2.weight.id);
        }
        ids
    }
}

impl<B: ParallelBackend> GptModel<B> {
    /// Logits of this rank's vocabulary slice, `[batch, seq, partition.len()]`, for token
    /// ids `[batch, seq]`. `padding` (`[batch, seq]`, true for padding) masks keys.
    ///
    /// # Panics
    ///
    /// When a collective fails, or the sequence is longer than a learned position table
    /// or (with sequence parallelism) not a multiple of the tensor-parallel size.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let [batch, seq] = ids.dims();
        let dropout_pass = self.dropout.next_pass();
        let mut hidden = self.embedding.forward(ids);
        if let Some(positions) = &self.positions {
            assert!(
                seq <= self.max_seq_len,
                "sequence of {seq} tokens is longer than the {} learned positions",
                self.max_seq_len
            );
            hidden = hidden + positions.val().narrow(0, 0, seq).unsqueeze_dim(0);
        }
        if let Some(norm) = &self.embedding_norm {
            hidden = norm.forward(hidden);
        }
        if dropout_pass.hidden > 0.0 {
            let full = [batch, seq, hidden.dims()[2]];
            hidden = dropout(
                hidden,
                dropout_pass.hidden,
                dropout_pass.site(0),
                full,
                [0, 0, 0],
            );
        }
        if self.sequence_parallel {
            hidden = scatter_to_sequence_parallel_region(hidden, &self.group, 1);
        }
        for (index, layer) in self.layers.iter().enumerate() {
            hidden = layer.forward(hidden, padding, &dropout_pass, index);
        }
        let hidden = self.final_norm.forward(hidden);
        match &self.output {
            Some(output) => output.forward(hidden),
            None => {
                let hidden = if self.sequence_parallel {
                    gather_from_sequence_parallel_region(hidden, &self.group, 1, true)
                } else {
                    copy_to_tensor_parallel_region(hidden, &self.group)
                };
                linear(hidden, self.embedding.weight.val().transpose(), None)
            }
        }
    }

    /// Mean next-token cross-entropy over the tokens where `loss_mask` is 1: `ids` and
    /// `labels` are `[batch, seq]`, `loss_mask` `[batch, seq]` of 0 and 1.
    ///
    /// # Panics
    ///
    /// As [`forward`](Self::forward).
    pub fn loss(
        &self,
        ids: Tensor<B, 2, Int>,
        labels: Tensor<B, 2, Int>,
        loss_mask: Tensor<B, 2>,
    ) -> Tensor<B, 1> {
        let logits = self.forward(ids, None);
        let losses =
            vocab_parallel_cross_entropy(logits, labels, &self.vocab_partition(), &self.group, 0.0);
        (losses * loss_mask.clone()).sum() / loss_mask.sum().clamp_min(1.0)
    }
}
