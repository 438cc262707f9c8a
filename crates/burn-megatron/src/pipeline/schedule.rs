//! Pipeline schedules: the order in which a stage runs the forward and backward passes
//! of one step's micro-batches.
//!
//! A schedule is a list of [`Action`]s per stage. A stage runs its list in order; a
//! forward waits for the activations of the previous virtual stage and a backward for
//! the gradient of the next one. Sends never block, so the only requirement is that the
//! lists admit a global order, which [`Schedule::simulate`] checks.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use crate::parallel::Layout;
use crate::{Error, Result};

/// Which schedule a stage follows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ScheduleKind {
    /// All forwards, then all backwards: every micro-batch's activations are held at once.
    /// For comparison; training uses 1F1B.
    GPipe,
    /// PipeDream-Flush: warm-up forwards, then one forward and one backward in turn,
    /// then cool-down backwards; a stage holds at most `stages` micro-batches.
    OneFOneB,
    /// 1F1B over model chunks (virtual stages), which shrinks the bubble by the number of
    /// chunks at the price of more point-to-point traffic.
    Interleaved,
}

/// One unit of pipeline work: the forward or backward pass of one micro-batch through
/// one model chunk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Forward pass.
    Forward {
        /// Model chunk of this stage.
        chunk: usize,
        /// Micro-batch of the step.
        micro: usize,
    },
    /// Backward pass.
    Backward {
        /// Model chunk of this stage.
        chunk: usize,
        /// Micro-batch of the step.
        micro: usize,
    },
}

/// The schedule of one optimizer step over a pipeline.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Schedule {
    kind: ScheduleKind,
    stages: usize,
    chunks: usize,
    micro_batches: usize,
}

/// What running a schedule's action lists with fixed pass costs gives.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// Time from the first forward to the last backward.
    pub makespan: f64,
    /// Idle time of a stage over its busy time: `(makespan - busy) / busy`.
    pub bubble_fraction: f64,
    /// For each stage, the most micro-batches whose forward has run and backward has not
    /// (their activations are held).
    pub peak_in_flight: Vec<usize>,
}

impl Schedule {
    /// A schedule of `micro_batches` over `stages` stages of `chunks` model chunks each.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when there are no micro-batches, when chunks above 1 are asked of
    /// a schedule other than the interleaved one, or when the interleaved schedule gets a
    /// number of micro-batches that is not a multiple of the stages (naming valid ones).
    pub fn new(
        kind: ScheduleKind,
        stages: usize,
        chunks: usize,
        micro_batches: usize,
    ) -> Result<Self> {
        if stages == 0 || chunks == 0 || micro_batches == 0 {
            return Err(Error::InvalidConfig(format!(
                "a pipeline schedule needs at least one stage, chunk and micro-batch, got \
                 {stages} stages, {chunks} chunks, {micro_batches} micro-batches"
            )));
        }
        if kind != ScheduleKind::Interleaved && chunks != 1 {
            return Err(Error::InvalidConfig(format!(
                "{kind} runs one model chunk per stage, got {chunks}"
            )));
        }
        if kind == ScheduleKind::Interleaved && !micro_batches.is_multiple_of(stages) {
            return Err(Error::InvalidConfig(format!(
                "the interleaved schedule needs the micro-batches of a step to be a multiple \
                 of the pipeline-parallel size {stages}, got {micro_batches}; use {}, {} or {} \
                 micro-batches",
                stages,
                2 * stages,
                4 * stages
            )));
        }
        Ok(Self {
            kind,
            stages,
            chunks,
            micro_batches,
        })
    }

    /// The training schedule for a layout: interleaved 1F1B with virtual stages, 1F1B
    /// otherwise (one stage runs forward, backward, forward, ...).
    ///
    /// # Errors
    ///
    /// As [`new`](Self::new).
    pub fn for_layout(layout: &Layout, micro_batches: usize) -> Result<Self> {
        let kind = if layout.virtual_pipeline() > 1 {
            ScheduleKind::Interleaved
        } else {
            ScheduleKind::OneFOneB
        };
        Self::new(
            kind,
            layout.pipeline(),
            layout.virtual_pipeline(),
            micro_batches,
        )
    }

    /// The schedule's kind.
    pub fn kind(&self) -> ScheduleKind {
        self.kind
    }

    /// Pipeline stages.
    pub fn stages(&self) -> usize {
        self.stages
    }

    /// Model chunks per stage.
    pub fn chunks(&self) -> usize {
        self.chunks
    }

    /// Micro-batches per step.
    pub fn micro_batches(&self) -> usize {
        self.micro_batches
    }

    /// The virtual stage of `chunk` on `stage`.
    pub fn virtual_stage(&self, stage: usize, chunk: usize) -> usize {
        chunk * self.stages + stage
    }

    /// The stage and chunk at virtual stage `virtual_stage`.
    fn locate(&self, virtual_stage: usize) -> (usize, usize) {
        (virtual_stage % self.stages, virtual_stage / self.stages)
    }

    /// The stage that runs the virtual stage before `chunk` of `stage`: where its
    /// forward input comes from. `None` on the first virtual stage.
    pub fn previous_stage(&self, stage: usize, chunk: usize) -> Option<usize> {
        let at = self.virtual_stage(stage, chunk);
        (at > 0).then(|| self.locate(at - 1).0)
    }

    /// The stage that runs the virtual stage after `chunk` of `stage`: where its forward
    /// output goes. `None` on the last virtual stage.
    pub fn next_stage(&self, stage: usize, chunk: usize) -> Option<usize> {
        let at = self.virtual_stage(stage, chunk) + 1;
        (at < self.stages * self.chunks).then(|| self.locate(at).0)
    }

    /// The actions of `stage` in one training step, in the order it runs them.
    pub fn actions(&self, stage: usize) -> Vec<Action> {
        let (stages, chunks, micro_batches) = (self.stages, self.chunks, self.micro_batches);
        let total = micro_batches * chunks;
        let round = stages * chunks;
        // The k-th forward (backward) of a stage: micro-batches go in groups of `stages`
        // through every chunk (backwards through the chunks in reverse).
        let micro = |k: usize| (k / round) * stages + k % stages;
        let forward = |k: usize| Action::Forward {
            chunk: (k % round) / stages,
            micro: micro(k),
        };
        let backward = |k: usize| Action::Backward {
            chunk: chunks - 1 - (k % round) / stages,
            micro: micro(k),
        };
        let warmup = match self.kind {
            ScheduleKind::GPipe => total,
            ScheduleKind::OneFOneB => (stages - stage - 1).min(total),
            ScheduleKind::Interleaved if micro_batches == stages => total,
            ScheduleKind::Interleaved => {
                ((stages - stage - 1) * 2 + (chunks - 1) * stages).min(total)
            }
        };
        let steady = total - warmup;
        let mut actions: Vec<Action> = (0..warmup).map(forward).collect();
        for k in 0..steady {
            actions.push(forward(warmup + k));
            actions.push(backward(k));
        }
        actions.extend((steady..total).map(backward));
        actions
    }

    /// The forwards of an evaluation of `micro_batches` (no backward), the same on every
    /// stage: micro-batch by micro-batch, each through every chunk.
    pub fn forward_only(&self, micro_batches: usize) -> Vec<Action> {
        (0..micro_batches)
            .flat_map(|micro| (0..self.chunks).map(move |chunk| Action::Forward { chunk, micro }))
            .collect()
    }

    /// The bubble fraction of the schedule by formula: idle over busy time per stage,
    /// `(stages - 1) / micro_batches`, divided by the chunks when interleaved.
    pub fn bubble_fraction(&self) -> f64 {
        (self.stages - 1) as f64 / (self.chunks * self.micro_batches) as f64
    }

    /// Runs every stage's action list with a forward of a whole stage costing `forward`
    /// and a backward `backward` (a chunk costs its share), sends arriving at once.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the lists deadlock, run a backward before its forward, or
    /// would receive point-to-point messages in another order than they were sent.
    pub fn simulate(&self, forward: f64, backward: f64) -> Result<Simulation> {
        let lists: Vec<Vec<Action>> = (0..self.stages).map(|s| self.actions(s)).collect();
        self.check_message_order(&lists)?;
        let last = self.stages * self.chunks - 1;
        let (forward, backward) = (forward / self.chunks as f64, backward / self.chunks as f64);
        // Finish time of (virtual stage, is backward, micro-batch).
        let mut finished: HashMap<(usize, bool, usize), f64> = HashMap::new();
        let mut next = vec![0; self.stages];
        let mut clock = vec![0.0f64; self.stages];
        let mut in_flight = vec![0usize; self.stages];
        let mut peak = vec![0usize; self.stages];
        loop {
            let mut progressed = false;
            for stage in 0..self.stages {
                while let Some(&action) = lists[stage].get(next[stage]) {
                    let (chunk, micro, is_backward) = match action {
                        Action::Forward { chunk, micro } => (chunk, micro, false),
                        Action::Backward { chunk, micro } => (chunk, micro, true),
                    };
                    let at = self.virtual_stage(stage, chunk);
                    let dependency = match (is_backward, at) {
                        (false, 0) => None,
                        (false, at) => Some((at - 1, false, micro)),
                        (true, at) if at == last => None,
                        (true, at) => Some((at + 1, true, micro)),
                    };
                    let ready = match dependency {
                        None => 0.0,
                        Some(key) => match finished.get(&key) {
                            Some(&time) => time,
                            None => break,
                        },
                    };
                    if is_backward && !finished.contains_key(&(at, false, micro)) {
                        return Err(Error::InvalidConfig(format!(
                            "stage {stage} runs the backward of micro-batch {micro} of chunk \
                             {chunk} before its forward"
                        )));
                    }
                    let cost = if is_backward { backward } else { forward };
                    clock[stage] = clock[stage].max(ready) + cost;
                    finished.insert((at, is_backward, micro), clock[stage]);
                    if is_backward {
                        in_flight[stage] -= 1;
                    } else {
                        in_flight[stage] += 1;
                        peak[stage] = peak[stage].max(in_flight[stage]);
                    }
                    next[stage] += 1;
                    progressed = true;
                }
            }
            if next.iter().zip(&lists).all(|(n, list)| *n == list.len()) {
                break;
            }
            if !progressed {
                return Err(Error::InvalidConfig(format!(
                    "the {self} schedule deadlocks: stages wait at actions {:?}",
                    next.iter()
                        .zip(&lists)
                        .map(|(n, list)| list.get(*n).copied())
                        .collect::<Vec<_>>()
                )));
            }
        }
        let makespan = clock.iter().copied().fold(0.0, f64::max);
        let busy = self.micro_batches as f64 * self.chunks as f64 * (forward + backward);
        Ok(Simulation {
            makespan,
            bubble_fraction: (makespan - busy) / busy,
            peak_in_flight: peak,
        })
    }

    /// Checks that on every channel (sender, receiver, direction) the messages are
    /// received in the order they are sent, as FIFO transports deliver them.
    fn check_message_order(&self, lists: &[Vec<Action>]) -> Result<()> {
        type Channel = (usize, usize, bool);
        let mut sent: HashMap<Channel, VecDeque<(usize, usize)>> = HashMap::new();
        let mut expected: HashMap<Channel, Vec<(usize, usize)>> = HashMap::new();
        for (stage, list) in lists.iter().enumerate() {
            for &action in list {
                let (chunk, micro, is_backward) = match action {
                    Action::Forward { chunk, micro } => (chunk, micro, false),
                    Action::Backward { chunk, micro } => (chunk, micro, true),
                };
                let at = self.virtual_stage(stage, chunk);
                let (to, from) = if is_backward {
                    (
                        self.previous_stage(stage, chunk),
                        self.next_stage(stage, chunk),
                    )
                } else {
                    (
                        self.next_stage(stage, chunk),
                        self.previous_stage(stage, chunk),
                    )
                };
                // The message names the sending virtual stage and the micro-batch.
                if let Some(to) = to {
                    sent.entry((stage, to, is_backward))
                        .or_default()
                        .push_back((at, micro));
                }
                if let Some(from) = from {
                    let sender = if is_backward { at + 1 } else { at - 1 };
                    expected
                        .entry((from, stage, is_backward))
                        .or_default()
                        .push((sender, micro));
                }
            }
        }
        for (channel, messages) in expected {
            let delivered: Vec<_> = sent.remove(&channel).unwrap_or_default().into();
            if delivered != messages {
                return Err(Error::InvalidConfig(format!(
                    "the {self} schedule would receive the messages from stage {} to stage {} \
                     in another order than they are sent",
                    channel.0, channel.1
                )));
            }
        }
        Ok(())
    }
}

impl fmt::Display for ScheduleKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ScheduleKind::GPipe => "GPipe",
            ScheduleKind::OneFOneB => "1F1B",
            ScheduleKind::Interleaved => "interleaved 1F1B",
        })
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} ({} stages, {} micro-batches",
            self.kind, self.stages, self.micro_batches
        )?;
        if self.chunks > 1 {
            write!(f, ", {} chunks per stage", self.chunks)?;
        }
        f.write_str(")")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn schedule(kind: ScheduleKind, stages: usize, chunks: usize, micro: usize) -> Schedule {
        Schedule::new(kind, stages, chunks, micro).unwrap()
    }

    #[test]
    fn one_f_one_b_warms_up_then_alternates() {
        use Action::{Backward as B, Forward as F};
        let actions = schedule(ScheduleKind::OneFOneB, 4, 1, 6).actions(1);
        let expected = vec![
            F { chunk: 0, micro: 0 },
            F { chunk: 0, micro: 1 },
            F { chunk: 0, micro: 2 },
            B { chunk: 0, micro: 0 },
            F { chunk: 0, micro: 3 },
            B { chunk: 0, micro: 1 },
            F { chunk: 0, micro: 4 },
            B { chunk: 0, micro: 2 },
            F { chunk: 0, micro: 5 },
            B { chunk: 0, micro: 3 },
            B { chunk: 0, micro: 4 },
            B { chunk: 0, micro: 5 },
        ];
        assert_eq!(actions, expected);
    }

    #[test]
    fn every_pass_runs_once_per_chunk_and_micro_batch() {
        for (kind, stages, chunks, micro) in [
            (ScheduleKind::OneFOneB, 4, 1, 3),
            (ScheduleKind::Interleaved, 2, 3, 4),
            (ScheduleKind::GPipe, 3, 1, 5),
        ] {
            let schedule = schedule(kind, stages, chunks, micro);
            for stage in 0..stages {
                let mut actions = schedule.actions(stage);
                actions.sort_by_key(|a| format!("{a:?}"));
                actions.dedup();
                assert_eq!(
                    actions.len(),
                    2 * chunks * micro,
                    "{schedule} stage {stage}"
                );
            }
        }
    }

    #[test]
    fn simulated_bubble_matches_the_formula() {
        for (kind, stages, chunks, micro) in [
            (ScheduleKind::OneFOneB, 2, 1, 4),
            (ScheduleKind::OneFOneB, 4, 1, 8),
            (ScheduleKind::OneFOneB, 4, 1, 2),
            (ScheduleKind::GPipe, 4, 1, 8),
            (ScheduleKind::Interleaved, 2, 2, 4),
            (ScheduleKind::Interleaved, 4, 2, 8),
            (ScheduleKind::Interleaved, 4, 3, 12),
            (ScheduleKind::Interleaved, 3, 2, 3),
        ] {
            let schedule = schedule(kind, stages, chunks, micro);
            for (forward, backward) in [(1.0, 1.0), (1.0, 2.0)] {
                let simulation = schedule.simulate(forward, backward).unwrap();
                assert!(
                    (simulation.bubble_fraction - schedule.bubble_fraction()).abs() < 1e-9,
                    "{schedule} f {forward} b {backward}: simulated {} formula {}",
                    simulation.bubble_fraction,
                    schedule.bubble_fraction()
                );
            }
        }
    }

    #[test]
    fn one_f_one_b_holds_at_most_stages_micro_batches() {
        let one_f_one_b = schedule(ScheduleKind::OneFOneB, 4, 1, 8).simulate(1.0, 2.0);
        assert_eq!(one_f_one_b.unwrap().peak_in_flight, vec![4, 3, 2, 1]);
        let gpipe = schedule(ScheduleKind::GPipe, 4, 1, 8).simulate(1.0, 2.0);
        assert_eq!(gpipe.unwrap().peak_in_flight, vec![8; 4]);
    }

    #[test]
    fn interleaving_needs_a_multiple_of_the_stages() {
        let error = Schedule::new(ScheduleKind::Interleaved, 4, 2, 6).unwrap_err();
        assert!(error.to_string().contains("use 4, 8 or 16"), "{error}");
    }
}
