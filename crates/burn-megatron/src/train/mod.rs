//! The training engine: [`TrainStep`], [`train`] (which runs the pipeline schedules) and
//! the learning-rate schedule.

mod checkpointing;
mod engine;
mod optimizer;
mod pipeline;
mod schedule;

pub use checkpointing::{CheckpointParam, save_model};
pub use engine::{
    CheckpointConfig, LossScaling, ParallelModel, Segment, StageOutput, StepRecord, TrainConfig,
    TrainStep, train,
};
pub use optimizer::{AdamWSettings, FlatLayout, LossScaler, OptimizerMemory, ParamRole};
pub use schedule::{Decay, LrSchedule};

/// The value of a one-element tensor at its own precision: not through the backend's
/// default element type, which is bf16 or fp16 under mixed precision.
pub(crate) fn scalar_value<B: burn::tensor::backend::Backend, const D: usize>(
    tensor: burn::tensor::Tensor<B, D>,
) -> f64 {
    let data = tensor.into_data().convert::<f64>();
    data.as_slice::<f64>().map_or(f64::NAN, |values| values[0])
}
