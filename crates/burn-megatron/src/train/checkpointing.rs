//! Saving a training run's state as a distributed checkpoint, and continuing from one
//! in any layout.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use burn::module::{AutodiffModule, Module, ModuleVisitor, Param, ParamId};
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::engine::ParallelModel;
use super::optimizer::FlatAdamW;
use crate::checkpoint::{
    Checkpoint, CheckpointInfo, LayoutInfo, Placement, RankWriter, ScalerState, StateKind, commit,
    prepare_staging, split_shard, staging_dir,
};
use crate::parallel::{ParallelBackend, ParallelContext};
use crate::{Error, Result};

/// A parameter as checkpoints know it: its canonical name, full shape and how this rank's
/// part is cut from it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckpointParam {
    /// The parameter's id in the module.
    pub id: ParamId,
    /// The canonical name, the same in every layout (global layer indices).
    pub name: String,
    /// The dimension split over the tensor-parallel ranks (`None`: replicated).
    pub split_dim: Option<usize>,
    /// The full shape, without vocabulary padding.
    pub global_shape: Vec<usize>,
    /// A copy of a parameter held elsewhere (the last stage's tied embeddings): not
    /// saved, loaded from the parameter it copies.
    pub copy: bool,
}

/// What a checkpoint records about training besides the tensors.
pub(crate) struct RunState {
    pub iteration: usize,
    pub consumed_samples: usize,
    pub loss_scaler: Option<ScalerState>,
    pub random_state: u64,
}

/// The placement of `param`'s part on the rank at tensor-parallel coordinate `tp`.
fn placement(param: &CheckpointParam, local_shape: Vec<usize>, ctx: &ParallelContext) -> Placement {
    Placement {
        name: param.name.clone(),
        global_shape: param.global_shape.clone(),
        split_dim: param.split_dim,
        tp_rank: if param.split_dim.is_some() {
            ctx.coords().tp
        } else {
            0
        },
        tp_size: ctx.layout().tensor(),
        local_shape,
    }
}

/// Whether this rank writes `param`: each element of the model is written once (split
/// parameters by every tensor-parallel rank, replicated ones by the first, copies never).
fn writes(param: &CheckpointParam, ctx: &ParallelContext) -> bool {
    !param.copy && (param.split_dim.is_some() || ctx.coords().tp == 0)
}

/// The parameters of `chunks` as host vectors, with their shapes.
fn param_values<B: Backend, M: Module<B>>(
    chunks: &[M],
) -> HashMap<ParamId, (Vec<usize>, Vec<f32>)> {
    struct Collect<'a>(&'a mut HashMap<ParamId, (Vec<usize>, Vec<f32>)>);
    impl<B: Backend> ModuleVisitor<B> for Collect<'_> {
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
            let value = param.val();
            let shape = value.dims().to_vec();
            let values = value
                .into_data()
                .convert::<f32>()
                .into_vec()
                .expect("float parameters");
            self.0.insert(param.id, (shape, values));
        }
    }
    let mut values = HashMap::new();
    for chunk in chunks {
        chunk.visit(&mut Collect(&mut values));
    }
    values
}

/// Writes this rank's parameters (and optimizer state) as a checkpoint under `root` for
/// `state.iteration`; every rank of the job calls it. Returns the checkpoint directory.
pub(crate) fn save<B, M, O>(
    ctx: &ParallelContext,
    root: &Path,
    chunks: &[M],
    optimizer: Option<(&FlatAdamW<O>, bool)>,
    state: &RunState,
    model: &serde_json::Value,
) -> Result<PathBuf>
where
    B: Backend,
    M: Module<B> + ParallelModel,
    O: ParallelBackend,
{
    let world = ctx.world();
    if ctx.rank() == 0 {
        std::fs::create_dir_all(root).map_err(|e| Error::io(root, e))?;
        prepare_staging(root, state.iteration)?;
    }
    world.barrier()?;
    let staging = staging_dir(root, state.iteration);
    let coords = ctx.coords();
    let mut writer = RankWriter::new(ctx.rank(), [coords.tp, coords.pp, coords.dp]);
    let params: HashMap<ParamId, CheckpointParam> = chunks
        .iter()
        .flat_map(|chunk| chunk.checkpoint_params())
        .map(|param| (param.id, param))
        .collect();
    let mut values = param_values::<B, M>(chunks);
    if coords.dp == 0 {
        for chunk in chunks {
            for param in chunk.checkpoint_params() {
                if let (true, Some((shape, data))) = (writes(&param, ctx), values.remove(&param.id))
                {
                    writer.add(StateKind::Param, placement(&param, shape, ctx), 0, data);
                }
            }
        }
    }
    let distributed = optimizer.is_some_and(|(_, distributed)| distributed);
    if let Some((optimizer, _)) = optimizer
        && (distributed || coords.dp == 0)
    {
        let shapes: HashMap<ParamId, Vec<usize>> = optimizer
            .slots()
            .map(|(id, shape, _)| (id, shape.to_vec()))
            .collect();
        for (id, kind, offset, data) in optimizer.state_pieces(coords.dp) {
            let param = params.get(&id).ok_or_else(|| missing_name(id))?;
            if writes(param, ctx) {
                writer.add(
                    kind,
                    placement(param, shapes[&id].clone(), ctx),
                    offset,
                    data,
                );
            }
        }
    }
    writer.write(&staging)?;
    world.barrier()?;
    let layout = ctx.layout();
    let dir = if ctx.rank() == 0 {
        let info = CheckpointInfo {
            format: crate::checkpoint::FORMAT.to_string(),
            iteration: state.iteration,
            consumed_samples: state.consumed_samples,
            layout: LayoutInfo {
                tp: layout.tensor(),
                pp: layout.pipeline(),
                dp: layout.data(),
                virtual_stages: layout.virtual_pipeline(),
            },
            distributed_optimizer: distributed,
            optimizer_steps: optimizer.map(|(optimizer, _)| optimizer.steps()),
            loss_scaler: state.loss_scaler,
            random_state: state.random_state,
            model: model.clone(),
            ranks: (0..layout.world_size())
                .map(|rank| format!("rank-{rank:05}.json"))
                .collect(),
        };
        commit(root, &info)?
    } else {
        crate::checkpoint::iteration_dir(root, state.iteration)
    };
    world.barrier()?;
    Ok(dir)
}

/// Saves the parameters of this rank's model `chunks` (no optimizer state, iteration 0)
/// as a checkpoint under `root`, with the model's configuration `model`: what converting
/// a model into burn-megatron's format writes. Every rank of the job calls it; a
/// training run started from it begins with fresh optimizer state.
///
/// # Errors
///
/// When a file cannot be written or a collective fails.
pub fn save_model<B, M>(
    ctx: &ParallelContext,
    root: &Path,
    chunks: &[M],
    model: &serde_json::Value,
) -> Result<PathBuf>
where
    B: ParallelBackend,
    M: Module<B> + ParallelModel,
{
    let state = RunState {
        iteration: 0,
        consumed_samples: 0,
        loss_scaler: None,
        random_state: 0,
    };
    save::<B, M, B>(ctx, root, chunks, None, &state, model)
}

fn missing_name(id: ParamId) -> Error {
    Error::InvalidConfig(format!(
        "parameter {id} has no checkpoint name: ParallelModel::checkpoint_params must list \
         every parameter of the model"
    ))
}

/// Loads this rank's part of `checkpoint` into the optimizer and the model chunks: the
/// optimizer state when the checkpoint has it (the parameters follow from the master
/// weights), else the parameters with fresh moments. Works for any layout.
pub(crate) fn restore<B, M>(
    ctx: &ParallelContext,
    checkpoint: &Checkpoint,
    chunks: Vec<M>,
    optimizer: &mut FlatAdamW<B::InnerBackend>,
    device: &B::Device,
) -> Result<Vec<M>>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
    M: AutodiffModule<B> + ParallelModel,
{
    let params: HashMap<ParamId, CheckpointParam> = chunks
        .iter()
        .flat_map(|chunk| chunk.checkpoint_params())
        .map(|param| (param.id, param))
        .collect();
    let with_optimizer = checkpoint.has_optimizer_state();
    let kinds: &[StateKind] = if with_optimizer {
        &StateKind::OPTIMIZER
    } else {
        &[StateKind::Param]
    };
    let padded = optimizer.padded_len();
    let mut full = [vec![0f32; padded], vec![0f32; padded], vec![0f32; padded]];
    let slots: Vec<(ParamId, Vec<usize>, std::ops::Range<usize>)> = optimizer
        .slots()
        .map(|(id, shape, range)| (id, shape.to_vec(), range))
        .collect();
    let tp_rank = ctx.coords().tp;
    for (id, shape, range) in slots {
        let param = params.get(&id).ok_or_else(|| missing_name(id))?;
        for (index, kind) in kinds.iter().enumerate() {
            let (values, global) = checkpoint.full(*kind, &param.name)?.ok_or_else(|| {
                Error::InvalidData(format!(
                    "{}: no {} `{}` in the checkpoint; it was written for another model",
                    checkpoint.dir().display(),
                    kind.name(),
                    param.name
                ))
            })?;
            if global != param.global_shape {
                return Err(Error::InvalidData(format!(
                    "{}: `{}` has shape {global:?} in the checkpoint, the model's is {:?}",
                    checkpoint.dir().display(),
                    param.name,
                    param.global_shape
                )));
            }
            let part = split_shard(&values, &global, &shape, param.split_dim, tp_rank)?;
            full[index][range.clone()].copy_from_slice(&part);
        }
    }
    let steps = checkpoint.info().optimizer_steps.unwrap_or(0);
    Ok(optimizer.restore(full, steps, chunks, ctx.coords().dp, device))
}
