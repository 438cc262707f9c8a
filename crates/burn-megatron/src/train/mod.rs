//! The training engine: [`TrainStep`], [`train`] and the learning-rate schedule.

mod engine;
mod schedule;

pub use engine::{ParallelParams, StepRecord, TrainConfig, TrainStep, train};
pub use schedule::{Decay, LrSchedule};
