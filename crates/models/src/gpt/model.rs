//! [`GptModel`]: embeddings, transformer layers, final norm and output layer, split
//! across the tensor-parallel group, whole or as the model chunk of a pipeline stage.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use burn::module::{Module, Param, ParamId};
use burn::tensor::{Bool, DType, Int, Tensor, backend::Backend};
use burn_megatron::ops::{linear, with_dtype};
use burn_megatron::parallel::{Group, ParallelBackend, ParallelContext};
use burn_megatron::pipeline::{LayerSplit, ModelChunk};
use burn_megatron::tensor_parallel::mappings::{
    copy_to_tensor_parallel_region, gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
};
use burn_megatron::tensor_parallel::{
    ColumnParallelLinear, ColumnParallelLinearConfig, ParamInit, VocabParallelEmbedding,
    VocabParallelEmbeddingConfig, VocabPartition, dropout, vocab_parallel_cross_entropy,
};
use burn_megatron::train::Segment;
use burn_megatron::{Error, Result};

use super::config::{GptConfig, PositionEmbedding, RecomputeMethod};
use super::layers::{DropoutPass, Norm, TransformerLayer};
use super::weights::Weights;

/// A GPT, or the model chunk of one pipeline stage, whose layers are split across the
/// tensor-parallel group of a rank.
///
/// The first chunk of a pipeline holds the embeddings, the last the final norm and the
/// output layer; with tied embeddings the last chunk holds a copy of the embedding table
/// as its output weight, kept equal to the first's by summing their gradients.
#[derive(Module, Debug)]
pub struct GptModel<B: Backend> {
    /// Token embeddings (this rank's slice of the padded vocabulary): on the first chunk,
    /// and on the last as the output weight when tied.
    pub embedding: Option<VocabParallelEmbedding<B>>,
    /// Learned position embeddings, `[max_seq_len, hidden]` (first chunk).
    pub positions: Option<Param<Tensor<B, 2>>>,
    /// Norm after the embeddings (BLOOM; first chunk).
    pub embedding_norm: Option<Norm<B>>,
    /// This chunk's transformer layers.
    pub layers: Vec<TransformerLayer<B>>,
    /// Final norm (last chunk).
    pub final_norm: Option<Norm<B>>,
    /// Output layer when it is not tied to the embeddings (last chunk).
    pub output: Option<ColumnParallelLinear<B>>,
    group: Group,
    sequence_parallel: bool,
    max_seq_len: usize,
    hidden: usize,
    vocab: VocabPartition,
    place: ChunkPlace,
    dropout: DropoutState,
    /// Layers full recompute runs again (0: none), chosen by `recompute_method`.
    recompute_layers: usize,
    recompute_method: RecomputeMethod,
}

/// One segment of a chunk's forward under full recompute: its layers (positions in the
/// chunk), or the final norm and output layer (`head`).
#[derive(Debug, Clone, PartialEq)]
struct SegmentSpan {
    layers: Range<usize>,
    head: bool,
    kind: Segment,
}

/// Where a model chunk sits in the pipeline.
#[derive(Debug, Clone, Copy)]
struct ChunkPlace {
    /// Holds the embeddings.
    first: bool,
    /// Holds the final norm and output layer.
    last: bool,
    /// Global index of the chunk's first layer.
    first_layer: usize,
    /// Holds one of two copies of the tied embedding table (pipeline parallelism).
    shares_embedding: bool,
}

/// What enters a model chunk.
#[derive(Debug, Clone)]
pub enum StageInput<B: Backend> {
    /// Token ids, `[batch, seq]` (the first chunk).
    Tokens(Tensor<B, 2, Int>),
    /// The previous chunk's activations, `[batch, seq, hidden]` (`seq / tp` under
    /// sequence parallelism).
    Hidden(Tensor<B, 3>),
}

impl<B: Backend> StageInput<B> {
    /// The input of a chunk in a pipeline step: the activations received from the previous
    /// stage when there are some (every chunk but the first), the token ids otherwise.
    pub fn of_step(received: Option<Tensor<B, 3>>, tokens: Tensor<B, 2, Int>) -> Self {
        match received {
            Some(hidden) => StageInput::Hidden(hidden),
            None => StageInput::Tokens(tokens),
        }
    }
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
    /// Whether forward passes draw dropout masks.
    fn active(&self) -> bool {
        self.training.load(Ordering::Relaxed) && (self.hidden > 0.0 || self.attention > 0.0)
    }

    /// Draws the masks of a new forward pass.
    fn next_pass(&self) -> DropoutPass {
        if !self.active() {
            return DropoutPass::OFF;
        }
        self.pass(self.passes.fetch_add(1, Ordering::Relaxed))
    }

    /// The masks of the pass drawn last: the later segments of a forward run in segments
    /// (full recompute) continue the pass that the first segment drew.
    fn current_pass(&self) -> DropoutPass {
        if !self.active() {
            return DropoutPass::OFF;
        }
        let drawn = self.passes.load(Ordering::Relaxed);
        self.pass(drawn.saturating_sub(1))
    }

    fn pass(&self, pass: u64) -> DropoutPass {
        DropoutPass {
            hidden: self.hidden,
            attention: self.attention,
            seed: Weights::seed_of(self.seed, &format!("dropout pass {pass}")),
        }
    }
}

impl<B: Backend> GptModel<B> {
    /// A freshly initialized whole model (no pipeline parallelism): the same full weights
    /// for the same seed, whatever the tensor- and data-parallel layout.
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model, or has pipeline stages (use
    /// [`init_chunks`](Self::init_chunks)).
    pub fn init(config: &GptConfig, ctx: &ParallelContext, device: &B::Device) -> Result<Self> {
        Self::build(config, ctx, &Self::fresh(config), device)
    }

    /// A whole model from full tensors by canonical name (see [`Weights`]).
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model or has pipeline stages, or a tensor is
    /// missing or mis-shaped.
    pub fn build(
        config: &GptConfig,
        ctx: &ParallelContext,
        weights: &Weights,
        device: &B::Device,
    ) -> Result<Self> {
        let layout = ctx.layout();
        if layout.pipeline() > 1 {
            return Err(Error::InvalidLayout(format!(
                "{layout} has pipeline stages, which hold model chunks rather than the whole \
                 model; build them with GptModel::build_chunks"
            )));
        }
        let mut chunks = Self::build_chunks(config, ctx, weights, device)?;
        Ok(chunks.remove(0))
    }

    /// This rank's model chunks, freshly initialized: one per virtual pipeline stage it
    /// runs (one without interleaving). The chunks of all stages together are the model
    /// [`init`](Self::init) makes on one rank.
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model.
    pub fn init_chunks(
        config: &GptConfig,
        ctx: &ParallelContext,
        device: &B::Device,
    ) -> Result<Vec<Self>> {
        Self::build_chunks(config, ctx, &Self::fresh(config), device)
    }

    /// This rank's model chunks from full tensors by canonical name.
    ///
    /// # Errors
    ///
    /// When the layout cannot split the model, or a tensor is missing or mis-shaped.
    pub fn build_chunks(
        config: &GptConfig,
        ctx: &ParallelContext,
        weights: &Weights,
        device: &B::Device,
    ) -> Result<Vec<Self>> {
        config.check(ctx.layout())?;
        let split = LayerSplit::new(
            config.layers,
            ctx.layout(),
            config.pipeline_layers.as_deref(),
        )?;
        split
            .chunks_of(ctx.coords().pp)
            .iter()
            .map(|chunk| Self::build_chunk(config, ctx, chunk, weights, device))
            .collect()
    }

    fn fresh(config: &GptConfig) -> Weights<'static> {
        Weights::Init {
            seed: config.seed,
            std: config.init_std,
        }
    }

    fn build_chunk(
        config: &GptConfig,
        ctx: &ParallelContext,
        chunk: &ModelChunk,
        weights: &Weights,
        device: &B::Device,
    ) -> Result<Self> {
        let group = ctx.tensor();
        let place = ChunkPlace {
            first: chunk.first,
            last: chunk.last,
            first_layer: chunk.layers.start,
            shares_embedding: config.tied_embeddings
                && ctx.layout().pipeline() > 1
                && (chunk.first || chunk.last),
        };
        let vocab = VocabPartition::new(
            config.vocab_size,
            config.make_vocab_size_divisible_by,
            group,
        )?;
        let embedding = if chunk.first || (chunk.last && config.tied_embeddings) {
            let embedding_config =
                VocabParallelEmbeddingConfig::new(config.vocab_size, config.hidden)
                    .with_make_vocab_size_divisible_by(config.make_vocab_size_divisible_by)
                    .with_init(ParamInit::Normal { std: weights.std() })
                    .with_seed(weights.param_seed("embedding"));
            Some(
                match weights.full("embedding", &[config.vocab_size, config.hidden])? {
                    Some(table) => embedding_config.init_from_full(group, table, device)?,
                    None => embedding_config.init(group, device)?,
                },
            )
        } else {
            None
        };
        let positions = match (chunk.first, config.position) {
            (true, PositionEmbedding::Learned) => Some(Param::from_tensor(weights.whole(
                "positions",
                [config.max_seq_len, config.hidden],
                ParamInit::Normal { std: weights.std() },
                device,
            )?)),
            _ => None,
        };
        let embedding_norm = (chunk.first && config.embedding_norm)
            .then(|| Norm::new(config, weights, "embedding_norm", device))
            .transpose()?;
        let layers = chunk
            .layers
            .clone()
            .map(|index| TransformerLayer::new(config, weights, index, group, device))
            .collect::<Result<Vec<_>>>()?;
        let final_norm = chunk
            .last
            .then(|| Norm::new(config, weights, "final_norm", device))
            .transpose()?;
        let output = if chunk.last && !config.tied_embeddings {
            Some(Self::output_layer(config, weights, &vocab, group, device)?)
        } else {
            None
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
            hidden: config.hidden,
            vocab,
            place,
            dropout: DropoutState {
                hidden: config.hidden_dropout,
                attention: config.attention_dropout,
                seed: config.seed,
                passes: Arc::new(AtomicU64::new(0)),
                training: Arc::new(AtomicBool::new(false)),
            },
            recompute_layers: config.recompute_num_layers,
            recompute_method: config.recompute_method,
        })
    }

    /// The untied output layer: the checkpoint's weight padded with zero columns to the
    /// padded vocabulary, or fresh columns drawn from the unpadded shape (so the weights
    /// do not depend on the padding, which grows with tp) and zero padding.
    fn output_layer(
        config: &GptConfig,
        weights: &Weights,
        partition: &VocabPartition,
        group: &Group,
        device: &B::Device,
    ) -> Result<ColumnParallelLinear<B>> {
        let padded = partition.padded_size;
        let layer = ColumnParallelLinearConfig::new(config.hidden, padded)
            .with_bias(false)
            .with_sequence_parallel(config.sequence_parallel);
        match weights.full("output.weight", &[config.hidden, config.vocab_size])? {
            Some(weight) => {
                let weight = Tensor::<B, 2>::from_data(weight, device);
                let padding = Tensor::zeros([config.hidden, padded - config.vocab_size], device);
                let full = Tensor::cat(vec![weight, padding], 1).into_data();
                layer.init_from_full(group, full, None, device)
            }
            None => {
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
                layer.init_from_shard(group, shard, None, device)
            }
        }
    }

    /// Forward passes that drew dropout masks so far (the model's random state).
    pub fn dropout_passes(&self) -> u64 {
        self.dropout.passes.load(Ordering::Relaxed)
    }

    /// Continues the dropout masks after `passes` passes (when resuming training).
    pub fn set_dropout_passes(&self, passes: u64) {
        self.dropout.passes.store(passes, Ordering::Relaxed);
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
        self.vocab
    }

    /// Global index of the chunk's first transformer layer.
    pub fn first_layer(&self) -> usize {
        self.place.first_layer
    }

    /// Whether this chunk starts the model (takes token ids).
    pub fn is_first_chunk(&self) -> bool {
        self.place.first
    }

    /// Whether this chunk ends the model (gives logits).
    pub fn is_last_chunk(&self) -> bool {
        self.place.last
    }

    /// The shape of the activations between chunks for `batch` samples of `seq` tokens.
    pub fn activation_shape(&self, batch: usize, seq: usize) -> [usize; 3] {
        let seq = if self.sequence_parallel {
            seq / self.group.size()
        } else {
            seq
        };
        [batch, seq, self.hidden]
    }

    /// The embedding table when this chunk holds one of the two copies that tied
    /// embeddings need under pipeline parallelism: its gradient is summed with the other
    /// copy's over the embedding group.
    pub fn shared_embedding_params(&self) -> HashSet<ParamId> {
        match (&self.embedding, self.place.shares_embedding) {
            (Some(embedding), true) => HashSet::from([embedding.weight.id]),
            _ => HashSet::new(),
        }
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
            .chain(&self.final_norm);
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
        if let Some(embedding) = &self.embedding {
            ids.insert(embedding.weight.id);
        }
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
    /// ids `[batch, seq]`, through the whole model. `padding` (`[batch, seq]`, true for
    /// padding) masks keys.
    ///
    /// # Panics
    ///
    /// On a model chunk that is not the whole model, when a collective fails, or when
    /// the sequence is longer than a learned position table or (with sequence
    /// parallelism) not a multiple of the tensor-parallel size.
    pub fn forward(
        &self,
        ids: Tensor<B, 2, Int>,
        padding: Option<&Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        assert!(
            self.place.first && self.place.last,
            "GptModel::forward runs a whole model; run pipeline chunks with forward_chunk"
        );
        self.forward_chunk(StageInput::Tokens(ids), padding)
    }

    /// Runs this model chunk: the activations for the next chunk, or, on the last chunk,
    /// the logits of this rank's vocabulary slice.
    ///
    /// # Panics
    ///
    /// When the input does not fit the chunk (token ids for a chunk other than the
    /// first, activations for the first), and as [`forward`](Self::forward).
    pub fn forward_chunk(
        &self,
        input: StageInput<B>,
        padding: Option<&Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let dropout_pass = self.dropout.next_pass();
        let hidden = self.start(0, input, &dropout_pass);
        let hidden = self.run_layers(hidden, 0..self.layers.len(), padding, &dropout_pass);
        match self.final_norm {
            Some(_) => self.head(hidden),
            None => hidden,
        }
    }

    /// What each segment of this chunk's forward keeps under full recompute (`None`
    /// without): see [`segment_spans`](Self::segment_spans).
    pub fn recompute_segments(&self) -> Option<Vec<Segment>> {
        self.segment_spans()
            .map(|spans| spans.iter().map(|span| span.kind).collect())
    }

    /// Full recompute's segments of this chunk (`None` without full recompute), the
    /// embeddings going with the first: under the uniform method its layers in groups of
    /// `recompute_num_layers`, each recomputed; under the block method its first
    /// `recompute_num_layers` layers one by one, recomputed, then the other layers as one
    /// stored segment. On the last chunk the final norm and output layer are a stored
    /// segment of their own (the loss backpropagates them first).
    fn segment_spans(&self) -> Option<Vec<SegmentSpan>> {
        let per_group = self.recompute_layers;
        if per_group == 0 {
            return None;
        }
        let count = self.layers.len();
        let span = |layers: Range<usize>, kind| SegmentSpan {
            layers,
            head: false,
            kind,
        };
        let mut spans: Vec<SegmentSpan> = match self.recompute_method {
            RecomputeMethod::Uniform => (0..count)
                .step_by(per_group)
                .map(|first| span(first..(first + per_group).min(count), Segment::Recomputed))
                .collect(),
            RecomputeMethod::Block => {
                let recomputed = per_group.min(count);
                let mut spans: Vec<_> = (0..recomputed)
                    .map(|layer| span(layer..layer + 1, Segment::Recomputed))
                    .collect();
                if recomputed < count {
                    spans.push(span(recomputed..count, Segment::Stored));
                }
                spans
            }
        };
        if spans.is_empty() {
            // A chunk without layers: its embeddings or received activations.
            spans.push(span(0..0, Segment::Recomputed));
        }
        if self.place.last {
            spans.push(SegmentSpan {
                layers: count..count,
                head: true,
                kind: Segment::Stored,
            });
        }
        Some(spans)
    }

    /// Runs segment `segment` of [`recompute_segments`](Self::recompute_segments): the
    /// first draws the forward pass's dropout masks, the later ones continue with them.
    /// Running the segments in order computes [`forward_chunk`](Self::forward_chunk).
    ///
    /// # Panics
    ///
    /// Without full recompute, for a segment the chunk does not have, and as
    /// [`forward_chunk`](Self::forward_chunk).
    pub fn forward_segment(
        &self,
        segment: usize,
        input: StageInput<B>,
        padding: Option<&Tensor<B, 2, Bool>>,
    ) -> Tensor<B, 3> {
        let spans = self
            .segment_spans()
            .expect("forward_segment runs a model built with recompute_num_layers");
        let span = spans
            .get(segment)
            .unwrap_or_else(|| panic!("segment {segment} of {}", spans.len()));
        let dropout_pass = if segment == 0 {
            self.dropout.next_pass()
        } else {
            self.dropout.current_pass()
        };
        let hidden = self.start(segment, input, &dropout_pass);
        let hidden = self.run_layers(hidden, span.layers.clone(), padding, &dropout_pass);
        if span.head { self.head(hidden) } else { hidden }
    }

    /// The hidden states segment `segment` (0: the whole chunk) starts from: the embedded
    /// tokens, or the activations received.
    fn start(
        &self,
        segment: usize,
        input: StageInput<B>,
        dropout_pass: &DropoutPass,
    ) -> Tensor<B, 3> {
        match input {
            StageInput::Tokens(ids) => {
                assert_eq!(segment, 0, "only a chunk's first segment takes token ids");
                self.embed(ids, dropout_pass)
            }
            StageInput::Hidden(hidden) => {
                assert!(
                    segment > 0 || !self.place.first,
                    "the first model chunk takes token ids, not activations"
                );
                hidden
            }
        }
    }

    /// Runs the chunk's transformer layers `layers` (positions in the chunk).
    fn run_layers(
        &self,
        mut hidden: Tensor<B, 3>,
        layers: Range<usize>,
        padding: Option<&Tensor<B, 2, Bool>>,
        dropout_pass: &DropoutPass,
    ) -> Tensor<B, 3> {
        for offset in layers {
            let index = self.place.first_layer + offset;
            hidden = self.layers[offset].forward(hidden, padding, dropout_pass, index);
        }
        hidden
    }

    /// The final norm and the output layer (the last chunk): the logits of this rank's
    /// vocabulary slice.
    fn head(&self, hidden: Tensor<B, 3>) -> Tensor<B, 3> {
        let final_norm = self
            .final_norm
            .as_ref()
            .expect("the last chunk's final norm");
        let hidden = final_norm.forward(hidden);
        match (&self.output, &self.embedding) {
            (Some(output), _) => output.forward(hidden),
            (None, Some(embedding)) => {
                let hidden = if self.sequence_parallel {
                    gather_from_sequence_parallel_region(hidden, &self.group, 1, true)
                } else {
                    copy_to_tensor_parallel_region(hidden, &self.group)
                };
                linear(hidden, embedding.weight.val().transpose(), None)
            }
            (None, None) => unreachable!("the last chunk has an output layer or embeddings"),
        }
    }

    /// Token and position embeddings, embedding norm and dropout; scattered along the
    /// sequence under sequence parallelism.
    fn embed(&self, ids: Tensor<B, 2, Int>, dropout_pass: &DropoutPass) -> Tensor<B, 3> {
        let embedding = match (&self.embedding, self.place.first) {
            (Some(embedding), true) => embedding,
            _ => panic!("only the first model chunk takes token ids"),
        };
        let [batch, seq] = ids.dims();
        let mut hidden = embedding.forward(ids);
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
        hidden
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
        self.loss_from_logits(self.forward(ids, None), labels, loss_mask)
    }

    /// Mean cross-entropy of the last chunk's `logits` (this rank's vocabulary slice)
    /// against `labels` over the tokens where `loss_mask` is 1.
    ///
    /// # Panics
    ///
    /// When a collective fails.
    pub fn loss_from_logits(
        &self,
        logits: Tensor<B, 3>,
        labels: Tensor<B, 2, Int>,
        loss_mask: Tensor<B, 2>,
    ) -> Tensor<B, 1> {
        // Cross-entropy computes in fp32 whatever the logits' type.
        let loss_mask = with_dtype(loss_mask, DType::F32);
        let losses = vocab_parallel_cross_entropy(logits, labels, &self.vocab, &self.group, 0.0);
        (losses * loss_mask.clone()).sum() / loss_mask.sum().clamp_min(1.0)
    }
}
