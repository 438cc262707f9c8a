//! What a checkpoint's JSON files say: the checkpoint as a whole, and where each rank's
//! tensors belong in the full model.

use serde::{Deserialize, Serialize};

/// The format tag of `checkpoint.json`.
pub const FORMAT: &str = "burn-megatron-checkpoint/1";

/// Which state of a parameter a tensor holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateKind {
    /// The model's parameter.
    Param,
    /// The optimizer's fp32 master copy.
    Master,
    /// Adam's first moment.
    ExpAvg,
    /// Adam's second moment.
    ExpAvgSq,
}

impl StateKind {
    /// Every kind, parameters first.
    pub const ALL: [StateKind; 4] = [
        StateKind::Param,
        StateKind::Master,
        StateKind::ExpAvg,
        StateKind::ExpAvgSq,
    ];

    /// The optimizer's kinds.
    pub const OPTIMIZER: [StateKind; 3] =
        [StateKind::Master, StateKind::ExpAvg, StateKind::ExpAvgSq];

    /// The kind's name in files.
    pub fn name(self) -> &'static str {
        match self {
            StateKind::Param => "param",
            StateKind::Master => "master",
            StateKind::ExpAvg => "exp_avg",
            StateKind::ExpAvgSq => "exp_avg_sq",
        }
    }
}

/// Where a rank's part of a parameter sits in the full (canonical) tensor.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Placement {
    /// The parameter's canonical name, such as `layers.3.mlp.fc1.weight`.
    pub name: String,
    /// The full tensor's shape (without vocabulary padding).
    pub global_shape: Vec<usize>,
    /// The dimension split over the tensor-parallel ranks (`None`: replicated).
    pub split_dim: Option<usize>,
    /// This part's tensor-parallel rank.
    pub tp_rank: usize,
    /// Tensor-parallel ranks the parameter is split over.
    pub tp_size: usize,
    /// The shape of one rank's part. Along the split dimension the parts together may
    /// be longer than the full tensor (vocabulary padding, cut off when merging).
    pub local_shape: Vec<usize>,
}

/// One tensor of a rank's file: elements `offset .. offset + len` of the flattened
/// tensor-parallel part that [`Placement`] describes (all of it, or one rank's slice
/// under the distributed optimizer).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Piece {
    /// The tensor's name inside the rank's safetensors file.
    pub key: String,
    /// Which state it holds.
    pub kind: StateKind,
    /// Where it belongs.
    #[serde(flatten)]
    pub placement: Placement,
    /// First element within the flattened part.
    pub offset: usize,
    /// Elements.
    pub len: usize,
}

/// What one rank wrote.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RankManifest {
    /// The global rank.
    pub rank: usize,
    /// Its tensor-, pipeline- and data-parallel coordinates.
    pub coords: [usize; 3],
    /// Its safetensors file, relative to the checkpoint directory.
    pub file: String,
    /// The file's length in bytes.
    pub bytes: u64,
    /// The file's FNV-1a hash (hex), checked when loading.
    pub hash: String,
    /// Every tensor in the file.
    pub pieces: Vec<Piece>,
}

/// The parallel layout a checkpoint was written from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayoutInfo {
    /// Tensor-parallel size.
    pub tp: usize,
    /// Pipeline stages.
    pub pp: usize,
    /// Data-parallel size.
    pub dp: usize,
    /// Model chunks per pipeline stage.
    pub virtual_stages: usize,
}

/// The dynamic loss scaler's state.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ScalerState {
    /// The current scale.
    pub scale: f64,
    /// Steps without overflow since the scale last changed.
    pub good_steps: usize,
}

/// `checkpoint.json`: the checkpoint as a whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckpointInfo {
    /// [`FORMAT`].
    pub format: String,
    /// Optimizer steps taken (the next step is `iteration + 1`).
    pub iteration: usize,
    /// Training samples consumed (the data position).
    pub consumed_samples: usize,
    /// The layout that wrote it.
    pub layout: LayoutInfo,
    /// Whether the optimizer state was sharded over the data-parallel ranks.
    pub distributed_optimizer: bool,
    /// Adam's step count for bias correction; `None` when the checkpoint holds no
    /// optimizer state (a converted model).
    pub optimizer_steps: Option<u64>,
    /// The loss scaler, when training used one.
    pub loss_scaler: Option<ScalerState>,
    /// The random state of the model (dropout passes drawn so far).
    pub random_state: u64,
    /// The model's configuration, as the model family writes it.
    pub model: serde_json::Value,
    /// The rank manifests, relative to the checkpoint directory.
    pub ranks: Vec<String>,
}
