//! The training engine: [`TrainStep`], [`train`] (which runs the pipeline schedules) and
//! the learning-rate schedule.

mod checkpointing;
mod engine;
mod optimizer;
mod pipeline;
mod schedule;

pub use checkpointing::{CheckpointParam, save_model};
pub use engine::{
    CheckpointConfig, LossScaling, ParallelModel, StageOutput, StepRecord, TrainConfig, TrainStep,
    train,
};
pub use optimizer::{AdamWSettings, FlatLayout, LossScaler, OptimizerMemory, ParamRole};
pub use schedule::{Decay, LrSchedule};
