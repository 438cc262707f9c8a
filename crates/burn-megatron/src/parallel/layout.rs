//! The parallel layout: how the ranks of a job split into tensor-, data- and
//! pipeline-parallel groups, in Megatron's rank order.

use crate::pipeline::LayerSplit;
use crate::{Error, Result};

/// Sizes of the parallel dimensions of a job.
///
/// Ranks are numbered in Megatron's order: tensor-parallel fastest, then data-parallel,
/// then pipeline-parallel:
///
/// `rank = pp_rank * dp * tp + dp_rank * tp + tp_rank`.
///
/// So the members of a tensor-parallel group are neighbours (one node's NVLink island),
/// and a pipeline stage is a contiguous block of `dp * tp` ranks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    tensor: usize,
    pipeline: usize,
    data: usize,
    virtual_pipeline: Option<usize>,
}

/// The coordinates of one rank in the layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct RankCoords {
    /// Position in the tensor-parallel group.
    pub tp: usize,
    /// Position in the data-parallel group.
    pub dp: usize,
    /// Pipeline stage.
    pub pp: usize,
}

/// The sizes of a transformer that a layout must divide.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ModelDims {
    /// Hidden size.
    pub hidden: usize,
    /// Attention heads.
    pub heads: usize,
    /// Key/value head groups (`heads` for multi-head attention, 1 for multi-query).
    pub query_groups: usize,
    /// Hidden size of the feed-forward block.
    pub ffn_hidden: usize,
    /// Transformer layers.
    pub layers: usize,
    /// Vocabulary size before padding.
    pub vocab: usize,
}

impl Layout {
    /// A layout of `tensor x data x pipeline` ranks.
    ///
    /// # Errors
    ///
    /// `InvalidLayout` when a size is zero: "tensor-parallel size must be at least 1".
    pub fn new(tensor: usize, pipeline: usize, data: usize) -> Result<Self> {
        for (size, name) in [
            (tensor, "tensor-parallel"),
            (pipeline, "pipeline-parallel"),
            (data, "data-parallel"),
        ] {
            if size == 0 {
                return Err(invalid(format!("{name} size must be at least 1, got 0")));
            }
        }
        Ok(Self {
            tensor,
            pipeline,
            data,
            virtual_pipeline: None,
        })
    }

    /// The layout that fills `world_size` ranks with the given tensor- and pipeline-parallel
    /// sizes, data parallelism taking the rest (as Megatron derives it).
    ///
    /// # Errors
    ///
    /// `InvalidLayout` when `tensor * pipeline` does not divide the world size:
    /// "world size 6 is not divisible by tensor-parallel size 4 x pipeline-parallel size 1 = 4".
    pub fn for_world(world_size: usize, tensor: usize, pipeline: usize) -> Result<Self> {
        let layout = Self::new(tensor, pipeline, 1)?;
        let model_parallel = tensor * pipeline;
        if world_size == 0 || !world_size.is_multiple_of(model_parallel) {
            return Err(invalid(format!(
                "world size {world_size} is not divisible by tensor-parallel size {tensor} x \
                 pipeline-parallel size {pipeline} = {model_parallel}; choose sizes whose product \
                 divides {world_size}"
            )));
        }
        Ok(Self {
            data: world_size / model_parallel,
            ..layout
        })
    }

    /// Splits each pipeline stage into `chunks` model chunks for the interleaved schedule.
    ///
    /// # Errors
    ///
    /// `InvalidLayout` when `chunks` is zero, or above 1 with a single pipeline stage:
    /// "virtual pipeline stages need pipeline-parallel size > 1".
    pub fn with_virtual_pipeline(self, chunks: usize) -> Result<Self> {
        if chunks == 0 {
            return Err(invalid(
                "virtual pipeline size must be at least 1, got 0".to_string(),
            ));
        }
        if chunks > 1 && self.pipeline == 1 {
            return Err(invalid(format!(
                "virtual pipeline stages need pipeline-parallel size > 1 (got {chunks} virtual \
                 stages with pipeline-parallel size 1); raise --pp or drop --virtual-stages"
            )));
        }
        Ok(Self {
            virtual_pipeline: (chunks > 1).then_some(chunks),
            ..self
        })
    }

    /// Tensor-parallel size.
    pub fn tensor(&self) -> usize {
        self.tensor
    }

    /// Pipeline-parallel size (number of stages).
    pub fn pipeline(&self) -> usize {
        self.pipeline
    }

    /// Data-parallel size.
    pub fn data(&self) -> usize {
        self.data
    }

    /// Model chunks per pipeline stage (1 without interleaving).
    pub fn virtual_pipeline(&self) -> usize {
        self.virtual_pipeline.unwrap_or(1)
    }

    /// Total number of ranks.
    pub fn world_size(&self) -> usize {
        self.tensor * self.pipeline * self.data
    }

    /// Checks that the layout uses exactly `world_size` ranks.
    ///
    /// # Errors
    ///
    /// `InvalidLayout`: "tp 2 x pp 2 x dp 2 = 8 ranks, but the world has 4".
    pub fn check_world_size(&self, world_size: usize) -> Result<()> {
        if self.world_size() != world_size {
            return Err(invalid(format!(
                "{self} = {} ranks, but the world has {world_size}; make the product of the \
                 sizes equal the number of ranks",
                self.world_size()
            )));
        }
        Ok(())
    }

    /// Checks that the layout divides the model.
    ///
    /// # Errors
    ///
    /// `InvalidLayout` naming the first size that does not divide, for example
    /// "tensor-parallel size 3 does not divide 16 attention heads".
    pub fn check_model(&self, model: &ModelDims) -> Result<()> {
        self.check_tensor_parallel(model)?;
        LayerSplit::new(model.layers, self, None).map(|_| ())
    }

    /// Checks that the tensor-parallel size divides the model's heads, query groups and
    /// feed-forward size (everything [`check_model`](Self::check_model) checks but the
    /// pipeline split of the layers, for models that give their own split).
    ///
    /// # Errors
    ///
    /// As [`check_model`](Self::check_model).
    pub fn check_tensor_parallel(&self, model: &ModelDims) -> Result<()> {
        let tp = self.tensor;
        let ModelDims {
            hidden,
            heads,
            query_groups,
            ffn_hidden,
            vocab,
            ..
        } = *model;
        if heads == 0 || hidden % heads != 0 {
            return Err(invalid(format!(
                "hidden size {hidden} is not a multiple of {heads} attention heads"
            )));
        }
        let checks = [
            (heads, format!("{heads} attention heads")),
            (ffn_hidden, format!("the FFN hidden size {ffn_hidden}")),
        ];
        for (count, what) in checks {
            if count == 0 || count % tp != 0 {
                return Err(invalid(format!(
                    "tensor-parallel size {tp} does not divide {what}; choose a \
                     tensor-parallel size among {:?}",
                    divisors(count)
                )));
            }
        }
        if query_groups == 0 || heads % query_groups != 0 {
            return Err(invalid(format!(
                "{query_groups} query groups do not divide {heads} attention heads"
            )));
        }
        // Key/value heads are split across tensor-parallel ranks, or replicated when there
        // are fewer of them than ranks (multi-query attention).
        if query_groups % tp != 0 && !tp.is_multiple_of(query_groups) {
            return Err(invalid(format!(
                "tensor-parallel size {tp} and {query_groups} query groups (key/value heads) \
                 must divide one another; choose a tensor-parallel size among {:?}",
                divisors(heads)
                    .into_iter()
                    .filter(|d| query_groups % d == 0 || d % query_groups == 0)
                    .collect::<Vec<_>>()
            )));
        }
        if vocab == 0 {
            return Err(invalid("the vocabulary is empty".to_string()));
        }
        Ok(())
    }

    /// The global rank at the given coordinates.
    ///
    /// # Panics
    ///
    /// When a coordinate is out of range.
    pub fn rank(&self, coords: RankCoords) -> usize {
        assert!(
            coords.tp < self.tensor && coords.dp < self.data && coords.pp < self.pipeline,
            "{coords:?} is outside {self}"
        );
        (coords.pp * self.data + coords.dp) * self.tensor + coords.tp
    }

    /// The coordinates of a global rank.
    ///
    /// # Panics
    ///
    /// When `rank` is not below the world size.
    pub fn coords(&self, rank: usize) -> RankCoords {
        assert!(
            rank < self.world_size(),
            "rank {rank} is outside {self} ({} ranks)",
            self.world_size()
        );
        RankCoords {
            tp: rank % self.tensor,
            dp: (rank / self.tensor) % self.data,
            pp: rank / (self.tensor * self.data),
        }
    }

    /// Ranks of the tensor-parallel group of `rank`, in group order.
    pub fn tensor_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.tensor)
            .map(|tp| self.rank(RankCoords { tp, ..c }))
            .collect()
    }

    /// Ranks of the data-parallel group of `rank`, in group order.
    pub fn data_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.data)
            .map(|dp| self.rank(RankCoords { dp, ..c }))
            .collect()
    }

    /// Ranks of the pipeline group of `rank`, first stage first.
    pub fn pipeline_group(&self, rank: usize) -> Vec<usize> {
        let c = self.coords(rank);
        (0..self.pipeline)
            .map(|pp| self.rank(RankCoords { pp, ..c }))
            .collect()
    }

    /// Ranks of the embedding group of `rank`: the first and last stage of its pipeline,
    /// which hold the input embedding and the (tied) output layer. Empty when `rank` is on
    /// a middle stage; just `[rank]` without pipeline parallelism.
    pub fn embedding_group(&self, rank: usize) -> Vec<usize> {
        let stages = self.pipeline_group(rank);
        let (first, last) = (stages[0], stages[stages.len() - 1]);
        if first == last {
            vec![first]
        } else if rank == first || rank == last {
            vec![first, last]
        } else {
            Vec::new()
        }
    }

    /// Whether `rank` is on the first pipeline stage.
    pub fn is_first_stage(&self, rank: usize) -> bool {
        self.coords(rank).pp == 0
    }

    /// Whether `rank` is on the last pipeline stage.
    pub fn is_last_stage(&self, rank: usize) -> bool {
        self.coords(rank).pp + 1 == self.pipeline
    }

    /// The rank that logs for the job: the last one, which is on the last stage and so
    /// holds the loss.
    pub fn logging_rank(&self) -> usize {
        self.world_size() - 1
    }
}

impl std::fmt::Display for Layout {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "tp {} x pp {} x dp {}",
            self.tensor, self.pipeline, self.data
        )?;
        if let Some(v) = self.virtual_pipeline {
            write!(f, " (virtual stages {v})")?;
        }
        Ok(())
    }
}

fn invalid(message: String) -> Error {
    Error::InvalidLayout(message)
}

fn divisors(n: usize) -> Vec<usize> {
    (1..=n).filter(|d| n.is_multiple_of(*d)).collect()
}
