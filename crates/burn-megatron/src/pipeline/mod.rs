//! Pipeline parallelism: which layers each stage holds ([`LayerSplit`]) and the order in
//! which stages run the passes of a step's micro-batches ([`Schedule`]). The training
//! engine runs the schedules, moving activations and gradients between neighbouring
//! stages over the pipeline groups.

mod schedule;
mod split;

pub use schedule::{Action, Schedule, ScheduleKind, Simulation};
pub use split::{LayerSplit, ModelChunk};
