//! Runs a pipeline [`Schedule`] on one rank: the forward and backward passes of its
//! model chunks, with activations and gradients sent to and received from the
//! neighbouring stages.
//!
//! A chunk's input is a fresh leaf (`require_grad`) made from the activations received,
//! so that its gradient can be sent upstream after the backward; the gradient received
//! from downstream enters the chunk's graph through the surrogate loss
//! `sum(output * gradient)`, whose gradient with respect to the output is that gradient.
//!
//! Under activation recompute ([`TrainStep::recompute_segments`]) a chunk's forward runs
//! as segments, each from a leaf of its own; a recomputed segment runs without a graph and
//! keeps only its input, and the backward runs it again just before backpropagating
//! through it; the segments are backpropagated last to first, each the same way.

use std::collections::HashMap;

use burn::module::{AutodiffModule, ModuleVisitor, Param};
use burn::optim::GradientsParams;
use burn::tensor::backend::{AutodiffBackend, Backend};
use burn::tensor::{DType, Tensor};
use burn_megatron_kernels::with_dtype;

use super::engine::{ParallelModel, Segment, StageOutput, TrainStep};
use super::optimizer::MainGrads;
use crate::data::GptSample;
use crate::parallel::{ParallelBackend, ParallelContext};
use crate::pipeline::{Action, Schedule};
use crate::{Error, Result};

/// What one rank's part of a step (or an evaluation) gives.
#[derive(Debug, Clone)]
pub(crate) struct PassOutcome<B: Backend> {
    /// Sum of the micro-batch losses in fp32, `[1]`, on the device (the last stage's;
    /// none elsewhere): read once a step, so that no micro-batch waits for the device
    /// between its forward and its backward.
    pub loss_sum: Option<Tensor<B, 1>>,
    /// The most micro-batches whose activations this rank held at once.
    pub peak_in_flight: usize,
    /// Device memory the first micro-batch's forward left allocated for its backward
    /// (training, on backends that report memory; see `MegatronOps::memory_in_use`).
    pub activation_bytes: Option<u64>,
}

impl<B: Backend> Default for PassOutcome<B> {
    fn default() -> Self {
        Self {
            loss_sum: None,
            peak_in_flight: 0,
            activation_bytes: None,
        }
    }
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
    /// The chunk's forward segments, first to last (one stored segment without
    /// activation recompute).
    segments: Vec<SegmentState<B>>,
    /// The shape of the activations the chunk sent to the next stage (the gradient that
    /// comes back has it).
    sent: Option<[usize; 3]>,
}

/// What the backward of a forward segment needs.
enum SegmentState<B: AutodiffBackend> {
    /// The segment's graph: its input (a leaf) and output.
    Stored {
        input: Option<Tensor<B, 3>>,
        output: StageOutput<B>,
    },
    /// What running the segment again needs: its input and the chunk's random state
    /// before it ran.
    Recomputed {
        input: Option<Tensor<B::InnerBackend, 3>>,
        random_state: u64,
    },
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
    ) -> Result<PassOutcome<B::InnerBackend>>
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
                            Some(Tensor::<B, 3>::from_inner(received))
                        }
                        None => None,
                    };
                    let gives_loss = self.schedule.next_stage(stage, chunk).is_none();
                    let (output, segments) = match training {
                        Some(_) => self.forward_segments(model, input, gives_loss, samples),
                        None => {
                            let output = self.step.forward(model, input, samples, self.device);
                            (Ok(output), Vec::new())
                        }
                    };
                    let output = output?;
                    let mut sent = None;
                    match (&output, self.schedule.next_stage(stage, chunk)) {
                        (StageOutput::Activations(hidden), Some(to)) => {
                            sent = Some(hidden.dims());
                            self.ctx.pipeline().send(hidden.clone().inner(), to)?;
                        }
                        (StageOutput::Loss(loss), None) => {
                            let loss = with_dtype(loss.clone().inner().reshape([1]), DType::F32);
                            outcome.loss_sum = Some(match outcome.loss_sum.take() {
                                Some(sum) => sum + loss,
                                None => loss,
                            });
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
                        let forward = InFlight { segments, sent };
                        in_flight.insert((chunk, micro), forward);
                        outcome.peak_in_flight = outcome.peak_in_flight.max(in_flight.len());
                    }
                }
                Action::Backward { chunk, micro } => {
                    let Some(training) = training.as_mut() else {
                        return Err(Error::InvalidConfig(
                            "a forward-only pass got a backward action".to_string(),
                        ));
                    };
                    let forward = in_flight.remove(&(chunk, micro)).ok_or_else(|| {
                        Error::InvalidConfig(format!(
                            "the schedule runs the backward of micro-batch {micro} of chunk \
                             {chunk} before its forward"
                        ))
                    })?;
                    let loss_weight = training.scale / micro_batches.len() as f64;
                    let model = &chunks[chunk];
                    let samples = &micro_batches[micro];
                    let grads = self.backward(model, chunk, samples, forward, loss_weight)?;
                    training.main_grads.add::<B, M>(chunk, model, grads);
                }
            }
        }
        Ok(outcome)
    }
}

impl<B, S> StageRunner<'_, B, S>
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
{
    /// A training forward of a chunk, as the segments of the step's recompute plan (one
    /// stored segment without one): a recomputed segment without a graph (on a copy of `model` whose parameters do not
    /// require gradients), keeping its input; a stored segment, and the one that gives the
    /// loss (`gives_loss`), on a fresh leaf, keeping its graph. Gives the chunk's output
    /// (or the error of a segment before the last that gave a loss) and the segments'
    /// states.
    fn forward_segments<M>(
        &self,
        model: &M,
        input: Option<Tensor<B, 3>>,
        gives_loss: bool,
        samples: &[GptSample],
    ) -> (Result<StageOutput<B>>, Vec<SegmentState<B>>)
    where
        M: AutodiffModule<B> + ParallelModel,
        S: TrainStep<B, M>,
    {
        let plan = self
            .step
            .recompute_segments(model)
            .filter(|plan| !plan.is_empty());
        let segmented = plan.is_some();
        let plan = plan.unwrap_or_else(|| vec![Segment::Stored]);
        let untracked = plan
            .contains(&Segment::Recomputed)
            .then(|| model.clone().no_grad());
        let count = plan.len();
        let mut states = Vec::with_capacity(count);
        let mut hidden = input;
        for (segment, &kind) in plan.iter().enumerate() {
            let last = segment + 1 == count;
            // Each segment starts from its own leaf, so that it backpropagates alone (Burn's
            // `detach` keeps `require_grad`: the leaf is made from the inner tensor).
            let leaf = hidden.take().map(|h| Tensor::<B, 3>::from_inner(h.inner()));
            let output = match (&untracked, kind == Segment::Stored || (last && gives_loss)) {
                (Some(untracked), false) => {
                    states.push(SegmentState::Recomputed {
                        input: leaf.clone().map(Tensor::inner),
                        random_state: model.random_state(),
                    });
                    let output =
                        self.step
                            .forward_segment(untracked, segment, leaf, samples, self.device);
                    if let StageOutput::Activations(output) = &output {
                        debug_assert!(
                            !output.is_require_grad(),
                            "segment {segment} built a graph without tracked inputs"
                        );
                    }
                    output
                }
                _ => {
                    let input = leaf.map(Tensor::require_grad);
                    let output = if segmented {
                        let input = input.clone();
                        self.step
                            .forward_segment(model, segment, input, samples, self.device)
                    } else {
                        self.step
                            .forward(model, input.clone(), samples, self.device)
                    };
                    states.push(SegmentState::Stored {
                        input,
                        output: output.clone(),
                    });
                    output
                }
            };
            match output {
                StageOutput::Activations(output) => hidden = Some(output),
                loss if last => return (Ok(loss), states),
                StageOutput::Loss(_) => {
                    let error = Error::InvalidConfig(format!(
                        "recompute segment {segment} of {count} returned a loss; only the last \
                         segment of the last virtual stage gives one"
                    ));
                    return (Err(error), states);
                }
            }
        }
        let output = hidden.expect("the last segment gave activations");
        (Ok(StageOutput::Activations(output)), states)
    }

    /// The backward of one micro-batch of chunk `chunk` (`model`): backpropagates its
    /// segments last to first (running a recomputed segment's forward again first), from
    /// the loss times `loss_weight` or the gradient received from the next stage, and
    /// sends the gradient of the chunk's input to the previous stage. Gives the
    /// parameters' gradients.
    fn backward<M>(
        &self,
        model: &M,
        chunk: usize,
        samples: &[GptSample],
        forward: InFlight<B>,
        loss_weight: f64,
    ) -> Result<GradientsParams>
    where
        M: AutodiffModule<B> + ParallelModel,
        S: TrainStep<B, M>,
    {
        let stage = self.ctx.coords().pp;
        let InFlight { segments, sent } = forward;
        let mut grads = GradientsParams::new();
        // The gradient of the loss with respect to the output of the segment to
        // backpropagate next (`None` for the chunk's own output).
        let mut gradient: Option<Tensor<B::InnerBackend, 3>> = None;
        for (segment, state) in segments.into_iter().enumerate().rev() {
            let (input, output) = match state {
                SegmentState::Stored { input, output } => (input, output),
                SegmentState::Recomputed {
                    input,
                    random_state,
                } => {
                    let input = input.map(|input| Tensor::from_inner(input).require_grad());
                    let current = model.random_state();
                    model.set_random_state(random_state);
                    let output = self.step.forward_segment(
                        model,
                        segment,
                        input.clone(),
                        samples,
                        self.device,
                    );
                    model.set_random_state(current);
                    (input, output)
                }
            };
            let root = match output {
                StageOutput::Loss(loss) => loss * loss_weight,
                StageOutput::Activations(hidden) => {
                    let upstream = match gradient.take() {
                        Some(upstream) => upstream,
                        None => {
                            let (Some(from), Some(dims)) =
                                (self.schedule.next_stage(stage, chunk), sent)
                            else {
                                unreachable!("a chunk that sent activations has a next stage")
                            };
                            self.ctx.pipeline_gradients().recv::<B::InnerBackend, 3>(
                                dims,
                                from,
                                self.device,
                            )?
                        }
                    };
                    (hidden * Tensor::from_inner(upstream)).sum().unsqueeze()
                }
            };
            gradient = self.backpropagate(model, root, input, &mut grads)?;
        }
        if let (Some(gradient), Some(to)) = (gradient, self.schedule.previous_stage(stage, chunk)) {
            self.ctx.pipeline_gradients().send(gradient, to)?;
        }
        Ok(grads)
    }

    /// Backpropagates from `root` (a one-element tensor): adds the parameters' gradients
    /// to `grads` and gives the gradient of `input` (zeros when the graph does not reach
    /// it; `None` without an input).
    fn backpropagate<M>(
        &self,
        model: &M,
        root: Tensor<B, 1>,
        input: Option<Tensor<B, 3>>,
        grads: &mut GradientsParams,
    ) -> Result<Option<Tensor<B::InnerBackend, 3>>>
    where
        M: AutodiffModule<B>,
    {
        self.enter_backward_together()?;
        let mut backward = root.backward();
        let input_grad = input.map(|input| {
            input
                .grad_remove(&mut backward)
                .unwrap_or_else(|| input.inner().zeros_like())
        });
        let params = GradientsParams::from_grads(backward, model);
        if grads.is_empty() {
            *grads = params;
        } else {
            model.visit(&mut AddGrads {
                into: grads,
                from: params,
            });
        }
        Ok(input_grad)
    }
}

/// Adds one backward's parameter gradients (`from`) to those of earlier ones (`into`).
struct AddGrads<'a> {
    into: &'a mut GradientsParams,
    from: GradientsParams,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for AddGrads<'_> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.from.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let sum = match self.into.remove::<B::InnerBackend, D>(param.id) {
            Some(earlier) => earlier + grad,
            None => grad,
        };
        self.into.register(param.id, sum);
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
