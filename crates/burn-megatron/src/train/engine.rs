//! The training loop: micro-batches run through the pipeline schedule with gradient
//! accumulation, data-parallel gradient averaging, sequence-parallel and tied-embedding
//! gradient sums, global gradient-norm clipping, AdamW on Megatron's learning-rate
//! schedule, evaluation, logging and metrics.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::{AutodiffModule, ParamId};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{Tensor, backend::Backend};

use super::checkpointing::{CheckpointParam, RunState, restore, save};
use super::optimizer::{
    AdamWSettings, FlatAdamW, FlatLayout, LossScaler, MainGrads, ParamRole, ReduceGroups,
};
use super::pipeline::{StageRunner, Training};
use super::scalar_value;
use super::schedule::LrSchedule;
use crate::checkpoint::Checkpoint;
use crate::data::{GptSample, MicroBatchSampler, SampleSource};
use crate::parallel::{Layout, ParallelBackend, ParallelContext, RankCoords, ReduceOp};
use crate::pipeline::Schedule;
use crate::{Error, Result};

/// What a model chunk gives for a micro-batch.
#[derive(Debug, Clone)]
pub enum StageOutput<B: Backend> {
    /// Hidden states for the next pipeline stage, `[batch, seq, hidden]` (the sequence
    /// split over tensor-parallel ranks under sequence parallelism).
    Activations(Tensor<B, 3>),
    /// The micro-batch's mean loss (the last stage), a one-element tensor.
    Loss(Tensor<B, 1>),
}

/// The forward pass of one micro-batch through one model chunk: what a training job
/// optimizes.
///
/// The GPT step is next-token cross-entropy; a user can supply another loss, such as one
/// that up-weights chosen tokens.
pub trait TrainStep<B: AutodiffBackend, M>: Sync {
    /// Runs `model` (one model chunk) on a micro-batch. `input` is `None` on the first
    /// virtual pipeline stage, which starts from the samples' tokens, and the previous
    /// stage's activations elsewhere. The last stage returns the mean loss over the
    /// micro-batch's tokens, the others their activations.
    fn forward(
        &self,
        model: &M,
        input: Option<Tensor<B, 3>>,
        samples: &[GptSample],
        device: &B::Device,
    ) -> StageOutput<B>;

    /// Activation recompute by segments: what each segment of the chunk's forward keeps
    /// for the backward, in order (for example one segment per group of transformer
    /// layers), or `None` (the default) to keep the whole forward's graph.
    ///
    /// A training forward runs a [`Segment::Recomputed`] segment without a graph and keeps
    /// only its input; the backward runs its forward again just before backpropagating
    /// through it. A [`Segment::Stored`] segment keeps its graph. The segment that gives
    /// the loss always keeps its graph: its backward comes first.
    fn recompute_segments(&self, _model: &M) -> Option<Vec<Segment>> {
        None
    }

    /// Runs segment `segment` of the chunk's forward (see
    /// [`recompute_segments`](Self::recompute_segments)): `input` is the previous
    /// segment's activations (`None` for the first segment of the first virtual stage);
    /// the last segment returns what [`forward`](Self::forward) returns, the others their
    /// activations. Running segments `0..n` in order must compute `forward`.
    ///
    /// A recomputed segment runs with the chunk's random state
    /// ([`ParallelModel::random_state`]) set back to what it was before the segment's
    /// first run, so that it draws the same dropout masks.
    fn forward_segment(
        &self,
        model: &M,
        segment: usize,
        input: Option<Tensor<B, 3>>,
        samples: &[GptSample],
        device: &B::Device,
    ) -> StageOutput<B> {
        debug_assert_eq!(segment, 0, "a chunk without recompute segments has one");
        self.forward(model, input, samples, device)
    }
}

/// What a segment of a model chunk's forward keeps for its backward (see
/// [`TrainStep::recompute_segments`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Segment {
    /// Only its input: the backward runs the segment's forward again.
    Recomputed,
    /// Its whole graph.
    Stored,
}

/// What the engine must know about a model chunk under tensor and pipeline parallelism.
pub trait ParallelModel {
    /// Replicated parameters whose gradient each rank computes only for its sequence chunk
    /// (norms under sequence parallelism): summed over the tensor-parallel group.
    fn sequence_parallel_params(&self) -> HashSet<ParamId>;
    /// Parameters split across the tensor-parallel group. All others are replicated and
    /// count once in the gradient norm.
    fn tensor_parallel_params(&self) -> HashSet<ParamId>;
    /// Parameters with a copy on another pipeline stage (the embeddings that the first
    /// and last stage share when the output layer is tied to them): their gradients are
    /// summed over the embedding group, and only the first stage counts them in the norm.
    fn shared_embedding_params(&self) -> HashSet<ParamId> {
        HashSet::new()
    }
    /// The shape of the activations that enter and leave the chunk for a micro-batch of
    /// `batch` samples of `seq` tokens.
    fn activation_shape(&self, batch: usize, seq: usize) -> [usize; 3];
    /// Switches stochastic layers (dropout) on for training, off for evaluation.
    fn set_training(&self, _training: bool) {}
    /// Every parameter under its canonical name, with its full shape and split: what
    /// checkpoints save and reshape.
    fn checkpoint_params(&self) -> Vec<CheckpointParam>;
    /// The chunk's random state (for example the dropout passes drawn so far), which a
    /// checkpoint keeps.
    fn random_state(&self) -> u64 {
        0
    }
    /// Continues from a checkpoint's random state.
    fn set_random_state(&self, _state: u64) {}
}

/// Checkpointing settings of a training run.
#[derive(Debug, Clone, Default)]
pub struct CheckpointConfig {
    /// Save checkpoints under this directory (at the intervals, when exiting, and at
    /// the end).
    pub save: Option<PathBuf>,
    /// Save every this many steps (0: only when exiting and at the end).
    pub save_interval: usize,
    /// Continue from the checkpoint in this directory (its `latest`), in any layout.
    pub load: Option<PathBuf>,
    /// The model's configuration, stored with each checkpoint so that tools can rebuild
    /// the model.
    pub model: serde_json::Value,
}

/// Settings of a training run.
#[derive(Debug, Clone)]
pub struct TrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Samples per micro-batch on one data-parallel rank.
    pub micro_batch_size: usize,
    /// Samples per optimizer step over all data-parallel ranks.
    pub global_batch_size: usize,
    /// Tokens per sample.
    pub seq_length: usize,
    /// The learning-rate schedule.
    pub schedule: LrSchedule,
    /// AdamW decoupled weight decay.
    pub weight_decay: f64,
    /// AdamW beta 1.
    pub adam_beta1: f64,
    /// AdamW beta 2.
    pub adam_beta2: f64,
    /// AdamW epsilon.
    pub adam_eps: f64,
    /// Clip the global gradient norm to this (0 disables clipping).
    pub clip_grad: f64,
    /// Shard the fp32 master weights and Adam moments over the data-parallel ranks
    /// (reduce-scatter the gradients, update the shard, all-gather the parameters).
    pub distributed_optimizer: bool,
    /// Elements per gradient bucket of the data-parallel reduction.
    pub bucket_size: usize,
    /// Dynamic loss scaling (for fp16): `None` trains without.
    pub loss_scaling: Option<LossScaling>,
    /// Megatron's gradient-accumulation fusion: the linear layers' weight-gradient GEMMs
    /// add into fp32 accumulators kept for the whole step (in place on CUDA), instead of
    /// making gradients in the weights' type that are cast and added per micro-batch.
    pub gradient_accumulation_fusion: bool,
    /// Saving and loading checkpoints.
    pub checkpoint: CheckpointConfig,
    /// Stop after a step that is a multiple of this (saving a checkpoint first when
    /// saving is on); 0 never stops early. Unlike fewer `steps`, the learning-rate
    /// schedule and the data order stay those of the whole run.
    pub exit_interval: usize,
    /// Log every this many steps.
    pub log_interval: usize,
    /// Evaluate every this many steps (0: only at the end, if there is validation data).
    pub eval_interval: usize,
    /// Micro-batches per data-parallel rank in an evaluation.
    pub eval_iters: usize,
    /// Write one JSON object per logged step here.
    pub metrics: Option<PathBuf>,
    /// Show a progress bar on standard error (logging rank only).
    pub progress: bool,
}

impl TrainConfig {
    /// Micro-batches per optimizer step on each data-parallel rank, as Megatron derives
    /// them: `global_batch / (micro_batch * dp)`.
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the global batch is not a positive multiple of
    /// `micro_batch * dp`, listing valid global batch sizes.
    pub fn micro_batches(&self, dp: usize) -> Result<usize> {
        if self.micro_batch_size == 0 {
            return Err(Error::InvalidConfig(
                "--micro-batch-size must be at least 1 sample".to_string(),
            ));
        }
        let per_pass = self.micro_batch_size * dp;
        if per_pass == 0
            || self.global_batch_size == 0
            || !self.global_batch_size.is_multiple_of(per_pass)
        {
            return Err(Error::InvalidConfig(format!(
                "global batch size {} is not a multiple of micro batch size {} x data-parallel \
                 size {dp} = {per_pass}; use --global-batch-size {}, {} or {}",
                self.global_batch_size,
                self.micro_batch_size,
                per_pass,
                2 * per_pass,
                4 * per_pass
            )));
        }
        Ok(self.global_batch_size / per_pass)
    }

    /// Checks the learning rates and AdamW's settings: values that would only turn the
    /// weights into NaN or grow them are refused before any work.
    fn check_optimizer(&self) -> Result<()> {
        let schedule = &self.schedule;
        let checks: [(&str, f64, bool, &str); 7] = [
            (
                "--lr",
                schedule.max_lr,
                schedule.max_lr >= 0.0,
                "at least 0, such as 3e-4",
            ),
            (
                "--min-lr",
                schedule.min_lr,
                (0.0..=schedule.max_lr.max(0.0)).contains(&schedule.min_lr),
                "between 0 and --lr",
            ),
            (
                "--weight-decay",
                self.weight_decay,
                self.weight_decay >= 0.0,
                "at least 0, such as 0.1",
            ),
            (
                "--adam-beta1",
                self.adam_beta1,
                (0.0..1.0).contains(&self.adam_beta1),
                "in [0, 1), such as 0.9",
            ),
            (
                "--adam-beta2",
                self.adam_beta2,
                (0.0..1.0).contains(&self.adam_beta2),
                "in [0, 1), such as 0.95",
            ),
            (
                "--adam-eps",
                self.adam_eps,
                self.adam_eps > 0.0,
                "above 0, such as 1e-8",
            ),
            (
                "--clip-grad",
                self.clip_grad,
                self.clip_grad >= 0.0,
                "at least 0 (0 turns clipping off)",
            ),
        ];
        for (flag, value, valid, expected) in checks {
            if !(value.is_finite() && valid) {
                return Err(Error::InvalidConfig(format!(
                    "{flag} {value}: must be {expected}"
                )));
            }
        }
        Ok(())
    }

    /// The pipeline schedule of a step on `layout`: 1F1B, or interleaved 1F1B with
    /// virtual stages, over [`micro_batches`](Self::micro_batches).
    ///
    /// # Errors
    ///
    /// `InvalidConfig` when the batch sizes do not fit the layout, the interleaved
    /// schedule's micro-batches are not a multiple of the stages (naming a global batch
    /// size that fits), or an optimizer setting is out of range.
    pub fn schedule(&self, layout: &Layout) -> Result<Schedule> {
        if self.bucket_size == 0 {
            return Err(Error::InvalidConfig(
                "--bucket-size must be at least 1 element (the default is 40000000)".to_string(),
            ));
        }
        self.check_optimizer()?;
        if let Some(scaling) = self.loss_scaling
            && !(scaling.initial.is_finite() && scaling.initial >= 1.0)
        {
            return Err(Error::InvalidConfig(format!(
                "--initial-loss-scale {} must be a finite number of at least 1, such as 65536",
                scaling.initial
            )));
        }
        let micro_batches = self.micro_batches(layout.data())?;
        Schedule::for_layout(layout, micro_batches).map_err(|error| {
            let stages = layout.pipeline();
            let fitting = micro_batches.div_ceil(stages).max(1) * stages;
            Error::InvalidConfig(format!(
                "{error} (micro-batches = global batch {} / (micro batch {} x dp {})); for \
                 example --global-batch-size {}",
                self.global_batch_size,
                self.micro_batch_size,
                layout.data(),
                fitting * self.micro_batch_size * layout.data()
            ))
        })
    }
}

/// Dynamic loss-scaling settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LossScaling {
    /// The first scale.
    pub initial: f64,
    /// Steps without overflow before the scale doubles.
    pub growth_interval: usize,
}

/// One logged step.
#[derive(Debug, Clone, PartialEq)]
pub struct StepRecord {
    /// Optimizer step (from 1).
    pub step: usize,
    /// Training loss: mean over the step's micro-batches and data-parallel ranks.
    pub loss: f64,
    /// Learning rate of the step.
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    /// Tokens of the global batch per second of the step.
    pub tokens_per_s: f64,
    /// Validation loss, when evaluated at this step.
    pub eval_loss: Option<f64>,
    /// The most micro-batches whose activations this rank held at once during the step
    /// (pipeline schedules bound it; it differs between stages).
    pub peak_in_flight: usize,
    /// The loss scale the step ran with, under dynamic loss scaling.
    pub loss_scale: Option<f64>,
    /// Whether the step was skipped because its gradients overflowed.
    pub skipped: bool,
}

impl StepRecord {
    /// The record as one JSON line.
    pub fn to_json(&self) -> String {
        let mut eval = self
            .eval_loss
            .map(|loss| format!(", \"eval_loss\": {loss}, \"eval_ppl\": {}", loss.exp()))
            .unwrap_or_default();
        if let Some(scale) = self.loss_scale {
            eval.push_str(&format!(
                ", \"loss_scale\": {scale}, \"skipped\": {}",
                self.skipped
            ));
        }
        format!(
            "{{\"step\": {}, \"loss\": {}, \"lr\": {}, \"grad_norm\": {}, \"tokens_per_s\": {:.1}{eval}}}",
            self.step, self.loss, self.lr, self.grad_norm, self.tokens_per_s
        )
    }
}

/// Trains the model chunks of this rank (one per virtual pipeline stage it runs, one
/// without interleaving) for `config.steps` optimizer steps on this rank's share of
/// `train_data`, and returns them with a record of every step (the same on every rank,
/// but for [`StepRecord::peak_in_flight`]).
///
/// # Errors
///
/// When the batch sizes do not fit the layout or schedule, the data runs out, a
/// collective fails, or the metrics file cannot be written.
#[allow(clippy::too_many_arguments)]
pub fn train<B, M, S>(
    ctx: &ParallelContext,
    mut chunks: Vec<M>,
    step: &S,
    train_data: &dyn SampleSource,
    valid_data: Option<&dyn SampleSource>,
    config: &TrainConfig,
    device: &B::Device,
) -> Result<(Vec<M>, Vec<StepRecord>)>
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
    M: AutodiffModule<B> + ParallelModel,
    S: TrainStep<B, M>,
{
    let layout = *ctx.layout();
    let schedule = config.schedule(&layout)?;
    let micro_batches = schedule.micro_batches();
    if chunks.len() != schedule.chunks() {
        return Err(Error::InvalidConfig(format!(
            "the layout runs {} model chunks per pipeline stage, got {}",
            schedule.chunks(),
            chunks.len()
        )));
    }
    let needed = config.steps * config.global_batch_size;
    if train_data.len() < needed {
        return Err(Error::InvalidConfig(format!(
            "{} steps of global batch {} need {needed} training samples, the data has {}; \
             request more samples or fewer steps",
            config.steps,
            config.global_batch_size,
            train_data.len()
        )));
    }
    let coords = ctx.coords();
    let logging = ctx.rank() == layout.logging_rank();
    let roles: Vec<_> = chunks.iter().map(ParamRoles::of).collect();
    let layout_of_params = FlatLayout::new(
        &chunks,
        layout.data(),
        config.bucket_size,
        |chunk, id, _| roles[chunk].role(id, coords),
    );
    let mut optimizer = FlatAdamW::new(
        layout_of_params,
        &chunks,
        AdamWSettings {
            beta1: config.adam_beta1,
            beta2: config.adam_beta2,
            eps: config.adam_eps,
            weight_decay: config.weight_decay,
        },
        config.distributed_optimizer,
        ctx.data(),
        device,
    );
    let mut scaler = config
        .loss_scaling
        .map(|scaling| LossScaler::new(scaling.initial, scaling.growth_interval));
    let mut start = RunState {
        iteration: 0,
        consumed_samples: 0,
        loss_scaler: None,
        random_state: 0,
    };
    if let Some(path) = &config.checkpoint.load {
        let checkpoint = Checkpoint::open(path)?;
        chunks = restore(ctx, &checkpoint, chunks, &mut optimizer, device)?;
        let info = checkpoint.info();
        start = RunState {
            iteration: info.iteration,
            consumed_samples: info.consumed_samples,
            loss_scaler: info.loss_scaler,
            random_state: info.random_state,
        };
        if let (Some(scaler), Some(state)) = (&mut scaler, info.loss_scaler) {
            scaler.restore(state);
        }
        for chunk in &chunks {
            chunk.set_random_state(info.random_state);
        }
        if logging {
            println!(
                "loaded {} (iteration {}, {} samples consumed, written at tp {} x pp {} x dp {}{})",
                checkpoint.dir().display(),
                info.iteration,
                info.consumed_samples,
                info.layout.tp,
                info.layout.pp,
                info.layout.dp,
                if checkpoint.has_optimizer_state() {
                    ", with optimizer state"
                } else {
                    ", parameters only: fresh optimizer state"
                }
            );
        }
    }
    let mut sampler = MicroBatchSampler::new(
        train_data.len(),
        start.consumed_samples,
        config.micro_batch_size,
        coords.dp,
        layout.data(),
    )?;
    let runner = StageRunner {
        ctx,
        schedule,
        step,
        device,
    };
    let actions = schedule.actions(coords.pp);
    let mut metrics = match (&config.metrics, logging) {
        // A resumed run continues the file of the run it resumes.
        (Some(path), true) => Some(
            std::fs::OpenOptions::new()
                .create(true)
                .write(true)
                .append(config.checkpoint.load.is_some())
                .truncate(config.checkpoint.load.is_none())
                .open(path)
                .map_err(|e| Error::io(path, e))?,
        ),
        _ => None,
    };
    let progress = (config.progress && logging).then(|| progress_bar(config.steps));
    if logging {
        let line = format!(
            "training {} steps: global batch {} = micro batch {} x {micro_batches} micro-batches x \
             dp {}, {} tokens per step, layout {}",
            config.steps,
            config.global_batch_size,
            config.micro_batch_size,
            layout.data(),
            config.global_batch_size * config.seq_length,
            layout
        );
        print_line(&progress, line);
        print_line(&progress, optimizer.memory().to_string());
        if layout.pipeline() > 1 {
            // Backward costs twice the forward, as in a transformer.
            let simulated = schedule.simulate(1.0, 2.0)?;
            let formula = if schedule.chunks() > 1 {
                "(pp - 1) / (v x m)"
            } else {
                "(pp - 1) / m"
            };
            print_line(
                &progress,
                format!(
                    "pipeline: {schedule}: bubble {formula} = {:.4} of compute time (simulated \
                     schedule: {:.4}); at most {} micro-batches of activations per stage",
                    schedule.bubble_fraction(),
                    simulated.bubble_fraction,
                    simulated.peak_in_flight.iter().max().copied().unwrap_or(0)
                ),
            );
        }
    }

    let mut records = Vec::with_capacity(config.steps);
    for index in start.iteration + 1..=config.steps {
        for chunk in &chunks {
            chunk.set_training(true);
        }
        let started = Instant::now();
        let mut phases = HostPhases::new(started);
        let samples = (0..micro_batches)
            .map(|_| {
                let range = sampler.next_micro_batch().ok_or_else(|| {
                    Error::InvalidConfig("the training data ran out of samples".to_string())
                })?;
                range.map(|i| train_data.get(i)).collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let scale = scaler.as_ref().map_or(1.0, |scaler| scaler.scale);
        let mut main_grads = MainGrads::new(chunks.len());
        if config.gradient_accumulation_fusion {
            crate::ops::begin_weight_grads::<B::InnerBackend>();
        }
        let training = Training {
            main_grads: &mut main_grads,
            scale,
            measure_activations: logging && index == start.iteration + 1,
        };
        phases.end("batch");
        let outcome = runner.run(&actions, &chunks, &samples, Some(training));
        let fused = crate::ops::take_weight_grads::<B::InnerBackend>();
        let outcome = outcome?;
        phases.end("forward+backward");
        let groups = ReduceGroups {
            tensor: ctx.tensor(),
            data: ctx.data(),
            embedding: ctx.embedding(),
        };
        let reduced = optimizer.reduce(main_grads, fused, &groups, scale, device)?;
        phases.end("reduce+norm");
        let overflow = match &scaler {
            Some(_) => any_rank::<B>(ctx, !reduced.norm_squared.is_finite(), device)?,
            None => false,
        };
        let sharded = config.distributed_optimizer;
        let grad_norm = global_norm::<B>(ctx, reduced.norm_squared, sharded, device)?;
        phases.end("global norm");
        if scaler.is_none() && !grad_norm.is_finite() {
            // Every rank has the same global norm: all stop here together.
            return Err(Error::Diverged {
                step: index,
                grad_norm,
            });
        }
        let loss_scale = scaler.as_ref().map(|scaler| scaler.scale);
        let apply = scaler.as_mut().is_none_or(|scaler| scaler.update(overflow));
        let lr = config.schedule.lr(index);
        if apply {
            let factor = if config.clip_grad > 0.0 {
                (config.clip_grad / (grad_norm + 1e-6)).min(1.0)
            } else {
                1.0
            };
            chunks = optimizer.step(reduced, factor, lr, chunks, ctx.data())?;
            phases.end("optimizer");
        } else if logging {
            print_line(
                &progress,
                format!(
                    "step {index}: gradients overflowed at loss scale {}; step skipped, scale \
                     now {}",
                    loss_scale.unwrap_or(1.0),
                    scaler.as_ref().map_or(1.0, |scaler| scaler.scale)
                ),
            );
        }
        if let Some(bytes) = outcome.activation_bytes {
            print_line(
                &progress,
                format!(
                    "activation memory: {:.1} MiB held after one micro-batch's forward for its \
                     backward (this rank)",
                    bytes as f64 / (1u64 << 20) as f64
                ),
            );
        }
        let loss = loss_of_step::<B>(ctx, outcome.loss_sum, micro_batches, device)?;
        B::check_queued_ops().map_err(Error::Device)?;
        let seconds = started.elapsed().as_secs_f64();
        phases.end("loss");
        if logging {
            phases.report(index);
        }

        let evaluate = valid_data.is_some()
            && ((config.eval_interval > 0 && index % config.eval_interval == 0)
                || index == config.steps);
        for chunk in &chunks {
            chunk.set_training(false);
        }
        let eval_loss = match (evaluate, valid_data) {
            (true, Some(valid)) => Some(evaluate_loss(&runner, &chunks, valid, config)?),
            _ => None,
        };
        let record = StepRecord {
            step: index,
            loss,
            lr,
            grad_norm,
            tokens_per_s: (config.global_batch_size * config.seq_length) as f64 / seconds,
            eval_loss,
            peak_in_flight: outcome.peak_in_flight,
            loss_scale,
            skipped: !apply,
        };
        if let Some(bar) = &progress {
            bar.set_position(index as u64);
            bar.set_message(format!("loss {loss:.4}"));
        }
        let log_now =
            index % config.log_interval.max(1) == 0 || index == config.steps || eval_loss.is_some();
        if logging && log_now {
            let mut line = format!(
                "step {index:>6}/{} | loss {loss:.4} | lr {lr:.3e} | grad norm {grad_norm:.3} | {:.0} tokens/s",
                config.steps, record.tokens_per_s
            );
            if let Some(eval) = eval_loss {
                line.push_str(&format!(
                    " | eval loss {eval:.4} | eval ppl {:.2}",
                    eval.exp()
                ));
            }
            print_line(&progress, line);
            if let (Some(file), Some(path)) = (&mut metrics, &config.metrics) {
                writeln!(file, "{}", record.to_json()).map_err(|e| Error::io(path, e))?;
            }
        }
        records.push(record);
        let exit = config.exit_interval > 0 && index % config.exit_interval == 0;
        let interval = config.checkpoint.save_interval;
        if let Some(root) = &config.checkpoint.save
            && ((interval > 0 && index % interval == 0) || exit || index == config.steps)
        {
            let state = RunState {
                iteration: index,
                consumed_samples: start.consumed_samples
                    + (index - start.iteration) * config.global_batch_size,
                loss_scaler: scaler.as_ref().map(LossScaler::state),
                random_state: chunks.first().map_or(0, ParallelModel::random_state),
            };
            let distributed = config.distributed_optimizer;
            let dir = save::<B, M, B::InnerBackend>(
                ctx,
                root,
                &chunks,
                Some((&optimizer, distributed)),
                &state,
                &config.checkpoint.model,
            )?;
            if logging {
                print_line(&progress, format!("saved {}", dir.display()));
            }
        }
        if exit {
            if logging {
                print_line(
                    &progress,
                    format!(
                        "exiting after step {index} (--exit-interval {})",
                        config.exit_interval
                    ),
                );
            }
            break;
        }
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok((chunks, records))
}

/// The host's time in each phase of a training step, printed to stderr after each step
/// when `BURN_MEGATRON_HOST_PHASES=1`: where the host spends a step, for finding what
/// keeps the GPU waiting. The phases that read a value back (the loss, the gradient norm)
/// include the wait for the GPU.
struct HostPhases {
    last: Instant,
    phases: Vec<(&'static str, f64)>,
}

impl HostPhases {
    fn new(started: Instant) -> Self {
        Self {
            last: started,
            phases: Vec::new(),
        }
    }

    /// Whether the phases are reported (`BURN_MEGATRON_HOST_PHASES=1`).
    fn enabled() -> bool {
        static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
        burn_megatron_kernels::environment_switch(&ON, "BURN_MEGATRON_HOST_PHASES")
    }

    /// Ends phase `name` now.
    fn end(&mut self, name: &'static str) {
        if Self::enabled() {
            let now = Instant::now();
            self.phases
                .push((name, now.duration_since(self.last).as_secs_f64() * 1e3));
            self.last = now;
        }
    }

    /// Prints step `step`'s phases (when enabled).
    fn report(&self, step: usize) {
        if Self::enabled() {
            let phases: Vec<String> = self
                .phases
                .iter()
                .map(|(name, ms)| format!("{name} {ms:.2}"))
                .collect();
            eprintln!("host phases of step {step} (ms): {}", phases.join(" | "));
        }
    }
}

/// How the engine treats each parameter of a model chunk.
struct ParamRoles {
    sequence_parallel: HashSet<ParamId>,
    tensor_parallel: HashSet<ParamId>,
    shared_embedding: HashSet<ParamId>,
}

impl ParamRoles {
    fn of<M: ParallelModel>(chunk: &M) -> Self {
        Self {
            sequence_parallel: chunk.sequence_parallel_params(),
            tensor_parallel: chunk.tensor_parallel_params(),
            shared_embedding: chunk.shared_embedding_params(),
        }
    }

    /// The role of parameter `id` on the rank at `coords`: split parameters count in the
    /// norm on every tensor-parallel rank, replicated ones on the first; a shared
    /// embedding only on the first pipeline stage.
    fn role(&self, id: ParamId, coords: RankCoords) -> ParamRole {
        let shared_embedding = self.shared_embedding.contains(&id);
        let split = self.tensor_parallel.contains(&id);
        ParamRole {
            sequence_parallel: self.sequence_parallel.contains(&id),
            shared_embedding,
            counted_in_norm: !(shared_embedding && coords.pp != 0) && (split || coords.tp == 0),
        }
    }
}

/// Whether `flag` is set on any rank of the job.
fn any_rank<B>(ctx: &ParallelContext, flag: bool, device: &B::Device) -> Result<bool>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    let tensor = scalar::<B::InnerBackend>(f32::from(u8::from(flag)), device);
    let any = ctx.world().all_reduce(tensor, ReduceOp::Max)?;
    Ok(scalar_value(any) > 0.0)
}

/// The mean loss over `eval_iters` micro-batches of validation data per data-parallel
/// rank, averaged over the ranks, through the forward-only pipeline schedule.
fn evaluate_loss<B, M, S>(
    runner: &StageRunner<'_, B, S>,
    chunks: &[M],
    valid: &dyn SampleSource,
    config: &TrainConfig,
) -> Result<f64>
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
    M: AutodiffModule<B> + ParallelModel,
    S: TrainStep<B, M>,
{
    let ctx = runner.ctx;
    let mut sampler = MicroBatchSampler::new(
        valid.len(),
        0,
        config.micro_batch_size,
        ctx.coords().dp,
        ctx.layout().data(),
    )?;
    let mut samples = Vec::new();
    for _ in 0..config.eval_iters.max(1) {
        let Some(range) = sampler.next_micro_batch() else {
            break;
        };
        samples.push(range.map(|i| valid.get(i)).collect::<Result<Vec<_>>>()?);
    }
    if samples.is_empty() {
        return Err(Error::InvalidConfig(format!(
            "the validation data has {} samples, fewer than one micro-batch per data-parallel rank",
            valid.len()
        )));
    }
    let actions = runner.schedule.forward_only(samples.len());
    let outcome = runner.run(&actions, chunks, &samples, None)?;
    loss_of_step::<B>(ctx, outcome.loss_sum, samples.len(), runner.device)
}

/// The loss of a step on every rank: the mean of the last stage's `micro_batches` losses
/// (summed on the device; the loss lives there), averaged over its data-parallel group and
/// handed to the other stages. Reads it back: waits for the device.
fn loss_of_step<B>(
    ctx: &ParallelContext,
    loss_sum: Option<Tensor<B::InnerBackend, 1>>,
    micro_batches: usize,
    device: &B::Device,
) -> Result<f64>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    let tensor = match loss_sum {
        Some(sum) => sum / micro_batches.max(1) as f64,
        None => scalar::<B::InnerBackend>(0.0, device),
    };
    let mean = ctx.data().all_reduce(tensor, ReduceOp::Mean)?;
    let last_stage = ctx.coords().pp + 1 == ctx.layout().pipeline();
    let mean = if last_stage { mean } else { mean.zeros_like() };
    let loss = ctx.pipeline().all_reduce(mean, ReduceOp::Sum)?;
    Ok(scalar_value(loss))
}

/// The global gradient norm from this rank's sum of squares (split parameters on every
/// tensor-parallel rank, replicated ones on the first), summed over the data-parallel
/// group when each rank holds a shard, the tensor-parallel group and the pipeline stages.
fn global_norm<B>(
    ctx: &ParallelContext,
    norm_squared: f64,
    sharded: bool,
    device: &B::Device,
) -> Result<f64>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    let alone = |group: &crate::parallel::Group| group.size() == 1;
    if (!sharded || alone(ctx.data())) && alone(ctx.tensor()) && alone(ctx.pipeline()) {
        // Nothing to sum over: no trip through the device.
        return Ok(norm_squared.sqrt());
    }
    let mut total = scalar::<B::InnerBackend>(norm_squared as f32, device);
    if sharded {
        total = ctx.data().all_reduce(total, ReduceOp::Sum)?;
    }
    let total = ctx.tensor().all_reduce(total, ReduceOp::Sum)?;
    let total = ctx.pipeline().all_reduce(total, ReduceOp::Sum)?;
    Ok(scalar_value(total).sqrt())
}

/// A one-element fp32 tensor (whatever the backend's default float type, so that
/// reported losses and norms keep fp32 precision under bf16 training).
fn scalar<B: Backend>(value: f32, device: &B::Device) -> Tensor<B, 1> {
    Tensor::from_data(
        burn::tensor::TensorData::new(vec![value], [1]),
        (device, burn::tensor::DType::F32),
    )
}

fn progress_bar(steps: usize) -> indicatif::ProgressBar {
    let bar = indicatif::ProgressBar::new(steps as u64);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} train [{bar:40}] {pos}/{len} steps {msg} eta {eta}",
        )
        .expect("a valid template")
        .progress_chars("=> "),
    );
    bar
}

fn print_line(progress: &Option<indicatif::ProgressBar>, line: String) {
    match progress {
        Some(bar) => bar.println(line),
        None => println!("{line}"),
    }
}
