//! The vocabulary-parallel embedding and the vocabulary padding it implies.

use burn::config::Config;
use burn::module::{Module, Param};
use burn::tensor::{Int, Tensor, TensorData, backend::Backend};
use burn_megatron_kernels::FusedKernels;

use super::init::ParamInit;
use super::linear::full_tensor;
use super::mappings::{
    reduce_from_tensor_parallel_region, reduce_scatter_to_sequence_parallel_region,
};
use crate::parallel::{Group, ParallelBackend};
use crate::{Error, Result};

/// The vocabulary size padded to a multiple of `divisible_by * tp`, as Megatron pads it so
/// that every tensor-parallel rank holds an equal, aligned slice (GPT-2's 50257 becomes
/// 50304 at tp 1 and 50432 at tp 2 with the default 128).
///
/// # Panics
///
/// When `divisible_by` or `tp` is zero.
pub fn padded_vocab_size(vocab: usize, divisible_by: usize, tp: usize) -> usize {
    let multiple = divisible_by * tp;
    assert!(multiple > 0, "vocabulary padding multiple must be positive");
    vocab.div_ceil(multiple) * multiple
}

/// One rank's slice `[start, end)` of the padded vocabulary.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct VocabPartition {
    /// The real vocabulary size; ids from here to `padded_size` are padding.
    pub vocab_size: usize,
    /// The padded vocabulary size.
    pub padded_size: usize,
    /// First id of this rank's slice.
    pub start: usize,
    /// One past the last id of this rank's slice.
    pub end: usize,
}

impl VocabPartition {
    /// The slice of `group`'s rank for a vocabulary padded to a multiple of
    /// `divisible_by * tp`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the vocabulary is empty or `divisible_by` is zero.
    pub fn new(vocab_size: usize, divisible_by: usize, group: &Group) -> Result<Self> {
        if vocab_size == 0 || divisible_by == 0 {
            return Err(Error::InvalidConfig(format!(
                "vocabulary size ({vocab_size}) and make_vocab_size_divisible_by \
                 ({divisible_by}) must both be at least 1"
            )));
        }
        let padded_size = padded_vocab_size(vocab_size, divisible_by, group.size());
        let len = padded_size / group.size();
        let start = group.rank() * len;
        Ok(Self {
            vocab_size,
            padded_size,
            start,
            end: start + len,
        })
    }

    /// Ids in this rank's slice.
    pub fn len(&self) -> usize {
        self.end - self.start
    }

    /// Whether the slice is empty (never, for a valid partition).
    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// How many of this rank's ids are real (not padding).
    pub fn real_len(&self) -> usize {
        self.vocab_size.clamp(self.start, self.end) - self.start
    }
}

/// Configuration of a [`VocabParallelEmbedding`].
#[derive(Config, Debug)]
pub struct VocabParallelEmbeddingConfig {
    /// Vocabulary size before padding.
    pub vocab_size: usize,
    /// Embedding width.
    pub d_model: usize,
    /// Pad the vocabulary to a multiple of this times the tensor-parallel size.
    #[config(default = 128)]
    pub make_vocab_size_divisible_by: usize,
    /// Reduce-scatter the output along the sequence dimension (sequence parallelism)
    /// instead of all-reducing it.
    #[config(default = false)]
    pub sequence_parallel: bool,
    /// Initialization of the table.
    #[config(default = "ParamInit::Normal { std: 0.02 }")]
    pub init: ParamInit,
    /// Seed of the table's values (the same full table whatever the parallel layout).
    #[config(default = 0)]
    pub seed: u64,
}

/// An embedding table whose (padded) vocabulary is split across the tensor-parallel ranks:
/// each rank looks up the ids of its slice, and the ranks' outputs are summed.
#[derive(Module, Debug)]
pub struct VocabParallelEmbedding<B: Backend> {
    /// This rank's rows of the padded table: `[padded_vocab / tp, d_model]`.
    pub weight: Param<Tensor<B, 2>>,
    group: Group,
    start: usize,
    end: usize,
    vocab_size: usize,
    sequence_parallel: bool,
}

impl VocabParallelEmbeddingConfig {
    /// This rank's slice of the table, initialized from [`init`](Self::init) and
    /// [`seed`](Self::seed) (padding rows too).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for an empty vocabulary or a zero padding multiple.
    pub fn init<B: Backend>(
        &self,
        group: &Group,
        device: &B::Device,
    ) -> Result<VocabParallelEmbedding<B>> {
        let partition = self.partition(group)?;
        let full = [partition.padded_size, self.d_model];
        let weight =
            self.init
                .init_shard(full, 0, partition.start, partition.len(), self.seed, device);
        Ok(self.build(group, partition, weight))
    }

    /// This rank's slice, cut from the unpadded table `[vocab_size, d_model]`; padding
    /// rows are zero.
    ///
    /// # Errors
    ///
    /// As [`init`](Self::init), and when the table's shape does not match.
    pub fn init_from_full<B: Backend>(
        &self,
        group: &Group,
        weight: TensorData,
        device: &B::Device,
    ) -> Result<VocabParallelEmbedding<B>> {
        let partition = self.partition(group)?;
        let table = full_tensor::<B, 2>(weight, [self.vocab_size, self.d_model], "table", device)?;
        let real = partition.real_len();
        let mut rows = Vec::with_capacity(2);
        if real > 0 {
            rows.push(table.narrow(0, partition.start, real));
        }
        if real < partition.len() {
            rows.push(Tensor::zeros(
                [partition.len() - real, self.d_model],
                device,
            ));
        }
        Ok(self.build(group, partition, Tensor::cat(rows, 0)))
    }

    /// This rank's slice of the padded vocabulary.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` for an empty vocabulary or a zero padding multiple.
    pub fn partition(&self, group: &Group) -> Result<VocabPartition> {
        VocabPartition::new(self.vocab_size, self.make_vocab_size_divisible_by, group)
    }

    fn build<B: Backend>(
        &self,
        group: &Group,
        partition: VocabPartition,
        weight: Tensor<B, 2>,
    ) -> VocabParallelEmbedding<B> {
        VocabParallelEmbedding {
            weight: Param::from_tensor(weight),
            group: group.clone(),
            start: partition.start,
            end: partition.end,
            vocab_size: partition.vocab_size,
            sequence_parallel: self.sequence_parallel,
        }
    }
}

impl<B: ParallelBackend> VocabParallelEmbedding<B> {
    /// Embeds `ids`: `[batch, seq]` to `[batch, seq, d_model]`, or
    /// `[batch, seq / tp, d_model]` with sequence parallelism.
    ///
    /// # Panics
    ///
    /// When a collective fails (see [`mappings`](super::mappings)), or with one rank
    /// when an id is at or above the padded vocabulary size.
    pub fn forward(&self, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
        let local = if self.group.size() == 1 {
            gather_rows(self.weight.val(), ids)
        } else {
            let outside = ids
                .clone()
                .lower_elem(self.start as i64)
                .bool_or(ids.clone().greater_equal_elem(self.end as i64));
            let local_ids = (ids - self.start as i64).mask_fill(outside.clone(), 0);
            let [batch, seq] = local_ids.dims();
            let [_, width] = self.weight.dims();
            let outside = outside.unsqueeze_dim::<3>(2).expand([batch, seq, width]);
            gather_rows(self.weight.val(), local_ids).mask_fill(outside, 0.0)
        };
        if self.sequence_parallel {
            reduce_scatter_to_sequence_parallel_region(local, &self.group, 1)
        } else {
            reduce_from_tensor_parallel_region(local, &self.group)
        }
    }
}

/// `weight`'s rows at `ids` ([`FusedKernels::embedding_lookup`]): the gradient adds the
/// rows' gradients in fp32 and rounds once to the weight's type, with one kernel of atomic
/// adds on CUDA (Burn's scatter, from an fp32 copy of the table made at every forward,
/// took 2.8 ms per GPT-2 774M step of 8 x 1024 tokens on an H200).
fn gather_rows<B: FusedKernels>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    B::embedding_lookup(weight, ids)
}

impl<B: Backend> VocabParallelEmbedding<B> {
    /// This rank's slice of the padded vocabulary, for the output layer and the loss.
    pub fn partition(&self) -> VocabPartition {
        VocabPartition {
            vocab_size: self.vocab_size,
            padded_size: (self.end - self.start) * self.group.size(),
            start: self.start,
            end: self.end,
        }
    }
}
