//! The training loop: micro-batches with gradient accumulation, data-parallel gradient
//! averaging, sequence-parallel gradient sums, global gradient-norm clipping, AdamW on
//! Megatron's learning-rate schedule, evaluation, logging and metrics.

use std::collections::HashSet;
use std::io::Write;
use std::path::PathBuf;
use std::time::Instant;

use burn::module::{AutodiffModule, ModuleVisitor, Param, ParamId};
use burn::optim::{AdamWConfig, GradientsParams, Optimizer};
use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{ElementConversion, Tensor};

use super::schedule::LrSchedule;
use crate::data::{GptSample, MicroBatchSampler, SampleSource};
use crate::parallel::{ParallelBackend, ParallelContext, ReduceOp};
use crate::{Error, Result};

/// The loss of one micro-batch: what a training job optimizes.
///
/// The GPT step is next-token cross-entropy; a user can supply another loss, such as one
/// that up-weights chosen tokens.
pub trait TrainStep<B: AutodiffBackend, M>: Sync {
    /// The mean loss over the micro-batch's tokens, as a one-element tensor.
    fn loss(&self, model: &M, samples: &[GptSample], device: &B::Device) -> Tensor<B, 1>;
}

/// What the engine must know about a model's parameters under tensor parallelism.
pub trait ParallelParams {
    /// Replicated parameters whose gradient each rank computes only for its sequence chunk
    /// (norms under sequence parallelism): summed over the tensor-parallel group.
    fn sequence_parallel_params(&self) -> HashSet<ParamId>;
    /// Parameters split across the tensor-parallel group. All others are replicated and
    /// count once in the gradient norm.
    fn tensor_parallel_params(&self) -> HashSet<ParamId>;
    /// Switches stochastic layers (dropout) on for training, off for evaluation.
    fn set_training(&self, _training: bool) {}
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
}

impl StepRecord {
    /// The record as one JSON line.
    pub fn to_json(&self) -> String {
        let eval = self
            .eval_loss
            .map(|loss| format!(", \"eval_loss\": {loss}, \"eval_ppl\": {}", loss.exp()))
            .unwrap_or_default();
        format!(
            "{{\"step\": {}, \"loss\": {}, \"lr\": {}, \"grad_norm\": {}, \"tokens_per_s\": {:.1}{eval}}}",
            self.step, self.loss, self.lr, self.grad_norm, self.tokens_per_s
        )
    }
}

/// Trains `model` for `config.steps` optimizer steps on this rank's share of
/// `train_data`, and returns the model and a record of every step (the same on every
/// rank).
///
/// # Errors
///
/// When the batch sizes do not fit the layout, the data runs out, a collective fails, or
/// the metrics file cannot be written.
#[allow(clippy::too_many_arguments)]
pub fn train<B, M, S>(
    ctx: &ParallelContext,
    mut model: M,
    step: &S,
    train_data: &dyn SampleSource,
    valid_data: Option<&dyn SampleSource>,
    config: &TrainConfig,
    device: &B::Device,
) -> Result<(M, Vec<StepRecord>)>
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
    M: AutodiffModule<B> + ParallelParams,
    S: TrainStep<B, M>,
{
    let micro_batches = config.micro_batches(ctx.layout().data())?;
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
    let logging = ctx.rank() == ctx.layout().logging_rank();
    let mut sampler = MicroBatchSampler::new(
        train_data.len(),
        0,
        config.micro_batch_size,
        coords.dp,
        ctx.layout().data(),
    )?;
    let mut optimizer = AdamWConfig::new()
        .with_beta_1(config.adam_beta1 as f32)
        .with_beta_2(config.adam_beta2 as f32)
        .with_epsilon(config.adam_eps as f32)
        .with_weight_decay(config.weight_decay as f32)
        .init::<B, M>();
    let sequence_parallel = model.sequence_parallel_params();
    let tensor_parallel = model.tensor_parallel_params();
    let mut metrics = match (&config.metrics, logging) {
        (Some(path), true) => Some(std::fs::File::create(path).map_err(|e| Error::io(path, e))?),
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
            ctx.layout().data(),
            config.global_batch_size * config.seq_length,
            ctx.layout()
        );
        print_line(&progress, line);
    }

    let mut records = Vec::with_capacity(config.steps);
    for index in 1..=config.steps {
        model.set_training(true);
        let started = Instant::now();
        let mut gradients = GradientsParams::new();
        let mut loss_sum = 0.0;
        for _ in 0..micro_batches {
            let range = sampler.next_micro_batch().ok_or_else(|| {
                Error::InvalidConfig("the training data ran out of samples".to_string())
            })?;
            let samples = range
                .map(|i| train_data.get(i))
                .collect::<Result<Vec<_>>>()?;
            let loss = step.loss(&model, &samples, device);
            loss_sum += loss.clone().into_scalar().elem::<f64>();
            let grads = (loss / micro_batches as f64).backward();
            let mut micro = GradientsParams::from_grads(grads, &model);
            model.visit(&mut Accumulate::<B> {
                total: &mut gradients,
                new: &mut micro,
                _backend: std::marker::PhantomData,
            });
        }
        let mut reduce = ReduceGradients::<B> {
            grads: &mut gradients,
            ctx,
            sequence_parallel: &sequence_parallel,
            tensor_parallel: &tensor_parallel,
            norm_squared: 0.0,
            error: None,
            _backend: std::marker::PhantomData,
        };
        model.visit(&mut reduce);
        if let Some(error) = reduce.error {
            return Err(error);
        }
        let grad_norm = global_norm::<B>(ctx, reduce.norm_squared, device)?;
        if config.clip_grad > 0.0 {
            let coefficient = config.clip_grad / (grad_norm + 1e-6);
            if coefficient < 1.0 {
                model.visit(&mut Scale::<B> {
                    grads: &mut gradients,
                    factor: coefficient,
                    _backend: std::marker::PhantomData,
                });
            }
        }
        let lr = config.schedule.lr(index);
        model = optimizer.step(lr, model, gradients);
        let loss = mean_over_data_parallel::<B>(ctx, loss_sum / micro_batches as f64, device)?;
        let seconds = started.elapsed().as_secs_f64();

        let evaluate = valid_data.is_some()
            && ((config.eval_interval > 0 && index % config.eval_interval == 0)
                || index == config.steps);
        model.set_training(false);
        let eval_loss = match (evaluate, valid_data) {
            (true, Some(valid)) => Some(evaluate_loss(ctx, &model, step, valid, config, device)?),
            _ => None,
        };
        let record = StepRecord {
            step: index,
            loss,
            lr,
            grad_norm,
            tokens_per_s: (config.global_batch_size * config.seq_length) as f64 / seconds,
            eval_loss,
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
    }
    if let Some(bar) = progress {
        bar.finish_and_clear();
    }
    Ok((model, records))
}

/// The mean loss over `eval_iters` micro-batches of validation data per data-parallel
/// rank, averaged over the ranks.
fn evaluate_loss<B, M, S>(
    ctx: &ParallelContext,
    model: &M,
    step: &S,
    valid: &dyn SampleSource,
    config: &TrainConfig,
    device: &B::Device,
) -> Result<f64>
where
    B: AutodiffBackend + ParallelBackend,
    B::InnerBackend: ParallelBackend,
    S: TrainStep<B, M>,
{
    let mut sampler = MicroBatchSampler::new(
        valid.len(),
        0,
        config.micro_batch_size,
        ctx.coords().dp,
        ctx.layout().data(),
    )?;
    let mut total = 0.0;
    let mut count = 0;
    for _ in 0..config.eval_iters.max(1) {
        let Some(range) = sampler.next_micro_batch() else {
            break;
        };
        let samples = range.map(|i| valid.get(i)).collect::<Result<Vec<_>>>()?;
        total += step
            .loss(model, &samples, device)
            .into_scalar()
            .elem::<f64>();
        count += 1;
    }
    if count == 0 {
        return Err(Error::InvalidConfig(format!(
            "the validation data has {} samples, fewer than one micro-batch per data-parallel rank",
            valid.len()
        )));
    }
    mean_over_data_parallel::<B>(ctx, total / count as f64, device)
}

fn mean_over_data_parallel<B>(ctx: &ParallelContext, value: f64, device: &B::Device) -> Result<f64>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    let tensor = Tensor::<B::InnerBackend, 1>::from_floats([value as f32], device);
    let mean = ctx.data().all_reduce(tensor, ReduceOp::Mean)?;
    Ok(mean.into_scalar().elem::<f64>())
}

/// The global gradient norm from this rank's sum of squares (split parameters on every
/// tensor-parallel rank, replicated ones on the first), summed over the group.
fn global_norm<B>(ctx: &ParallelContext, norm_squared: f64, device: &B::Device) -> Result<f64>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    let tensor = Tensor::<B::InnerBackend, 1>::from_floats([norm_squared as f32], device);
    let total = ctx.tensor().all_reduce(tensor, ReduceOp::Sum)?;
    Ok(total.into_scalar().elem::<f64>().sqrt())
}

/// Adds a micro-batch's gradients to the step's.
struct Accumulate<'a, B: AutodiffBackend> {
    total: &'a mut GradientsParams,
    new: &'a mut GradientsParams,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Accumulate<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        let Some(grad) = self.new.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let sum = match self.total.remove::<B::InnerBackend, D>(param.id) {
            Some(previous) => previous + grad,
            None => grad,
        };
        self.total.register(param.id, sum);
    }
}

/// Sums sequence-parallel gradients over the tensor-parallel group, averages every
/// gradient over the data-parallel group, and adds up the squares for the norm.
struct ReduceGradients<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    ctx: &'a ParallelContext,
    sequence_parallel: &'a HashSet<ParamId>,
    tensor_parallel: &'a HashSet<ParamId>,
    norm_squared: f64,
    error: Option<Error>,
    _backend: std::marker::PhantomData<B>,
}

impl<B> ModuleVisitor<B> for ReduceGradients<'_, B>
where
    B: AutodiffBackend,
    B::InnerBackend: ParallelBackend,
{
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if self.error.is_some() {
            return;
        }
        let Some(mut grad) = self.grads.remove::<B::InnerBackend, D>(param.id) else {
            return;
        };
        let reduced = (|| {
            if self.sequence_parallel.contains(&param.id) {
                grad = self.ctx.tensor().all_reduce(grad, ReduceOp::Sum)?;
            }
            if self.ctx.data().size() > 1 {
                grad = self.ctx.data().all_reduce(grad, ReduceOp::Mean)?;
            }
            Ok::<_, Error>(grad)
        })();
        match reduced {
            Ok(grad) => {
                if self.tensor_parallel.contains(&param.id) || self.ctx.coords().tp == 0 {
                    self.norm_squared += grad
                        .clone()
                        .powi_scalar(2)
                        .sum()
                        .into_scalar()
                        .elem::<f64>();
                }
                self.grads.register(param.id, grad);
            }
            Err(error) => self.error = Some(error),
        }
    }
}

/// Multiplies every gradient by `factor` (clipping).
struct Scale<'a, B: AutodiffBackend> {
    grads: &'a mut GradientsParams,
    factor: f64,
    _backend: std::marker::PhantomData<B>,
}

impl<B: AutodiffBackend> ModuleVisitor<B> for Scale<'_, B> {
    fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<B, D>>) {
        if let Some(grad) = self.grads.remove::<B::InnerBackend, D>(param.id) {
            self.grads.register(param.id, grad * self.factor);
        }
    }
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
