//! Runs a pipeline [`Schedule`] on one rank: the forward and backward passes of its
//! model chunks, with activations and gradients sent to and received from the
//! neighbouring stages.
//!
//! A chunk's input is a fresh leaf (`require_grad`) made from the activations received,
//! so that its gradient can be sent upstream after the backward; the gradient received
//! from downstream enters the chunk's graph through the surrogate loss
//! `sum(output * gradient)`, whose gradient with respect to the output is that gradient.

use std::collections::HashMap;

use burn::module::AutodiffModule;
use burn::optim::GradientsParams;
use burn::tensor::Tensor;
use burn::tensor::backend::{AutodiffBackend, Backend};

use super::engine::{ParallelModel, StageOutput, TrainStep};
use super::optimizer::MainGrads;
use crate::data::GptSample;
use crate::parallel::{ParallelBackend, ParallelContext};
use crate::pipeline::{Action, Schedule};
use crate::{Error, Result};

/// What one rank's part of a step (or an evaluation) gives.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct PassOutcome {
    /// Sum of the micro-batch losses (on the last stage; 0 elsewhere).
    pub loss_sum: f64,
    /// The most micro-batches whose activations this rank held at once.
    pub peak_in_flight: usize,
    /// Device memory the first micro-batch's forward left allocated for its backward
    /// (training, on backends that report memory; see `MegatronOps::memory_in_use`).
    pub activation_bytes: Option<u64>,
}

/// What a training pass needs besides its data.
pub(crate) struct Training<'a, B: Backend> {
    /// The step's main-grad buffers.
    pub main_grads: &'a mut MainGrads<B>,
    /// The loss scale the backward starts from.
    pub scale: f64,
    /// Measure the device memory the first micro-batch's forward leaves for its backward
    /// (`PassOutcome::activation_bytes`).
    pub measure_activations: bool,
}

/// A forward whose backward has not run yet: what the backward needs.
struct InFlight<B: AutodiffBackend> {
    input: Option<Tensor<B, 3>>,
    output: StageOutput<B>,
}

/// One rank's runner of a schedule.
pub(crate) struct StageRunner<'a, B: AutodiffBackend, S> {
    pub ctx: &'a ParallelContext,
    pub schedule: Schedule,
    pub step: &'a S,
    pub device: &'a B::Device,
}

impl<B, S> StageRunner<'_, B, S>
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
{
    /// Runs `actions` over `chunks` on `micro_batches`. With `training` it trains: runs
    /// the backwards and adds to the main-grad buffers the parameter gradients of the loss
    /// divided by the number of micro-batches and multiplied by the loss scale; without,
    /// only forwards (evaluation).
    pub fn run<M>(
        &self,
        actions: &[Action],
        chunks: &[M],
        micro_batches: &[Vec<GptSample>],
        mut training: Option<Training<'_, B::InnerBackend>>,
    ) -> Result<PassOutcome>
    where
        M: AutodiffModule<B> + ParallelModel,
        S: TrainStep<B, M>,
    {
        let stage = self.ctx.coords().pp;
        let mut in_flight: HashMap<(usize, usize), InFlight<B>> = HashMap::new();
        let mut outcome = PassOutcome::default();
        for &action in actions {
            match action {
                Action::Forward { chunk, micro } => {
                    // The first forward of a pass that measures, nothing else in flight.
                    let first = training.as_ref().is_some_and(|t| t.measure_activations)
                        && in_flight.is_empty()
                        && outcome.activation_bytes.is_none();
                    let before = first.then(|| B::memory_in_use(self.device)).flatten();
                    let samples = &micro_batches[micro];
                    let model = &chunks[chunk];
                    let input = match self.schedule.previous_stage(stage, chunk) {
                        Some(from) => {
                            let shape = activation_shape(model, samples);
                            let received = self.ctx.pipeline().recv::<B::InnerBackend, 3>(
                                shape,
                                from,
                                self.device,
                            )?;
                            let input = Tensor::<B, 3>::from_inner(received);
                            Some(if training.is_some() {
                                input.require_grad()
                            } else {
                                input
                            })
                        }
                        None => None,
                    };
                    let output = self
                        .step
                        .forward(model, input.clone(), samples, self.device);
                    match (&output, self.schedule.next_stage(stage, chunk)) {
                        (StageOutput::Activations(hidden), Some(to)) => {
                            self.ctx.pipeline().send(hidden.clone().inner(), to)?;
                        }
                        (StageOutput::Loss(loss), None) => {
                            outcome.loss_sum += super::scalar_value(loss.clone());
                        }
                        (_, next) => {
                            return Err(Error::InvalidConfig(format!(
                                "model chunk {chunk} of pipeline stage {stage} returned {} but \
                                 {}; build each chunk for its place in the pipeline",
                                match output {
                                    StageOutput::Loss(_) => "a loss",
                                    StageOutput::Activations(_) => "activations",
                                },
                                match next {
                                    Some(_) => "a later stage needs its activations",
                                    None => "it is the last virtual stage, which gives the loss",
                                }
                            )));
                        }
                    }
                    if let Some(before) = before {
                        outcome.activation_bytes =
                            B::memory_in_use(self.device).map(|after| after.saturating_sub(before));
                    }
                    if training.is_some() {
                        in_flight.insert((chunk, micro), InFlight { input, output });
                        outcome.peak_in_flight = outcome.peak_in_flight.max(in_flight.len());
                    }
                }
                Action::Backward { chunk, micro } => {
                    let Some(training) = training.as_mut() else {
                        return Err(Error::InvalidConfig(
                            "a forward-only pass got a backward action".to_string(),
                        ));
                    };
                    let InFlight { input, output } =
                        in_flight.remove(&(chunk, micro)).ok_or_else(|| {
                            Error::InvalidConfig(format!(
                                "the schedule runs the backward of micro-batch {micro} of chunk \
                                 {chunk} before its forward"
                            ))
                        })?;
                    let model = &chunks[chunk];
                    let root = match (output, self.schedule.next_stage(stage, chunk)) {
                        (StageOutput::Loss(loss), _) => {
                            loss * (training.scale / micro_batches.len() as f64)
                        }
                        (StageOutput::Activations(hidden), Some(from)) => {
                            let gradient = self
                                .ctx
                                .pipeline_gradients()
                                .recv::<B::InnerBackend, 3>(hidden.dims(), from, self.device)?;
                            (hidden * Tensor::from_inner(gradient)).sum().unsqueeze()
                        }
                        (StageOutput::Activations(_), None) => unreachable!("checked in forward"),
                    };
                    self.enter_backward_together()?;
                    let mut grads = root.backward();
                    if let (Some(input), Some(to)) =
                        (input, self.schedule.previous_stage(stage, chunk))
                    {
                        let gradient = input
                            .grad_remove(&mut grads)
                            .unwrap_or_else(|| input.inner().zeros_like());
                        self.ctx.pipeline_gradients().send(gradient, to)?;
                    }
                    training.main_grads.add::<B, M>(
                        chunk,
                        model,
                        GradientsParams::from_grads(grads, model),
                    );
                }
            }
        }
        Ok(outcome)
    }
}

impl<B: AutodiffBackend, S> StageRunner<'_, B, S> {
    /// Waits until every tensor-parallel peer is about to start the same backward, when
    /// the ranks are threads of one process.
    ///
    /// A backward holds its graph's lock in Burn's process-wide autodiff registry while
    /// it runs the tensor-parallel collectives of its region operations, and every
    /// backward ends by locking each graph in the process to clean up. Under a pipeline
    /// schedule, a rank could start its backward (holding its graph, waiting in a
    /// collective for a peer) while that peer still waits for the gradient from the next
    /// stage, whose rank is stuck cleaning up behind the first rank's graph: a deadlock
    /// (observed with tp 2 x pp 2 x dp 2 thread ranks). Peers that start together only
    /// ever wait for one another inside the backward, which always ends.
    fn enter_backward_together(&self) -> Result<()> {
        let tensor = self.ctx.tensor();
        if tensor.size() > 1 && tensor.process_group().threads_of_one_process() {
            tensor.barrier()?;
        }
        Ok(())
    }
}

fn activation_shape<M: ParallelModel>(model: &M, samples: &[GptSample]) -> [usize; 3] {
    let seq = samples.first().map_or(0, |s| s.tokens.len());
    model.activation_shape(samples.len(), seq)
}
