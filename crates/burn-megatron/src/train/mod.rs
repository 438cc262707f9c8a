//! The training engine: [`TrainStep`], [`train`] (which runs the pipeline schedules) and
//! the learning-rate schedule.

mod engine;
mod pipeline;
mod schedule;

pub use engine::{ParallelModel, StageOutput, StepRecord, TrainConfig, TrainStep, train};
pub use schedule::{Decay, LrSchedule};
