//! The training engine: [`TrainStep`], [`train`] (which runs the pipeline schedules) and
//! the learning-rate schedule.

mod engine;
mod optimizer;
mod pipeline;
mod schedule;

pub use engine::{
    LossScaling, ParallelModel, StageOutput, StepRecord, TrainConfig, TrainStep, train,
};
pub use optimizer::{AdamWSettings, FlatLayout, LossScaler, OptimizerMemory, ParamRole};
pub use schedule::{Decay, LrSchedule};
